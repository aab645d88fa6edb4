"""moe_forward (Triton, under the interpreter on the CPU) against the reference, and DMoEBlock."""
import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dmoe_triton import DMoEBlock, RouterConfig, RoutingPolicy, moe_forward, route
from dmoe_triton import launch
from dmoe_triton.launch import (DECODE_MAX_TOKENS, AlignLaunch, CombineLaunch, DecodeConfig,
                                GroupedConfig)
from dmoe_triton.moe import (align_slots, combine_slots, decode_down_combine, decode_gate_up,
                             expert_down, expert_gate_up, max_tiles, moe_forward_triton)
from dmoe_triton.reference import (align_slots_reference, expert_mlp_reference,
                                   moe_forward_reference)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture
def poison_scratch(monkeypatch):
    """Every torch.empty the wrapper makes (scratch, output) starts as NaN / -7, never zeros."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


def make_layer(E, H, I, dtype, device=DEV, gen=None):
    w_gate_up = (torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)).to(dtype).to(device)
    w_down = (torch.randn(E, H, I, generator=gen) / math.sqrt(I)).to(dtype).to(device)
    return w_gate_up, w_down


def rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def oracle(hidden, ids, weights, w_gate_up, w_down, shared=None):
    """The reference in float64."""
    shared = None if shared is None else tuple(t.double() for t in shared)
    return moe_forward_reference(hidden.double(), ids, weights.double(), w_gate_up.double(),
                                 w_down.double(), shared)


def check_against_reference(hidden, ids, weights, w_gate_up, w_down, tol, path="auto",
                            decode=DecodeConfig(), shared=None, grouped=None):
    out = torch.full_like(hidden, float("nan"))
    forced = dict(moe_path=None if path == "auto" else path, decode=decode, grouped=grouped)
    with launch.override(**forced):
        y = moe_forward(hidden, ids, weights, w_gate_up, w_down, backend="triton", out=out,
                        shared=shared)
    assert y.data_ptr() == out.data_ptr() and y.dtype == hidden.dtype
    ref = oracle(hidden, ids, weights, w_gate_up, w_down, shared)
    assert torch.isfinite(y).all(), "an output row was left unwritten (NaN poison survived)"
    assert rel_err(y, ref) <= tol, rel_err(y, ref)


@st.composite
def routings(draw):
    """Shapes (mostly small for the interpreter) and a routing with the edge cases mixed in."""
    E = draw(st.integers(1, 12))
    k = draw(st.integers(1, min(E, 4)))
    big = draw(st.integers(0, 5)) == 0
    T = draw(st.integers(40, 300)) if big else draw(st.integers(1, 24))
    H = draw(st.sampled_from([16, 24, 40, 64])) if not big else 16
    I = draw(st.sampled_from([8, 16, 20, 48])) if not big else 16
    kind = draw(st.sampled_from(["random", "one_expert", "every_expert", "empty_slots"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # Distinct experts per token, like a real gate: a random permutation per row.
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(torch.int32)
    if kind == "one_expert":
        ids[:, 0] = int(torch.randint(E, (1,), generator=g))
        ids[:, 1:] = -1
    elif kind == "every_expert":
        ids.view(-1)[: min(E, T * k)] = torch.arange(min(E, T * k), dtype=torch.int32)
    elif kind == "empty_slots":
        ids[torch.rand(T, k, generator=g) < 0.4] = -1
    weights = torch.rand(T, k, generator=g)
    if draw(st.booleans()):
        weights[:] = 0.5  # duplicate weights
    weights[ids < 0] = 0.0
    # Both kernel paths: the decode one only takes few tokens.
    path = draw(st.sampled_from(["decode", "grouped"])) if T <= DECODE_MAX_TOKENS else "grouped"
    # The decode path's down launch with its (expert, I step) pairs in 1..3 shares (partials +
    # last-arriver sum), its hidden columns in one block (the default 64) or several (16), I
    # in one step or several of 16 (then a share may start or end inside an expert); the
    # gate/up's last partial wave of items cut into pieces of 16 columns (the default) or
    # never cut (64 = block_i).
    decode = DecodeConfig(down_splits=draw(st.integers(1, 3)),
                          block_h=draw(st.sampled_from([16, 64])),
                          k_tile_down=draw(st.sampled_from([16, 256])),
                          tail_cols=draw(st.sampled_from([16, 64])))
    # The grouped path's work items: an expert's slots in one or many tiles (block_m), its
    # columns in one or several slices.
    grouped = GroupedConfig(block_m=draw(st.sampled_from([16, 32])),
                            block_i=draw(st.sampled_from([16, 64])), block_h=16)
    with_shared = draw(st.booleans())  # a shared expert: one more expert every token uses
    return T, H, I, E, ids, weights, g, path, decode, grouped, with_shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@given(case=routings())
def test_kernel_matches_reference(dtype, case):
    T, H, I, E, ids, weights, g, path, decode, grouped, with_shared = case
    hidden = torch.randn(T, H, generator=g).to(dtype)
    w_gate_up, w_down = make_layer(E, H, I, dtype, "cpu", g)
    to = dict(device=DEV)
    shared = None
    if with_shared:
        gate_up, down = make_layer(1, H, I, dtype, DEV, g)
        shared = (gate_up[0], down[0])
    check_against_reference(hidden.to(**to), ids.to(**to), weights.to(**to), w_gate_up.to(**to),
                            w_down.to(**to), TOL[dtype], path, decode, shared, grouped)


def decode_tables_reference(ids, weights, E, with_shared, T_PAD):
    """The decode gate/up's list and table (ActRows.used, row_weight) from ids / weights (CPU):
    the used experts in id order (E: the shared expert, last); for each, token t's routing
    weight (the sum of its slots naming the expert, NaN included; the shared expert's 1; 0
    where t does not use it), over T_PAD token columns (padding columns: 0)."""
    T, k = ids.shape
    ids = ids.long()
    experts = torch.unique(ids[(ids >= 0) & (ids < E)]).tolist() + ([E] if with_shared else [])
    weight = torch.zeros(len(experts), T_PAD)
    for u, e in enumerate(experts):
        if e == E:
            weight[u, :T] = 1.0
            continue
        weight[u, :T] = torch.where(ids == e, weights, 0.0).sum(1)
    return experts, weight


@pytest.mark.parametrize("T", [1, 5, 17])
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("n_experts", [3, 4, 5])  # 5 items on the CPU's 4 programs: a tail cut
def test_decode_gate_up_writes_every_table_entry_the_down_reads(poison_scratch, T, with_shared,
                                                                 n_experts):
    """Every entry the decode down loads, for every used expert and all T_PAD token columns:
    the list, the routing weights, and the act rows (u * T_PAD + t), which the down reads
    unmasked, so a token that does not use the expert must have its row written as zeros. Cases:
    a token listing an expert twice, empty and out-of-range slots (their NaN weights have no
    say), a NaN weight in a filled slot, padding columns past T, the shared expert, the last
    item cut into pieces. Scratch is poisoned (NaN / -7), so an entry left unwritten differs
    from the reference."""
    g = torch.Generator().manual_seed(T * 10 + n_experts)
    H, I, E, k = 16, 64, 12, 3
    ids = torch.randint(0, n_experts, (T, k), generator=g, dtype=torch.int32)
    weights = torch.rand(T, k, generator=g)
    ids[0, 1] = ids[0, 0]  # token 0 lists its expert twice
    if T > 1:
        ids[1] = torch.tensor([-1, E, 100], dtype=torch.int32)  # empty and out-of-range slots
        weights[1] = float("nan")
    if T > 2:
        weights[2, 2] = float("nan")  # a NaN weight in a filled slot
    hidden = torch.randn(T, H, generator=g).to(DEV)
    w_gate_up, _ = make_layer(E, H, I, torch.float32, DEV, g)
    shared = make_layer(1, H, I, torch.float32, DEV, g)[0][0] if with_shared else None
    config = DecodeConfig(block_i=64, tail_cols=16, tail_k_tile=16)
    acts = decode_gate_up(hidden, ids.to(DEV), weights.to(DEV), w_gate_up, None, config, shared)
    T_PAD = acts.row_weight.shape[1]
    experts, weight = decode_tables_reference(ids, weights, E, with_shared, T_PAD)
    U = len(experts)
    assert acts.row_weight.shape == (min(E, T * k) + with_shared, T_PAD)
    assert acts.act.shape == ((min(E, T * k) + with_shared) * T_PAD, I)
    assert acts.used.cpu()[:U].tolist() == experts and int(acts.used[-1]) == U  # count: last
    # A token naming an expert in 2 or 3 slots sums their weights in tl.sum's tree order (the
    # H200 differed from the reference's left-to-right sum by an ulp): rtol 2**-22, the bound
    # for three positive terms summed in two orders (2 to 4 ulps, by where the value lies).
    torch.testing.assert_close(acts.row_weight.cpu()[:U], weight, rtol=2 ** -22, atol=0,
                               equal_nan=True)
    unused = (weight == 0).reshape(-1)  # token rows of an expert they do not use, padding too
    assert torch.equal(acts.act.cpu()[:U * T_PAD][unused], torch.zeros(int(unused.sum()), I))


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("tail_cols", [16, 32])
def test_decode_cuts_work_inside_an_expert(poison_scratch, splits, tail_cols):
    """The decode launches split an expert's work between programs: the down's shares are
    even in (expert, I step) pairs, so a share may start or end inside an expert (4 I steps
    of 16 here), and the gate/up cuts the items of its last, partial wave into pieces of
    tail_cols columns when the pieces fit in one more wave. The interpreter runs 4 programs.
    At block_i 64 (I = 64) an item is an expert: 7 routed + the shared one make two full
    waves; 8 + 1 leave the shared expert to cut, 9 without it a routed one; 6 + 1 leave 3
    items, whole (the pieces would not fit in a wave). At block_i 32 an expert is 2 items:
    4 + 1 experts leave 2 items, cut when tail_cols is 16. The pieces take 2 k steps of 16
    along H = 32 (DecodeConfig.tail_k_tile). Scratch is poisoned: the down reads each step's
    expert from the list that whole items and pieces alike must write."""
    g = torch.Generator().manual_seed(5)
    T, H, I, E, k = 8, 32, 64, 12, 2
    for n_experts, with_shared, block_i in ((7, True, 64), (8, True, 64), (9, False, 64),
                                            (6, True, 64), (4, True, 32)):
        decode = DecodeConfig(down_splits=splits, k_tile_down=16, block_i=block_i,
                              tail_cols=min(tail_cols, block_i), tail_k_tile=16)
        hidden = torch.randn(T, H, generator=g).to(DEV)
        ids = (torch.arange(T * k).view(T, k) % n_experts).to(torch.int32).to(DEV)
        weights = torch.rand(T, k, generator=g).to(DEV)
        w_gate_up, w_down = make_layer(E, H, I, torch.float32, DEV, g)
        shared = None
        if with_shared:
            gate_up, down = make_layer(1, H, I, torch.float32, DEV, g)
            shared = (gate_up[0], down[0])
        check_against_reference(hidden, ids, weights, w_gate_up, w_down, 1e-4, "decode", decode,
                                shared)


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_shared_expert_alone_when_every_slot_is_empty(path):
    """No routed expert at all: the output is the shared expert alone (not zeros, not NaN)."""
    g = torch.Generator().manual_seed(3)
    T, H, I, E = 20 if path == "decode" else 70, 24, 16, 4
    hidden = torch.randn(T, H, generator=g).to(DEV)
    ids = torch.full((T, 2), -1, dtype=torch.int32, device=DEV)
    weights = torch.zeros(T, 2, device=DEV)
    w_gate_up, w_down = make_layer(E, H, I, torch.float32, DEV, g)
    gate_up, down = make_layer(1, H, I, torch.float32, DEV, g)
    check_against_reference(hidden, ids, weights, w_gate_up, w_down, 1e-4, path,
                            shared=(gate_up[0], down[0]))


@pytest.mark.parametrize("path", ["decode", "grouped"])
@pytest.mark.parametrize("top_k", [2, 0])
def test_shared_expert_is_one_more_expert(path, top_k):
    """On both paths the shared expert is expert E of the same launches, in one more slot of
    every token with weight 1 (the sum's last term): bit for bit the layer with it routed so;
    with no routed slot (top_k 0) the shared expert alone."""
    g = torch.Generator().manual_seed(4)
    T, H, I, E = 20 if path == "decode" else 70, 24, 16, 4  # the decode path takes <= 64
    hidden = torch.randn(T, H, generator=g).to(torch.float16).to(DEV)
    ids = torch.randint(0, E, (T, top_k), generator=g).to(torch.int32).to(DEV)
    weights = torch.rand(T, top_k, generator=g).to(DEV)
    w_gate_up, w_down = make_layer(E, H, I, torch.float16, DEV, g)
    gate_up, down = make_layer(1, H, I, torch.float16, DEV, g)
    with launch.override(moe_path=path):
        y = moe_forward(hidden, ids, weights, w_gate_up, w_down, backend="triton",
                        shared=(gate_up[0], down[0]))
        as_routed = moe_forward(
            hidden, torch.cat((ids, torch.full((T, 1), E, dtype=ids.dtype, device=DEV)), 1),
            torch.cat((weights, torch.ones(T, 1, device=DEV)), 1),
            torch.cat((w_gate_up, gate_up)), torch.cat((w_down, down)), backend="triton")
    if path == "grouped":  # (the decode path lists it after the used experts: another order;
        assert torch.equal(y, as_routed)  # with top_k 0 the shared expert takes the grouped path)
    assert rel_err(y, oracle(hidden, ids, weights, w_gate_up, w_down, (gate_up[0], down[0]))) \
        <= TOL[torch.float16]


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_nan_rule_beside_a_shared_expert(path):
    """docs/routing.md's NaN rule reads the routed slots only: a NaN weight in a filled slot,
    or every routed slot empty with NaN weights, gives a NaN row even though the shared
    expert's slot is filled; other rows stay finite."""
    g = torch.Generator().manual_seed(5)
    T, H, I, E = 20 if path == "decode" else 70, 24, 16, 4
    hidden = torch.randn(T, H, generator=g).to(DEV)
    ids = torch.randint(0, E, (T, 2), generator=g).to(torch.int32)
    weights = torch.rand(T, 2, generator=g)
    ids[0, 1], weights[0, 1] = 1, float("nan")
    ids[2], weights[2] = -1, float("nan")
    ids[3, 1], weights[3, 1] = -1, float("nan")  # an empty slot's NaN: no say
    w_gate_up, w_down = make_layer(E, H, I, torch.float32, DEV, g)
    gate_up, down = make_layer(1, H, I, torch.float32, DEV, g)
    for backend in ("triton", "reference"):
        with launch.override(moe_path=path):
            y = moe_forward(hidden, ids.to(DEV), weights.to(DEV), w_gate_up, w_down,
                            backend=backend, shared=(gate_up[0], down[0]))
        rows_nan = torch.isnan(y).all(1).cpu()
        assert rows_nan[0] and rows_nan[2] and not torch.isnan(y).any(1).cpu()[[1, 3]].any()
        assert int(torch.isnan(y).any(1).sum()) == 2, backend


def test_shared_must_match_the_experts_layout():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 16, generator=g)
    ids = torch.zeros(4, 1, dtype=torch.int32)
    w_gate_up, w_down = make_layer(2, 16, 8, torch.float32, "cpu", g)
    with pytest.raises(ValueError, match="shared\\[1\\] \\(down\\) must have"):
        moe_forward(hidden, ids, torch.ones(4, 1), w_gate_up, w_down,
                    shared=(w_gate_up[0], w_down[0].T))
    with pytest.raises(TypeError, match="shared must be None or a pair"):
        moe_forward(hidden, ids, torch.ones(4, 1), w_gate_up, w_down, shared=w_gate_up[0])


