"""The routing kernel against the reference (routing-spec.md), plus invariants and edge cases."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from dmoe_triton import RouterConfig, RoutingPolicy, launch, route
from dmoe_triton.launch import RouteLaunch
from dmoe_triton.reference import block_votes, scores, sort_desc

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
LLADA = RouterConfig(256, 8, n_group=8, topk_group=4, routed_scaling_factor=2.5)


# ---------------------------------------------------------------------------------------------
# helpers

def canonical(res):
    """Slot order is free: sort each row's slots by expert id."""
    order = torch.argsort(res.topk_ids.long(), dim=-1)
    return torch.gather(res.topk_ids, -1, order), torch.gather(res.topk_weights, -1, order)


def ambiguous_blocks(logits, bias, cfg, policy, ref_coreset):
    """Blocks whose coreset depends on rounding: the last vote the reference coreset keeps and
    the first it leaves out within 1e-6 of each other (relative to the block's largest vote;
    two exact zeros are exact in any order and tie by index, so they do not count), or for
    dMoE a cumulative vote mass within 1e-5 of top_p. Kernel and reference may add in
    different orders there; everywhere else they must agree exactly.
    logits [S, L, E]; ref_coreset bool [S, n_blocks, E] (the reference's)."""
    _, r, _ = scores(logits.double().cpu(), bias.double().cpu())
    L, bs = r.shape[-2], policy.block_size
    flags = []
    for q in range(r.shape[0]):
        row = []
        for b in range(-(-L // bs)):
            votes = block_votes(r[q, b * bs:(b + 1) * bs], cfg.top_k)
            v = votes[sort_desc(votes)]
            kept = int(ref_coreset[q, b].sum())
            near_edge = False
            if 0 < kept < v.numel():
                last, first_out = v[kept - 1], v[kept]
                near_edge = bool((last - first_out).abs()
                                 <= 1e-6 * v.abs().max().clamp(min=1e-30)) and bool(last != 0)
            if policy.kind == "dmoe":
                mass = torch.cumsum(v, 0)
                near_edge = near_edge or ((mass - policy.top_p).abs() < 1e-5).any().item()
            row.append(near_edge)
        flags.append(row)
    return torch.tensor(flags)


def assert_invariants(res, logits, bias, cfg, policy):
    ids, w = res.topk_ids.long().cpu(), res.topk_weights.cpu()
    E, k = cfg.num_experts, policy.slots(cfg)
    assert ids.shape[-1] == k and ids.dtype == torch.int64
    assert ((ids >= -1) & (ids < E)).all()
    empty = ids < 0
    assert (w[empty] == 0).all()
    filled_rows = (~empty).any(-1)
    sums = w.sum(-1)
    if k == 1:  # one slot is not normalised (routing.md step 3): the scaled sigmoid itself
        want = torch.sigmoid(logits.cpu().float()).gather(-1, ids.clamp(min=0))[..., 0]
        sums, filled_rows = sums / want, filled_rows & (want > 0)
    assert torch.allclose(sums[filled_rows], torch.full_like(sums[filled_rows],
                                                          cfg.routed_scaling_factor), atol=1e-5)
    for row in ids.reshape(-1, k):  # no expert twice in one token
        real = row[row >= 0]
        assert real.unique().numel() == real.numel()
    if not policy.is_block:
        return
    cs = res.coreset.cpu()
    L, bs = ids.shape[-2], policy.block_size
    for b in range(cs.shape[-2]):
        block_ids = ids[..., b * bs:(b + 1) * bs, :]
        member = torch.gather(cs[..., b, :], -1, block_ids.clamp(min=0).flatten(-2))
        assert (member | (block_ids < 0).flatten(-2)).all(), "a token left its block's coreset"
    sizes = cs.sum(-1)
    if policy.kind == "des_vote":
        assert (sizes == policy.size).all()
        return
    # dMoE: the coreset carries at least top_p of the block's vote mass, or it is the guard.
    _, r, _ = scores(logits.double().cpu().reshape(-1, L, E), bias.double().cpu())
    for q in range(r.shape[0]):
        for b in range(cs.shape[-2]):
            votes = block_votes(r[q, b * bs:(b + 1) * bs], cfg.top_k)
            mass = votes[cs.reshape(-1, cs.shape[-2], E)[q, b]].sum().item()
            size = int(sizes.reshape(-1, cs.shape[-2])[q, b])
            assert mass >= policy.top_p - 1e-5 or size == max(policy.guard, 1) or size == E


def compare(logits, bias, cfg, policy, shapes=None):
    """Kernel (launched with `shapes`, default: route_launch's) against the reference."""
    with launch.override(route=shapes):
        got = route(logits, bias, cfg, policy, backend="triton")
    ref = route(logits.cpu(), bias.cpu(), cfg, policy, backend="reference")
    assert_invariants(got, logits, bias, cfg, policy)
    ok_rows = torch.ones(logits.shape[:-1], dtype=torch.bool)
    if policy.is_block:
        amb = ambiguous_blocks(logits.reshape(-1, *logits.shape[-2:]), bias, cfg, policy,
                               ref.coreset.reshape(-1, *ref.coreset.shape[-2:]))
        amb = amb.reshape(*logits.shape[:-2], -1)
        same = (got.coreset.cpu() == ref.coreset).all(-1)
        assert (same | amb).all(), "coreset differs from the reference away from any rounding edge"
        ok_rows = same.repeat_interleave(policy.block_size, dim=-1)[..., : logits.shape[-2]]
    gi, gw = canonical(got)
    ri, rw = canonical(ref)
    assert torch.equal(gi.cpu()[ok_rows], ri[ok_rows])
    torch.testing.assert_close(gw.cpu()[ok_rows], rw[ok_rows], atol=1e-5, rtol=1e-5)
    return got


# ---------------------------------------------------------------------------------------------
# strategies

@st.composite
def router_configs(draw):
    n_group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    group_size = draw(st.sampled_from([2, 3, 5, 8, 16, 32]))
    E = n_group * group_size
    if E < 4:
        group_size, E = 4, 4 * n_group
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(E, topk_group * group_size, 10)))
    scale = draw(st.sampled_from([1.0, 2.5]))
    return RouterConfig(E, top_k, n_group, topk_group, scale)


