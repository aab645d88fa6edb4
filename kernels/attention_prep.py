"""Attention prep: per-head RMSNorm of q and k, partial NeoX RoPE, and the q/k/v layout, in one
launch over the QKV projection's output.

One program per (token, head) of qkv [B, L, (NH + 2 NKV) * HD]: heads [0, NH) are queries,
[NH, NH + NKV) keys, the rest values. q and k are normalised (fp32 statistics, rounded to the
activations' dtype, times the weight, rounded again: LLaDA2MoeRMSNorm's order) and their first RD
dims rotated (NeoX halves), every product rounded to the dtype before the sum as eager torch
does, so that the kernel reproduces the torch path bit for bit up to the order of the sum of
squares. Values are copied. Outputs go straight to their destinations (q [B, NH, L, HD]
contiguous; k and v strided, e.g. a static KV cache's spare rows), so no layout copy follows.

The rotate-half partner of dim d is read from memory a second time (d +- RD/2) rather than
shuffled in registers: the row statistic is shared, so the partner's normalised value costs a
load and a few multiplies.
"""
import triton
import triton.language as tl

from .pdl import wait_previous_kernel


@triton.jit
def _normed(x, w, inv_rms, dtype: tl.constexpr):
    """weight * round(x * inv_rms) rounded to dtype, back in fp32."""
    return (w * (x * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)


@triton.jit
def _norm_rope_head(src, w_ptr, cos_row, sin_row, dst, eps,
                    HD: tl.constexpr, RD: tl.constexpr, BLOCK_D: tl.constexpr):
    """One head: RMSNorm (weights w_ptr [HD]) then NeoX RoPE on its first RD dims, src -> dst."""
    dtype = dst.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    in_head = d < HD
    x = tl.load(src + d, mask=in_head, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / HD + eps)
    w = tl.load(w_ptr + d, mask=in_head, other=0.0).to(tl.float32)
    y = _normed(x, w, inv_rms, dtype)

    rotary = d < RD
    first_half = d < RD // 2
    partner = tl.where(first_half, d + RD // 2, d - RD // 2)
    xp = tl.load(src + partner, mask=rotary, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + partner, mask=rotary, other=0.0).to(tl.float32)
    yp = _normed(xp, wp, inv_rms, dtype)
    rotated = tl.where(first_half, -yp, yp)  # rotate_half: (-b, a)
    cos_d = tl.load(cos_row + d, mask=rotary, other=0.0).to(tl.float32)
    sin_d = tl.load(sin_row + d, mask=rotary, other=0.0).to(tl.float32)
    roped = (y * cos_d).to(dtype).to(tl.float32) + (rotated * sin_d).to(dtype).to(tl.float32)
    tl.store(dst + d, tl.where(rotary, roped, y).to(dtype), mask=in_head)


@triton.jit
def attention_prep_kernel(
    qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
    L, eps,
    qkv_sb, qkv_sl,            # qkv [B, L, heads * HD], unit stride along the last dim
    cs_sb, cs_sl,              # cos/sin [B, L, RD] (shared strides), unit stride along RD
    k_sb, k_sh, k_sl,          # k destination [B, NKV, L, HD], unit stride along HD
    v_sb, v_sh, v_sl,          # v destination [B, NKV, L, HD], unit stride along HD
    NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, RD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid (B * L, NH + 2 NKV): program (token, head) normalises, rotates or copies one head.

    qkv_ptr [B, L, (NH + 2 NKV) * HD] fp32/fp16/bf16; q_weight_ptr, k_weight_ptr [HD];
    cos_ptr, sin_ptr [B, L, RD] in qkv's dtype; q_ptr [B, NH, L, HD] contiguous out; k_ptr,
    v_ptr [B, NKV, L, HD] out (strides in elements, as commented). L: tokens per sequence;
    eps: RMSNorm epsilon (fp32). NH, NKV: query and KV heads; HD: head dims; RD: rotary dims
    (even, <= HD); BLOCK_D: next power of two >= HD.
    """
    wait_previous_kernel(PDL)  # before any load or store (kernels/pdl.py)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    b = token // L
    l = token % L
    src = qkv_ptr + b * qkv_sb + l * qkv_sl + head * HD
    cos_row = cos_ptr + b * cs_sb + l * cs_sl
    sin_row = sin_ptr + b * cs_sb + l * cs_sl
    if head < NH:
        dst = q_ptr + ((b * NH + head) * L + l) * HD
        _norm_rope_head(src, q_weight_ptr, cos_row, sin_row, dst, eps, HD, RD, BLOCK_D)
    elif head < NH + NKV:
        dst = k_ptr + b * k_sb + (head - NH) * k_sh + l * k_sl
        _norm_rope_head(src, k_weight_ptr, cos_row, sin_row, dst, eps, HD, RD, BLOCK_D)
    else:
        d = tl.arange(0, BLOCK_D)
        dst = v_ptr + b * v_sb + (head - NH - NKV) * v_sh + l * v_sl
        tl.store(dst + d, tl.load(src + d, mask=d < HD), mask=d < HD)
