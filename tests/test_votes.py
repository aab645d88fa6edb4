"""The coreset kernel's votes (kernels/routing.py _window_scores) where they hang on the tie rule:
each real row votes for its plain top-k of r = sigmoid(logit) + bias, ties to the lower expert,
and a -inf pick (a NaN score) casts no vote (docs/routing.md, dMoE coreset step 1).

Exact scores: logits of -inf, 0 or +inf give sigmoid 0, 1/2 or 1, and a bias in eighths keeps
every r, every vote sum and the normalising division exact in any order of addition, so the
DES-vote coreset (the top-`size` experts by votes, ties to the lower id) and the capacity
coreset must equal the reference's exactly: no rounding edge to excuse, and most rows tie at
their k-th value, within and across the vote tile's slices (RouteLaunch.vote_cols). NaN
logits rank as -inf: rows with fewer than k finite values, and whole NaN rows.
"""
import pytest
import torch
from hypothesis import given, strategies as st

from dmoe_triton import RouterConfig, RoutingPolicy, launch, route
from dmoe_triton.launch import RouteLaunch
from dmoe_triton.testing import DEVICE

NAN, INF = float("nan"), float("inf")
CONFIGS = [RouterConfig(256, 8, n_group=8, topk_group=4, routed_scaling_factor=2.5),
           RouterConfig(40, 6, n_group=4, topk_group=2),
           RouterConfig(12, 3, n_group=3, topk_group=2), RouterConfig(4, 4),
           RouterConfig(24, 10, n_group=2, topk_group=2),
           RouterConfig(64, 1, n_group=8, topk_group=4)]


def vote_launches():
    """Vote tiles from one expert per slice to the whole row in one slice, the votes in the
    coreset program or split over programs (block_votes_kernel); route_rows 32 keeps the
    interpreter's program count low (the picks are not under test)."""
    return st.builds(RouteLaunch, route_rows=st.just(32), vote_rows=st.sampled_from([4, 16, 32]),
                     vote_cols=st.sampled_from([1, 2, 8, 32, 256]),
                     vote_split=st.sampled_from([1, 5, 32]))


