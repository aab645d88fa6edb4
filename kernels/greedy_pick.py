"""The greedy (temperature 0) pick of a denoising step: per row of logits, the token of the
largest logit and its softmax probability (the step's confidence), read from the logits' own
dtype, in two launches: each program sums one slice of a row's vocabulary (an online softmax),
then one program per few rows merges the slices (one launch when a row is one slice).

Why: torch's pick upcast the bf16 logits to fp32 (for bf16 its softmax with dtype=float32 makes
the same copy), took the softmax and an argmax: four passes over [B, 32, V] in fp32. At 64
sequences that is 1.3 GB per pass and about 2 ms of a 19 ms step on the H200; this reads the
bf16 logits once (0.64 GB). Why slices: one program per row gives one sequence's 32 rows only
32 programs on 132 SMs (44 us for a 2.4 us read, H200, 2026-11-30).
"""
import triton
import triton.language as tl

from .pdl import wait_previous_kernel


@triton.jit
def greedy_pick_slice_kernel(logits_ptr, stride_row, max_ptr, at_ptr, sum_ptr, V, SLICE_V,
                             BLOCK_V: tl.constexpr, tok_ptr=None, conf_ptr=None,
                             PDL: tl.constexpr = False):
    """Grid (rows, slices): program (r, s) reads logits[r, s * SLICE_V : (s + 1) * SLICE_V],
    BLOCK_V at a time (the running sum is rescaled when the running maximum grows).

    logits_ptr [rows, V] fp32/fp16/bf16 (row stride stride_row, unit along V); SLICE_V: a
    multiple of BLOCK_V. Out, each [rows, slices] contiguous, fp32 / int32 / fp32: max_ptr the
    slice's largest logit (-inf for a slice of -inf only), at_ptr the first index of it in the
    row, sum_ptr sum_j exp(l_j - max) over the slice (0 for -inf only), NaN where the slice
    holds a NaN or +inf logit (the row's softmax is undefined then:
    greedy_pick_merge_kernel).
    With one slice per row (tok_ptr, conf_ptr not None; max/at/sum_ptr unused) the program
    holds the whole row and writes greedy_pick_merge_kernel's outputs itself: nothing to
    merge, so no second launch (64 sequences: 1 slice per row, launch.pick_launch).
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)  # int64: row x stride passes 2**31 from ~430 seqs
    part = row * tl.num_programs(1) + tl.program_id(1)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    begin = tl.program_id(1) * SLICE_V
    best = -float("inf")
    best_at = 0
    total = 0.0
    bad = 0
    for start in range(begin, tl.minimum(begin + SLICE_V, V), BLOCK_V):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
        # Explicit, though a NaN or +inf would make the sum NaN through exp anyway: the rule
        # does not lean on how the fast exp treats NaN and inf.
        bad = tl.maximum(bad, tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=0))
        top = tl.max(x, axis=0)
        at = tl.min(tl.where(x == top, idx, V), axis=0)  # first index of the step's maximum
        new_best = tl.maximum(best, top)
        # Both -inf while every logit so far is -inf: exp(-inf - -inf) would be NaN.
        scale = tl.where(best == -float("inf"), 0.0, tl.exp(best - new_best))
        terms = tl.where(x == -float("inf"), 0.0, tl.exp(x - new_best))
        total = total * scale + tl.sum(terms, axis=0)
        best_at = tl.where(top > best, at, best_at)  # strictly: an earlier maximum stays
        best = new_best
    if tok_ptr is not None:  # the whole row: the merge's rule for one slice
        _store_pick(tok_ptr + row, conf_ptr + row, best_at, total,
                    (bad != 0) | (best == -float("inf")), None)
    else:
        tl.store(max_ptr + part, best)
        tl.store(at_ptr + part, best_at)
        tl.store(sum_ptr + part, tl.where(bad != 0, float("nan"), total))


@triton.jit
def greedy_pick_merge_kernel(max_ptr, at_ptr, sum_ptr, tok_ptr, conf_ptr, rows, NUM_SLICES,
                             BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                             PDL: tl.constexpr = False):
    """Grid (cdiv(rows, BLOCK_R),): merges greedy_pick_slice_kernel's [rows, NUM_SLICES]
    partials (BLOCK_S >= NUM_SLICES). tok_ptr [rows] int64 out: the first index of the row's
    largest logit (the earliest slice holding the maximum, its first index); conf_ptr [rows]
    fp32 out: 1 / (sum over slices s of sum[s] * exp(max[s] - max)). A row whose softmax is
    undefined (a NaN or +inf logit, or every logit -inf) gets token 0 and confidence NaN, as
    torch's softmax-then-argmax gives.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    s = tl.arange(0, BLOCK_S)
    ok = (r < rows)[:, None] & (s < NUM_SLICES)[None, :]
    part = r.to(tl.int64)[:, None] * NUM_SLICES + s[None, :]
    m = tl.load(max_ptr + part, mask=ok, other=-float("inf"))
    at = tl.load(at_ptr + part, mask=ok, other=0)
    part_sum = tl.load(sum_ptr + part, mask=ok, other=0.0)
    best = tl.max(m, axis=1)
    first = tl.min(tl.where(m == best[:, None], s[None, :], BLOCK_S), axis=1)
    best_at = tl.sum(tl.where(s[None, :] == first[:, None], at, 0), axis=1)
    # A slice of -inf only adds 0 (its sum is 0); NaN (an undefined slice) spreads to the row.
    weight = tl.where(m == -float("inf"), 0.0, tl.exp(m - best[:, None]))
    total = tl.sum(tl.where(ok, part_sum * weight, 0.0), axis=1)
    _store_pick(tok_ptr + r, conf_ptr + r, best_at, total,
                (total != total) | (best == -float("inf")), r < rows)


@triton.jit
def _store_pick(tok_ptr, conf_ptr, best_at, total, undefined, mask):
    """The pick of a row (or rows) whose largest logit is first at best_at and whose softmax
    denominator (taken at that maximum) is total: token best_at, confidence 1 / total; where
    the softmax is undefined (a NaN or +inf logit, or every logit -inf), token 0 and
    confidence NaN, as torch's softmax-then-argmax gives. mask: tl.store's (None: store)."""
    tl.store(tok_ptr, tl.where(undefined, 0, best_at).to(tl.int64), mask=mask)
    tl.store(conf_ptr, tl.where(undefined, float("nan"), 1.0 / total), mask=mask)
