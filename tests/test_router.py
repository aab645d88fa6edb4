"""The router from hidden states (dmoe_triton/router.py, kernels/router.py) against the reference:
the fp32 logits GEMM within its rounding bound, and the routing exact where the sums are exact
(ties everywhere), windows and padding included."""
import pytest
import torch
from hypothesis import given, strategies as st

from dmoe_triton import RouterConfig, RoutingPolicy, launch, route
from dmoe_triton.launch import RouterLaunch, router_launch
from dmoe_triton.reference import block_votes, scores, sort_desc
from dmoe_triton.router import route_hidden, router_logits

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS32 = torch.finfo(torch.float32).eps


def router_launches():
    # split_k: shares of the hidden columns summed apart, then in split order (3: uneven
    # shares; 8 at H = 17: splits with no column at all)
    return st.builds(RouterLaunch, block_t=st.sampled_from([1, 4, 32]),
                     block_e=st.sampled_from([1, 4, 16]), block_k=st.sampled_from([4, 16, 64]),
                     split_k=st.sampled_from([1, 2, 3, 8]))


@given(T=st.sampled_from([1, 5, 33]), H=st.sampled_from([1, 17, 64, 100]),
       E=st.sampled_from([3, 12, 64]), dtype=st.sampled_from([torch.float32, torch.float16]),
       transposed=st.booleans(), shapes=router_launches(), seed=st.integers(0, 2**31 - 1))
def test_logits_within_the_fp32_rounding_bound(T, H, E, dtype, transposed, shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    if transposed:  # a view with a row stride != H
        hidden = torch.randn(H + 3, T, generator=gen).to(dtype)[:H].T
    weight = torch.randn(E, H, generator=gen)
    out = torch.full((T, E), float("nan"))
    with launch.override(router=shapes):
        got = router_logits(hidden.to(DEVICE), weight.to(DEVICE), out.to(DEVICE)).cpu()
    exact = hidden.double() @ weight.double().T
    bound = H * EPS32 * (hidden.double().abs() @ weight.double().abs().T) + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()


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
       windows=st.booleans(), use_kernel=st.booleans(), split_k=st.sampled_from([1, 4]),
       seed=st.integers(0, 2**31 - 1))
def test_exact_sums_route_exactly_as_the_reference(policy, S, L, windows, use_kernel, split_k,
                                                   seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = RouterConfig(32, 4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    hidden = dyadic(gen, (S, L, 24), 4, torch.float16)
    weight = dyadic(gen, (32, 24), 8, torch.float32)
    bias = dyadic(gen, (32,), 64, torch.float32)
    first_position = torch.randint(-5, 40, (S,), generator=gen) if windows else None
    row_valid = torch.rand(S, L, generator=gen) > 0.2 if windows else None
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    gemm = RouterLaunch(block_k=4, split_k=split_k, use_kernel=use_kernel)  # ours or torch's
    with launch.override(router=gemm):
        got = route_hidden(on(hidden), on(weight), on(bias), cfg, policy, "triton",
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


def test_router_launch_rule():
    one = router_launch(32, 256)
    assert (one.block_t, one.block_e) == (32, 4)  # 64 programs for one 32-row block
    many = router_launch(512, 256)
    assert many.block_t * many.block_e * many.block_k <= 8192
    assert 64 <= (512 // many.block_t) * (256 // many.block_e) <= 256
    assert router_launch(3, 5).block_e <= 8


@pytest.mark.parametrize("make, error, match", [
    (lambda: (torch.ones(2, 4, dtype=torch.int32), torch.ones(8, 4)), TypeError, "hidden"),
    (lambda: (torch.ones(2, 4), torch.ones(8, 4, dtype=torch.bfloat16)), TypeError, "gate_weight"),
    (lambda: (torch.ones(2, 4), torch.ones(8, 5)), ValueError, "gate_weight"),
    (lambda: (torch.ones(4), torch.ones(8, 4)), ValueError, "hidden"),
    (lambda: (torch.ones(0, 4), torch.ones(8, 4)), ValueError, "hidden"),
])
def test_bad_inputs_are_named(make, error, match):
    hidden, weight = make()
    cfg = RouterConfig(8, 2, n_group=2, topk_group=1)
    with pytest.raises(error, match=match):
        route_hidden(hidden, weight, None, cfg, RoutingPolicy.token(), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("policy", [RoutingPolicy.dmoe(), RoutingPolicy.token(),
                                    RoutingPolicy.capacity(48)])
def test_gpu_llada_router_replays_in_a_graph_and_matches_its_logits(policy):
    cfg = RouterConfig(256, 8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    hidden = torch.randn(1, 32, 2048, device="cuda").bfloat16()
    weight = torch.randn(256, 2048, device="cuda").bfloat16().float() * 0.02
    bias = torch.randn(256, device="cuda") * 0.01
    with launch.override(router=RouterLaunch(use_kernel=True)):
        eager = route_hidden(hidden, weight, bias, cfg, policy, "triton")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = route_hidden(hidden, weight, bias, cfg, policy, "triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.topk_ids, eager.topk_ids)
    assert torch.equal(captured.topk_weights, eager.topk_weights)
    # The kernel's logits: within the fp32 bound of the exact sum; routed exactly by them.
    logits = router_logits(hidden[0], weight, torch.empty(32, 256, device="cuda"))
    exact = hidden[0].double() @ weight.double().T
    bound = 2048 * EPS32 * (hidden[0].double().abs() @ weight.double().abs().T)
    assert ((logits.double() - exact).abs() <= bound).all()
    ref = route(logits[None], bias, cfg, policy, "reference")
    assert torch.equal(eager.topk_ids.sort(-1).values, ref.topk_ids.sort(-1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [4, 16, 64])
def test_gpu_split_router_logits_are_the_same_every_replay(split_k):
    """The split GEMM's shares are added by whichever program of a tile arrives last: the
    logits must be bitwise the same on every graph replay (a stale partial or a counter not
    reset by the memset would show here), within the fp32 bound of the exact sum."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(512, 2048, device="cuda", generator=gen).bfloat16()
    weight = torch.randn(256, 2048, device="cuda", generator=gen) * 0.02
    out = torch.full((512, 256), float("nan"), device="cuda")
    shape = RouterLaunch(block_t=32, block_e=8, block_k=32, split_k=split_k, use_kernel=True)
    first = router_logits(hidden, weight, out, shape).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        router_logits(hidden, weight, out, shape)
    for _ in range(20):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
    exact = hidden.double() @ weight.double().T
    bound = 2048 * EPS32 * (hidden.double().abs() @ weight.double().abs().T)
    assert ((first.double() - exact).abs() <= bound).all()
