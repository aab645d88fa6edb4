"""The router from hidden states (dmoe_triton/router.py) against the spec's fp32 GEMM.

The bf16 GEMM with fp32 output (skinny_gemm or cuBLAS's) routes exactly as the fp32 GEMM where
every partial sum is exact (ties and near-ties between experts included), and its logits stay
within LOGIT_TOL of the fp64 product on random inputs. DMoEBlock's bf16 gate copy exists only when
it holds the fp32 weight's numbers, is never saved, and follows every writer of gate_weight."""
import importlib

import pytest
import torch
from hypothesis import given, strategies as st

from dmoe_triton import RouterConfig, RoutingPolicy, patch_model, route
from dmoe_triton.calibrate import set_router_diversity, set_router_weights
from dmoe_triton.moe import DMoEBlock
from dmoe_triton.patch import Unpatched
from dmoe_triton.reference import block_votes, scores, sort_desc
from dmoe_triton.router import gate_logits, route_hidden, uses_bf16_gemm
from dmoe_triton.skinny import skinny_gemm
from dmoe_triton.testing import small_model

router_module = importlib.import_module("dmoe_triton.router")  # not the package's lazy names

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS32 = torch.finfo(torch.float32).eps
# A logit may be off the fp64 product by LOGIT_TOL eps32 x sum_k |x_k w_k|. Why 64: the worst
# case of an fp32 sum of H = 2048 terms in any order is ~H/2 = 1024 of those units, but no
# real GEMM comes near it; measured on the CPU (H = 2048, bf16 inputs): a sequential fp32 sum
# 0.9, chunks of 8 summed exactly then added with round-toward-zero (a tensor core's worst
# habit) 5.5, the logits rounded to bf16 2600. So 64 passes any fp32 accumulation with a 10x
# margin and fails a reduced-precision one by 40x.
LOGIT_TOL = 64
LLADA = RouterConfig(256, 8, n_group=8, topk_group=4, routed_scaling_factor=2.5)


def dyadic(gen, shape, scale, dtype):
    """Small multiples of 1/scale: every product and partial sum is exact in fp32, so any order
    of the GEMM's sum gives the same logits, and those logits tie a lot."""
    return (torch.randint(-3, 4, shape, generator=gen).float() / scale).to(dtype)


