"""Issue 11, items 1, 4 and 12: odd input layouts, NaN routing rows, int64 kernel offsets.

1. Every public entry (route, moe_forward, attention_prep, block_attention, DMoEBlock.forward)
   given transposed, sliced, offset or expanded views returns what the reference returns for
   the same values laid out contiguously (padding around the views is NaN: a wrong read shows).
4. A token that route flags for NaN scores (an all-NaN row: ids -1, NaN weights; a partly-NaN
   row: NaN weights) outputs NaN on every backend and path, with and without a shared expert;
   other rows are untouched.
12. Kernel offsets that pass 2**31 elements are int64: the real kernels run one program with a
   large program id under the interpreter, with loads and stores recorded instead of done (no
   8 GB tensor needed), and every address must be the exact int64 one.
"""
import contextlib
import math

import numpy as np
import pytest
import torch

from dmoe_triton import DMoEBlock, RouterConfig, RoutingPolicy, launch, moe_forward, route
from dmoe_triton.attention import attention_prep, block_attention
from dmoe_triton.launch import AttentionLaunch, DecodeConfig, RouteLaunch
from dmoe_triton.models.llada2 import rope_cos_sin
from dmoe_triton.reference import (attention_prep_reference, block_attention_reference,
                                   moe_forward_reference)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter (CPU) tests")

CFG = RouterConfig(16, 4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
POLICIES = [RoutingPolicy.token(), RoutingPolicy.dmoe(top_p=0.6, guard=4, block_size=4)]
KINDS = ["transposed", "strided", "offset", "expanded"]
NAN = float("nan")


def view_of(t, kind):
    """A non-contiguous view with (for all kinds but "expanded") t's values. The padding
    around the view holds NaN (floats) or -1 (ints), so a kernel that ignores the layout reads
    junk."""
    pad = NAN if t.is_floating_point() else -1
    if kind == "transposed" and t.dim() >= 2:  # transposed-then-transposed-back copy
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind in ("strided", "transposed"):  # x[..., ::2] of a twice-wider buffer
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), pad, dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]
    if kind == "offset" and t.dim() == 1:  # x[1:]
        buf = torch.full((t.shape[0] + 1,), pad, dtype=t.dtype)
        buf[1:] = t
        return buf[1:]
    if kind == "offset":  # storage_offset > 0 (x[1:]) and a row stride past the row
        buf = torch.full((t.shape[0] + 1, *t.shape[1:-1], t.shape[-1] + 3), pad, dtype=t.dtype)
        buf[1:, ..., :t.shape[-1]] = t
        view = buf[1:, ..., :t.shape[-1]]
        assert view.storage_offset() > 0
        return view
    assert kind == "expanded"  # stride 0 along the first dim (every entry = t[0])
    return t[:1].expand(t.shape)


def dense(t):
    return t.contiguous().clone()


# ---------------------------------------------------------------------------------------------
# item 1: route

@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_route_views(kind, policy):
    g = torch.Generator().manual_seed(1)
    logits = view_of(torch.randn(2, 8, 16, generator=g), kind)
    bias = view_of(0.05 * torch.randn(16, generator=g), kind)
    want = route(dense(logits), dense(bias), CFG, policy, backend="reference")
    for backend in ("triton", "reference"):
        got = route(logits, bias, CFG, policy, backend=backend)
        assert torch.equal(got.topk_ids, want.topk_ids), backend
        torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=1e-6, atol=1e-6)
        if policy.is_block:
            assert torch.equal(got.coreset, want.coreset)
        assert got.topk_ids.is_contiguous() and got.topk_weights.is_contiguous()


# ---------------------------------------------------------------------------------------------
# item 1: moe_forward

