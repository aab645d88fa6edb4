"""The decoding graphs' cache (issue 18), on the CPU: the key, the LRU and its invalidation, the
cache write that a replayed forward makes, and the stacked routing statistics."""
import gc

import pytest
import torch

from dmoe_triton import RoutingPolicy, launch, patch_model, set_policy
from dmoe_triton.decoding import generate, route_stats
from dmoe_triton.graphs import GraphCache, graph_key
from dmoe_triton.modules import expert_hits, moe_layers
from dmoe_triton.testing import small_model


@pytest.fixture(scope="module")
def patched():
    return patch_model(small_model(), RoutingPolicy.token(), backend="reference")


LAYOUT = dict(batch=2, span=8, capacity=64, block_length=8, steps=8, mask_id=2, stats=True,
              sampling=(0.95, 0.0, None, None))


def test_key_is_stable_and_names_the_layout(patched):
    key = graph_key(patched, **LAYOUT)
    assert graph_key(patched, **LAYOUT) == key
    for name, value in (("batch", 3), ("capacity", 72), ("stats", False),
                        ("sampling", (0.9, 0.0, None, None))):
        assert graph_key(patched, **{**LAYOUT, name: value}) != key, name


def test_key_follows_the_policy_and_comes_back_with_it(patched):
    token = graph_key(patched, **LAYOUT)
    set_policy(patched, RoutingPolicy.dmoe(0.6, 4, block_size=8))
    try:
        assert graph_key(patched, **LAYOUT) != token
    finally:
        set_policy(patched, RoutingPolicy.token())
    assert graph_key(patched, **LAYOUT) == token


def test_key_ignores_values_written_in_place_but_not_moved_weights(patched):
    key = graph_key(patched, **LAYOUT)
    block = moe_layers(patched)[0]
    with torch.no_grad():
        block.w_down.mul_(1.0)             # in place (load_state_dict): the replay reads it
        patched.load_state_dict(patched.state_dict())
    assert graph_key(patched, **LAYOUT) == key
    old = block.w_down.data
    block.w_down.data = old.clone()        # new memory: a graph would read the old address
    try:
        assert graph_key(patched, **LAYOUT) != key
    finally:
        block.w_down.data = old
    assert graph_key(patched, **LAYOUT) == key


def test_key_follows_launch_overrides(patched):
    key = graph_key(patched, **LAYOUT)
    with launch.override(moe_path="grouped"):
        assert graph_key(patched, **LAYOUT) != key
    assert graph_key(patched, **LAYOUT) == key


def test_key_differs_between_models():
    a, b = small_model(0), small_model(0)
    assert graph_key(a, **LAYOUT) != graph_key(b, **LAYOUT)


class _Model:  # anything weak-referenceable stands for a model
    pass


def test_lru_is_bounded_and_drops_the_least_recent():
    cache, model = GraphCache(max_entries=2), _Model()
    for k in "abc":
        cache.put((id(model), k), model, k.upper())
    assert len(cache) == 2 and cache.captures == 3
    assert cache.get((id(model), "a"), model) is None            # evicted first
    assert cache.get((id(model), "b"), model) == "B"              # now the most recent
    cache.put((id(model), "d"), model, "D")
    assert cache.get((id(model), "c"), model) is None
    assert cache.get((id(model), "b"), model) == "B" and cache.hits == 2
    cache.clear()
    assert len(cache) == 0 and cache.get((id(model), "b"), model) is None


def test_lru_answers_only_its_own_model_and_forgets_collected_ones():
    cache, model, other = GraphCache(), _Model(), _Model()
    cache.put((id(model), "k"), model, 1)
    assert cache.get((id(model), "k"), other) is None  # an id reused by another object
    assert len(cache) == 0
    cache.put((id(model), "k"), model, 1)
    cache.put((id(other), "k"), other, 2)
    del model
    gc.collect()
    assert len(cache) == 1 and cache.get((id(other), "k"), other) == 2


def test_zero_entries_keeps_nothing():
    cache, model = GraphCache(max_entries=0), _Model()
    cache.put((id(model), "k"), model, 1)
    assert len(cache) == 0 and cache.captures == 1


def test_append_scratch_writes_what_write_cache_writes(patched):
    """The graphed cache write (forward without writing, then append_scratch) fills the cache
    exactly as a forward with write_cache=True does."""
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (2, 24))
    pos = torch.arange(24).expand(2, 24)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, :5] = False
    caches = [patched.new_cache(2, 40, static=True, scratch=16) for _ in range(2)]
    for cache in caches:
        for t in cache.keys + cache.values:
            t.normal_()  # stale rows: clear() must empty them
        cache.valid[:, 3] = True
        cache.length = 7
        cache.clear()
        assert cache.length == 0 and not cache.valid.any()
        assert all(not t.any() for t in cache.keys + cache.values)
        patched(ids[:, :16], pos[:, :16], past_key_values=cache, attention_mask=valid[:, :16],
                write_cache=True, return_logits=False, block_length=8)
    written, appended = caches
    patched(ids[:, 16:], pos[:, 16:], past_key_values=written, attention_mask=valid[:, 16:],
            write_cache=True, return_logits=False, block_length=8)
    patched(ids[:, 16:], pos[:, 16:], past_key_values=appended, attention_mask=valid[:, 16:],
            return_logits=False, block_length=8)
    appended.append_scratch(valid[:, 16:])
    assert appended.length == written.length == 24
    assert torch.equal(appended.valid, written.valid)
    for a, w in zip(appended.keys + appended.values, written.keys + written.values):
        assert torch.equal(a[:, :, :24], w[:, :, :24])
    with pytest.raises(ValueError, match="static"):
        patched.new_cache(2, 40).append_scratch(valid[:, 16:])