@pytest.mark.parametrize("T", [37, DECODE_MAX_TOKENS + 3])  # decode path, grouped path
@pytest.mark.parametrize("with_shared", [False, True])
def test_scratch_poisoned_and_every_row_written(poison_scratch, T, with_shared):
    g = torch.Generator().manual_seed(1)
    H, I, E, k = 40, 24, 5, 3
    hidden = torch.randn(T, H, generator=g).to(DEV)
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(torch.int32)
    ids[::4, 1] = -1
    weights = torch.rand(T, k, generator=g)
    w_gate_up, w_down = make_layer(E, H, I, torch.float32, "cpu", g)
    shared = None
    if with_shared:
        gate_up, down = make_layer(1, H, I, torch.float32, DEV, g)
        shared = (gate_up[0], down[0])
    y = moe_forward(hidden, ids.to(DEV), weights.to(DEV), w_gate_up.to(DEV), w_down.to(DEV),
                    backend="triton", shared=shared)
    ref = oracle(hidden, ids.to(DEV), weights.to(DEV), w_gate_up.to(DEV), w_down.to(DEV),
                 shared)
    assert torch.isfinite(y).all() and rel_err(y, ref) <= 1e-4


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_decode_down_splits_agree_and_leave_counters_zeroed(splits):
    """Shares of the (expert, I step) pairs (more shares than pairs too) sum to the one-program
    result; the arrival counters are zero after each launch, so the down launch can be replayed
    on its own."""
    g = torch.Generator().manual_seed(4)
    T, H, I, E, k = 20, 48, 24, 6, 2
    hidden = torch.randn(T, H, generator=g).to(DEV)
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(torch.int32)
    ids[:, 1] = -1
    ids[: T // 2, 0] = 3  # two used experts: fewer than 3 shares
    ids[T // 2:, 0] = 5
    ids, weights = ids.to(DEV), torch.rand(T, k, generator=g).to(DEV)
    w_gate_up, w_down = make_layer(E, H, I, torch.float32, "cpu", g)
    w_gate_up, w_down = w_gate_up.to(DEV), w_down.to(DEV)
    config = DecodeConfig(block_h=16, down_splits=splits)
    arrivals = torch.full((H // 16,), -7, dtype=torch.int32, device=DEV)  # poison: gate/up zeroes
    act = decode_gate_up(hidden, ids, weights, w_gate_up, None if splits == 1 else arrivals,
                         config)
    ref = oracle(hidden, ids, weights, w_gate_up, w_down)
    for _ in range(2):
        out = torch.full_like(hidden, float("nan"))
        decode_down_combine(act, ids, weights, w_down, out, arrivals, config)
        assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-4
        if splits > 1:
            assert torch.equal(arrivals, torch.zeros_like(arrivals))
    with pytest.raises(ValueError, match="down_splits"):
        DecodeConfig(down_splits=0)


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_all_slots_empty_gives_zeros(path):
    hidden = torch.randn(6, 16, device=DEV)
    ids = torch.full((6, 2), -1, dtype=torch.int32, device=DEV)
    w_gate_up, w_down = make_layer(3, 16, 16, torch.float32)
    out = torch.full_like(hidden, float("nan"))
    y = moe_forward_triton(hidden, ids, torch.zeros(6, 2, device=DEV), w_gate_up, w_down,
                           out=out, path=path)
    assert torch.equal(y, torch.zeros_like(hidden))


@pytest.mark.parametrize("unroll", [1, 3, 16, 32])
def test_combine_of_wide_slot_rows_in_steps(unroll):
    """Expert choice's [T, E] layout gives every token E slots: the combine loops over them in
    steps of CombineLaunch.unroll (a whole unroll of 256 slots took minutes to compile) with a
    last step past the row's end (20 slots, steps of 3); below `unroll` slots it unrolls
    whole. Same sum as the reference either way, and the NaN rule holds: a token with every
    slot empty and every weight NaN is NaN, one with a filled slot is not."""
    g = torch.Generator().manual_seed(5)
    T, H, I, E, k = DECODE_MAX_TOKENS + 6, 16, 16, 24, 20
    hidden = torch.randn(T, H, generator=g)
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(torch.int32)
    ids[torch.rand(T, k, generator=g) < 0.7] = -1  # sparse rows, as expert choice leaves them
    weights = torch.where(ids >= 0, torch.rand(T, k, generator=g), 0.0)
    ids[0], weights[0] = -1, float("nan")  # no expert, all-NaN weights: NaN
    ids[1], weights[1] = -1, float("nan")
    ids[1, k - 1], weights[1, k - 1] = 3, 0.5  # only the last slot filled: not NaN
    w_gate_up, w_down = make_layer(E, H, I, torch.float32, "cpu", g)
    with launch.override(combine=CombineLaunch(unroll=unroll)):
        y = moe_forward_triton(hidden.to(DEV), ids.to(DEV), weights.to(DEV), w_gate_up.to(DEV),
                               w_down.to(DEV), out=torch.full((T, H), float("nan"), device=DEV),
                               path="grouped").cpu()
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1:]).all()
    want = oracle(hidden[1:], ids[1:], weights[1:], w_gate_up, w_down)
    assert rel_err(y[1:], want) <= 1e-4


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_nan_weight_in_empty_slot_does_not_leak(path):
    hidden = torch.randn(3, 16, device=DEV)
    ids = torch.tensor([[0, -1], [1, 2], [-1, -1]], dtype=torch.int32, device=DEV)
    weights = torch.tensor([[1.0, float("nan")], [0.5, 0.5], [float("nan"), 0.0]], device=DEV)
    w_gate_up, w_down = make_layer(3, 16, 16, torch.float32)
    y = moe_forward_triton(hidden, ids, weights, w_gate_up, w_down, path=path)
    assert torch.isfinite(y).all()
    assert rel_err(y, oracle(hidden, ids, weights, w_gate_up, w_down)) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_partials_are_weighted_terms_in_the_output_dtype(dtype):
    """The grouped down writes w[t, j] * expert(x[t]) per filled slot, in the output's dtype
    (the weight applied before the one rounding; the combine only adds): docs/moe.md."""
    g = torch.Generator().manual_seed(5)
    E, H, I, T, k = 5, 32, 16, 70, 3
    hidden = torch.randn(T, H, generator=g).to(dtype).to(DEV)
    ids = torch.randint(-1, E, (T, k), generator=g, dtype=torch.int32).to(DEV)
    weights = (0.1 + torch.rand(T, k, generator=g)).to(DEV)
    ids[7, 1], weights[7, 1] = 2, float("nan")  # a filled slot's NaN weight: its partial NaN
    w_gate_up, w_down = make_layer(E, H, I, dtype, "cpu", g)
    w_gate_up, w_down = w_gate_up.to(DEV), w_down.to(DEV)
    config = GroupedConfig(block_m=16, block_i=16, block_h=16)
    lists = align_slots(ids, E, config.block_m)
    acts = expert_gate_up(hidden, w_gate_up, lists, k, config)
    partial = expert_down(acts, w_down, lists, weights, dtype, config)
    assert partial.dtype == dtype and partial.shape == (T * k, H)
    for slot in torch.nonzero(ids.view(-1) >= 0).view(-1).tolist():
        t, j = divmod(slot, k)
        e = int(ids[t, j])
        want = weights[t, j].double() * expert_mlp_reference(
            hidden[t:t + 1].double(), w_gate_up[e].double(), w_down[e].double())[0]
        got = partial[slot].double()
        if (t, j) == (7, 1):
            assert torch.isnan(got).all()
        else:
            assert rel_err(got, want) <= TOL[dtype] / 2, (slot, rel_err(got, want))


def test_int64_ids_and_strided_hidden():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(9, 64, generator=g)
    hidden = base[:, :32].to(DEV)  # row stride 64
    ids = torch.argsort(torch.rand(9, 4, generator=g), dim=1)[:, :2].to(DEV)  # int64
    weights = torch.rand(9, 2, generator=g).to(DEV)
    w_gate_up, w_down = make_layer(4, 32, 16, torch.float32)
    check_against_reference(hidden, ids, weights, w_gate_up, w_down, 1e-4)


@pytest.mark.parametrize("E,T,k,block_m,chunk,rows,wide,shared", [
    (7, 50, 3, 1, 16, 2, 0, False), (7, 50, 3, 2, 32, 1, 0, False),
    (7, 50, 3, 16, 128, 32, 0, False),
    (256, 600, 8, 32, 128, 32, 0, False),  # LLaDA2.0-mini's experts, 38 chunks (4800 slots)
    (257, 600, 8, 32, 128, 32, 0, True),   # and its shared expert: 5400 slots
    (7, 50, 3, 16, 16, 2, 2**32, False),   # int64 ids, some past int32 (2**32 + e cut is e)
    (7, 50, 3, 4, 16, 2, 2**32, True), (7, 50, 0, 16, 16, 2, 0, True)])  # shared alone
def test_align_kernels_match_the_torch_reference(E, T, k, block_m, chunk, rows, wide, shared):
    """The counting sort (several chunks and chunk-sum steps, out-of-range ids, a last chunk
    cut short) gives the reference's lists, the sorted slots whole (empty slots last). With a
    shared expert (expert E - 1, one more slot per token held in no tensor) a routed id E - 1
    is out of range: an empty slot, not the shared expert."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(-3, E + 3, (T, k), generator=g, dtype=torch.int32)  # bad ids too
    if wide:
        ids = ids.long() + wide * (torch.rand(T, k, generator=g) < 0.5)
    if shared and k:
        ids[::5, 0] = E - 1  # the shared expert's id among the routed ones: empty
    ids = ids.to(DEV)
    with launch.override(align=AlignLaunch(chunk=chunk, rows=rows)):
        got = align_slots(ids, E, block_m, shared)
    want = align_slots_reference(ids, E, block_m, shared)
    n = int(want.n_used)
    assert int(got.n_used) == n and int(got.n_tiles) == int(want.n_tiles)
    for a, b in zip(got[1:4], want[1:4]):
        assert torch.equal(a[:n], b[:n])
    assert torch.equal(got.used_tile, want.used_tile)  # past n_used too: n_tiles there
    assert torch.equal(got.sorted_slots, want.sorted_slots)
    filled = int(want.used_count[:n].sum())
    flat = ids.view(-1).long()
    assert int(((flat >= 0) & (flat < E - shared)).sum()) + shared * T == filled
    # Each used expert's tiles follow the previous expert's, and they cover its slots.
    counts = want.used_count[:n].long()
    tiles = (counts + block_m - 1) // block_m
    assert torch.equal(want.used_tile[:n].long(), torch.cumsum(tiles, 0) - tiles)
    assert int(want.n_tiles) == int(tiles.sum()) <= max_tiles(T * (k + shared), E, block_m)
    assert bool((want.used_tile[n:] == want.n_tiles).all())


def test_grouped_launches_refuse_other_routing_layouts():
    """align_slots, expert_down and combine_slots take the routing as contiguous [T, top_k] and
    add a shared expert's slot themselves: a flat or transposed tensor, or one that already
    holds the shared slot (the layout before the tenth session), is a ValueError naming it."""
    T, k, E, H, I = 6, 3, 4, 16, 16
    ids = torch.randint(0, E, (T, k), dtype=torch.int32, device=DEV)
    weights = torch.rand(T, k, device=DEV)
    for bad in (ids.view(-1), ids.t(), ids.repeat(1, 2)[:, ::2]):  # flat, transposed, sliced
        with pytest.raises(ValueError, match="ids must be a contiguous \\[T, top_k\\]"):
            align_slots(bad, E + 1, 16, shared=True)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        align_slots(ids.float(), E + 1, 16, shared=True)
    config = GroupedConfig(block_m=16, block_i=16, block_h=16)
    w_gate_up, w_down = make_layer(E, H, I, torch.float32)
    hidden = torch.randn(T, H, device=DEV)
    lists = align_slots(ids, E + 1, 16, shared=True)
    acts = expert_gate_up(hidden, w_gate_up, lists, k + 1, config, shared_gate_up=w_gate_up[0])
    with_slot = torch.cat([weights, torch.ones(T, 1, device=DEV)], dim=1)
    with pytest.raises(ValueError, match="weights must be .* match the 24 slot rows"):
        expert_down(acts, w_down, lists, with_slot, torch.float32, config, shared_down=w_down[0])
    partial = torch.randn(T * (k + 1), H, device=DEV)
    with pytest.raises(ValueError, match="ids must be"):
        combine_slots(partial, ids[:, :2], weights[:, :2], hidden.clone(), E + 1, shared=True)
    with pytest.raises(ValueError, match="weights must be"):
        combine_slots(partial, ids, with_slot, hidden.clone(), E + 1, shared=True)


@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_out_of_range_ids_rejected_on_cpu_and_skipped_by_kernel(path, with_shared):
    """An unchecked bad id is an empty slot on both paths; with a shared expert too, whose own
    slot the grouped path gives id E: a routed id E must not become the shared expert."""
    hidden = torch.randn(4, 16)
    w_gate_up, w_down = make_layer(3, 16, 16, torch.float32, "cpu")
    shared = None
    if with_shared:
        gate_up, down = make_layer(1, 16, 16, torch.float32, "cpu")
        shared = (gate_up[0], down[0])
    weights = torch.rand(4, 2)
    for bad in (3, -2, 100, 2**32 + 1):  # the last: int64 only, 1 if cut to 32 bits
        dtype = torch.int64 if bad > 2**31 else torch.int32
        ids = torch.tensor([[0, 1], [2, bad], [1, -1], [0, 2]], dtype=dtype)
        with pytest.raises(ValueError, match="topk_ids"):
            moe_forward(hidden, ids, weights, w_gate_up, w_down, backend="reference")
        # Unchecked, the kernel treats the id as an empty slot and never reads out of bounds.
        to = dict(device=DEV)
        y = moe_forward_triton(
            hidden.to(**to), ids.to(**to), weights.to(**to), w_gate_up.to(**to),
            w_down.to(**to), path=path,
            shared=None if shared is None else tuple(t.to(**to) for t in shared))
        ref = oracle(hidden, ids, weights, w_gate_up, w_down, shared)
        assert rel_err(y.cpu(), ref) <= 1e-4, bad


# Known divergence (docs/moe.md): the decode down multiplies every token's act row of an expert
# (zeros for the tokens that do not use it) by its weights, 0 x inf = NaN, so every token is NaN.
_DOWN_INF_ON_DECODE = pytest.mark.xfail(strict=True, reason="known: an inf in w_down on the "
                                        "decode path makes every token NaN (docs/moe.md)")


@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("path, weight", [
    ("decode", "w_gate_up"), ("grouped", "w_gate_up"),
    pytest.param("decode", "w_down", marks=_DOWN_INF_ON_DECODE), ("grouped", "w_down")])
def test_non_finite_expert_reaches_only_its_tokens(path, weight, with_shared):
    """An expert with an inf weight (its first gate row, or its down) makes non-finite outputs
    for the tokens that use it and for no other (as the reference does): a kernel must not
    multiply another token's zero row by it (0 * inf = NaN). One token lists an expert twice:
    both slots' weights count."""
    g = torch.Generator().manual_seed(6)
    T, H, I, E = 6, 16, 32, 4
    hidden = torch.randn(T, H, generator=g)
    w_gate_up, w_down = make_layer(E, H, I, torch.float32, "cpu", g)
    (w_gate_up if weight == "w_gate_up" else w_down)[2, 0, 0] = float("inf")  # expert 2's
    ids = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0], [0, 2], [1, 3]], dtype=torch.int32)
    weights = torch.rand(T, 2, generator=g)
    shared = None
    if with_shared:
        gate_up, down = make_layer(1, H, I, torch.float32, "cpu", g)
        shared = (gate_up[0], down[0])
    to = dict(device=DEV)
    y = moe_forward_triton(hidden.to(**to), ids.to(**to), weights.to(**to), w_gate_up.to(**to),
                           w_down.to(**to), path=path,
                           shared=None if shared is None else tuple(t.to(**to) for t in shared))
    ref = oracle(hidden, ids, weights, w_gate_up, w_down, shared)
    uses_2 = (ids == 2).any(1)
    assert torch.equal(~y.cpu().isfinite().all(1), uses_2)
    assert torch.equal(~ref.isfinite().all(1), uses_2)
    assert rel_err(y.cpu()[~uses_2], ref[~uses_2]) <= 1e-4


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_fp16_routing_weight_does_not_overflow_an_act_row(path):
    """fp16: act = silu(256) * 128 = 32768 fits in fp16, weight 2.5 x act = 81920 does not, the
    output (1311) does. Weighing the fp16 act rows in the gate/up (as bf16 rows are) made inf
    on the decode path; the products are weighed in fp32 instead, as the reference does."""
    T, H, I, E = 4, 16, 16, 2
    hidden = torch.full((T, H), 16.0).half()
    w_gate_up = torch.cat([torch.ones(E, I, H), torch.full((E, I, H), 0.5)], 1).half()
    w_down = torch.full((E, H, I), 1e-3).half()
    ids = torch.tensor([[0], [1], [0], [1]], dtype=torch.int32)
    weights = torch.tensor([[2.5], [1.0], [2.0], [2.5]])
    to = dict(device=DEV)
    y = moe_forward_triton(hidden.to(**to), ids.to(**to), weights.to(**to), w_gate_up.to(**to),
                           w_down.to(**to), path=path).cpu()
    ref = oracle(hidden, ids, weights, w_gate_up, w_down, None)
    assert ref.isfinite().all() and float(ref[0, 0]) > 1000
    assert rel_err(y, ref) <= 2e-3