def make_moe(T=6, H=20, I=12, E=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[0, -1] = -1  # an empty slot
    weights = torch.rand(T, k, generator=g)
    weights[0, -1] = 0.0
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    w_down = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    shared = (torch.randn(2 * I, H, generator=g) / math.sqrt(H),
              torch.randn(H, I, generator=g) / math.sqrt(I))
    return hidden, ids, weights, w_gate_up, w_down, shared


def run_moe(args, backend, path, shared=None, out=None):
    with launch.override(moe_path=path):
        return moe_forward(*args, backend=backend, shared=shared, out=out)


@pytest.mark.parametrize("path", ["decode", "grouped"])
@pytest.mark.parametrize("kind", KINDS)
def test_moe_forward_views(kind, path):
    hidden, ids, weights, w_gate_up, w_down, shared = make_moe()
    args = tuple(view_of(t, kind) for t in (hidden, ids, weights, w_gate_up, w_down))
    shared_view = tuple(view_of(t, kind) for t in shared)
    want = moe_forward_reference(*map(dense, args), tuple(map(dense, shared_view)))
    for backend in ("triton", "reference"):
        got = run_moe(args, backend, path, shared=shared_view)
        assert got.is_contiguous() and got.shape == hidden.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_moe_forward_transposed_hidden_issue_example(path):
    """The issue's case: x = randn(48, 20), moe_forward(x.t(), ...) (hidden [20, 48])."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 20, generator=g)
    _, ids, weights, w_gate_up, w_down, _ = make_moe(T=20, H=48, seed=3)
    want = moe_forward_reference(x.t().contiguous(), ids, weights, w_gate_up, w_down)
    for backend in ("triton", "reference"):
        got = run_moe((x.t(), ids, weights, w_gate_up, w_down), backend, path)
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_moe_forward_out_views(path):
    """A row-sliced `out` (row stride > H, offset) is written in place; an `out` whose rows
    overlap (expanded) or that is not unit-stride along H is a ValueError naming out."""
    args = make_moe()[:5]
    want = moe_forward_reference(*args)
    T, H = args[0].shape
    buf = torch.full((T + 1, H + 5), NAN)
    out = buf[1:, 2:2 + H]
    for backend in ("triton", "reference"):
        buf.fill_(NAN)
        got = run_moe(args, backend, path, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        assert torch.isnan(buf[0]).all() and torch.isnan(buf[:, :2]).all()
        assert torch.isnan(buf[:, 2 + H:]).all()
        for bad in (torch.zeros(1, H).expand(T, H), torch.zeros(H, T).t()):
            with pytest.raises(ValueError, match="out"):
                run_moe(args, backend, path, out=bad)


# ---------------------------------------------------------------------------------------------
# item 1: attention

def prep_inputs(B=2, L=5, nh=4, nkv=2, hd=16, rd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = 3 * torch.randn(B, L, (nh + 2 * nkv) * hd, generator=g)
    q_weight = 1 + 0.3 * torch.randn(hd, generator=g)
    k_weight = 1 + 0.3 * torch.randn(hd, generator=g)
    positions = torch.arange(L).expand(B, L) + 7 * torch.arange(B)[:, None]
    cos, sin = rope_cos_sin(positions, rd, 600000.0, torch.float32)
    return qkv, q_weight, k_weight, cos, sin


@pytest.mark.parametrize("kind", KINDS)
def test_attention_prep_views(kind):
    qkv, qw, kw, cos, sin = prep_inputs()
    other = "offset" if kind != "offset" else "strided"
    views = (view_of(qkv, kind), view_of(qw, kind), view_of(kw, other), view_of(cos, kind),
             view_of(sin, other))  # cos and sin in different layouts too
    if kind == "expanded":
        views = (views[0], qw, kw, views[3], view_of(sin, "expanded"))
    want = attention_prep_reference(*map(dense, views), 4, 2, 1e-6)
    for backend in ("triton", "reference"):
        got = attention_prep(*views, 4, 2, 1e-6, backend=backend)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_block_attention_views(kind):
    g = torch.Generator().manual_seed(2)
    B, nh, nkv, l, n, hd = 2, 4, 2, 3, 9, 16
    q = torch.randn(B, nh, l, hd, generator=g)
    keys = torch.randn(B, nkv, n, hd, generator=g)
    values = torch.randn(B, nkv, n, hd, generator=g)
    mask = torch.where(torch.rand(B, 1, 2 * l, n, generator=g) < 0.7, 0.0, float("-inf"))
    mask[..., -1] = 0.0  # every row sees a key
    views = tuple(view_of(t, kind) for t in (q, keys, values, mask))
    want = block_attention_reference(*map(dense, views), hd ** -0.5)
    for backend in ("triton", "reference"):
        got = block_attention(*views, hd ** -0.5, backend=backend,
                              launch=AttentionLaunch(block_m=16, block_n=16))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# item 1: DMoEBlock.forward

@pytest.mark.parametrize("kind", KINDS)
def test_dmoe_block_views(kind):
    g = torch.Generator().manual_seed(4)
    E, H, I = 16, 24, 8
    hidden = torch.randn(2, 4, H, generator=g)
    gate = 0.3 * torch.randn(E, H, generator=g)
    bias = 0.05 * torch.randn(E, generator=g)
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    w_down = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    policy = RoutingPolicy.dmoe(top_p=0.6, guard=4, block_size=4)
    hv = view_of(hidden, kind)
    views = [view_of(t, kind) for t in (gate, bias, w_gate_up, w_down)]
    if kind == "expanded":  # every expert the same would make ties; keep the router dense
        views[:2] = gate, bias
    want = DMoEBlock(CFG, policy, *map(dense, views), backend="reference")(dense(hv))
    got = DMoEBlock(CFG, policy, *views, backend="triton")(hv)
    assert got.shape == hidden.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# item 4: NaN rows

def nan_routing():
    """Logits [6, 16] with row 2 all NaN and row 4 partly NaN, routed by both backends (the
    same ids and weights)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 16, generator=g)
    logits[2] = NAN
    logits[4, 3] = NAN
    r, ref = (route(logits, None, CFG, RoutingPolicy.token(), backend=b)
              for b in ("triton", "reference"))
    assert torch.equal(r.topk_ids, ref.topk_ids)
    torch.testing.assert_close(r.topk_weights, ref.topk_weights, equal_nan=True)
    assert (r.topk_ids[2] == -1).all() and torch.isnan(r.topk_weights[2]).all()
    assert torch.isnan(r.topk_weights[4]).all() and (r.topk_ids[4] >= 0).all()
    return r.topk_ids, r.topk_weights


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_nan_rows_propagate(path, shared):
    ids, weights = nan_routing()
    hidden, _, _, w_gate_up, w_down, sh = make_moe(T=6, H=20, I=12, E=16, seed=6)
    sh = sh if shared else None
    bad = torch.tensor([False, False, True, False, True, False])
    clean = weights.clone()
    clean[bad] = 0.0
    want = moe_forward_reference(hidden, ids, clean, w_gate_up, w_down, sh)
    runs = [("reference", 4), ("triton", 4)] + [("triton", 1)] * (path == "decode")
    for backend, splits in runs:  # down_splits: one split writes out, more sum partials
        with launch.override(decode=DecodeConfig(down_splits=splits)):
            got = run_moe((hidden, ids, weights, w_gate_up, w_down), backend, path, sh)
        assert torch.isnan(got[bad]).all(), (backend, splits)
        torch.testing.assert_close(got[~bad], want[~bad], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["decode", "grouped"])
