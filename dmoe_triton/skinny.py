"""`skinny_gemm()`: y = x W^T in fp32 sums for a decode step's few rows (kernels/skinny_gemm.py):
where launch.takes_skinny says so, the router's logits GEMM (router.gate_logits)."""
from __future__ import annotations

import torch
import triton

from .launch import KERNEL_FLOATS, SKINNY_MAX_ROWS, dot_precision, pdl, pipeline_stages, \
    skinny_launch
from .routing import check_interpreted_dot, check_kernel_device, interpreting


def check_skinny_inputs(x, weight, out_dtype) -> None:
    """x float [T, K], 1 <= T <= SKINNY_MAX_ROWS, on CUDA (on the CPU only under Triton's
    interpreter, and neither x nor out_dtype bf16 there); weight [N, K] of x's dtype and
    device; out_dtype a float dtype; no autograd (the kernel has no backward); else a TypeError
    / ValueError naming the argument."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in KERNEL_FLOATS:
            raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got "
                            f"{t.dtype}")
        if t.dim() != 2 or min(t.shape) < 1:
            raise ValueError(f"{name} must be 2-D with both sizes >= 1, got {tuple(t.shape)}")
    if x.shape[0] > SKINNY_MAX_ROWS:
        raise ValueError(f"x must have at most {SKINNY_MAX_ROWS} rows (SKINNY_MAX_ROWS), got "
                         f"{x.shape[0]}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape [N, K={x.shape[1]}] (K from x), got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must be {x.dtype} on {x.device}, got {weight.dtype} on "
                        f"{weight.device}")
    if out_dtype not in KERNEL_FLOATS:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    check_kernel_device("x must be a CUDA tensor", x.device)
    check_interpreted_dot("x", x)
    if interpreting() and out_dtype == torch.bfloat16:  # its cast truncates (Triton 3.9)
        raise TypeError("out_dtype bfloat16 is truncated, not rounded, by Triton's interpreter "
                        "(TRITON_INTERPRET=1); on the CPU use float32 or float16")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise TypeError("skinny_gemm has no backward: x and weight must not require grad "
                        "(or call it under torch.no_grad())")


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """y [T, N] = x [T, K] @ weight [N, K]^T, the products summed in fp32 and rounded once to
    out_dtype (one launch, no host synchronisation; launch.skinny_launch's shape, sized for
    Hopper's shared memory: callers ask launch.takes_skinny first).

    x, weight: fp32 / fp16 / bf16, the same dtype and device, any row strides (a column stride other
    than 1 is copied first); T at most SKINNY_MAX_ROWS; no autograd. Half-type products are
    exact in fp32, so with fp32 out the result is the fp32 GEMM's up to the order of the sum;
    fp32 operands multiply exactly ("ieee"). Errors: check_skinny_inputs'.
    """
    check_skinny_inputs(x, weight, out_dtype)
    from .kernels.skinny_gemm import skinny_gemm_kernel
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    (T, K), N = x.shape, weight.shape[0]
    y = torch.empty(T, N, dtype=out_dtype, device=x.device)
    shape, launch_pdl = skinny_launch(N, x.device), pdl(x.device)
    skinny_gemm_kernel[(triton.cdiv(N, shape.block_n),)](
        x_ptr=x, stride_xt=x.stride(0), w_ptr=weight, stride_wn=weight.stride(0), y_ptr=y,
        stride_yt=y.stride(0), T=T, N=N, K=K, T_PAD=max(16, triton.next_power_of_2(T)),
        BLOCK_N=shape.block_n, BLOCK_K=shape.block_k,
        STAGES=pipeline_stages(shape.stages, x.dtype), PRECISION=dot_precision(x.dtype),
        num_warps=shape.warps, **launch_pdl)
    return y


__all__ = ["skinny_gemm", "check_skinny_inputs"]
