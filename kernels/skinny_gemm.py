"""y = x W^T for a few rows of x (a decode step's tokens): the router's logits GEMM.

Why: with 32 rows, cuBLAS's bf16 GEMM with fp32 output took 5.5 us per MoE layer on the H200
for the router's 1 MB of weights (floor 0.25 us; profile_e2e --graph-timeline, twentieth
session): its tiles put few programs on the weights. Here each program owns BLOCK_N rows of W
(the MMA's left operand, so a handful of tokens does not waste its 64-row side) and all of K,
and every program reads x (from L2 after the first). No split over K: the sum of a column is one
program's, in one order, so the output does not depend on which program finishes first, and
nothing needs zeroed counters between launches.
"""
import triton
import triton.language as tl

from .pdl import wait_previous_kernel


@triton.jit
def skinny_gemm_kernel(x_ptr, stride_xt, w_ptr, stride_wn, y_ptr, stride_yt, T, N, K,
                       T_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       STAGES: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False):
    """Grid (cdiv(N, BLOCK_N),): program n writes y[:, n*BLOCK_N : (n+1)*BLOCK_N].

    x_ptr [T, K] (row stride stride_xt, unit along K); w_ptr [N, K] (row stride stride_wn, unit
    along K), x's dtype; y_ptr [T, N] (row stride stride_yt, unit along N), any float dtype: the
    fp32 sum, rounded once. T <= T_PAD (a power of two >= 16: tl.dot's smallest side);
    PRECISION: tl.dot's input_precision ("ieee" for fp32 operands, exact as the spec's fp32 GEMM
    up to the order of the sum).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    t = tl.arange(0, T_PAD)
    n_ok, t_ok = offs_n < N, t < T
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + t.to(tl.int64)[None, :] * stride_xt
    # acc^T [BLOCK_N, T_PAD]: the weights are the left operand. Padded tokens load zeros and
    # are never stored, so a weight's inf makes NaN only in their columns.
    acc = tl.zeros((BLOCK_N, T_PAD), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x_t = tl.load(x_cols + k[:, None], mask=k_ok[:, None] & t_ok[None, :], other=0.0)
        acc = tl.dot(w, x_t, acc, input_precision=PRECISION)
    y = y_ptr + t.to(tl.int64)[None, :] * stride_yt + offs_n[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & t_ok[None, :])