def test_bad_inputs_name_the_argument():
    T, H, I, E, k = 4, 16, 8, 3, 2
    ok = dict(hidden=torch.randn(T, H), topk_ids=torch.zeros(T, k, dtype=torch.int32),
              topk_weights=torch.rand(T, k), w_gate_up=torch.randn(E, 2 * I, H),
              w_down=torch.randn(E, H, I))
    cases = [
        ("hidden", torch.randn(T, H, 1), ValueError),
        ("hidden", torch.randn(T, H).to(torch.float64), TypeError),
        ("topk_ids", torch.zeros(T + 1, k, dtype=torch.int32), ValueError),
        ("topk_ids", torch.zeros(T, k), TypeError),
        ("topk_weights", torch.rand(T, k + 1), ValueError),
        ("topk_weights", torch.rand(T, k).half(), TypeError),
        ("w_gate_up", torch.randn(E, 2 * I, H + 1), ValueError),
        ("w_gate_up", torch.randn(E, 2 * I + 1, H), ValueError),
        ("w_gate_up", torch.randn(E, 2 * I, H).half(), TypeError),
        ("w_down", torch.randn(E, H, I + 1), ValueError),
        ("w_down", torch.randn(E + 1, H, I), ValueError),
        ("w_down", torch.randn(E, H, I, device="meta"), TypeError),
        ("hidden", [[1.0]], TypeError),
    ]
    for name, value, err in cases:
        with pytest.raises(err, match=name):
            moe_forward(**{**ok, name: value})
    with pytest.raises(ValueError, match="backend"):
        moe_forward(**ok, backend="cuda")
    with pytest.raises(ValueError, match="out"):
        moe_forward(**ok, out=torch.empty(T + 1, H))
    with pytest.raises(TypeError, match="out"):
        moe_forward(**ok, out=torch.empty(T, H).half())


