"""LLaDA2 attention in two launches: `attention_prep` and `block_attention`.

`attention_prep`: q/k RMSNorm + partial RoPE + the q/k/v layout in one launch. Why: in a decoding step (one 32-token block, CUDA graph) the attention's cost is the ~25 small
kernels around the SDPA (split, transpose, two RMSNorms, ~10 kernels of RoPE per tensor, the
copy of k/v into the cache), each 2-4 us, not its bytes. kernels/attention_prep.py does all of
them in one launch and writes k/v straight into their destination (a static cache's spare rows).
The reference (reference.attention_prep_reference) is the model's eager torch path.

`block_attention`: the block's queries against the cache and themselves with the additive
block-causal mask (kernels/block_attention.py), written in the layout the dense projection
reads. Reference: reference.block_attention_reference (fp32 math); the model's CPU path is SDPA.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .kernels.attention_prep import attention_prep_kernel
from .kernels.block_attention import attention_combine_kernel, block_attention_kernel
from .launch import (FEW_SEQUENCES, MANY_FROM, MANY_SEQUENCES,  # noqa: F401 (re-exported)
                     KERNEL_FLOATS, AttentionLaunch, attention_launch, dot_precision, pdl,
                     prep_launch)
from .reference import attention_prep_reference, block_attention_reference
from .routing import check_interpreted_dot, resolve_backend


def _check_destination(name, t, shape, like) -> None:
    """t must be a `like`-typed tensor of `shape` with unit stride along the last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} must be {like.dtype} on {like.device}, got {t.dtype} on {t.device}")
    if tuple(t.shape) != shape or t.stride(-1) != 1:
        raise ValueError(f"{name} must have shape {shape} with unit stride along the last dim, "
                         f"got {tuple(t.shape)} with strides {t.stride()}")