def test_nan_weights_with_every_slot_empty(path):
    """Every slot empty and every weight NaN (route's mark of an all-NaN row): a NaN row. Every
    slot empty with a NaN beside a finite weight (junk in unused slots): zeros, as before
    (test_moe.test_nan_weight_in_empty_slot_does_not_leak)."""
    args = list(make_moe(seed=7)[:5])
    args[1][3], args[2][3] = -1, NAN
    args[1][4], args[2][4] = -1, torch.tensor([NAN, 0.0, NAN])
    for backend in ("triton", "reference"):
        got = run_moe(tuple(args), backend, path)
        assert torch.isnan(got[3]).all() and torch.equal(got[4], torch.zeros(20))
        assert torch.isfinite(got[torch.arange(6) != 3]).all()


# ---------------------------------------------------------------------------------------------
# item 12: int64 offsets

@contextlib.contextmanager
def one_program_at(pid):
    """Run a launch's programs as program `pid` of the interpreter, with every load returning 0
    (`other` where masked) and every store dropped; yields (loads, stores): the byte
    addresses each touched."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    b = interp.interpreter_builder
    loads, stores = [], []

    def program_id(axis):
        return interp.TensorHandle(np.array([pid[axis]], dtype=np.int32), tl.int32)

    def masked_load(ptrs, mask, other, cache_policy, is_volatile):
        dtype_tt = ptrs.get_element_ty()
        np_dtype = interp._get_np_dtype(dtype_tt)
        loads.append(ptrs.data[mask.data].astype(np.uint64))
        data = np.zeros(ptrs.data.shape, dtype=np_dtype)
        if other is not None:
            data = np.where(mask.data, data, other.data).astype(np_dtype)
        return interp.TensorHandle(data, dtype_tt)

    def masked_store(ptrs, value, mask, cache_policy):
        stores.append(ptrs.data[mask.data].astype(np.uint64))

    saved = {name: b.__dict__.get(name) for name in
             ("create_get_program_id", "create_masked_load", "create_masked_store")}
    b.create_get_program_id, b.create_masked_load = program_id, masked_load
    b.create_masked_store = masked_store
    try:
        yield loads, stores
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(b, name)
            else:
                setattr(b, name, value)


def addresses(t, offsets):
    return {t.data_ptr() + t.element_size() * int(o) for o in offsets}


def touched(chunks):
    return set(int(a) for chunk in chunks for a in np.ravel(chunk))


@pytest.mark.parametrize("vote_split", [1, 32])
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_routing_offsets_are_int64(policy, vote_split):
    """Program seq of route_kernel (and block_coreset_kernel, block_votes_kernel) for seq =
    2**23 + 5 at E = 256: its rows start at (seq * L) * 256 > 2**31 elements; the int32 product
    wrapped to 8 GB before the tensor. With the votes split, the shares' scratch is written too
    (at seq's own slots, outside the one-window buffer: the fake stores touch no memory)."""
    cfg = RouterConfig(256, 8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    L = policy.block_size if policy.is_block else 1
    logits = torch.zeros(1, L, 256)
    seq = 2**23 + 5
    shapes = RouteLaunch(route_rows=L, vote_split=vote_split)
    with launch.override(route=shapes), one_program_at((seq, 0, 0)) as (ld, st):
        r = route(logits, None, cfg, policy, backend="triton")
    row0 = seq * L * 256
    assert row0 > 2**31
    logits_read = addresses(logits, range(row0, row0 + L * 256))
    assert logits_read <= touched(ld)
    slots = policy.slots(cfg)
    written = addresses(r.topk_ids, range(seq * L * slots, (seq + 1) * L * slots))
    written |= addresses(r.topk_weights, range(seq * L * slots, (seq + 1) * L * slots))
    if policy.is_block:
        written |= addresses(r.coreset, range(seq * 256, (seq + 1) * 256))
    if policy.is_block and vote_split > 1:
        assert written <= touched(st)
    else:
        assert touched(st) == written


def test_block_attention_offsets_are_int64():
    """Program b of block_attention_kernel for b = 2**24 + 3 with per-sequence strides of 256
    elements (q, keys, values, mask, out): b * 256 > 2**31."""
    B, nh, nkv, l, n, hd = 1, 1, 1, 16, 16, 16
    q, keys, values = (torch.zeros(B, h, m, hd) for h, m in ((nh, l), (nkv, n), (nkv, n)))
    mask = torch.zeros(B, 1, l, n)
    b = 2**24 + 3
    with one_program_at((b, 0, 0)) as (ld, st):
        out = block_attention(q, keys, values, mask, 0.25, backend="triton",
                              launch=AttentionLaunch(block_m=16, block_n=16))
    assert b * 256 > 2**31
    for t in (q, keys, values, mask):
        assert addresses(t, range(b * 256, (b + 1) * 256)) <= touched(ld)
    assert touched(st) == addresses(out, range(b * 256, (b + 1) * 256))


def test_attention_prep_offsets_are_int64():
    """Program (token, head) of attention_prep_kernel for token = 2**25 + 1, one sequence of
    L = 1: the row offsets token * 64 pass 2**31 elements (already int64; kept so)."""
    qkv, qw, kw, cos, sin = prep_inputs(B=1, L=1, nh=2, nkv=1, hd=16, rd=8)
    token = 2**25 + 1
    with one_program_at((token, 2, 0)) as (ld, st):  # head 2: the key head
        q, k, v = attention_prep(qkv, qw, kw, cos, sin, 2, 1, 1e-6, backend="triton")
    assert token * 64 > 2**31
    assert addresses(qkv, range(token * 64 + 32, token * 64 + 48)) <= touched(ld)
    assert touched(st) == addresses(k, range(token * 16, token * 16 + 16))


def test_moe_decode_row_offsets_are_int64():
    """The decode gate/up kernel's token rows t * stride_xt are int64: with a row stride of
    2**28 elements (a hidden view into a huge buffer), row 9 starts past 2**31. (The grouped
    kernels' rows are int64 slots already.)"""
    import triton

    from dmoe_triton.kernels.moe_matmul import moe_gate_up_decode_kernel

    T, H, I, E, k = 10, 20, 12, 8, 3
    hidden, ids, _, w_gate_up, _, _ = make_moe(T=T, H=H, I=I, E=E, k=k)
    ids = ids.contiguous()
    big = 2**28
    act = torch.empty(E * 16, I)  # rows u * T_PAD + t
    with one_program_at((0, 0, 0)) as (ld, _):
        moe_gate_up_decode_kernel[(1,)](
            x_ptr=hidden, stride_xt=big, stride_xh=1, w_ptr=w_gate_up,
            stride_we=w_gate_up.stride(0), stride_wn=w_gate_up.stride(1),
            stride_wk=w_gate_up.stride(2), act_ptr=act, stride_as=act.stride(0), ids_ptr=ids,
            used_ptr=torch.empty(E + 1, dtype=torch.int32), weights_ptr=torch.rand(T, k),
            row_weight_ptr=torch.empty(E, 16),
            arrivals_ptr=None, n_arrivals=0, shared_ptr=None, T=T, H=H, I=I, E=E, TOP_K=k,
            T_PAD=16, TOP_K_PAD=4, S_PAD=32, NUM_BINS=triton.next_power_of_2(E + 1),
            BLOCK_I=16, BLOCK_K=32, PRECISION="ieee", HAS_SHARED=False)
    assert 9 * big > 2**31
    rows = range(T)  # the ids read as 0: every token uses expert 0, work item 0
    want = set().union(*(addresses(hidden, range(t * big, t * big + H)) for t in rows))
    assert rows and want <= touched(ld)