# ----------------------------------------------------------------------------------------------
# DMoEBlock
# ----------------------------------------------------------------------------------------------

class MLP(torch.nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.gate_proj = torch.nn.Linear(H, I, bias=False)
        self.up_proj = torch.nn.Linear(H, I, bias=False)
        self.down_proj = torch.nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(torch.nn.Module):
    def __init__(self, E, H):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(E, H) / math.sqrt(H))
        self.register_buffer("expert_bias", torch.randn(E) * 0.1)


class OfficialMoE(torch.nn.Module):
    """The layout of LLaDA2's `mlp` in a MoE layer (official parameter names)."""

    def __init__(self, E, H, I):
        super().__init__()
        self.gate = Gate(E, H)
        self.experts = torch.nn.ModuleList(MLP(H, I) for _ in range(E))
        self.shared_experts = MLP(H, I)


TINY = dict(num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
            routed_scaling_factor=2.5)


@torch.no_grad()
def per_expert_loop(mlp, cfg, policy, hidden):
    """Straight from the official modules: route, then loop over tokens and their experts."""
    logits = hidden.float() @ mlp.gate.weight.float().T
    r = route(logits, mlp.gate.expert_bias, cfg, policy, backend="reference")
    mlp = copy.deepcopy(mlp).double()
    flat = hidden.reshape(-1, hidden.shape[-1]).double()
    ids = r.topk_ids.reshape(flat.shape[0], -1)
    weights = r.topk_weights.reshape(flat.shape[0], -1).double()
    y = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(ids.shape[1]):
            if ids[t, j] >= 0:
                y[t] += weights[t, j] * mlp.experts[int(ids[t, j])](flat[t])
    return y.reshape(hidden.shape) + mlp.shared_experts(hidden.double()), r