@st.composite
def exact_logits(draw, E):
    """Logits [S, L, E] of -inf, 0, +inf and NaN (some rows all NaN), bias [E] in eighths."""
    S, L = draw(st.integers(1, 2)), draw(st.sampled_from([1, 5, 32, 45]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    style = draw(st.sampled_from(["equal", "three", "few_finite"]))
    values = {"equal": [0.0], "three": [-INF, 0.0, INF], "few_finite": [0.0, INF, NAN, NAN, NAN,
                                                                         NAN, NAN, NAN]}[style]
    pick = torch.randint(len(values), (S, L, E), generator=gen)
    x = torch.tensor(values)[pick]
    x[torch.rand(S, L, generator=gen) < 0.1] = NAN  # whole NaN rows: no vote at all
    bias = torch.randint(-4, 5, (E,), generator=gen) / 8 * draw(st.sampled_from([0.0, 1.0]))
    return x, bias


def windows(S, L, data):
    """first_position and row_valid, or None: windows held in part, padding rows."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    first = torch.randint(-12, 40, (S,), generator=gen) if data.draw(st.booleans()) else None
    valid = torch.rand(S, L, generator=gen) > 0.3 if data.draw(st.booleans()) else None
    return first, valid


def assert_same_as_reference(x, bias, cfg, policy, shapes, first=None, valid=None):
    on = (lambda t: None if t is None else t.to(DEVICE))
    with launch.override(route=shapes):
        got = route(on(x), on(bias), cfg, policy, backend="triton", first_position=on(first),
                    row_valid=on(valid))
    want = route(x, bias, cfg, policy, backend="reference", first_position=first, row_valid=valid)
    assert torch.equal(got.coreset.cpu(), want.coreset), "coreset differs on exact scores"
    ids_got, order_got = got.topk_ids.cpu().sort(-1)
    ids_want, order_want = want.topk_ids.sort(-1)
    assert torch.equal(ids_got, ids_want)
    torch.testing.assert_close(got.topk_weights.cpu().gather(-1, order_got),
                               want.topk_weights.gather(-1, order_want), equal_nan=True)
    return got


@given(st.data())
def test_exact_ties_vote_as_the_reference(data):
    cfg = data.draw(st.sampled_from(CONFIGS))
    E = cfg.num_experts
    x, bias = data.draw(exact_logits(E))
    block_size = data.draw(st.sampled_from([1, 7, 16, 32]))
    policy = data.draw(st.one_of(
        st.builds(RoutingPolicy.des_vote, size=st.integers(1, E), block_size=st.just(block_size)),
        st.builds(RoutingPolicy.capacity, expert_capacity=st.integers(cfg.top_k, E),
                  block_size=st.just(block_size))))
    first, valid = windows(x.shape[0], x.shape[1], data)
    assert_same_as_reference(x, bias, cfg, policy, data.draw(vote_launches()), first, valid)


SHAPES = [RouteLaunch(route_rows=32, vote_cols=c, vote_split=split)
          for c in (1, 8, 64) for split in (1, 32)]


@pytest.mark.parametrize("shapes", SHAPES)
def test_ties_at_the_threshold_go_to_the_lowest_experts(shapes):
    # One row of 64 experts, top-4: six experts tie at r = 1 in four slices of 8 (3, 12, 20,
    # 33, 41, 60): its votes go to the four lowest (3, 12, 20, 33), so DES-vote of size 4 keeps
    # exactly them. Vote tiles of 1, 8 and 64 experts per slice put the ties in 1 to 6 slices.
    cfg = RouterConfig(64, 4, n_group=8, topk_group=4)
    x = torch.zeros(1, 1, 64)
    x[..., [3, 12, 20, 33, 41, 60]] = INF
    got = assert_same_as_reference(x, torch.zeros(64), cfg, RoutingPolicy.des_vote(4), shapes)
    assert got.coreset.cpu()[0, 0].nonzero().flatten().tolist() == [3, 12, 20, 33]
    # Two values above the tie: they vote, and the two lowest of the tied 0.5s fill the slots.
    x = torch.zeros(1, 1, 64)
    x[..., [5, 50]] = INF
    got = assert_same_as_reference(x, torch.zeros(64), cfg, RoutingPolicy.des_vote(4), shapes)
    assert got.coreset.cpu()[0, 0].nonzero().flatten().tolist() == [0, 1, 5, 50]


@pytest.mark.parametrize("shapes", SHAPES)
def test_rows_with_fewer_finite_scores_than_top_k_vote_for_those_only(shapes):
    # Top-4 of 16. Row 0 has two finite scores (r = 1 at expert 9, 1/2 at expert 7), row 1 is
    # all NaN, row 2 all equal (r = 1/2: it votes for experts 0-3). The -inf picks of rows 0
    # and 1 cast no vote, so only experts 0-3, 7 and 9 have votes (1/2 each, 9 twice that): at
    # top_p 0.99 without a guard the coreset is exactly them (7 is the first past top_p).
    cfg = RouterConfig(16, 4, n_group=4, topk_group=4)
    x = torch.full((1, 3, 16), NAN)
    x[0, 0, 7], x[0, 0, 9] = 0.0, INF
    x[0, 2] = 0.0
    got = assert_same_as_reference(x, torch.zeros(16), cfg, RoutingPolicy.dmoe(0.99, 0, 4), shapes)
    assert got.coreset.cpu()[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 7, 9]
    assert torch.isnan(got.topk_weights.cpu()[0, :2]).all()


@pytest.mark.parametrize("shapes", SHAPES[:2])
def test_a_window_of_nan_rows_ranks_its_experts_by_index(shapes):
    # No row votes (every score NaN): every vote is 0, so DES-vote keeps the lowest experts.
    cfg = RouterConfig(16, 4, n_group=4, topk_group=4)
    got = assert_same_as_reference(torch.full((1, 4, 16), NAN), torch.zeros(16), cfg,
                                   RoutingPolicy.des_vote(5, 4), shapes)
    assert got.coreset.cpu()[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("vote_split", [3, 5])
def test_capacity_scores_below_zero_keep_the_highest_experts(vote_split):
    # LLaDA2.2's capacity score is each expert's maximum r over the window. Every r here is
    # below 0 (logit -inf, bias -(12 - e)/8), so the highest are experts 8-11. The coreset
    # kernel takes the maximum over the vote programs' shares, loaded as a tile padded to a
    # power of two (3 or 5 parts -> 4 or 8): a pad of 0 instead of -inf would tie every expert
    # at 0 and keep experts 0-3.
    cfg = RouterConfig(12, 3)
    x = torch.full((1, 32, 12), -INF)
    bias = -(12 - torch.arange(12)) / 8
    shapes = RouteLaunch(route_rows=32, vote_cols=8, vote_split=vote_split)
    got = assert_same_as_reference(x, bias, cfg, RoutingPolicy.capacity(4, 32), shapes)
    assert got.coreset.cpu()[0, 0].nonzero().flatten().tolist() == [8, 9, 10, 11]
