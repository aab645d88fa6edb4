"""Expert-choice routing (docs/routing.md, Expert choice; issue 15): the kernel against the
reference, the contract's invariants, ties, capacity, windows, NaN rows, bad input."""
import pytest
import torch
from hypothesis import assume, given, strategies as st

from dmoe_triton import RouterConfig, RoutingPolicy, moe_forward, route
from dmoe_triton.reference import expert_choice_capacity
from dmoe_triton.testing import DEVICE

CFG = RouterConfig(16, 4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
SCHEDULES = ("fixed", "linear", "linear_reverse")


def on(t):
    return None if t is None else t.to(DEVICE)


def ec(schedule="fixed", k=4, k_min=2, k_max=8, block_size=8, top_p=None, guard=2):
    guard = None if top_p is None else guard  # plain expert choice takes no guard
    if schedule == "fixed":
        return RoutingPolicy.expert_choice(k, block_size=block_size, coreset_top_p=top_p,
                                           guard=guard)
    return RoutingPolicy.expert_choice(None, schedule, k_min, k_max, block_size,
                                       coreset_top_p=top_p, guard=guard)


def both(x, policy, cfg=CFG, bias=None, **windows):
    """(reference, kernel) results on the same inputs; the kernel's outputs are poisoned first
    by the allocator only (torch.empty), so a slot it never writes shows up as junk."""
    windows = {k: on(v) for k, v in windows.items()}
    b = None if bias is None else on(bias)
    ref = route(on(x), b, cfg, policy, "reference", **windows)
    ker = route(on(x), b, cfg, policy, "triton", **windows)
    return ref, ker


def assert_same(ref, ker):
    assert torch.equal(ref.topk_ids.cpu(), ker.topk_ids.cpu())
    torch.testing.assert_close(ker.topk_weights.cpu(), ref.topk_weights.cpu(), rtol=1e-5,
                               atol=1e-6, equal_nan=True)
    assert torch.equal(ref.coreset.cpu(), ker.coreset.cpu())


def assert_invariants(res, x, policy, cfg=CFG, row_valid=None, row_masked=None):
    """Each window: every eligible expert takes exactly min(c, its finite real rows) rows;
    nothing outside the window's real rows or eligible experts; slot e holds e or -1; weights
    0 where empty and summing to the scale where a row has a pick (NaN rows aside)."""
    ids, w = res.topk_ids.cpu().long(), res.topk_weights.cpu()
    S, L, E = ids.shape
    bs = policy.block_size
    assert ((ids == -1) | (ids == torch.arange(E))).all()
    bad = torch.isnan(x.cpu()).any(-1)
    assert torch.isnan(w[bad]).all()
    good = ~bad
    assert (w[good][ids[good] < 0] == 0).all()
    picked = (ids >= 0).any(-1)
    sums = w.sum(-1)
    assert torch.allclose(sums[good & picked], torch.full_like(sums[good & picked],
                                                           cfg.routed_scaling_factor), atol=1e-5)
    valid = torch.ones(S, L, dtype=torch.bool) if row_valid is None else row_valid.cpu()
    masked = torch.zeros(S, L, dtype=torch.bool) if row_masked is None else row_masked.cpu()
    assert not (ids[~valid] >= 0).any()
    for q in range(S):
        for j in range(-(-L // bs)):
            rows = slice(j * bs, (j + 1) * bs)
            real = valid[q, rows]
            eligible = res.coreset[q, j].cpu()
            c = expert_choice_capacity(policy, int(real.sum()), int((masked[q, rows] & real).sum()),
                                       int(eligible.sum()))
            finite = (real[:, None] & ~torch.isnan(x[q, rows].cpu())).sum(0)
            taken = (ids[q, rows] >= 0).sum(0)
            want = torch.where(eligible, torch.clamp(finite, max=c), 0)
            assert torch.equal(taken, want), (q, j, c, taken, want)


@st.composite
def ec_inputs(draw, coreset=False):
    E = draw(st.sampled_from([8, 12, 16, 32]))
    cfg = RouterConfig(E, draw(st.integers(1, 4)), routed_scaling_factor=2.5)
    schedule = draw(st.sampled_from(SCHEDULES))
    k_min = draw(st.integers(1, E))
    k_max = draw(st.integers(k_min, E))
    policy = ec(schedule, k=k_min, k_min=k_min, k_max=k_max,
                block_size=draw(st.sampled_from([1, 4, 8, 16, 32])),
                top_p=draw(st.sampled_from([0.3, 0.6, 1.0])) if coreset else None,
                guard=draw(st.integers(0, E // 2)))
    S, L = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, L, E, generator=g) * draw(st.sampled_from([0.5, 2.0]))
    if draw(st.booleans()):  # ties: a few distinct values only
        x = torch.round(x)
    if draw(st.booleans()):  # NaN rows, partly and wholly
        x[0, draw(st.integers(0, L - 1)), draw(st.integers(0, E - 1))] = float("nan")
        x[-1, draw(st.integers(0, L - 1))] = float("nan")
    if draw(st.booleans()):
        x[0, 0, 0], x[-1, -1, -1] = float("-inf"), float("inf")
    windows = dict(row_masked=torch.rand(S, L, generator=g) < draw(st.floats(0, 1)))
    if not coreset and draw(st.booleans()):
        windows["first_position"] = torch.randint(-40, 80, (S,), generator=g)
    if draw(st.booleans()):
        windows["row_valid"] = torch.rand(S, L, generator=g) > 0.25
    bias = torch.randn(E, generator=g) * 0.1 if draw(st.booleans()) else None
    return cfg, policy, x, bias, windows


@given(ec_inputs())
def test_kernel_matches_reference(inputs):
    cfg, policy, x, bias, windows = inputs
    ref, ker = both(x, policy, cfg, bias, **windows)
    assert_same(ref, ker)
    if "first_position" not in windows:
        assert_invariants(ker, x, policy, cfg, windows.get("row_valid"), windows["row_masked"])


@given(ec_inputs(coreset=True))
def test_kernel_matches_reference_inside_the_coreset(inputs):
    cfg, policy, x, bias, windows = inputs
    ref, ker = both(x, policy, cfg, bias, **windows)
    # The coreset's top-p edge may round differently (docs/routing.md); elsewhere: exact.
    assume(torch.equal(ref.coreset.cpu(), ker.coreset.cpu()))
    assert_same(ref, ker)
    assert_invariants(ker, x, policy, cfg, windows.get("row_valid"), windows["row_masked"])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ties_go_to_the_lower_token(backend):
    """All scores equal: every expert takes the window's first c rows."""
    x = torch.zeros(1, 20, CFG.num_experts)
    res = route(on(x), None, CFG, ec(k=4, block_size=8), backend)
    ids = res.topk_ids.cpu()
    for j, rows in enumerate(((0, 8), (8, 16), (16, 20))):
        c = expert_choice_capacity(ec(k=4, block_size=8), rows[1] - rows[0], 0, 16)
        taken = ids[0, rows[0]:rows[1]] >= 0
        assert taken[:c].all() and not taken[c:].any(), (j, c)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_capacity_of_all_rows_takes_every_row(backend):
    """k = E (or a coreset smaller than k): c = rows, every eligible expert takes every row."""
    x = torch.randn(2, 11, CFG.num_experts)
    res = route(on(x), None, CFG, ec(k=CFG.num_experts, block_size=8), backend)
    assert (res.topk_ids.cpu() >= 0).all()
    small = ec(k=8, block_size=8, top_p=0.05, guard=1)  # a coreset of 1-2 experts, k = 8
    res = route(on(x), None, CFG, small, backend)
    ids, core = res.topk_ids.cpu(), res.coreset.cpu()
    for j in range(2):
        rows = ids[:, j * 8:(j + 1) * 8]
        assert torch.equal(rows >= 0, core[:, j, None, :].expand_as(rows))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_window_held_in_part_uses_its_real_rows(backend):
    """Rows at positions 28..35 with window 32: 4 rows of window 0 and 4 of window 1, each with
    c = ceil(4 * k / E); the same as routing the two halves alone."""
    x = torch.randn(1, 8, CFG.num_experts)
    policy = ec(k=6, block_size=32)
    res = route(on(x), None, CFG, policy, backend, first_position=on(torch.tensor([28])))
    taken = (res.topk_ids.cpu() >= 0).sum(1)[0]
    assert (taken == -(-4 * 6 // 16) * 2).all()
    for lo, p0 in ((0, 28), (4, 32)):
        alone = route(on(x[:, lo:lo + 4]), None, CFG, policy, backend,
                      first_position=on(torch.tensor([p0])))
        assert torch.equal(alone.topk_ids, res.topk_ids[:, lo:lo + 4])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_schedules_follow_the_mask_ratio(backend):
    """linear_reverse: k_min when all rows are masked, k_max when none; linear the other way;
    padding rows count in neither rows nor masked."""
    x = torch.randn(1, 16, CFG.num_experts)
    valid = torch.ones(1, 16, dtype=torch.bool)
    valid[0, 12:] = False  # 4 padding rows (masked or not, they do not count)
    for schedule, all_masked, none_masked in (("linear_reverse", 2, 8), ("linear", 8, 2)):
        policy = ec(schedule, k_min=2, k_max=8, block_size=16)
        for masked, k in ((torch.ones(1, 16, dtype=torch.bool), all_masked),
                          (torch.zeros(1, 16, dtype=torch.bool), none_masked)):
            res = route(on(x), None, CFG, policy, backend, row_valid=on(valid),
                        row_masked=on(masked))
            assert ((res.topk_ids.cpu() >= 0).sum(1) == -(-12 * k // 16)).all(), (schedule, k)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_rows_are_nan_and_never_taken(backend):
    x = torch.randn(1, 8, CFG.num_experts)
    x[0, 2] = float("nan")   # a whole row
    x[0, 5, 3] = float("nan")  # one score
    res = route(on(x), None, CFG, ec(k=8, block_size=8), backend)
    ids, w = res.topk_ids.cpu(), res.topk_weights.cpu()
    assert (ids[0, 2] == -1).all() and torch.isnan(w[0, 2]).all()
    assert ids[0, 5, 3] == -1 and torch.isnan(w[0, 5]).all()
    assert not torch.isnan(w[0, [0, 1, 3, 4, 6, 7]]).any()
    # moe_forward turns the all-NaN row NaN (every slot empty, every weight NaN), not 0.
    H, I = 8, 4
    y = moe_forward(on(torch.randn(8, H)), res.topk_ids[0], res.topk_weights[0],
                    on(torch.randn(16, 2 * I, H)), on(torch.randn(16, H, I)), backend=backend)
    assert torch.isnan(y[2]).all() and torch.isnan(y[5]).all()
    assert not torch.isnan(y[[0, 1, 3, 4, 6, 7]]).any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sequences_and_padding_route_as_alone(backend):
    """Batched sequences route as each alone; padding rows are never taken and do not change
    the real rows' routing (any logits in them)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 21, CFG.num_experts, generator=g)
    valid = torch.rand(3, 21, generator=g) > 0.3
    masked = torch.rand(3, 21, generator=g) > 0.5
    starts = torch.tensor([0, 5, 13])
    policy = ec("linear_reverse", k_min=2, k_max=6, block_size=8, top_p=0.6, guard=2)
    kw = dict(first_position=on(starts), row_valid=on(valid), row_masked=on(masked))
    batched = route(on(x), None, CFG, policy, backend, **kw)
    junk = torch.where(valid[..., None], x, 100 * torch.randn(x.shape, generator=g))
    assert torch.equal(route(on(junk), None, CFG, policy, backend, **kw).topk_ids,
                       batched.topk_ids)
    for q in range(3):
        alone = route(on(x[q:q + 1]), None, CFG, policy, backend,
                      **{k: v[q:q + 1] for k, v in kw.items()})
        assert torch.equal(alone.topk_ids, batched.topk_ids[q:q + 1])
        assert torch.equal(alone.topk_weights, batched.topk_weights[q:q + 1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_moe_forward_consumes_the_expert_slots(backend):
    """The [T, E] layout through moe_forward equals the sum over each expert's taken rows; a row
    no expert takes has a routed output of 0 (the shared expert only)."""
    torch.manual_seed(1)
    T, H, I = 16, 8, 4
    x = torch.randn(1, T, CFG.num_experts)
    x[0, 3] = -1e4  # sigmoid 0 everywhere: no expert ranks row 3 above the others
    res = route(on(x), None, CFG, ec(k=2, block_size=16), backend)
    ids, w = res.topk_ids[0], res.topk_weights[0]
    assert (ids[3] == -1).all()
    hidden = on(torch.randn(T, H))
    wg, wd = on(torch.randn(16, 2 * I, H)), on(torch.randn(16, H, I))
    y = moe_forward(hidden, ids, w, wg, wd, backend=backend)
    want = torch.zeros(T, H, device=hidden.device)
    for e in range(16):
        rows = (ids[:, e] == e).nonzero().flatten()
        gu = hidden[rows] @ wg[e].T
        out = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]) @ wd[e].T
        want[rows] += out * w[rows, e, None]
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    assert (y[3] == 0).all()


@pytest.mark.parametrize("make, match", [
    (lambda: RoutingPolicy.expert_choice(0), "k must be >= 1"),
    (lambda: RoutingPolicy.expert_choice(schedule="cosine", k_min=1, k_max=2), "schedule"),
    (lambda: RoutingPolicy.expert_choice(None, "linear", 8, 4), r"k_min \(8\) must be <= k_max"),
    (lambda: RoutingPolicy.expert_choice(None, "linear_reverse", k_min=4), "needs k_min and k_max"),
    (lambda: RoutingPolicy.expert_choice(8, k_min=2), "k_min / k_max are for the linear"),
    (lambda: RoutingPolicy.expert_choice(None, "linear", 0, 4), "k_min must be >= 1"),
    (lambda: RoutingPolicy.expert_choice(8, coreset_top_p=0.0), "top_p"),
    (lambda: RoutingPolicy.expert_choice(8, guard=4), "guard is for expert choice inside"),
])
def test_bad_policy(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_before_any_kernel(backend, monkeypatch):
    """k_max > E (a capacity above the window's rows) and a schedule without row_masked are
    ValueErrors naming the parameter, raised before a kernel launches."""
    from dmoe_triton.kernels import expert_choice

    monkeypatch.setattr(expert_choice, "expert_choice_kernel", None)  # a launch would fail
    x = on(torch.randn(1, 8, CFG.num_experts))
    with pytest.raises(ValueError, match="k must be >= 1 and <= 16, got 17"):
        route(x, None, CFG, ec(k=17), backend)
    with pytest.raises(ValueError, match="row_masked is required"):
        route(x, None, CFG, ec("linear"), backend)
    with pytest.raises(ValueError, match="row_masked must have shape"):
        route(x, None, CFG, ec("linear"), backend, row_masked=on(torch.ones(1, 7, dtype=torch.bool)))


@pytest.mark.parametrize("config, error, needle", [
    (dict(expert_choice_k_min=0), ValueError, "expert_choice_k_min must be >= 1"),
    (dict(expert_choice_schedule="linear", expert_choice_k_max=0), ValueError,
     "expert_choice_k_max must be >= 1"),
    (dict(block_size=0), ValueError, "block_size must be >= 1"),
    (dict(expert_choice_k_max=12), ValueError, "'fixed' takes one k"),
    (dict(expert_choice_schedule="bogus"), ValueError, "schedule must be one of"),
])
def test_from_config_names_a_bad_key_and_never_replaces_it(config, error, needle):
    """A break test found 0 replaced by defaults (k_min 0 -> 8, block_size 0 -> 32) and a fixed
    schedule's differing k_max dropped."""
    base = dict(num_experts=64, num_experts_per_tok=8, expert_choice_schedule="fixed")
    with pytest.raises(error, match=needle):
        RoutingPolicy.from_config({**base, **config})


def test_schedule_is_checked_first_and_k_named_under_fixed():
    """The schedule's own error, whatever else is missing; the fixed schedule's k is named k
    (it is kept as k_min == k_max) when it exceeds E."""
    for bad in ("bogus", "LINEAR"):
        with pytest.raises(ValueError, match="schedule must be one of"):
            RoutingPolicy.expert_choice(4, bad)
    with pytest.raises(TypeError, match="schedule must be a str"):
        RoutingPolicy.expert_choice(4, 1)
    with pytest.raises(ValueError, match="k must be >= 1 and <= 8, got 9"):
        route(torch.randn(1, 4, 8), None, RouterConfig(8, 2), RoutingPolicy.expert_choice(9),
              "reference")


def test_from_config_declares_expert_choice():
    base = dict(num_experts=64, num_experts_per_tok=8)
    p = RoutingPolicy.from_config({**base, "expert_choice_schedule": "fixed"})
    assert (p.kind, p.k_min, p.k_max) == ("expert_choice", 8, 8)
    p = RoutingPolicy.from_config({**base, "expert_choice_schedule": "linear_reverse",
                                   "expert_choice_k_min": 4, "expert_choice_k_max": 12,
                                   "core_threshold": 0.6})
    assert (p.kind, p.schedule, p.k_min, p.k_max, p.top_p, p.guard) == (
        "ec_coreset", "linear_reverse", 4, 12, 0.6, 4)
    p = RoutingPolicy.from_config({**base, "expert_choice_schedule": "linear",
                                   "expert_choice_k_min": 4})  # k_max: the model's top-k
    assert (p.k_min, p.k_max) == (4, 8)
    p = RoutingPolicy.from_config({**base, "expert_choice_schedule": "fixed",
                                   "expert_choice_k_min": 6, "expert_choice_k_max": 6})
    assert (p.schedule, p.k_min, p.k_max) == ("fixed", 6, 6)


def test_the_model_routes_by_the_mask_ratio_of_its_input():
    """The model hands each MoE layer row_masked = (input_ids == mask_token_id): each window's
    capacity follows its own mask ratio; the kernels and the reference agree through the
    patched model, and generate() decodes with and without the cache alike."""
    import copy

    from dmoe_triton import generate
    from dmoe_triton.modules import moe_layers
    from dmoe_triton.patch import patch_model
    from dmoe_triton.testing import small_model

    model = small_model()
    mask_id = model.config.mask_token_id
    policy = ec("linear_reverse", k_min=1, k_max=12, block_size=8)
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[0, :8] = mask_id  # window 0 of sequence 0 all masked: c = ceil(8 * 1 / 16) = 1
    ids[1, 8:12] = mask_id  # half masked: c = ceil((8 + 11 * 4) / 16) = 4
    outs = {}
    for backend in ("reference", "triton"):
        patched = patch_model(copy.deepcopy(model).to(DEVICE), policy, backend=backend)
        with torch.no_grad():
            outs[backend] = patched(on(ids)).logits
        block = moe_layers(patched)[0].last_route.topk_ids.cpu()
        per_window = (block.view(2, 2, 8, -1) >= 0).sum(2)  # [seq, window, E]
        assert (per_window[0, 0] == 1).all() and (per_window[1, 1] == 4).all()
        assert (per_window[0, 1] == 12 * 8 // 16).all()  # no mask: k_max
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-4)
    patched = patch_model(copy.deepcopy(model).to(DEVICE), policy)
    # A prompt of distinct tokens: repeated ones tie their rows exactly on one path and nearly
    # on the other (a different summation order), and expert choice may break such ties apart.
    prompt = on(torch.randint(3, 80, (2, 8), generator=torch.Generator().manual_seed(0)))
    runs = [generate(patched, prompt, gen_length=8, block_length=8, steps=8, use_cache=c,
                     eos_id=-1, mask_id=mask_id, stats=False).tokens for c in (True, False)]
    assert runs[0] == runs[1]


@pytest.mark.gpu
def test_expert_choice_replays_in_a_cuda_graph_at_llada_shape():
    """E = 256, windows of 32, the mask ratio from a device tensor: captured once, replayed on
    new logits and masks, equal to the reference (no host sync anywhere in route)."""
    cfg = RouterConfig(256, 8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    policy = ec("linear_reverse", k_min=2, k_max=10, block_size=32, top_p=0.6, guard=16)
    x = torch.randn(4, 32, 256, device="cuda")
    masked = torch.rand(4, 32, device="cuda") < 0.5
    route(x, None, cfg, policy, "triton", row_masked=masked)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = route(x, None, cfg, policy, "triton", row_masked=masked)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(x.shape, device="cuda", generator=g))
        masked.copy_(torch.rand(masked.shape, device="cuda", generator=g) < 0.5)
        graph.replay()
        ref = route(x, None, cfg, policy, "reference", row_masked=masked)
        if torch.equal(ref.coreset, res.coreset):  # the top-p edge may round apart
            assert_same(ref, res)


def test_k_with_a_linear_schedule_is_refused_not_ignored():
    with pytest.raises(ValueError, match="k is for schedule 'fixed'"):
        RoutingPolicy.expert_choice(4, "linear", 2, 6)
    assert RoutingPolicy.expert_choice().k_min == 8  # fixed, LLaDA2's top-k by default