def _per_layer_stats(modules, rows):
    """The statistics layer by layer (the code before issue 18): the reference."""
    n, B = len(modules), rows.shape[0]
    unique, coreset = torch.zeros(n, B), torch.full((n, B), float("nan"))
    outside = torch.zeros(n, B, dtype=torch.long)
    for i, m in enumerate(modules):
        r = m.last_route
        hit = expert_hits(torch.where(rows[..., None], r.topk_ids, -1), m.router_cfg.num_experts)
        unique[i] = hit.sum(-1)
        if r.coreset is not None:
            W, size = r.coreset.shape[1], m.policy.block_size
            padded = torch.zeros(B, W * size, dtype=torch.bool)
            padded[:, : rows.shape[1]] = rows
            covers = padded.view(B, W, size).any(-1)
            sizes = r.coreset.sum(-1).float()
            coreset[i] = (sizes * covers).sum(1) / covers.sum(1).clamp(min=1)
            outside[i] = (hit & ~(r.coreset & covers[..., None]).any(1)).sum(-1)
    return unique, coreset, outside


@pytest.mark.parametrize("mixed", [False, True])
def test_stacked_stats_equal_the_per_layer_ones(mixed):
    model = patch_model(small_model(num_hidden_layers=4), RoutingPolicy.dmoe(0.5, 2, block_size=8),
                        backend="reference")
    modules = moe_layers(model)
    if mixed:  # a token-routed layer between block-routed ones
        modules[1].set_policy(RoutingPolicy.token())
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (3, 16))
    model(ids, block_length=8)
    rows = torch.zeros(3, 16, dtype=torch.bool)
    rows[:, 8:] = True
    rows[2, 3:8] = True  # rows in both windows
    n = len(modules)
    got = (torch.zeros(n, 3), torch.full((n, 3), float("nan")), torch.zeros(n, 3, dtype=torch.long))
    route_stats(modules, rows, *got)
    want = _per_layer_stats(modules, rows)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)
    assert not torch.isnan(got[1]).all()


def test_generate_stats_equal_the_per_layer_ones_on_the_cpu():
    """Through generate: the recorded statistics of the last step equal the reference over the
    layers' last routes."""
    model = patch_model(small_model(), RoutingPolicy.dmoe(0.5, 2, block_size=8),
                        backend="reference")
    res = generate(model, [[5, 6, 7, 8, 9, 10, 11]], gen_length=8, block_length=8, steps=4)
    st = res.stats
    assert st.unique_experts.shape == (st.forwards, 2, 1) and st.outside_coreset == 0
    rows = torch.ones(1, 8, dtype=torch.bool)  # the last step's rows: its block, all current
    unique, coreset, _ = _per_layer_stats(moe_layers(model), rows)
    torch.testing.assert_close(st.unique_experts[-1], unique)
    torch.testing.assert_close(st.coreset_size[-1], coreset)


def _replay_eagerly(step, state=(), warmup=2):
    """A stand-in for graphs.capture on the CPU: the 'replay' runs the captured closure, which
    like a graph holds the first call's tensors and Python values."""
    return step


def test_kept_graphs_serve_later_calls_on_the_cpu(monkeypatch):
    """The reuse plumbing without CUDA: captures replaced by closures over the capturing call.
    A later call of the same layout captures nothing, refills the kept buffers and cache, and
    decodes other prompts exactly as eager decoding does; a new policy captures anew."""
    from dmoe_triton import decoding, graphs

    kept, graphed = graphs.GraphCache(), {"on": False}
    monkeypatch.setattr(decoding, "graph_cache", kept)
    monkeypatch.setattr(decoding, "capture", _replay_eagerly)
    monkeypatch.setattr(decoding, "_wants_graph", lambda *a: graphed["on"])
    model = patch_model(small_model(), RoutingPolicy.dmoe(0.5, 2, block_size=8),
                        backend="reference")
    kw = dict(gen_length=16, block_length=8, steps=4, threshold=0.6)
    captured = []
    for prompts in ([[5, 6, 7, 8, 9, 10, 11], [12, 13]], [[20, 21, 22], [30, 31, 32, 33, 34]]):
        graphed["on"] = False
        eager = generate(model, prompts, **kw)
        graphed["on"] = True
        kept_run = generate(model, prompts, **kw)
        assert kept_run.tokens == eager.tokens
        assert kept_run.stats.cache_writes == eager.stats.cache_writes > 1
        for name in ("unique_experts", "coreset_size"):
            torch.testing.assert_close(getattr(kept_run.stats, name), getattr(eager.stats, name),
                                       equal_nan=True)
        captured.append(kept_run.stats.graphs_captured)
    assert captured == [1, 0] and kept.captures == 1 and kept.hits == 1
    set_policy(model, RoutingPolicy.token())
    assert generate(model, [[20, 21, 22], [30, 31, 32]], **kw).stats.graphs_captured == 1


def test_max_entries_zero_turns_reuse_off_even_for_kept_entries():
    from dmoe_triton.graphs import GraphCache
    model = torch.nn.Linear(2, 2)
    cache = GraphCache(max_entries=4)
    cache.put(("k",), model, "kept")
    cache.max_entries = 0
    assert cache.get(("k",), model) is None
