"""Router calibration (dmoe_triton/calibrate.py), the end-to-end benchmark's model helpers
(bench/bench_e2e.py's, now in dmoe_triton.patch / modules / testing) and the attention changes
they came with, on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from dmoe_triton import RoutingPolicy, patch_model
from dmoe_triton.calibrate import (calibrate_router, expert_hits, moe_layers, popularity_skew,
                                   route_summary, router_weight, router_weights, set_router_bias,
                                   set_router_diversity, set_router_weights, shared_directions)
from dmoe_triton.models import LLaDA2MoeConfig
from dmoe_triton.models.llada2 import grouped_query_attention
from dmoe_triton.modules import cache_bytes, expert_bytes, non_expert_bytes
from dmoe_triton.moe import DMoEBlock
from dmoe_triton.patch import Unpatched
from dmoe_triton.testing import SMALL, build_model

CONFIG = dict(SMALL, num_experts=32, n_group=4, topk_group=2)


@pytest.fixture(scope="module")
def patched():
    model = build_model(LLaDA2MoeConfig(**CONFIG), torch.device("cpu"))
    model.float()
    return patch_model(model, RoutingPolicy.token())


def test_skew_is_seeded_and_shaped():
    a, b = popularity_skew(3, 16, seed=5), popularity_skew(3, 16, seed=5)
    assert a.shape == (3, 16) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, popularity_skew(3, 16, seed=6))
    with pytest.raises(ValueError, match="num_layers"):
        popularity_skew(0, 16)


def test_expert_hits_ignores_empty_and_bad_slots():
    ids = torch.tensor([[[0, 1], [1, -1], [5, 3]], [[2, 2], [-1, -1], [4, 9]]])  # [2, 3, 2], E=5
    hit = expert_hits(ids, 5)
    assert hit.tolist() == [[True, True, False, True, False], [False, False, True, False, True]]
    assert expert_hits(ids, 5, rows=1).tolist() == [[False, False, False, True, False],
                                                    [False, False, False, False, True]]


def test_set_router_bias_writes_in_place_and_checks_shape(patched):
    layers = moe_layers(patched)
    before = [m.expert_bias for m in layers]
    bias = popularity_skew(len(layers), 32, seed=1)
    set_router_bias(patched, bias)
    assert all(m.expert_bias is b for m, b in zip(layers, before))  # same buffers (CUDA graphs)
    assert torch.equal(torch.stack(before), bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        set_router_bias(patched, bias[:, :5])
    set_router_bias(patched, 0 * bias)


def test_calibration_reaches_the_target_and_is_recorded(patched):
    ids = torch.randint(3, 90, (3, 64), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            patched(ids, block_length=32)

    forward()
    plain = route_summary(patched).mean_unique
    target = plain - 6
    calib = calibrate_router(patched, forward, target, seed=3, tolerance=1.0)
    assert abs(calib.unique - target) <= 1.0 or len(calib.history) == 14
    assert calib.strength > 0 and calib.history[0] == (0.0, plain)
    forward()  # the model is left at the chosen strength
    assert route_summary(patched).mean_unique == pytest.approx(calib.unique)
    bias = moe_layers(patched)[0].expert_bias
    torch.testing.assert_close(bias, calib.strength * popularity_skew(2, 32, seed=3)[0])
    assert "N(0,1)" in calib.describe()
    set_router_bias(patched, torch.zeros(2, 32))


def test_calibration_from_below_raises_diversity(patched):
    """Below the target the gate weights lose part of the directions the block's tokens share."""
    ids = torch.randint(3, 90, (3, 64), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            patched(ids, block_length=32)

    plain_weights = router_weights(patched)
    buffers = [router_weight(m) for m in moe_layers(patched)]
    forward()
    plain = route_summary(patched).mean_unique
    target = plain + 3
    calib = calibrate_router(patched, forward, target, tolerance=1.0, directions=4)
    assert abs(calib.unique - target) <= 1.0 or len(calib.history) == 14
    assert calib.strength == 0 and 0 < calib.diversity <= 1 and calib.directions == 4
    assert calib.history[0] == (0.0, plain) and calib.history[1][0] == 1.0
    assert "singular vectors" in calib.describe()
    assert all(torch.equal(m.expert_bias, torch.zeros(32)) for m in moe_layers(patched))
    assert all(router_weight(m) is b for m, b in zip(moe_layers(patched), buffers))  # in place
    forward()  # left at the chosen value
    assert route_summary(patched).mean_unique == pytest.approx(calib.unique)
    set_router_weights(patched, plain_weights)
    forward()
    assert route_summary(patched).mean_unique == pytest.approx(plain)


def test_diversity_removes_the_shared_directions(patched):
    ids = torch.randint(3, 90, (2, 32), generator=torch.Generator().manual_seed(4))

    def forward():
        with torch.no_grad():
            patched(ids)

    base = router_weights(patched)
    basis = shared_directions(patched, forward, 3)
    assert [tuple(u.shape) for u in basis] == [(3, 64)] * 2
    torch.testing.assert_close(basis[0] @ basis[0].T, torch.eye(3), rtol=1e-4, atol=1e-4)
    set_router_diversity(patched, 1.0, base, basis)
    w = router_weight(moe_layers(patched)[0])
    exact = base[0] - (base[0] @ basis[0].T) @ basis[0]
    torch.testing.assert_close(exact @ basis[0].T, torch.zeros(32, 3), rtol=0, atol=1e-5)
    # The fixture's gate is bf16-valued (a bf16 checkpoint's): the skewed gate is stored so too.
    assert torch.equal(base[0].bfloat16().float(), base[0])
    assert torch.equal(w, exact.bfloat16().float())
    set_router_diversity(patched, 0.0, base, basis)
    assert torch.equal(router_weight(moe_layers(patched)[0]), base[0])
    with pytest.raises(ValueError, match="diversity must be in"):
        set_router_diversity(patched, 1.5, base, basis)
    with pytest.raises(ValueError, match="directions must be"):
        shared_directions(patched, forward, 0)


def test_build_model_is_random_bf16_built_in_place():
    model = build_model(LLaDA2MoeConfig(**SMALL), torch.device("cpu"))
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    assert float(model.model.norm.weight.detach().float().mean()) == 1.0
    std = float(model.model.layers[1].mlp.experts[3].up_proj.weight.detach().float().std())
    assert 0.015 < std < 0.025


def test_official_view_runs_the_loop_on_the_patched_weights(patched):
    ids = torch.randint(3, 90, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = patched(ids).logits
        with Unpatched(patched) as loop:
            assert not any(isinstance(l.mlp, DMoEBlock) for l in loop.model.layers)
            looped = loop(ids).logits
            summary = route_summary(loop)
    assert any(isinstance(l.mlp, DMoEBlock) for l in patched.model.layers)  # restored
    torch.testing.assert_close(looped, fused, rtol=1e-4, atol=1e-4)
    assert summary.unique.shape == (2, 2) and summary.coreset is None


def test_bytes_of_a_forward(patched):
    c = patched.config
    assert expert_bytes(patched) == 3 * c.hidden_size * c.moe_intermediate_size * 4  # fp32
    cache = patched.new_cache(2, 64, static=True)
    kv = 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * (64 + 32) * c.head_dim * 4
    assert cache_bytes(cache) == kv
    assert non_expert_bytes(patched, 2) > non_expert_bytes(patched, 1)


def test_grouped_query_attention_equals_sdpa_gqa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((8, 5), (2, 12), (2, 12)))
    mask = torch.rand(2, 1, 5, 12, generator=g) < 0.7
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    stacked = mask.repeat(1, 1, 4, 1)  # the layout block_causal_mask(..., query_groups=4) builds
    torch.testing.assert_close(grouped_query_attention(q, k, v, stacked, 0.3), ref)
    additive = torch.zeros(stacked.shape).masked_fill_(~stacked, float("-inf"))  # as the model
    torch.testing.assert_close(grouped_query_attention(q, k, v, additive, 0.3), ref)
    with pytest.raises(ValueError, match="mask must have 20 rows"):
        grouped_query_attention(q, k, v, mask, 0.3)


def test_static_cache_attends_through_scratch_rows():
    """A static cache writes the step's K/V into spare rows instead of concatenating."""
    model = build_model(LLaDA2MoeConfig(**SMALL), torch.device("cpu")).float()
    ids = torch.randint(3, 90, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 32, static=True)
        assert cache.keys[0].shape[2] == 32 + cache.scratch
        model(ids[:, :32], past_key_values=cache, write_cache=True, return_logits=False)
        step = model(ids[:, 32:], past_key_values=cache).logits
    torch.testing.assert_close(step, full[:, 32:], rtol=1e-5, atol=1e-5)


def test_summary_coreset_is_the_window_that_holds_the_block():
    """A block starting on a window boundary has one more (empty) window slot after it: the
    summary's coreset is the held window's, not that empty slot (bench_e2e printed 0)."""
    model = build_model(LLaDA2MoeConfig(**CONFIG), torch.device("cpu"))
    patch_model(model.float(), RoutingPolicy.dmoe(0.6, 2, 8), backend="reference")
    ids = torch.randint(3, CONFIG["vocab_size"] - 8, (2, 8))
    positions = torch.arange(16, 24).expand(2, 8)
    with torch.no_grad():
        model(ids, positions)
    summary = route_summary(model, rows=8)
    coresets = [m.last_route.coreset for m in moe_layers(model)]
    assert all(c.shape[1] == 2 and not c[:, 1].any() for c in coresets)
    want = torch.stack([c[:, 0].sum(-1) for c in coresets])
    assert torch.equal(summary.coreset, want) and bool((want > 0).all())
