"""Attention of a block's queries over a KV cache, with an additive mask (flash-style).

One program per (sequence, KV head, BLOCK_M stacked query rows): the query heads that share a KV
head are stacked along the rows (row g * L + i is query i of head kv_head * GROUP + g, the
layout of llada2.block_causal_mask), so each K/V tile is loaded once for all of them and the
products are [BLOCK_M, HD] x [HD, BLOCK_N] tensor-core dots. The keys are walked in BLOCK_N
steps with an online softmax in fp32 (base 2); the additive mask is read tile by tile. Output
goes straight to [B, L, NH, HD], the layout the dense projection reads, so no transpose copy
follows.

Why not SDPA: for 128 stacked rows against ~550 keys, cuDNN's kernel took ~19 us per layer on an
H100 (bench/profile_e2e.py), several times the time of its bytes (~1 MB of K/V).
"""
import triton
import triton.language as tl

from .pdl import wait_previous_kernel

LOG2E = tl.constexpr(1.4426950408889634)
# Running max before any key: finite, so a tile whose keys are all masked (-inf) for a row
# gives exp2(-inf - FLOOR) = 0 and a rescale of exp2(0) = 1 instead of NaN from -inf - -inf.
FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def block_attention_kernel(
    q_ptr, stride_qb, stride_qh, stride_ql,
    k_ptr, v_ptr, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    mask_ptr, stride_mb, stride_mr,
    out_ptr, stride_ob, stride_ol, stride_oh,
    L, n_keys, scale, keys_per_split, part_out_ptr, part_lse_ptr,
    NKV: tl.constexpr, GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid (B * NKV, cdiv(GROUP * L, BLOCK_M), splits): softmax(q k^T * scale + mask) v.

    Split over keys (flash-decoding) when part_out_ptr is not None: program (.., .., s) walks
    keys [s * keys_per_split, (s + 1) * keys_per_split) (a multiple of BLOCK_N) and writes its
    normalised partial output fp32 [B * NKV, splits, GROUP * L, BLOCK_D] and its log2-sum-exp2
    fp32 [B * NKV, splits, GROUP * L] (-inf where the row saw no key there) for
    attention_combine_kernel (its own launch: the last split combining in this launch measured
    slower, bench/results/h200-2026-12-01-s13); else (one split) it writes out_ptr directly.

    q_ptr [B, NH, L, HD] with NH = NKV * GROUP; k_ptr, v_ptr [B, NKV, n_keys, HD]; mask_ptr
    additive [B, 1, GROUP * L, n_keys] (fp32 or q's dtype); out_ptr [B, L, NH, HD] out, q's
    dtype. All strides in elements, unit along HD and keys. scale: fp32 logit factor.
    BLOCK_D: HD padded to a power of two >= 16 (tl.dot); BLOCK_M: stacked query rows per
    program; BLOCK_N: keys per step; PRECISION: tl.dot input_precision.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    # int64: b * stride_kb (a KV cache of B sequences) passes 2**31 elements (issue 11).
    b = (tl.program_id(0) // NKV).to(tl.int64)
    kv_head = tl.program_id(0) % NKV
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # stacked rows g * L + i
    row_ok = rows < GROUP * L
    head = kv_head * GROUP + rows // L
    i = rows % L
    d = tl.arange(0, BLOCK_D)  # head dims padded to a power of two, masked
    d_ok = d < HD
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_ql
                + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    m_base = mask_ptr + b * stride_mb + rows[:, None] * stride_mr

    run_max = tl.full([BLOCK_M], FLOOR, dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first_key = tl.program_id(2) * keys_per_split
    for n0 in range(first_key, tl.minimum(first_key + keys_per_split, n_keys), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < n_keys
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        bias = tl.load(m_base + n[None, :], mask=row_ok[:, None] & n_ok[None, :],
                       other=float("-inf")).to(tl.float32)
        s = (s + bias) * LOG2E
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        p = tl.exp2(s - new_max[:, None])
        rescale = tl.exp2(run_max - new_max)
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=kv_ok, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        run_max = new_max
    if part_out_ptr is not None:  # (if / else on a constexpr, no early return: Triton 3.6)
        _store_partial(part_out_ptr, part_lse_ptr, acc, run_max, run_sum, rows, row_ok, d,
                       GROUP * L, BLOCK_D)
    else:
        # A row that sees no key at all (never the model's: every row sees itself) divides 0
        # by 0: NaN, as SDPA gives, never a silent zero.
        out = acc / tl.where(row_ok, run_sum, 1.0)[:, None]  # padding rows: no 0 / 0
        tl.store(out_ptr + b * stride_ob + i[:, None] * stride_ol + head[:, None] * stride_oh
                 + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _store_partial(part_out_ptr, part_lse_ptr, acc, run_max, run_sum, rows, row_ok, d, ROWS,
                   BLOCK_D: tl.constexpr):
    """One split's normalised output and log2-sum-exp2 (-inf: no key seen in this split)."""
    part = (tl.program_id(0) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) * ROWS + rows
    seen = run_sum > 0
    lse = tl.where(seen, run_max + tl.log2(tl.where(seen, run_sum, 1.0)), float("-inf"))
    out = acc / tl.where(seen, run_sum, 1.0)[:, None]
    tl.store(part_lse_ptr + part, lse, mask=row_ok)
    tl.store(part_out_ptr + part[:, None] * BLOCK_D + d[None, :], out, mask=row_ok[:, None])


@triton.jit
def attention_combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_ol,
                             stride_oh, L, SPLITS: tl.constexpr, NKV: tl.constexpr,
                             GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr, PDL: tl.constexpr = False):
    """Grid (B * NKV, cdiv(GROUP * L, BLOCK_M)): the splits' partial outputs weighed by
    exp2(lse - max lse) and normalised, into out_ptr [B, L, NH, HD] (block_attention_kernel's
    layout and dtype). A row that saw no key in any split gets 0 / 0 = NaN, as unsplit."""
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    b = (tl.program_id(0) // NKV).to(tl.int64)
    kv_head = tl.program_id(0) % NKV
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * L
    d = tl.arange(0, BLOCK_D)
    base = tl.program_id(0).to(tl.int64) * SPLITS * (GROUP * L)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        lse = tl.load(part_lse_ptr + base + s * GROUP * L + rows, mask=row_ok, other=0.0)
        best = tl.maximum(best, lse)
    best = tl.where(best == float("-inf"), 0.0, best)  # no key anywhere: every weight 0
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        at = base + s * GROUP * L + rows
        weight = tl.exp2(tl.load(part_lse_ptr + at, mask=row_ok, other=0.0) - best)
        part = tl.load(part_out_ptr + at[:, None] * BLOCK_D + d[None, :], mask=row_ok[:, None],
                       other=0.0)
        total += weight
        acc += weight[:, None] * part
    head = kv_head * GROUP + rows // L
    i = rows % L
    out = acc / tl.where(row_ok, total, 1.0)[:, None]
    tl.store(out_ptr + b * stride_ob + i[:, None] * stride_ol + head[:, None] * stride_oh
             + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < HD)[None, :])
