"""`add_rms_norm()`: the decoder layer's residual add fused with the RMSNorm that reads it
(kernels/add_norm.py); the reference is reference.add_rms_norm_reference (the eager ops)."""
from __future__ import annotations

from typing import Optional

import torch

from .launch import KERNEL_FLOATS, norm_launch, pdl
from .reference import add_rms_norm_reference
from .routing import resolve_backend


def check_add_norm_inputs(x, delta, weight) -> None:
    """x float [..., H]; delta None or x's shape, dtype and device; weight [H] of x's dtype."""
    if not isinstance(x, torch.Tensor) or x.dtype not in KERNEL_FLOATS:
        raise TypeError(f"x must be a float32, float16 or bfloat16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., H] with H >= 1, got {tuple(x.shape)}")
    for name, t, shape in (("delta", delta, x.shape), ("weight", weight, x.shape[-1:])):
        if t is None and name == "delta":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must be {x.dtype} on {x.device}, got {t.dtype} on {t.device}")


def add_rms_norm(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float, backend: str = "auto"):
    """(h, y): h = x + delta rounded to x's dtype, contiguous (x itself when delta is None),
    y = weight * rms_norm(h) (fp32 statistics, LLaDA2MoeRMSNorm's rounding) [..., H]
    contiguous, both in x's dtype. x, delta [..., H] (any strides), weight [H] in x's dtype; eps the norm's epsilon.
    backend: "triton" (one launch), "reference" (eager ops), "auto" (triton on CUDA).
    Errors: TypeError/ValueError naming x, delta or weight. Launch: launch.norm_launch.
    """
    check_add_norm_inputs(x, delta, weight)
    if resolve_backend(backend, x.device) == "reference":
        return add_rms_norm_reference(x, delta, weight, eps)
    from .kernels.add_norm import add_rms_norm_kernel

    H = x.shape[-1]
    rows = x.reshape(-1, H)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    d = None if delta is None else delta.reshape(-1, H)
    d = d if d is None or d.stride(-1) == 1 else d.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = x if delta is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return h, y
    shapes = norm_launch(H)
    add_rms_norm_kernel[(rows.shape[0],)](
        x_ptr=rows, stride_x=rows.stride(0), delta_ptr=d, stride_d=0 if d is None else d.stride(0),
        w_ptr=weight.contiguous(), sum_ptr=h, y_ptr=y, H=H, eps=float(eps),
        BLOCK_H=shapes.block_h, num_warps=shapes.warps, **pdl(x.device))
    return h, y


__all__ = ["add_rms_norm"]