@pytest.mark.parametrize("backend", ["reference", "triton"])
@torch.no_grad()
def test_dmoe_block_matches_per_expert_loop(backend):
    torch.manual_seed(0)
    H, I = 32, 16
    cfg = RouterConfig.from_hf(TINY)
    mlp = OfficialMoE(cfg.num_experts, H, I)
    hidden = torch.randn(2, 40, H)
    policy = RoutingPolicy.dmoe(top_p=0.6, guard=4, block_size=32)
    want, r_want = per_expert_loop(mlp, cfg, policy, hidden)
    block = DMoEBlock.from_official(mlp, TINY, policy, backend=backend).to(DEV)
    assert all(e.gate_proj.weight is None and e.down_proj.weight is None for e in mlp.experts)
    got = block(hidden.to(DEV))
    assert got.shape == hidden.shape
    assert rel_err(got.cpu(), want) <= 1e-4
    assert torch.equal(block.last_route.topk_ids.cpu(), r_want.topk_ids)
    assert block.last_route.coreset is not None
    block.set_policy(RoutingPolicy.token())  # switch at run time, no repacking
    want_token, _ = per_expert_loop(mlp_copy_with(block, mlp), cfg, RoutingPolicy.token(), hidden)
    assert rel_err(block(hidden.to(DEV)).cpu(), want_token) <= 1e-4
    assert block.last_route.coreset is None