def check_prep_inputs(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads) -> None:
    """attention_prep's host checks: a TypeError/ValueError naming the argument."""
    if not all(isinstance(t, torch.Tensor) for t in (qkv, q_weight, k_weight, cos, sin)):
        raise TypeError("qkv, q_weight, k_weight, cos and sin must be tensors")
    if qkv.dtype not in KERNEL_FLOATS:
        raise TypeError(f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    if num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"num_heads and num_kv_heads must be >= 1, got {num_heads}, {num_kv_heads}")
    if q_weight.dim() != 1 or k_weight.shape != q_weight.shape:
        raise ValueError(f"q_weight and k_weight must both have shape [head_dim], got "
                         f"{tuple(q_weight.shape)} and {tuple(k_weight.shape)}")
    hd = q_weight.shape[0]
    if qkv.dim() != 3 or qkv.shape[2] != (num_heads + 2 * num_kv_heads) * hd:
        raise ValueError(f"qkv must have shape [B, L, {(num_heads + 2 * num_kv_heads) * hd}] "
                         f"((num_heads + 2 num_kv_heads) * head_dim), got {tuple(qkv.shape)}")
    B, L, _ = qkv.shape
    rd = cos.shape[-1]
    if cos.dim() != 3 or tuple(cos.shape[:2]) != (B, L) or rd % 2 or not 0 < rd <= hd:
        raise ValueError(f"cos must have shape [{B}, {L}, rotary_dim] with an even rotary_dim in "
                         f"(0, {hd}], got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
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
    rope_cos_sin); v as projected. eps: the RMSNorm epsilon. Launch: launch.prep_launch.

    qkv, the weights, cos and sin may be any strided views (the kernel reads qkv and cos/sin
    through their strides when unit along the last dim and cos/sin share them, else a copy).
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
    # The kernel takes qkv's and cos/sin's (shared) strides, unit along the last dim, and reads
    # the norm weights densely: other layouts are copied (issue 11).
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    q = torch.empty(B, num_heads, L, hd, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(kv_shape, dtype=qkv.dtype, device=qkv.device) if k_out is None else k_out
    v = torch.empty(kv_shape, dtype=qkv.dtype, device=qkv.device) if v_out is None else v_out
    shapes = prep_launch(hd)
    attention_prep_kernel[(B * L, num_heads + 2 * num_kv_heads)](
        qkv_ptr=qkv, q_weight_ptr=q_weight, k_weight_ptr=k_weight, cos_ptr=cos, sin_ptr=sin,
        q_ptr=q, k_ptr=k, v_ptr=v, L=L, eps=float(eps),
        qkv_sb=qkv.stride(0), qkv_sl=qkv.stride(1), cs_sb=cos.stride(0), cs_sl=cos.stride(1),
        k_sb=k.stride(0), k_sh=k.stride(1), k_sl=k.stride(2),
        v_sb=v.stride(0), v_sh=v.stride(1), v_sl=v.stride(2),
        NH=num_heads, NKV=num_kv_heads, HD=hd, RD=cos.shape[-1],
        BLOCK_D=shapes.block_d, num_warps=shapes.warps, **pdl(qkv.device),
    )
    return q, k, v


def default_launch(batch: int) -> AttentionLaunch:
    """Kept for old callers: launch.attention_launch(batch)."""
    return attention_launch(batch)


def check_attention_inputs(q, keys, values, mask) -> None:
    """block_attention's host checks: a TypeError/ValueError naming the argument."""
    for name, t in (("q", q), ("keys", keys), ("values", values), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise TypeError(f"{name} must be on {q.device}, got {t.device}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-d, got shape {tuple(t.shape)}")
    if q.dtype not in KERNEL_FLOATS:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    B, nh, l, hd = q.shape
    if keys.dtype != q.dtype or values.dtype != q.dtype:
        raise TypeError(f"keys and values must have q's dtype {q.dtype}, got {keys.dtype}, "
                        f"{values.dtype}")
    nkv, n = keys.shape[1], keys.shape[2]
    if keys.shape[0] != B or keys.shape[3] != hd or nkv < 1 or nh % nkv:
        raise ValueError(f"keys must have shape [{B}, nkv, n, {hd}] with nkv dividing "
                         f"num_heads={nh}, got {tuple(keys.shape)}")
    if values.shape != keys.shape:
        raise ValueError(f"values must have keys' shape {tuple(keys.shape)}, got "
                         f"{tuple(values.shape)}")
    want = (B, 1, (nh // nkv) * l, n)
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must have shape {list(want)} (additive; query heads stacked per "
                         f"KV head, see llada2.block_causal_mask), got {tuple(mask.shape)}")
    if mask.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"mask must be additive in q's dtype {q.dtype} or float32, got {mask.dtype}")


def block_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                    scale: float, backend: str = "auto",
                    launch: Optional[AttentionLaunch] = None) -> torch.Tensor:
    """q [B, nh, l, hd], keys/values [B, nkv, n, hd] (any strides; unit along hd reads them in
    place, others are copied), additive mask
    [B, 1, (nh / nkv) * l, n] with the query heads stacked per KV head -> [B, l, nh * hd] in q's
    dtype: softmax(q k^T * scale + mask) v per head, head h reading KV head h // (nh / nkv).

    backend: "triton" (one launch), "reference" (fp32 math), "auto" (triton on CUDA).
    launch: the kernel's tile shape and key splits (default: launch.attention_launch(B, n):
    long prefixes split over the keys, then one combine launch; or a
    launch.override(attention=...)). scale: the logits' factor (1 / sqrt(hd) for the model).
    Errors: check_attention_inputs'; and under Triton's interpreter a bfloat16 q with the
    Triton backend (a TypeError: routing.check_interpreted_dot).
    """
    check_attention_inputs(q, keys, values, mask)
    if resolve_backend(backend, q.device) == "reference":
        return block_attention_reference(q, keys, values, mask, scale)
    check_interpreted_dot("q", q)  # its products take q's dtype
    # The kernel takes every stride but the last: a view without unit stride there is copied.
    q, keys, values, mask = (t if t.stride(-1) == 1 else t.contiguous()
                             for t in (q, keys, values, mask))
    B, nh, l, hd = q.shape
    nkv, n = keys.shape[1], keys.shape[2]
    group = nh // nkv
    out = torch.empty(B, l, nh, hd, dtype=q.dtype, device=q.device)
    shapes = launch or attention_launch(B, n)
    block_d = max(16, triton.next_power_of_2(hd))  # tl.dot needs >= 16
    row_tiles = triton.cdiv(group * l, shapes.block_m)
    # Keys per split: a multiple of the key step; splits past the last key are dropped.
    per_split = triton.cdiv(triton.cdiv(n, shapes.key_splits), shapes.block_n) * shapes.block_n
    splits = triton.cdiv(n, per_split)
    part_out = part_lse = None
    if splits > 1:
        part_out = torch.empty(B * nkv, splits, group * l, block_d, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(B * nkv, splits, group * l, dtype=torch.float32, device=q.device)
    block_attention_kernel[(B * nkv, row_tiles, splits)](
        q_ptr=q, stride_qb=q.stride(0), stride_qh=q.stride(1), stride_ql=q.stride(2),
        k_ptr=keys, v_ptr=values,
        stride_kb=keys.stride(0), stride_kh=keys.stride(1), stride_kn=keys.stride(2),
        stride_vb=values.stride(0), stride_vh=values.stride(1), stride_vn=values.stride(2),
        mask_ptr=mask, stride_mb=mask.stride(0), stride_mr=mask.stride(2),
        out_ptr=out, stride_ob=out.stride(0), stride_ol=out.stride(1), stride_oh=out.stride(2),
        L=l, n_keys=n, scale=float(scale), keys_per_split=per_split, part_out_ptr=part_out,
        part_lse_ptr=part_lse, NKV=nkv, GROUP=group, HD=hd, BLOCK_D=block_d,
        BLOCK_M=shapes.block_m, BLOCK_N=shapes.block_n, PRECISION=dot_precision(q.dtype),
        num_warps=shapes.warps, num_stages=shapes.stages, **pdl(q.device),
    )
    if splits > 1:
        attention_combine_kernel[(B * nkv, row_tiles)](
            part_out_ptr=part_out, part_lse_ptr=part_lse, out_ptr=out, stride_ob=out.stride(0),
            stride_ol=out.stride(1), stride_oh=out.stride(2), L=l, SPLITS=splits, NKV=nkv,
            GROUP=group, HD=hd, BLOCK_D=block_d, BLOCK_M=shapes.block_m, num_warps=shapes.warps,
            **pdl(q.device))
    return out.view(B, l, nh * hd)