@st.composite
def policies(draw, E):
    kind = draw(st.sampled_from(["token", "dmoe", "dmoe", "des_vote", "topk_cap"]))
    block_size = draw(st.sampled_from([1, 7, 16, 32]))
    if kind == "dmoe":
        top_p = draw(st.floats(0.01, 1.0))
        return RoutingPolicy.dmoe(top_p=top_p, guard=draw(st.integers(0, E)), block_size=block_size)
    if kind == "des_vote":
        return RoutingPolicy.des_vote(size=draw(st.integers(1, E)), block_size=block_size)
    if kind == "topk_cap":
        return RoutingPolicy.topk_cap(k=draw(st.integers(1, min(E, 8))))
    return RoutingPolicy.token()


def route_launches():
    """Launch shapes of the routing kernels: the default and the sweep's neighbours, the votes
    in the coreset program or split over several (block_votes_kernel; 3 parts leave uneven and
    empty parts in blocks of 7 and 16 rows). The result must not depend on them; under the
    interpreter, more rows per program also run faster."""
    return st.builds(RouteLaunch, route_rows=st.sampled_from([1, 4, 32]),
                     vote_rows=st.sampled_from([4, 16, 32]),
                     vote_split=st.sampled_from([1, 3, 8, 32]))


@st.composite
def logits_for(draw, E):
    S = draw(st.integers(1, 2))
    L = draw(st.sampled_from([1, 5, 33, 70]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    style = draw(st.sampled_from(["normal", "ties", "skewed"]))
    x = torch.randn(S, L, E, generator=gen) * 2
    if style == "ties":  # few distinct values: exercises every tie rule
        x = torch.round(x)
    elif style == "skewed":  # a few popular experts, like a trained router
        x = x + 4 * torch.randn(E, generator=gen).clamp(min=0)
    bias = torch.randn(E, generator=gen) * draw(st.sampled_from([0.0, 0.01, 0.3]))
    return x.to(DEVICE), bias.to(DEVICE)


# ---------------------------------------------------------------------------------------------
# kernel == reference

@given(st.data())
def test_kernel_matches_reference(data):
    cfg = data.draw(router_configs())
    policy = data.draw(policies(cfg.num_experts))
    logits, bias = data.draw(logits_for(cfg.num_experts))
    compare(logits, bias, cfg, policy, data.draw(route_launches()))


@given(st.data())
def test_llada_shape_matches_reference(data):
    policy = data.draw(st.sampled_from([RoutingPolicy.dmoe(), RoutingPolicy.dmoe(0.5, 0),
                                        RoutingPolicy.token(), RoutingPolicy.des_vote(38),
                                        RoutingPolicy.topk_cap(4)]))
    logits, bias = data.draw(logits_for(256))
    compare(logits, bias, LLADA, policy, data.draw(route_launches()))


# ---------------------------------------------------------------------------------------------
# agreement with the dMoE authors' gate, written from the spec's description

def authors_gate(logits, bias, cfg, policy):
    """The authors' block_experts_select + group_limited_topk, as the spec describes them:
    coreset as ours; a group scores the sum of its two largest coreset-masked values (-inf if it
    has fewer than two); torch.topk picks groups, then experts."""
    ref = route(logits, bias, cfg, policy, backend="reference")
    s, r, _ = scores(logits, bias)
    S, L, E = r.shape
    bs = policy.block_size
    cand = ref.coreset.repeat_interleave(bs, dim=1)[:, :L]
    masked = torch.where(cand, r, torch.tensor(float("-inf")))
    grouped = masked.view(S, L, cfg.n_group, cfg.group_size)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)
    groups = group_score.topk(cfg.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, groups, True)
    masked = torch.where(keep.repeat_interleave(cfg.group_size, -1), masked,
                         torch.tensor(float("-inf")))
    ids = masked.topk(cfg.top_k, dim=-1).indices
    w = s.gather(-1, ids)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    well_posed = ((cand.view(S, L, cfg.n_group, -1).sum(-1) >= 2).sum(-1) >= cfg.topk_group)
    return ids, w, well_posed


@given(seed=st.integers(0, 2**31 - 1), skew=st.sampled_from([0.0, 1.0, 2.0]))
def test_agrees_with_authors_gate(seed, skew):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 40, 256, generator=gen) + skew * torch.randn(256, generator=gen).clamp(min=0)
    bias = torch.randn(256, generator=gen) * 0.01
    policy = RoutingPolicy.dmoe(top_p=0.6, guard=16, block_size=32)
    ids, w, well_posed = authors_gate(logits, bias, LLADA, policy)
    # A block's rows in one program: the interpreter's cost is per program, and the launch
    # shape cannot change the result (test_kernel_matches_reference draws shapes to show it).
    with launch.override(route=None if HAS_CUDA else RouteLaunch(route_rows=32)):
        got = route(logits.to(DEVICE), bias.to(DEVICE), LLADA, policy, backend="triton")
    got_ids, got_w = canonical(got)
    order = torch.argsort(ids, -1)
    ids, w = ids.gather(-1, order), w.gather(-1, order)
    rows = well_posed & (got.topk_ids.cpu() >= 0).all(-1)
    assert rows.sum() >= 8, "the test must compare some well-posed rows"
    assert torch.equal(got_ids.cpu().long()[rows], ids[rows])
    torch.testing.assert_close(got_w.cpu()[rows], w[rows], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# edge cases

def _route_both(logits, bias, cfg, policy):
    return compare(logits.to(DEVICE), bias.to(DEVICE), cfg, policy)


def test_all_equal_logits_break_ties_to_lower_index():
    cfg = RouterConfig(32, 4, n_group=4, topk_group=2)
    got = _route_both(torch.zeros(1, 5, 32), torch.zeros(32), cfg, RoutingPolicy.dmoe(0.6, 0, 32))
    # Every token's plain top-4 is experts 0-3 with equal votes 1/4: the cumulative mass 0.25, 0.5
    # stays within top_p 0.6, expert 2 is the first past it; expert 3 is out. The fourth slot has
    # no candidate left, so it is empty rather than escaping the coreset.
    assert got.coreset.cpu()[0, 0].nonzero().flatten().tolist() == [0, 1, 2]
    assert sorted(got.topk_ids.cpu()[0, 0].tolist()) == [-1, 0, 1, 2]


def test_cumulative_mass_equal_to_top_p_is_kept():
    cfg = RouterConfig(32, 4, n_group=4, topk_group=2)
    # Equal votes of exactly 1/4: the cumulative mass hits 0.5 exactly at expert 1, which is kept
    # ("<= top_p"), and expert 2 is the first past it.
    got = route(torch.zeros(1, 5, 32, device=DEVICE), None, cfg, RoutingPolicy.dmoe(0.5, 0, 32),
                backend="triton")
    assert got.coreset.cpu()[0, 0].nonzero().flatten().tolist() == [0, 1, 2]


def test_one_expert_dominating_gives_a_coreset_of_one_then_guard():
    cfg = RouterConfig(16, 2, n_group=4, topk_group=2)
    logits = torch.full((1, 8, 16), -8.0)
    logits[..., 5] = 8.0
    got = _route_both(logits, torch.zeros(16), cfg, RoutingPolicy.dmoe(0.5, 0, 8))
    assert got.coreset.cpu().sum().item() == 1
    assert (got.topk_ids.cpu()[..., 0] == 5).all() and (got.topk_ids.cpu()[..., 1] == -1).all()
    assert torch.allclose(got.topk_weights.cpu()[..., 0], torch.ones(1, 8))
    guarded = _route_both(logits, torch.zeros(16), cfg, RoutingPolicy.dmoe(0.5, 6, 8))
    assert guarded.coreset.cpu().sum().item() == 6


def test_bias_much_larger_than_scores_ranks_but_does_not_weigh():
    cfg = RouterConfig(16, 2, n_group=2, topk_group=1)
    logits = torch.randn(1, 9, 16)
    bias = torch.zeros(16)
    bias[3], bias[12] = 100.0, 50.0  # different groups: only one group survives
    got = _route_both(logits, bias, cfg, RoutingPolicy.token())
    ids = got.topk_ids.cpu()
    assert (ids[..., 0] == 3).all() and (ids[..., 1] < 8).all()  # expert 3 and its group
    s = torch.sigmoid(logits)
    w0 = s[..., 3] / (s[..., 3] + s.gather(-1, ids[..., 1:].long())[..., 0])
    torch.testing.assert_close(got.topk_weights.cpu()[..., 0], w0)


def test_top_p_one_is_token_routing_and_a_single_token_block_votes_alone():
    cfg = RouterConfig(64, 8, n_group=8, topk_group=4)
    logits = torch.randn(1, 33, 64)
    got = _route_both(logits, torch.zeros(64), cfg, RoutingPolicy.dmoe(1.0, 0, 32))
    assert got.coreset.cpu().all()  # every cumulative sum is <= 1 in exact arithmetic
    token = _route_both(logits, torch.zeros(64), cfg, RoutingPolicy.token())
    assert torch.equal(got.topk_ids, token.topk_ids)
    # The last block holds one token: at top_p 0.99 its coreset is its own top-8 minus the tail
    # that exceeds 0.99, i.e. at most 8 experts, all among that token's top-8.
    one = _route_both(logits, torch.zeros(64), cfg, RoutingPolicy.dmoe(0.99, 0, 32))
    own = set(torch.sigmoid(logits[0, 32]).topk(8).indices.tolist())
    assert set(one.coreset.cpu()[0, 1].nonzero().flatten().tolist()) <= own


def test_guard_larger_than_top_p_set_and_topk_cap_of_all_experts():
    cfg = RouterConfig(24, 3, n_group=3, topk_group=3)
    logits = torch.randn(2, 12, 24) * 3
    got = _route_both(logits, torch.zeros(24), cfg, RoutingPolicy.dmoe(0.2, 20, 4))
    assert (got.coreset.cpu().sum(-1) == 20).all()
    cap = _route_both(logits, torch.zeros(24), cfg, RoutingPolicy.topk_cap(24))
    assert (cap.topk_ids.cpu() >= 0).all()
    narrow = RouterConfig(24, 3, n_group=3, topk_group=1)
    capped = _route_both(logits, torch.zeros(24), narrow, RoutingPolicy.topk_cap(12))
    # only one group of 8 experts is kept: slots 9-12 stay empty instead of escaping
    assert ((capped.topk_ids.cpu() >= 0).sum(-1) == 8).all()


def test_nan_logits_poison_their_token_only_and_inf_is_legal():
    cfg = RouterConfig(16, 4, n_group=4, topk_group=4)
    logits = torch.randn(1, 6, 16)
    logits[0, 2, 7] = float("nan")
    logits[0, 4, 1] = float("inf")
    logits[0, 4, 2] = float("-inf")
    for policy in (RoutingPolicy.token(), RoutingPolicy.dmoe(0.6, 4, 6)):
        for backend in ("triton", "reference"):
            res = route(logits.to(DEVICE), torch.zeros(16, device=DEVICE), cfg, policy,
                        backend=backend)
            w, ids = res.topk_weights.cpu(), res.topk_ids.cpu()
            assert torch.isnan(w[0, 2]).all()
            assert not torch.isnan(w[0, [0, 1, 3, 4, 5]]).any()
            assert ((ids >= -1) & (ids < 16)).all() and 7 not in ids[0, 2].tolist()
            assert 2 not in ids[0, 4].tolist()  # sigmoid(-inf) = 0 never beats a finite score
            if policy.kind == "token":  # sigmoid(+inf) = 1 is every token's best
                assert 1 in ids[0, 4].tolist()


def test_blocks_never_span_sequences():
    cfg = RouterConfig(32, 4, n_group=4, topk_group=2)
    logits = torch.randn(3, 10, 32)
    policy = RoutingPolicy.dmoe(0.6, 0, 4)
    together = route(logits.to(DEVICE), None, cfg, policy, backend="triton")
    for q in range(3):
        alone = route(logits[q:q + 1].to(DEVICE), None, cfg, policy, backend="triton")
        assert torch.equal(alone.coreset[0], together.coreset[q])
        assert torch.equal(alone.topk_ids[0], together.topk_ids[q])
    assert together.coreset.shape == (3, 3, 32)


# ---------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=30, top_k=2, n_group=4, topk_group=2), "divisible by n_group"),
    (dict(num_experts=8, top_k=2, n_group=8, topk_group=2), "two experts per group"),
    (dict(num_experts=16, top_k=9, n_group=4, topk_group=2), "must be >= top_k"),
    (dict(num_experts=16, top_k=0), "top_k"),
    (dict(num_experts=16, top_k=2, n_group=4, topk_group=5), "topk_group"),
    (dict(num_experts=16, top_k=2, routed_scaling_factor=0.0), "routed_scaling_factor"),
])
def test_bad_router_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: RoutingPolicy.dmoe(top_p=0.0), "top_p"),
    (lambda: RoutingPolicy.dmoe(top_p=1.5), "top_p"),
    (lambda: RoutingPolicy.dmoe(guard=-1), "guard"),
    (lambda: RoutingPolicy.dmoe(block_size=0), "block_size"),
    (lambda: RoutingPolicy.des_vote(size=0), "size"),
    (lambda: RoutingPolicy.topk_cap(k=0), "k must"),
])
def test_bad_policy(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make, match", [
    (lambda: RoutingPolicy.dmoe(top_p="0.6"), "top_p must be a float, got str"),
    (lambda: RoutingPolicy.dmoe(top_p=True), "top_p must be a float, got bool"),
    (lambda: RoutingPolicy.dmoe(guard=16.0), "guard must be an int, got float"),
])
def test_policy_parameter_of_the_wrong_type(make, match):
    with pytest.raises(TypeError, match=match):
        make()