def mlp_copy_with(block, released):
    """An official module rebuilt from the block's stacked weights (the original was released)."""
    E, two_i, H = block.w_gate_up.shape
    I = two_i // 2
    mlp = OfficialMoE(E, H, I)
    with torch.no_grad():
        mlp.gate.weight.copy_(block.gate_weight.cpu())
        mlp.gate.expert_bias.copy_(block.expert_bias.cpu())
        for e, expert in enumerate(mlp.experts):
            expert.gate_proj.weight.copy_(block.w_gate_up[e, :I].cpu())
            expert.up_proj.weight.copy_(block.w_gate_up[e, I:].cpu())
            expert.down_proj.weight.copy_(block.w_down[e].cpu())
    mlp.shared_experts.load_state_dict(released.shared_experts.state_dict())
    return mlp


def test_dmoe_block_errors_name_what_is_missing():
    mlp = OfficialMoE(16, 32, 16)
    del mlp.gate
    with pytest.raises(ValueError, match="gate"):
        DMoEBlock.from_official(mlp, TINY, RoutingPolicy.token())
    mlp = OfficialMoE(8, 32, 16)
    with pytest.raises(ValueError, match="experts"):
        DMoEBlock.from_official(mlp, TINY, RoutingPolicy.token())
    mlp = OfficialMoE(16, 32, 16)
    block = DMoEBlock.from_official(mlp, TINY, RoutingPolicy.token(), backend="reference")
    with pytest.raises(ValueError, match="guard"):
        block.set_policy(RoutingPolicy.dmoe(guard=17))
    with pytest.raises(ValueError, match="hidden"):
        block(torch.randn(4, 32))


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------

