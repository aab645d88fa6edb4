"""Residual add + RMSNorm in one launch: h = x + delta (rounded to the activations' dtype, as the
eager add is), written out; y = weight * round(h * rsqrt(mean(h^2) + eps)) (LLaDA2MoeRMSNorm's
order: fp32 statistics, rounded, times the weight, rounded again).

Why: the decoder layer's two residual adds and two norms were four launches of a few bytes each
(bench_e2e: 0.15 ms per forward for norms and adds, their bytes ~0); the add folds into the norm
that reads its result next, so a layer runs two.
"""
import triton
import triton.language as tl

from .pdl import wait_previous_kernel


@triton.jit
def add_rms_norm_kernel(x_ptr, stride_x, delta_ptr, stride_d, w_ptr, sum_ptr, y_ptr, H, eps,
                        BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    """Grid (rows,): one row of H values per program.

    x_ptr [rows, H] fp32/fp16/bf16 (row stride stride_x, unit along H); delta_ptr like x (row
    stride stride_d) or None (h = x, nothing written to sum_ptr); w_ptr [H] the norm weight
    (x's dtype); sum_ptr [rows, H] contiguous out, h; y_ptr [rows, H] contiguous out, x's dtype.
    eps: fp32; BLOCK_H: next power of two >= H.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at long prefills
    h = tl.arange(0, BLOCK_H)
    ok = h < H
    dtype = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + h, mask=ok, other=0.0)
    if delta_ptr is not None:
        d = tl.load(delta_ptr + row * stride_d + h, mask=ok, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row * H + h, x, mask=ok)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    w = tl.load(w_ptr + h, mask=ok, other=0.0).to(tl.float32)
    y = (w * (xf * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    tl.store(y_ptr + row * H + h, y, mask=ok)