def uncertain_windows(logits, bias, cfg, policy, first_position, row_valid):
    """bool [S, n_windows]: windows whose coreset depends on rounding (a cumulative vote mass
    within 1e-5 of top_p, or two different votes within 1e-6 of each other): kernel and
    reference add votes in other orders there (docs/routing.md, ties)."""
    _, r, _ = scores(logits.double(), bias.double())
    S, L, _ = r.shape
    bs = policy.block_size
    fp = torch.zeros(S, dtype=torch.long) if first_position is None else first_position.long()
    n = -(-(L + (bs - 1 if first_position is not None else 0)) // bs)
    flags = torch.zeros(S, n, dtype=torch.bool)
    for s in range(S):
        slot = (fp[s] + torch.arange(L)) // bs - torch.div(fp[s], bs, rounding_mode="floor")
        for j in range(n):
            rows = (slot == j) & (row_valid[s] if row_valid is not None else True)
            if not rows.any() or policy.kind == "capacity":
                continue
            votes = block_votes(r[s, rows], cfg.top_k)
            v = votes[sort_desc(votes)]
            gap = (v[:-1] - v[1:]).abs()
            close = ((gap > 0) & (gap <= 1e-6)).any()  # equal votes tie exactly in both
            flags[s, j] = bool(close) or bool(((torch.cumsum(v, 0) - policy.top_p).abs()
                                               < 1e-5).any())
    return flags


POLICIES = [RoutingPolicy.token(), RoutingPolicy.dmoe(0.6, 4, 8), RoutingPolicy.dmoe(0.3, 0, 16),
            RoutingPolicy.des_vote(10, 8), RoutingPolicy.capacity(12, 8),
            RoutingPolicy.topk_cap(3)]


@given(policy=st.sampled_from(POLICIES), S=st.integers(1, 2), L=st.sampled_from([1, 9, 20]),
       windows=st.booleans(), hidden_dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       weight_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_exact_sums_route_exactly_as_the_reference(policy, S, L, windows, hidden_dtype,
                                                   weight_dtype, seed):
    """Both GEMMs (on the GPU: cuBLAS bf16 for bf16 hidden and weight; on the CPU the fp32
    fallback reading a bf16 weight) against the reference's fp32 GEMM of the fp32 weight."""
    gen = torch.Generator().manual_seed(seed)
    cfg = RouterConfig(32, 4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    hidden = dyadic(gen, (S, L, 24), 4, hidden_dtype)
    weight = dyadic(gen, (32, 24), 8, torch.float32)
    bias = dyadic(gen, (32,), 64, torch.float32)
    first_position = torch.randint(-5, 40, (S,), generator=gen) if windows else None
    row_valid = torch.rand(S, L, generator=gen) > 0.2 if windows else None
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    got = route_hidden(on(hidden), on(weight.to(weight_dtype)), on(bias), cfg, policy, "triton",
                       first_position=on(first_position), row_valid=on(row_valid))
    ref = route_hidden(hidden, weight, bias, cfg, policy, "reference",
                       first_position=first_position, row_valid=row_valid)
    ok = torch.ones(S, L, dtype=torch.bool)
    if policy.is_block:
        logits = hidden.float() @ weight.T
        sure = ~uncertain_windows(logits, bias, cfg, policy, first_position, row_valid)
        assert (got.coreset.cpu() == ref.coreset).all(-1)[sure].all()
        ok = torch.stack([sure[s][(torch.arange(L) + (0 if first_position is None else
                                   first_position[s] % policy.block_size)) // policy.block_size]
                          for s in range(S)])
    order_g = torch.argsort(got.topk_ids.cpu().long(), -1)
    order_r = torch.argsort(ref.topk_ids.long(), -1)
    ids_g, ids_r = got.topk_ids.cpu().gather(-1, order_g), ref.topk_ids.gather(-1, order_r)
    assert torch.equal(ids_g[ok], ids_r[ok])
    torch.testing.assert_close(got.topk_weights.cpu().gather(-1, order_g)[ok],
                               ref.topk_weights.gather(-1, order_r)[ok], atol=1e-6, rtol=1e-6)


def test_no_bf16_gemm_where_torch_has_none():
    """mm with out_dtype has no CPU kernel and no derivative: CPU tensors, fp16 hidden, an
    fp32 weight and autograd take the fp32 GEMM (on a GPU too), whose gradient flows."""
    hidden = torch.randn(2, 5, 16, device=DEVICE).bfloat16()
    weight = torch.randn(8, 16, device=DEVICE).bfloat16()
    assert uses_bf16_gemm(hidden, weight, "triton") == HAS_CUDA
    assert not uses_bf16_gemm(hidden, weight, "reference")
    assert not uses_bf16_gemm(hidden.half(), weight, "triton")
    assert not uses_bf16_gemm(hidden, weight.float(), "triton")
    hidden.requires_grad_()
    assert not uses_bf16_gemm(hidden, weight, "triton")
    logits = gate_logits(hidden, weight, "triton")
    logits.square().sum().backward()
    assert logits.dtype == torch.float32 and hidden.grad.abs().sum() > 0
    with torch.no_grad():
        assert uses_bf16_gemm(hidden, weight, "triton") == HAS_CUDA


@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.ones(2, 4, dtype=torch.int32), torch.ones(8, 4)), TypeError, "hidden"),
    (lambda: (torch.ones(2, 4), torch.ones(8, 4, dtype=torch.float16)), TypeError,
     "gate_weight must be float32 or bfloat16"),
    (lambda: (torch.ones(2, 4), torch.ones(8, 5)), ValueError, "gate_weight"),
    (lambda: (torch.ones(4), torch.ones(8, 4)), ValueError, "hidden"),
    (lambda: (torch.ones(0, 4), torch.ones(8, 4)), ValueError, "hidden"),
])
def test_bad_inputs_are_named(make, error, match):
    hidden, weight = make()
    cfg = RouterConfig(8, 2, n_group=2, topk_group=1)
    with pytest.raises(error, match=match):
        route_hidden(hidden, weight, None, cfg, RoutingPolicy.token(), "triton")


# ---------------------------------------------------------------------------------------------
# DMoEBlock's bf16 gate copy


def block_with_gate(weight: torch.Tensor) -> DMoEBlock:
    cfg = RouterConfig(8, 2, n_group=2, topk_group=1)
    gen = torch.Generator().manual_seed(0)
    w_gate_up = torch.randn(8, 12, weight.shape[1], generator=gen) * 0.1
    w_down = torch.randn(8, weight.shape[1], 6, generator=gen) * 0.1
    return DMoEBlock(cfg, RoutingPolicy.token(), weight, None, w_gate_up, w_down,
                     backend="reference")