def llada_like_case(T=64, E=32, H=512, I=128, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(torch.int32)
    ids[::7, -1] = -1
    weights = torch.rand(T, k, generator=g)
    w_gate_up, w_down = make_layer(E, H, I, torch.float32, "cpu", g)
    return [t.cuda() for t in (hidden, ids, weights, w_gate_up, w_down)]


@pytest.mark.gpu
@pytest.mark.parametrize("T", [32, 33, 64, 128])  # one block, two (tokens padded to 64), grouped
def test_bf16_against_fp32_reference(T):
    hidden, ids, weights, w_gate_up, w_down = llada_like_case(T=T)
    ref = oracle(hidden.bfloat16(), ids, weights, w_gate_up.bfloat16(), w_down.bfloat16())
    y = moe_forward(hidden.bfloat16(), ids, weights, w_gate_up.bfloat16(), w_down.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel_err(y, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_matches_reference(dtype):
    hidden, ids, weights, w_gate_up, w_down = llada_like_case(T=300, E=24, H=256, I=96, k=4)
    check_against_reference(hidden.to(dtype), ids, weights, w_gate_up.to(dtype),
                            w_down.to(dtype), TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("T,splits", [(32, 1), (32, 2), (32, 4), (64, 4), (128, 2)])
@pytest.mark.parametrize("with_shared", [False, True])
def test_cuda_graph_replay_equals_eager(T, splits, with_shared):
    """The decode path at one and two blocks (its own config from 33 tokens), the grouped one
    at 128 tokens."""
    hidden, ids, weights, w_gate_up, w_down = llada_like_case(T=T)
    hidden, w_gate_up, w_down = hidden.bfloat16(), w_gate_up.bfloat16(), w_down.bfloat16()
    base = launch.moe_launch(T, ids.shape[1], w_gate_up.shape[0], torch.bfloat16,
                             hidden.device).decode
    decode = dataclasses.replace(base, down_splits=splits)
    # a shared expert: on the grouped path one more, virtual, slot per token (the SHARED
    # align, down and combine), which the graph must capture too
    shared = (w_gate_up[0].clone(), w_down[0].clone()) if with_shared else None

    def forward(out=None):  # moe_forward's kernel path with this test's decode config
        return moe_forward_triton(hidden, ids, weights, w_gate_up, w_down, out=out, decode=decode,
                                  shared=shared)

    eager = forward()
    out = torch.full_like(hidden, float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(out)  # warm-up: compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward(out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    # New routing in the same buffers: the graph follows the data, not the captured values.
    ids.copy_(torch.roll(ids, 1, dims=0))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, forward())


def _compiled_kernels(fn):
    """The kernels Triton compiled for `fn` so far (its per-device caches: an entry's first
    element is its kernel cache in Triton 3.x)."""
    for entry in fn.device_caches.values():
        yield from entry[0].values()


def _serving_layer(T, fp8):
    """LLaDA2.0-mini's MoE layer shapes (256 experts + a shared one, H 2048, I 512, top-8) on
    the GPU, random: the lists' USED_PAD (next_power_of_2(257)) sizes a vector of every work
    item, so the expert count matters to the registers."""
    from dmoe_triton.quant import quantize_experts, quantize_shared

    E, H, I, k = 256, 2048, 512, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    w_gate_up = torch.randn(E, 2 * I, H, device="cuda", generator=g) / math.sqrt(H)
    w_down = torch.randn(E, H, I, device="cuda", generator=g) / math.sqrt(I)
    hidden = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    ids = torch.argsort(torch.rand(T, E, device="cuda", generator=g), dim=1)[:, :k]
    weights = torch.rand(T, k, device="cuda", generator=g)
    shared = (w_gate_up[0].clone(), w_down[0].clone())
    if not fp8:
        return dict(hidden=hidden, topk_ids=ids, topk_weights=weights,
                    w_gate_up=w_gate_up.bfloat16(), w_down=w_down.bfloat16(),
                    shared=tuple(t.bfloat16() for t in shared))
    q_gate_up, q_down, scales = quantize_experts(w_gate_up, w_down)
    s_gate_up, s_down, shared_scales = quantize_shared(*shared)
    scales = dataclasses.replace(scales, shared=shared_scales)
    return dict(hidden=hidden, topk_ids=ids, topk_weights=weights, w_gate_up=q_gate_up,
                w_down=q_down, shared=(s_gate_up, s_down), scales=scales)


@pytest.mark.gpu
@pytest.mark.parametrize("T,fp8", [
    (512, False), (2048, False),  # tiles of 32 and of 64 slots (launch.moe_launch)
    pytest.param(2048, True, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
        "issue 16: the FP8 gate/up takes 254 registers a thread with 8 warps and 120 KB of "
        "shared memory, one program per SM where DEFAULT_GROUPED_FP8 asks for two")))])
def test_persistent_programs_fit_on_an_sm_together(T, fp8):
    """The grouped kernels' grids assume programs_per_sm programs run on an SM at once
    (launch.persistent_grid): their registers and shared memory must allow it. When one did
    not (an int64 division in the down's epilogue: 186 registers a thread at 64-slot tiles,
    tenth session), half the warps were left to hide the memory latency and the down took 2.2x
    as long, with the same results."""
    from dmoe_triton.kernels.moe_matmul import moe_down_kernel, moe_gate_up_kernel

    layer = _serving_layer(T, fp8)
    for fn in (moe_gate_up_kernel, moe_down_kernel):
        if not hasattr(fn, "device_caches"):
            pytest.skip("this Triton keeps no per-device kernel caches")
        fn.device_caches.clear()  # so the kernels below are this call's (Triton's disk cache
        # makes the recompile quick)
    moe_forward_triton(**layer, path="grouped")
    torch.cuda.synchronize()
    config = launch.moe_launch(T, 8, 256, torch.bfloat16, layer["hidden"].device, fp8=fp8).grouped
    props = torch.cuda.get_device_properties(layer["hidden"].device)
    # Fallbacks for a torch that does not report them: the H100's and H200's per-SM sizes.
    registers = getattr(props, "regs_per_multiprocessor", 65536)
    shared_memory = getattr(props, "shared_memory_per_multiprocessor", 233472)
    for fn in (moe_gate_up_kernel, moe_down_kernel):
        kernels = list(_compiled_kernels(fn))
        assert len(kernels) == 1, (fn.__name__, len(kernels))
        k = kernels[0]
        assert getattr(k, "n_regs", None), f"{fn.__name__}: Triton reported no register count"
        per_thread = -(-k.n_regs // 8) * 8  # allocated in steps of 8 a thread (256 a warp)
        by_registers = registers // (per_thread * 32 * k.metadata.num_warps)
        by_shared = shared_memory // (k.metadata.shared + 1024)  # CUDA keeps 1 KB per program
        assert min(by_registers, by_shared) >= config.programs_per_sm, (
            fn.__name__, k.n_regs, k.metadata.shared)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's bf16 trap: the CPU suite")
@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_interpreter_refuses_bf16_products(path):
    """Triton's interpreter computes tl.dot on bf16 operands wrongly (about 1e10 off on outputs
    near 10), so the Triton backend refuses bf16 weights there with a TypeError naming hidden
    instead of returning wrong values; fp16 runs and matches the reference, and so do bf16
    activations with FP8 weights, whose dots take fp16 or e4m3 operands (test_fp8.py). The
    attention kernel refuses a bf16 q the same way."""
    g = torch.Generator().manual_seed(8)
    T, H, I, E, k = 6, 32, 16, 4, 2
    hidden = torch.randn(T, H, generator=g)
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(torch.int32)
    weights = torch.rand(T, k, generator=g)
    w_gate_up, w_down = make_layer(E, H, I, torch.float32, "cpu", g)
    with launch.override(moe_path=path):
        with pytest.raises(TypeError, match="hidden is bfloat16.*interpreter"):
            moe_forward(hidden.bfloat16(), ids, weights, w_gate_up.bfloat16(),
                        w_down.bfloat16(), backend="triton")
        half = [t.half() for t in (hidden, w_gate_up, w_down)]
        y = moe_forward(half[0], ids, weights, *half[1:], backend="triton")
    ref = moe_forward_reference(half[0].float(), ids, weights, *(t.float() for t in half[1:]))
    assert rel_err(y, ref) <= 1e-2
    from dmoe_triton.attention import block_attention
    q = torch.randn(1, 4, 8, 16).bfloat16()
    kv = torch.randn(1, 2, 8, 16).bfloat16()
    with pytest.raises(TypeError, match="q is bfloat16.*interpreter"):
        block_attention(q, kv, kv, torch.zeros(1, 1, 16, 8, dtype=torch.bfloat16),
                        16 ** -0.5, backend="triton")
