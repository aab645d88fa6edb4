"""LLaDA2.2's block routing, `RoutingPolicy.capacity` (issue 12 item 1; docs/routing.md and
../shared/docs/llada2-family.md): each window keeps the expert_capacity experts with the largest
maximum score over its real rows; tokens take a plain top-k inside them."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dmoe_triton import RouterConfig, RoutingPolicy, route
from dmoe_triton.reference import scores
from dmoe_triton.testing import DEVICE

CFG = RouterConfig(num_experts=32, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)


def logits_of(S, L, seed, E=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, L, E, generator=g) + 2 * torch.randn(E, generator=g).clamp(min=0)).to(DEVICE)


def test_the_rule_by_hand():
    """Window max over rows, top-C by it, plain top-k inside (groups not applied)."""
    x = logits_of(1, 8, 0)
    policy = RoutingPolicy.capacity(6, block_size=8)
    got = route(x, None, CFG, policy, "reference")
    s, r, _ = scores(x.cpu().double(), torch.zeros(32, dtype=torch.float64))
    allowed = torch.zeros(32, dtype=torch.bool)
    allowed[r[0].max(0).values.argsort(descending=True, stable=True)[:6]] = True
    assert torch.equal(got.coreset[0, 0].cpu(), allowed)
    want = torch.where(allowed, r[0], float("-inf")).topk(4, dim=-1).indices
    assert torch.equal(got.topk_ids[0].cpu().sort(-1).values, want.sort(-1).values.int())
    w = s[0].gather(-1, want)
    w = w / w.sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(got.topk_weights[0].cpu().double().sort(-1).values,
                               w.sort(-1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capacity", [4, 9, 32])  # = top_k, between, = E
@given(S=st.integers(1, 3), L=st.integers(1, 20), seed=st.integers(0, 999),
       windows=st.booleans())
def test_kernel_matches_reference(capacity, S, L, seed, windows):
    g = torch.Generator().manual_seed(seed)
    x = logits_of(S, L, seed)
    x[0, L // 2] = float("nan")  # a NaN row: its weights NaN, its scores never lead a window
    policy = RoutingPolicy.capacity(capacity, block_size=8)
    kw = {}
    if windows:
        kw = dict(first_position=torch.randint(-9, 30, (S,), generator=g).to(DEVICE),
                  row_valid=(torch.rand(S, L, generator=g) > 0.25).to(DEVICE))
    want = route(x, None, CFG, policy, "reference", **kw)
    got = route(x, None, CFG, policy, "triton", **kw)
    assert torch.equal(got.coreset, want.coreset)
    ids_got, order_got = got.topk_ids.sort(-1)
    ids_want, order_want = want.topk_ids.sort(-1)
    assert torch.equal(ids_got, ids_want)
    torch.testing.assert_close(got.topk_weights.gather(-1, order_got),
                               want.topk_weights.gather(-1, order_want), rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    assert bool(want.topk_weights[0, L // 2].isnan().all())


def test_ties_go_to_the_lower_expert():
    x = torch.zeros(1, 8, 32, device=DEVICE)  # every score equal
    got = route(x, None, CFG, RoutingPolicy.capacity(5, block_size=8), "triton")
    assert got.coreset[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert (got.topk_ids[0].sort(-1).values.cpu() == torch.tensor([0, 1, 2, 3])).all()


@pytest.mark.parametrize("capacity", [0, 3, 33, "48"])
def test_capacity_outside_top_k_to_experts_is_named(capacity):
    with pytest.raises((ValueError, TypeError), match="expert_capacity"):
        RoutingPolicy.capacity(capacity).check(CFG)


def test_the_checkpoint_chooses_its_routing():
    E = dict(num_experts=256, num_experts_per_tok=8)
    assert RoutingPolicy.from_config({**E, "expert_capacity": 48}) == RoutingPolicy.capacity(48)
    assert RoutingPolicy.from_config({**E, "expert_capacity": 48, "block_size": 16}) == \
        RoutingPolicy.capacity(48, block_size=16)
    assert RoutingPolicy.from_config({**E, "core_threshold": 0.5}) == RoutingPolicy.dmoe(0.5, 16)
    assert RoutingPolicy.from_config({**E, "mode": "aggregate"}) == RoutingPolicy.dmoe(0.6, 16)
    assert RoutingPolicy.from_config({"num_experts": 64, "mode": "aggregate"}).guard == 4
    assert RoutingPolicy.from_config({**E, "expert_capacity": 0}) == RoutingPolicy.token()
    assert RoutingPolicy.from_config(E) == RoutingPolicy.token()
    for bad in (4, 300):
        with pytest.raises(ValueError, match="expert_capacity"):
            RoutingPolicy.from_config({**E, "expert_capacity": bad})


def test_an_unpatched_llada22_checkpoint_routes_by_windows_as_the_patched_one():
    from dmoe_triton import generate, patch_model
    from dmoe_triton.testing import small_model

    model = small_model(0, expert_capacity=6, block_size=8)
    assert model.model.layers[1].mlp.block_policy == RoutingPolicy.capacity(6, block_size=8)
    ids = torch.randint(3, 90, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :5] = False
    with torch.no_grad():
        own = model(ids, attention_mask=mask).logits
        prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
        own_tokens = generate(model, prompts, gen_length=16, block_length=8, stats=False).tokens
        patch_model(model, backend="reference")  # no policy: the checkpoint's own
        assert model.model.layers[1].mlp.policy == RoutingPolicy.capacity(6, block_size=8)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, own,
                                   rtol=1e-4, atol=1e-4)
        assert generate(model, prompts, gen_length=16, block_length=8,
                        stats=False).tokens == own_tokens


def test_the_cli_runs_the_routing_the_checkpoint_declares(capsys):
    from dmoe_triton import cli, tiny

    if tiny.shipped_model_dir() is None:
        pytest.skip("the shipped models are not here")
    root = tiny.shipped_model_dir().rsplit("/", 1)[0]
    for name, want in (("arith-dmoe", "dmoe(top_p=0.6, guard=4"), ("arith-token", "token()")):
        assert cli.main(["generate", "--model", f"{root}/{name}", "--no-compare",
                         "--gen-length", "8"]) == 0
        out = capsys.readouterr().out
        assert f"policy: {want}" in out and "auto: config.json" in out, out


def test_an_unpatched_llada22_model_decodes_the_same_with_and_without_the_cache():
    from dmoe_triton import generate
    from dmoe_triton.testing import small_model

    model = small_model(1, expert_capacity=5, block_size=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    kw = dict(gen_length=12, block_length=4, steps=4, threshold=0.6, stats=False)
    with torch.no_grad():
        cached = generate(model, prompts, **kw).tokens
        assert generate(model, prompts, use_cache=False, **kw).tokens == cached
        assert [generate(model, [p], **kw).tokens[0] for p in prompts] == cached


@pytest.mark.parametrize("block_size", [0, -8])
def test_a_routing_window_below_one_is_named(block_size):
    from dmoe_triton.testing import small_model

    config = dict(num_experts=16, num_experts_per_tok=4, expert_capacity=8, block_size=block_size)
    with pytest.raises(ValueError, match="block_size"):
        RoutingPolicy.from_config(config)
    with pytest.raises(ValueError, match="block_size"):
        small_model(0, expert_capacity=8, block_size=block_size)
    with pytest.raises(ValueError, match="block_size"):
        RoutingPolicy.capacity(8, block_size=block_size)