@pytest.mark.parametrize("policy, match", [
    (RoutingPolicy.dmoe(guard=17), "guard"),
    (RoutingPolicy.des_vote(size=17), "size"),
    (RoutingPolicy.topk_cap(k=17), "k must"),
])
def test_policy_checked_against_the_number_of_experts(policy, match):
    cfg = RouterConfig(16, 2, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match=match):
        route(torch.randn(4, 16), None, cfg, policy, backend="reference")


def test_bad_tensors():
    cfg = RouterConfig(16, 2, n_group=4, topk_group=2)
    p = RoutingPolicy.token()
    with pytest.raises(TypeError, match="logits must be float32"):
        route(torch.randn(4, 16).half(), None, cfg, p)
    with pytest.raises(ValueError, match=r"logits must have shape \[\.\.\., L, 16\]"):
        route(torch.randn(4, 15), None, cfg, p)
    with pytest.raises(ValueError, match=r"logits must have shape"):
        route(torch.randn(16), None, cfg, p)
    with pytest.raises(ValueError, match="expert_bias must have shape"):
        route(torch.randn(4, 16), torch.zeros(15), cfg, p)
    with pytest.raises(TypeError, match="expert_bias must be float32"):
        route(torch.randn(4, 16), torch.zeros(16, dtype=torch.float64), cfg, p)
    with pytest.raises(ValueError, match="backend must be one of"):
        route(torch.randn(4, 16), None, cfg, p, backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU only

@pytest.mark.gpu
def test_route_replays_in_a_cuda_graph():
    logits = torch.randn(4, 32, 256, device="cuda")
    bias = torch.randn(256, device="cuda") * 0.01
    policy = RoutingPolicy.dmoe()
    eager = route(logits, bias, LLADA, policy, backend="triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = route(logits, bias, LLADA, policy, backend="triton")
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    fresh = route(logits, bias, LLADA, policy, backend="triton")
    assert not torch.equal(fresh.topk_ids, eager.topk_ids)
    assert torch.equal(captured.topk_ids, fresh.topk_ids)
    assert torch.equal(captured.coreset, fresh.coreset)
    assert torch.equal(captured.topk_weights, fresh.topk_weights)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden_dtype", [torch.bfloat16, torch.float32])
def test_gpu_router_from_hidden_states(hidden_dtype):
    # The router logits of a real layer: hidden (bf16 or fp32) @ gate.T in fp32.
    hidden = torch.randn(2, 64, 512, device="cuda").to(hidden_dtype)
    gate = (torch.randn(256, 512, device="cuda") / math.sqrt(512)).to(hidden_dtype)
    logits = hidden.float() @ gate.float().T
    for policy in (RoutingPolicy.dmoe(), RoutingPolicy.token(), RoutingPolicy.des_vote(38)):
        compare(logits, torch.randn(256, device="cuda") * 0.01, LLADA, policy)
