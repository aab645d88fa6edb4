"""Routing windows by absolute position (docs/routing.md, issue 11 item 3 / issue 12 item 3):
the same tokens route the same way with and without a KV cache, alone or batched, whatever
padding sits before them."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dmoe_triton import RouterConfig, RoutingPolicy, route
from dmoe_triton.testing import DEVICE

CFG = RouterConfig(num_experts=32, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
BLOCK_POLICIES = [RoutingPolicy.dmoe(0.6, 4, block_size=8), RoutingPolicy.des_vote(6, block_size=8)]
BACKENDS = ["reference", "triton"]


def on(t):
    return t.to(DEVICE)


def logits_of(S, L, seed):
    """On the GPU where there is one: backend "triton" needs CUDA tensors there (on the CPU the
    interpreter runs it); the window arguments go with them (on())."""
    g = torch.Generator().manual_seed(seed)
    skew = 2 * torch.randn(CFG.num_experts, generator=g).clamp(min=0)
    return (torch.randn(S, L, CFG.num_experts, generator=g) + skew).to(DEVICE)


def same(a, b):
    torch.testing.assert_close(a.topk_ids, b.topk_ids, rtol=0, atol=0)
    torch.testing.assert_close(a.topk_weights, b.topk_weights, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", BLOCK_POLICIES)
@given(L=st.integers(9, 40), cut=st.integers(1, 4), seed=st.integers(0, 99))
def test_cached_rows_route_as_in_the_full_forward(backend, policy, L, cut, seed):
    """A forward that starts after a cache of whole windows routes its rows as the full one."""
    start = min(cut * policy.block_size, L - 1) // policy.block_size * policy.block_size
    x = logits_of(1, L, seed)
    full = route(x, None, CFG, policy, backend)
    tail = route(x[:, start:], None, CFG, policy, backend,
                 first_position=on(torch.tensor([start])))
    assert torch.equal(tail.topk_ids, full.topk_ids[:, start:])
    assert torch.equal(tail.topk_weights, full.topk_weights[:, start:])
    first = start // policy.block_size
    n = tail.coreset.shape[1]
    assert torch.equal(tail.coreset[:, : full.coreset.shape[1] - first],
                       full.coreset[:, first: first + n])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", BLOCK_POLICIES)
@given(L=st.integers(1, 30), p0=st.integers(-20, 40), seed=st.integers(0, 99))
def test_a_shifted_forward_equals_padding_rows_that_never_vote(backend, policy, L, p0, seed):
    """Row i at absolute position p0 + i: the same as (p0 mod bs) padding rows before it, routed
    from the window boundary; padding rows (any logits) never change the real rows' routing."""
    bs = policy.block_size
    shift = p0 % bs
    x = logits_of(1, L, seed)
    shifted = route(x, None, CFG, policy, backend, first_position=on(torch.tensor([p0])))
    pads = logits_of(1, shift, seed + 1000) * 5
    padded_x = torch.cat((pads, x), dim=1)
    valid = on(torch.cat((torch.zeros(1, shift, dtype=torch.bool),
                          torch.ones(1, L, dtype=torch.bool)), 1))
    padded = route(padded_x, None, CFG, policy, backend, row_valid=valid)
    assert torch.equal(shifted.topk_ids, padded.topk_ids[:, shift:])
    assert torch.equal(shifted.topk_weights, padded.topk_weights[:, shift:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", BLOCK_POLICIES)
def test_batched_sequences_route_as_alone(backend, policy):
    x = logits_of(3, 21, 7)
    starts = on(torch.tensor([0, 5, 13]))
    valid = on(torch.rand(3, 21, generator=torch.Generator().manual_seed(3)) > 0.2)
    batched = route(x, None, CFG, policy, backend, first_position=starts, row_valid=valid)
    for q in range(3):
        alone = route(x[q:q + 1], None, CFG, policy, backend, first_position=starts[q:q + 1],
                      row_valid=valid[q:q + 1])
        assert torch.equal(batched.topk_ids[q], alone.topk_ids[0])
        assert torch.equal(batched.coreset[q], alone.coreset[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_of_padding_rows_takes_no_expert(backend):
    policy = BLOCK_POLICIES[0]
    x = logits_of(1, 24, 1)
    valid = on(torch.ones(1, 24, dtype=torch.bool))
    valid[:, 8:16] = False  # the whole second window is padding
    r = route(x, None, CFG, policy, backend, row_valid=valid)
    assert not r.coreset[0, 1].any()
    assert (r.topk_ids[0, 8:16] == -1).all() and (r.topk_weights[0, 8:16] == 0).all()
    assert (r.topk_ids[0, :8] >= 0).any(-1).all() and r.coreset[0, 0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_routing_ignores_windows(backend):
    x = logits_of(2, 12, 2)
    plain = route(x, None, CFG, RoutingPolicy.token(), backend)
    windowed = route(x, None, CFG, RoutingPolicy.token(), backend,
                     first_position=on(torch.tensor([3, 9])),
                     row_valid=on(torch.ones(2, 12, dtype=torch.bool)))
    same(plain, windowed)


@pytest.mark.parametrize("name, kwargs, error, needle", [
    ("shape", dict(first_position=torch.tensor([0, 1])), ValueError, "first_position"),
    ("dtype", dict(first_position=torch.tensor([0.0])), TypeError, "first_position"),
    ("valid shape", dict(row_valid=torch.ones(1, 5, dtype=torch.bool)), ValueError, "row_valid"),
    ("valid dtype", dict(row_valid=torch.ones(1, 8, dtype=torch.int32)), TypeError, "row_valid"),
    ("not a tensor", dict(first_position=[0]), TypeError, "first_position"),
])
def test_bad_window_arguments_are_named(name, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        route(logits_of(1, 8, 0), None, CFG, BLOCK_POLICIES[0], "reference", **kwargs)


@pytest.mark.parametrize("policy", BLOCK_POLICIES)
@given(S=st.integers(1, 3), L=st.integers(1, 26), seed=st.integers(0, 999))
def test_kernel_matches_reference_with_windows(policy, S, L, seed):
    g = torch.Generator().manual_seed(seed)
    x = logits_of(S, L, seed)
    first = on(torch.randint(-12, 40, (S,), generator=g))
    valid = on(torch.rand(S, L, generator=g) > 0.3)
    want = route(x, None, CFG, policy, "reference", first_position=first, row_valid=valid)
    got = route(x, None, CFG, policy, "triton", first_position=first, row_valid=valid)
    assert torch.equal(got.coreset, want.coreset)
    ids_got, order_got = got.topk_ids.sort(-1)
    ids_want, order_want = want.topk_ids.sort(-1)
    assert torch.equal(ids_got, ids_want)
    torch.testing.assert_close(got.topk_weights.gather(-1, order_got),
                               want.topk_weights.gather(-1, order_want), rtol=1e-6, atol=1e-6)
