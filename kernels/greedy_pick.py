"""The greedy (temperature 0) pick of a denoising step in one launch: per row of logits, the
token of the largest logit and its softmax probability (the step's confidence), read from the
logits' own dtype.

Why: torch's pick upcast the bf16 logits to fp32 (for bf16 its softmax with dtype=float32 makes
the same copy), took the softmax and an argmax: four passes over [B, 32, V] in fp32. At 64
sequences that is 1.3 GB per pass and about 2 ms of a 19 ms step on the H200; this kernel reads
the bf16 logits once (0.64 GB).
"""
import triton
import triton.language as tl

from .pdl import wait_previous_kernel


@triton.jit
def greedy_pick_kernel(logits_ptr, stride_row, tok_ptr, conf_ptr, V, BLOCK_V: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Grid (rows,): one row of V logits per program, BLOCK_V at a time (an online softmax:
    the running sum is rescaled when the running maximum grows).

    logits_ptr [rows, V] fp32/fp16/bf16 (row stride stride_row, unit along V); tok_ptr [rows]
    int64 out: the first index of the row's largest logit; conf_ptr [rows] fp32 out:
    1 / sum_j exp(l_j - l_max), the softmax probability of that token. A row whose softmax is
    undefined (a NaN or +inf logit, or every logit -inf) gets token 0 and confidence NaN, as
    torch's softmax-then-argmax gives.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)  # int64: row x stride passes 2**31 from ~430 seqs
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    best = -float("inf")
    best_at = 0
    total = 0.0
    bad = 0
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
        bad = tl.maximum(bad, tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=0))
        top = tl.max(x, axis=0)
        at = tl.min(tl.where(x == top, idx, V), axis=0)  # first index of the chunk's maximum
        new_best = tl.maximum(best, top)
        # Both -inf while every logit so far is -inf: exp(-inf - -inf) would be NaN.
        scale = tl.where(best == -float("inf"), 0.0, tl.exp(best - new_best))
        terms = tl.where(x == -float("inf"), 0.0, tl.exp(x - new_best))
        total = total * scale + tl.sum(terms, axis=0)
        best_at = tl.where(top > best, at, best_at)  # strictly: an earlier maximum stays
        best = new_best
    undefined = (bad != 0) | (best == -float("inf"))
    tl.store(tok_ptr + row, tl.where(undefined, 0, best_at).to(tl.int64))
    tl.store(conf_ptr + row, tl.where(undefined, float("nan"), 1.0 / total))
