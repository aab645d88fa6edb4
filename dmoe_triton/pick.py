"""`greedy_pick()`: the temperature-0 decision of a denoising step, the token of each row's
largest logit and its softmax probability, in one launch (kernels/greedy_pick.py); the
reference is reference.greedy_pick_reference (torch's softmax and argmax)."""
from __future__ import annotations

import torch

from .launch import pdl, pick_launch
from .reference import greedy_pick_reference
from .routing import resolve_backend


def greedy_pick(logits: torch.Tensor, backend: str = "auto"):
    """(token, confidence) per row of logits [..., V] (fp32, fp16 or bf16, any strides, V >= 1):
    token int64 [...], the first index of the row's largest logit (LLaDA's greedy rule);
    confidence fp32 [...], that token's softmax probability in fp32. A row whose softmax is
    undefined (a NaN or +inf logit, or every logit -inf) gets token 0 and confidence NaN.
    The kernel's confidence is the reference's up to the order of the softmax sum (relative
    error about 1e-6 at V = 157184); its tokens are the reference's.
    backend: "triton" (one launch, no host sync: CUDA-graph capturable), "reference" (torch),
    "auto" (triton on CUDA). Errors: TypeError / ValueError naming logits. Launch:
    launch.pick_launch.
    """
    if not isinstance(logits, torch.Tensor) or logits.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits must be a float32, float16 or bfloat16 tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got "
                         f"{tuple(logits.shape)}")
    if resolve_backend(backend, logits.device) == "reference":
        return greedy_pick_reference(logits)
    from .kernels.greedy_pick import greedy_pick_kernel

    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    tok = torch.empty(rows.shape[0], dtype=torch.int64, device=logits.device)
    conf = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    if rows.shape[0]:
        shapes = pick_launch(V)
        greedy_pick_kernel[(rows.shape[0],)](
            logits_ptr=rows, stride_row=rows.stride(0), tok_ptr=tok, conf_ptr=conf, V=V,
            BLOCK_V=shapes.block_v, num_warps=shapes.warps, **pdl(logits.device))
    return tok.view(logits.shape[:-1]), conf.view(logits.shape[:-1])


__all__ = ["greedy_pick"]
