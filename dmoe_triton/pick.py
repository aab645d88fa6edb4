"""`greedy_pick()`: the temperature-0 decision of a denoising step, the token of each row's
largest logit and its softmax probability, in two launches, one when a row is one slice
(kernels/greedy_pick.py); the reference is reference.greedy_pick_reference (torch's softmax
and argmax)."""
from __future__ import annotations

import torch
import triton

from .launch import KERNEL_FLOATS, pdl, pick_launch
from .reference import greedy_pick_reference
from .routing import resolve_backend


def greedy_pick(logits: torch.Tensor, backend: str = "auto"):
    """(token, confidence) per row of logits [..., V] (fp32, fp16 or bf16, any strides, V >= 1):
    token int64 [...], the first index of the row's largest logit (LLaDA's greedy rule);
    confidence fp32 [...], that token's softmax probability in fp32. A row whose softmax is
    undefined (a NaN or +inf logit, or every logit -inf) gets token 0 and confidence NaN.
    The kernel's confidence is within about 2e-7 (relative) of a float64 softmax at
    V = 157184, torch's fp32 reference within about 1e-5 on the CPU (its sum's order); its
    tokens are the reference's.
    backend: "triton" (two launches, one at one slice per row; no host sync: CUDA-graph
    capturable), "reference" (torch), "auto" (triton on CUDA). Errors: TypeError / ValueError
    naming logits. Launch: launch.pick_launch.
    """
    if not isinstance(logits, torch.Tensor) or logits.dtype not in KERNEL_FLOATS:
        raise TypeError(f"logits must be a float32, float16 or bfloat16 tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got "
                         f"{tuple(logits.shape)}")
    if resolve_backend(backend, logits.device) == "reference":
        return greedy_pick_reference(logits)
    from .kernels.greedy_pick import greedy_pick_merge_kernel, greedy_pick_slice_kernel

    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    R, device = rows.shape[0], logits.device
    tok = torch.empty(R, dtype=torch.int64, device=device)
    conf = torch.empty(R, dtype=torch.float32, device=device)
    if R:
        shapes = pick_launch(R, V, device)
        slice_v = shapes.slice_v(V)
        num_slices = triton.cdiv(V, slice_v)  # at most shapes.slices: the last may be shorter
        one = num_slices == 1  # a row in one program: it writes tok and conf itself
        part_max = part_at = part_sum = None
        if not one:
            part_max = torch.empty(R, num_slices, dtype=torch.float32, device=device)
            part_at = torch.empty(R, num_slices, dtype=torch.int32, device=device)
            part_sum = torch.empty(R, num_slices, dtype=torch.float32, device=device)
        greedy_pick_slice_kernel[(R, num_slices)](
            logits_ptr=rows, stride_row=rows.stride(0), max_ptr=part_max, at_ptr=part_at,
            sum_ptr=part_sum, V=V, SLICE_V=slice_v, BLOCK_V=shapes.block_v,
            tok_ptr=tok if one else None, conf_ptr=conf if one else None,
            num_warps=shapes.warps, **pdl(device))
        if not one:
            greedy_pick_merge_kernel[(triton.cdiv(R, shapes.merge_rows),)](
                max_ptr=part_max, at_ptr=part_at, sum_ptr=part_sum, tok_ptr=tok, conf_ptr=conf,
                rows=R, NUM_SLICES=num_slices, BLOCK_R=shapes.merge_rows,
                BLOCK_S=triton.next_power_of_2(num_slices), num_warps=shapes.merge_warps,
                **pdl(device))
    return tok.view(logits.shape[:-1]), conf.view(logits.shape[:-1])


__all__ = ["greedy_pick"]
