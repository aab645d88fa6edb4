"""`attention_prep`: q/k RMSNorm + partial RoPE + the q/k/v layout of LLaDA2 attention in one launch.

Why: in a decoding step (one 32-token block, CUDA graph) the attention's cost is the ~25 small
kernels around the SDPA (split, transpose, two RMSNorms, ~10 kernels of RoPE per tensor, the
copy of k/v into the cache), each 2-4 us, not its bytes. kernels/attention_prep.py does all of
them in one launch and writes k/v straight into their destination (a static cache's spare rows).
The reference (reference.attention_prep_reference) is the model's eager torch path.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .kernels.attention_prep import attention_prep_kernel
from .reference import attention_prep_reference
from .routing import resolve_backend


def _check_destination(name, t, shape, like) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} must be {like.dtype} on {like.device}, got {t.dtype} on {t.device}")
    if tuple(t.shape) != shape or t.stride(-1) != 1:
        raise ValueError(f"{name} must have shape {shape} with unit stride along the last dim, "
                         f"got {tuple(t.shape)} with strides {t.stride()}")


def check_prep_inputs(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (qkv, q_weight, k_weight, cos, sin)):
        raise TypeError("qkv, q_weight, k_weight, cos and sin must be tensors")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    if num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"num_heads and num_kv_heads must be >= 1, got {num_heads}, {num_kv_heads}")
    if q_weight.dim() != 1 or k_weight.shape != q_weight.shape:
        raise ValueError(f"q_weight and k_weight must both have shape [head_dim], got "
                         f"{tuple(q_weight.shape)} and {tuple(k_weight.shape)}")
    hd = q_weight.shape[0]
    if qkv.dim() != 3 or qkv.shape[2] != (num_heads + 2 * num_kv_heads) * hd or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must have shape [B, L, {(num_heads + 2 * num_kv_heads) * hd}] "
                         f"((num_heads + 2 num_kv_heads) * head_dim) with unit stride along the "
                         f"last dim, got {tuple(qkv.shape)} with strides {qkv.stride()}")
    B, L, _ = qkv.shape
    rd = cos.shape[-1]
    if cos.dim() != 3 or tuple(cos.shape[:2]) != (B, L) or rd % 2 or not 0 < rd <= hd:
        raise ValueError(f"cos must have shape [{B}, {L}, rotary_dim] with an even rotary_dim in "
                         f"(0, {hd}], got {tuple(cos.shape)}")
    if sin.shape != cos.shape or sin.stride() != cos.stride() or cos.stride(-1) != 1:
        raise ValueError(f"sin must have cos's shape and strides (unit along the last dim), got "
                         f"{tuple(sin.shape)} {sin.stride()} vs {tuple(cos.shape)} {cos.stride()}")
    for name, t in (("q_weight", q_weight), ("k_weight", k_weight), ("cos", cos), ("sin", sin)):
        if t.device != qkv.device:
            raise TypeError(f"{name} must be on {qkv.device}, got {t.device}")
    if cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        raise TypeError(f"cos and sin must have qkv's dtype {qkv.dtype} (rope_cos_sin casts them), "
                        f"got {cos.dtype}, {sin.dtype}")


def attention_prep(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                   eps: float, k_out: Optional[torch.Tensor] = None,
                   v_out: Optional[torch.Tensor] = None, backend: str = "auto"):
    """qkv [B, L, (nh + 2 nkv) * hd] (the QKV projection) -> q [B, nh, L, hd] contiguous and
    k, v [B, nkv, L, hd]: q and k RMS-normalised per head (weights [hd]) and rotated on their
    first rotary_dim = cos.shape[-1] dims (cos/sin [B, L, rotary_dim] in qkv's dtype, from
    rope_cos_sin); v as projected.

    k_out / v_out: optional destinations [B, nkv, L, hd] (any strides, unit along hd), written
    in place and returned as k / v, e.g. the spare rows of a static KV cache.
    backend: "triton" (one launch), "reference" (the eager torch ops), "auto" (triton on CUDA).
    """
    check_prep_inputs(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads)
    B, L, _ = qkv.shape
    hd = q_weight.shape[0]
    kv_shape = (B, num_kv_heads, L, hd)
    for name, t in (("k_out", k_out), ("v_out", v_out)):
        if t is not None:
            _check_destination(name, t, kv_shape, qkv)
    if resolve_backend(backend, qkv.device) == "reference":
        q, k, v = attention_prep_reference(qkv, q_weight, k_weight, cos, sin, num_heads,
                                           num_kv_heads, eps)
        k = k if k_out is None else k_out.copy_(k)
        v = v if v_out is None else v_out.copy_(v)
        return q, k, v
    q = torch.empty(B, num_heads, L, hd, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(kv_shape, dtype=qkv.dtype, device=qkv.device) if k_out is None else k_out
    v = torch.empty(kv_shape, dtype=qkv.dtype, device=qkv.device) if v_out is None else v_out
    attention_prep_kernel[(B * L, num_heads + 2 * num_kv_heads)](
        qkv, q_weight, k_weight, cos, sin, q, k, v, L, float(eps),
        qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        NH=num_heads, NKV=num_kv_heads, HD=hd, RD=cos.shape[-1],
        BLOCK_D=triton.next_power_of_2(hd), num_warps=1 if hd <= 128 else 2,
    )
    return q, k, v