def bf16_valued(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16().float()


def assert_copy_of(block: DMoEBlock) -> None:
    copy = block.gate_weight_bf16
    assert copy is not None and copy.dtype == torch.bfloat16
    assert torch.equal(copy.float(), block.gate_weight)


def test_block_keeps_a_bf16_gate_copy_only_when_exact_and_never_saves_it():
    block = block_with_gate(bf16_valued(8, 16))
    assert_copy_of(block)
    assert block.gate_weight.dtype == torch.float32
    assert "gate_weight_bf16" not in block.state_dict() and "gate_weight" in block.state_dict()
    hidden = torch.randn(1, 3, 16)
    assert block.gate_weight_for(hidden.bfloat16()) is block.gate_weight_bf16
    assert block.gate_weight_for(hidden) is block.gate_weight
    assert block.gate_weight_for(hidden.half()) is block.gate_weight
    inexact = bf16_valued(8, 16)
    inexact[3, 5] += inexact[3, 5].abs() * 2**-12  # one value off the bf16 grid
    assert block_with_gate(inexact).gate_weight_bf16 is None


def test_block_forward_routes_with_the_copy_for_bf16_hidden():
    block = block_with_gate(bf16_valued(8, 16)).to(torch.bfloat16)  # bf16 experts
    hidden = torch.randn(2, 6, 16).bfloat16()
    with torch.no_grad():
        block(hidden)
        want = block.last_route.topk_ids.clone()
        block.gate_weight_bf16.neg_()  # only the copy changes: the forward must see it
        block(hidden)
    assert not torch.equal(block.last_route.topk_ids, want)


def test_the_copy_follows_load_state_dict_and_dtype_moves():
    block = block_with_gate(bf16_valued(8, 16))
    copy = block.gate_weight_bf16
    block.load_state_dict({**block.state_dict(), "gate_weight": bf16_valued(8, 16, seed=1)})
    assert_copy_of(block)
    assert block.gate_weight_bf16.data_ptr() == copy.data_ptr()  # in place: graphs read it
    block.load_state_dict({**block.state_dict(), "gate_weight": torch.randn(8, 16)})
    assert block.gate_weight_bf16 is None
    block.load_state_dict({**block.state_dict(), "gate_weight": bf16_valued(8, 16, seed=2)})
    assert_copy_of(block)
    for move in (torch.float16, torch.float64, torch.bfloat16):
        block.to(move)
        assert_copy_of(block)


def test_the_copy_follows_calibration_and_the_unpatched_view():
    model = patch_model(small_model().to(torch.bfloat16), RoutingPolicy.token(),
                        backend="reference")
    blocks = [m for m in model.modules() if isinstance(m, DMoEBlock)]
    for block in blocks:
        assert_copy_of(block)
    base = [b.gate_weight.clone() for b in blocks]
    set_router_weights(model, [w.flip(0) for w in base])  # bf16-valued still: kept, refreshed
    for block, w in zip(blocks, base):
        assert_copy_of(block)
        assert torch.equal(block.gate_weight, w.flip(0))
    basis = [torch.linalg.qr(torch.randn(w.shape[1], 2)).Q.T for w in base]
    set_router_diversity(model, 0.5, base, basis)  # a bf16 gate is skewed into bf16 values
    for block, w in zip(blocks, base):
        assert_copy_of(block)
        assert block.gate_weight_bf16 is not None and not torch.equal(block.gate_weight, w)
    set_router_weights(model, [w * (1 + 2**-12) for w in base])  # not bf16-valued: fp32 GEMM
    assert all(b.gate_weight_bf16 is None for b in blocks)
    set_router_diversity(model, 0.0, base, basis)
    for block in blocks:
        assert_copy_of(block)
    with Unpatched(model) as plain, torch.no_grad():
        for layer in plain.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(2)  # the view's weight IS the block's gate_weight
    for block, w in zip(blocks, base):
        assert torch.equal(block.gate_weight, 2 * w)
        assert_copy_of(block)


# ---------------------------------------------------------------------------------------------
# The bf16 GEMM itself, skinny_gemm for up to SKINNY_MAX_ROWS (32) rows on Hopper, cuBLAS's
# beyond (on the CPU: the fp32 fallback where a test can run there)


def tie_inputs(rows: int, seed: int = 0):
    """(hidden bf16 [rows, 2048], the fp32 gate [256, 2048] holding bf16 values, bias fp32
    [256]), made on the CPU (the same numbers on every device) so that every product and
    partial sum is exact in fp32: multiples of 2**-10 below 2**16 in magnitude.

    Experts come in triples (3j, 3j+1, 3j+2) of the same gate row, except that 3j+2 has one
    more unit in column 0, where every token's hidden value is one unit: 3j and 3j+1 tie
    exactly (the lower id wins) and 3j+2 beats both by 2**-10 (a near-tie that bf16 logits
    would lose), under one bias per triple."""
    gen = torch.Generator().manual_seed(seed)
    unit = 2.0 ** -5
    hidden = torch.randint(-4, 5, (rows, 2048), generator=gen) * unit
    hidden[:, 0] = unit
    base = torch.randint(-4, 5, (86, 2048), generator=gen) * unit
    weight = base.repeat_interleave(3, 0)[:256].clone()
    weight[2::3, 0] += unit
    bias = (torch.randint(-8, 9, (86,), generator=gen) * 2.0 ** -8).repeat_interleave(3)[:256]
    return hidden.bfloat16(), weight.float(), bias.float()


@pytest.mark.parametrize("rows", [32, 64])
@pytest.mark.parametrize("policy", [RoutingPolicy.token(), RoutingPolicy.dmoe(),
                                    RoutingPolicy.capacity(48)])
def test_bf16_gate_routes_ties_and_near_ties_as_the_fp32_gemm(policy, rows):
    """On the GPU the bf16 GEMM (skinny_gemm at 32 rows, cuBLAS's at 64), on the CPU the fp32
    fallback reading the bf16 weight: the exact logits, so the fp32 GEMM's routing, bit for
    bit."""
    backend = "triton" if HAS_CUDA else "reference"  # the interpreter is slow at E = 256
    hidden, w32, bias = (t.to(DEVICE) for t in tie_inputs(rows))
    w16 = w32.bfloat16()
    assert uses_bf16_gemm(hidden, w16, "triton") == HAS_CUDA
    exact = (hidden.double() @ w32.double().T).float()  # exact: the sums are exact
    assert torch.equal(gate_logits(hidden, w16, backend), exact)
    assert torch.equal(gate_logits(hidden, w32, backend), exact)
    got = route_hidden(hidden[None], w16, bias, LLADA, policy, backend)
    want = route_hidden(hidden[None], w32, bias, LLADA, policy, backend)
    assert torch.equal(got.topk_ids, want.topk_ids)
    assert torch.equal(got.topk_weights, want.topk_weights)
    # The inputs decide something: the same routing of bf16-rounded logits differs.
    rounded = route(exact.bfloat16().float()[None], bias, LLADA, policy, backend)
    assert not torch.equal(rounded.topk_ids.sort(-1).values, got.topk_ids.sort(-1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, calls", [(1, 1), (32, 1), (33, 0), (512, 0)])
def test_gpu_gate_logits_takes_skinny_gemm_for_a_decode_step(monkeypatch, rows, calls):
    """gate_logits runs skinny_gemm for up to 32 bf16 rows on Hopper, cuBLAS beyond (its calls
    counted: both give the same logits up to the order of the fp32 sum, often bit for bit)."""
    seen = []

    def counted(*args):
        seen.append(args[0].shape[0])
        return skinny_gemm(*args)

    monkeypatch.setattr(router_module, "skinny_gemm", counted)
    hidden = torch.randn(rows, 2048, device="cuda").bfloat16()
    w16 = (torch.randn(256, 2048, device="cuda") * 0.02).bfloat16()
    gate_logits(hidden, w16, "triton")
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert seen == [rows] * (calls if hopper else 0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 2048), (32, 2048), (512, 2048), (2, 16, 2048)])
def test_gpu_bf16_gemm_logits_are_within_the_stated_tolerance(shape):
    gen = torch.Generator(device="cuda").manual_seed(shape[0])
    # hidden as a view with a row stride != H (torch.mm takes the strides or copies)
    hidden = torch.randn(*shape[:-1], shape[-1] + 8, device="cuda", generator=gen)
    hidden = hidden.bfloat16()[..., 3:3 + shape[-1]]
    w16 = (torch.randn(256, shape[-1], device="cuda", generator=gen) * 0.02).bfloat16()
    assert uses_bf16_gemm(hidden, w16, "triton")
    exact = hidden.double() @ w16.double().T
    bound = LOGIT_TOL * EPS32 * (hidden.double().abs() @ w16.double().abs().T)
    for weight in (w16, w16.float()):  # the bf16 GEMM, then the fp32 GEMM: the same bound
        logits = gate_logits(hidden, weight, "triton")
        assert logits.dtype == torch.float32 and logits.shape == exact.shape
        assert ((logits.double() - exact).abs() <= bound).all()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", [RoutingPolicy.dmoe(), RoutingPolicy.token(),
                                    RoutingPolicy.capacity(48)])
def test_gpu_bf16_router_replays_in_a_graph_as_eager(policy):
    hidden = torch.randn(1, 32, 2048, device="cuda").bfloat16()
    w16 = (torch.randn(256, 2048, device="cuda") * 0.02).bfloat16()
    bias = torch.randn(256, device="cuda") * 0.01
    eager = route_hidden(hidden, w16, bias, LLADA, policy, "triton")
    logits = gate_logits(hidden, w16, "triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = route_hidden(hidden, w16, bias, LLADA, policy, "triton")
        captured_logits = gate_logits(hidden, w16, "triton")
    for _ in range(3):
        captured.topk_ids.fill_(-7)  # poison: the replay must write every slot
        captured.topk_weights.fill_(float("nan"))
        captured_logits.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured.topk_ids, eager.topk_ids)
        assert torch.equal(captured.topk_weights, eager.topk_weights)
        assert torch.equal(captured_logits, logits)
