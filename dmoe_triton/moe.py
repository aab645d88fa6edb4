"""The routed-expert MLP of a MoE layer: `moe_forward()` and `DMoEBlock` (docs/moe.md).

`moe_forward` checks its inputs on the host (shapes, dtypes, devices: nothing that needs a sync),
then runs either the Triton kernels of `kernels/moe_matmul.py` or the reference. `DMoEBlock` is a
whole LLaDA2 MoE MLP: `route_hidden` (router GEMM + routing), `moe_forward` and the
shared expert.
"""
from __future__ import annotations

import contextvars
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
import triton

from .config import RouterConfig, RoutingPolicy
from .launch import (DECODE_MAX_TOKENS, DEFAULT_COMBINE,  # noqa: F401 (re-exported)
                     DEFAULT_DECODE, DEFAULT_GROUPED, KERNEL_FLOATS, CombineLaunch, DecodeConfig,
                     GroupedConfig, align_launch, dot_precision, fit_scale_blocks, fp8_bits,
                     moe_launch, pdl, persistent_grid, pipeline_stages, takes_tma)
from .modules import bf16_copy, fp32_router_state, keep_dtypes
from .quant import (DEFAULT_BLOCK, FP8_DTYPE, Fp8Scales, check_block, check_scale,
                    dequantize_experts, dequantize_shared, quantize_experts, quantize_shared)
from .reference import moe_forward_reference
from .router import route_hidden
from .routing import check_interpreted_dot, resolve_backend

ID_TYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_moe_inputs(hidden, topk_ids, topk_weights, w_gate_up, w_down, scales=None) -> None:
    """Shapes, dtypes and devices only: a ValueError/TypeError naming the argument. Weights in
    hidden's dtype, or float8_e4m3fn with `scales` (an Fp8Scales, checked by the caller)."""
    named = dict(hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights,
                 w_gate_up=w_gate_up, w_down=w_down)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [T, H], got {_shape(hidden)}")
    if hidden.dtype not in KERNEL_FLOATS:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    T, H = hidden.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must have shape [{T}, k] (T from hidden), got {_shape(topk_ids)}")
    if topk_ids.dtype not in ID_TYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if _shape(topk_weights) != _shape(topk_ids):
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {_shape(topk_ids)}, "
            f"got {_shape(topk_weights)}"
        )
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}")
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != H or w_gate_up.shape[1] % 2 != 0:
        raise ValueError(f"w_gate_up must have shape [E, 2*I, {H}] (H from hidden), "
                         f"got {_shape(w_gate_up)}")
    E, two_i = w_gate_up.shape[:2]
    if E < 1 or two_i < 2:
        raise ValueError(f"w_gate_up must hold at least one expert and I >= 1, got {_shape(w_gate_up)}")
    if _shape(w_down) != (E, H, two_i // 2):
        raise ValueError(f"w_down must have shape [{E}, {H}, {two_i // 2}] (E, H, I from "
                         f"w_gate_up and hidden), got {_shape(w_down)}")
    _check_weight_dtypes(hidden, w_gate_up, w_down, scales)
    for name, t in named.items():
        if t.device != hidden.device:
            raise TypeError(f"{name} is on {t.device} but hidden on {hidden.device}")


def _check_weight_dtypes(hidden, w_gate_up, w_down, scales) -> None:
    """hidden's dtype, or FP8 with scales (whose shapes Fp8Scales.check checks)."""
    if scales is not None:
        if not isinstance(scales, Fp8Scales):
            raise TypeError(f"scales must be None or an Fp8Scales, got {type(scales).__name__}")
        return
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype == FP8_DTYPE:
            raise ValueError(f"{name} is float8_e4m3fn: pass its block scales "
                             f"(scales=Fp8Scales(gate_up, down, block))")
        if w.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {w.dtype}")


def check_out(out, hidden) -> None:
    """out must be a [T, H] tensor of hidden's dtype and device, unit stride along H and rows
    that do not overlap (any row stride >= H: a row-sliced buffer works)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    T, H = _shape(hidden)
    if _shape(out) != (T, H) or (out.numel() and (
            out.stride(1) != 1 or (T > 1 and out.stride(0) < H))):
        raise ValueError(f"out must have hidden's shape {_shape(hidden)} with unit stride along H "
                         f"and non-overlapping rows (row stride >= H), got shape {_shape(out)} "
                         f"strides {out.stride()}")
    if out.dtype != hidden.dtype or out.device != hidden.device:
        raise TypeError(f"out must be {hidden.dtype} on {hidden.device}, got {out.dtype} on "
                        f"{out.device}")


def check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Host check of the id values (a sync on CUDA, so only where asked or free)."""
    bad = (topk_ids < -1) | (topk_ids >= num_experts)
    if bool(bad.any()):
        value = int(topk_ids[bad][0])
        raise ValueError(
            f"topk_ids must hold expert ids in [0, {num_experts}) or -1 (empty slot), got {value}"
        )


def _routed_strides(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t itself, or a copy with `like`'s strides (the kernels run a shared expert with the
    routed experts' per-expert strides)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device=t.device).copy_(t)


def check_shared(shared, w_gate_up, w_down, dtype: torch.dtype, scales=None,
                 check_values: bool = False) -> tuple:
    """(shared, scales) checked: shared None, or (gate_up [2I, H], down [H, I]) shaped like one
    routed expert of w_gate_up [E, 2I, H] / w_down [E, H, I] on their device, in `dtype`
    (hidden's); with FP8 routed experts (scales, an Fp8Scales) FP8 too, its block scales in
    scales.shared (quant.quantize_shared), as one more expert of the same launches. Returns the
    pair (and scales.shared) with the routed experts' strides: the tensors themselves, or
    copies where a view's strides differ (a transposed or sliced shared expert still gives the
    right values). check_values: the scales' values too (a host sync: quant.check_scale).
    TypeError / ValueError naming the tensor."""
    has_scales = scales is not None and scales.shared is not None
    if shared is None:
        if has_scales:
            raise ValueError("scales.shared holds a shared expert's scales but shared is None")
        return None, scales
    if not (isinstance(shared, (tuple, list)) and len(shared) == 2
            and all(isinstance(t, torch.Tensor) for t in shared)):
        raise TypeError("shared must be None or a pair of tensors (gate_up [2I, H], down [H, I])")
    if scales is not None:
        if not has_scales:
            raise ValueError("with FP8 routed experts the shared expert must be FP8 too: pass "
                             "its block scales as scales.shared (quant.quantize_shared)")
        dtype = FP8_DTYPE
    restrided = []
    for name, t, like in (("shared[0] (gate_up)", shared[0], w_gate_up[0]),
                          ("shared[1] (down)", shared[1], w_down[0])):
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the routed experts' per-expert shape "
                             f"{_shape(like)}, got {_shape(t)}")
        if t.dtype != dtype or t.device != like.device:
            raise TypeError(f"{name} must be {dtype} on {like.device}, got {t.dtype} on "
                            f"{t.device}")
        restrided.append(_routed_strides(t, like))
    if scales is None:
        return tuple(restrided), None
    if not (isinstance(scales.shared, (tuple, list)) and len(scales.shared) == 2):
        raise TypeError("scales.shared must be a pair of tensors (the shared expert's gate_up "
                        "and down scales)")
    if any(0 in t[0].stride() for t in (scales.gate_up, scales.down)):
        # Broadcast routed scales (a zero stride) have no layout to copy the shared ones into.
        scales = replace(scales, gate_up=scales.gate_up.contiguous(),
                         down=scales.down.contiguous())
    shared_scales = []
    for name, t, s, like in (("shared[0]", shared[0], scales.shared[0], scales.gate_up[0]),
                             ("shared[1]", shared[1], scales.shared[1], scales.down[0])):
        check_scale(name, t, s, scales.block, like.shape, check_values)
        shared_scales.append(_routed_strides(s, like))
    return tuple(restrided), replace(scales, shared=tuple(shared_scales))


def moe_forward(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                w_gate_up: torch.Tensor, w_down: torch.Tensor, backend: str = "auto",
                check_ids: Optional[bool] = None,
                out: Optional[torch.Tensor] = None, shared=None,
                scales: Optional[Fp8Scales] = None) -> torch.Tensor:
    """Routed experts of one MoE layer: y[t] = sum_j w[t, j] * down(silu(gate(x)) * up(x)).

    hidden [T, H] (fp32/fp16/bf16); topk_ids [T, k] int32/int64, -1 = empty slot; topk_weights
    [T, k] fp32; w_gate_up [E, 2I, H] (gate rows, then up rows) and w_down [E, H, I] in hidden's
    dtype, or float8_e4m3fn with `scales` (FP8 experts: dmoe_triton/quant.py, an Fp8Scales of
    fp32 block scales; a missing or mis-shaped scale is a ValueError naming it). With bf16
    activations FP8 experts run W8A8 by default, as DeepSeek-V3's FP8 inference does: the
    activations are quantized to e4m3 per token in groups of the scale blocks' width (128 in
    published checkpoints; the act rows in groups of the gate/up's block_i, a divisor of it,
    the whole width by default; power-of-two scales) for FP8 tensor cores; the reference
    dequantizes the weights and quantizes the activations the same way
    (launch.DecodeConfig.dot; "fp16" keeps the activations exact). Returns [T, H] in
    hidden's dtype, accumulated in fp32, contiguous. Every input may be any strided view
    (transposed, sliced, offset, expanded): the values are the same.

    NaN rule (docs/routing.md, NaN): a token outputs a NaN row when a filled slot's weight is
    NaN, or when every slot is empty and every weight is NaN (how `route` marks an all-NaN
    logits row), on every backend and path, with or without a shared expert: a row that route
    flags is NaN, never 0. Otherwise an empty slot's weight is never read (junk cannot leak).

    check_ids: None (default) checks id values (and FP8 scales for finiteness) on the host only
    where that is free (CPU tensors); True checks on CUDA too (a host sync: not allowed under
    CUDA-graph capture); False never checks. Unchecked, the kernels skip any id outside [0, E) like an empty slot and
    never read out of bounds.
    out: optional [T, H] tensor of hidden's dtype and device with unit stride along H and any
    row stride >= H (else a ValueError naming out), written in place and returned (a fixed
    buffer for CUDA graphs).
    shared: optional (gate_up [2I, H], down [H, I]) of a shared expert (copied to the routed
    experts' per-expert strides where a view's differ, so pass them for no copy): every token
    adds it with weight 1, inside the same fp32 sum (on either path, one more expert of the
    same launches). With FP8 routed experts it is FP8 too,
    its block scales in scales.shared (quant.quantize_shared), and runs exactly as a routed
    expert does (dot, activation groups); without its scales (scales.shared) it is a
    ValueError, and one not in float8_e4m3fn beside them a TypeError.
    Launch path and tile shapes: dmoe_triton.launch (moe_launch; `launch.override` forces them).
    Under Triton's interpreter (TRITON_INTERPRET=1) the Triton backend refuses bfloat16 products
    (bf16 weights, or FP8 weights with the "model" dot) with a TypeError: the interpreter
    computes them wrongly (routing.check_interpreted_dot).
    """
    check_moe_inputs(hidden, topk_ids, topk_weights, w_gate_up, w_down, scales)
    if out is not None:
        check_out(out, hidden)
    backend = resolve_backend(backend, hidden.device)
    if check_ids is None:
        check_ids = hidden.device.type != "cuda"
    if check_ids:
        if hidden.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("check_ids=True needs a host sync; pass check_ids=None or False "
                             "under CUDA-graph capture")
        check_ids_in_range(topk_ids, w_gate_up.shape[0])
    if scales is not None:
        scales.check(w_gate_up, w_down, check_values=check_ids)
    shared, scales = check_shared(shared, w_gate_up, w_down, hidden.dtype, scales, check_ids)
    if backend == "reference":
        groups = None
        if scales is not None:  # the reference of FP8 experts: dequantize, then the same path
            groups = fp8_activation_groups(hidden, _launch_config(hidden, topk_ids, w_gate_up),
                                           scales)
            acc = torch.promote_types(hidden.dtype, torch.float32)
            w_gate_up, w_down = dequantize_experts(w_gate_up, w_down, scales, acc)
            if shared is not None:
                shared = dequantize_shared(shared, scales, acc)
        y = moe_forward_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, shared,
                                  activation_groups=groups)
        return y if out is None else out.copy_(y)
    return moe_forward_triton(hidden, topk_ids, topk_weights, w_gate_up, w_down, out=out,
                              shared=shared, scales=scales)


def _launch_config(hidden, topk_ids, w_gate_up):
    """The config (DecodeConfig or GroupedConfig) of the path the Triton backend would take for
    FP8 experts (launch.moe_launch)."""
    plan = moe_launch(topk_ids.shape[0], topk_ids.shape[1], w_gate_up.shape[0], hidden.dtype,
                      hidden.device, fp8=True)
    return plan.decode if plan.path == "decode" else plan.grouped


class SlotLists(NamedTuple):
    """align_slots' outputs, int32 on the device: for u < n_used, expert used_expert[u] owns
    slots sorted_slots[used_start[u] : used_start[u] + used_count[u]], in cdiv(used_count[u],
    block_m) tiles numbered from used_tile[u] (used_tile[u] = n_tiles from u = n_used on)."""
    sorted_slots: torch.Tensor  # [S]: slots by expert, then slot; empty slots last
    used_expert: torch.Tensor   # [E]
    used_start: torch.Tensor    # [E]
    used_count: torch.Tensor    # [E]
    n_used: torch.Tensor        # [1]
    used_tile: torch.Tensor     # [E]
    n_tiles: torch.Tensor       # [1]

    def kernel_args(self) -> dict:
        """The persistent kernels' keyword arguments (moe_gate_up_kernel, moe_down_kernel)."""
        E = self.used_expert.numel()
        return dict(sorted_slots_ptr=self.sorted_slots, used_expert_ptr=self.used_expert,
                    used_start_ptr=self.used_start, used_count_ptr=self.used_count,
                    used_tile_ptr=self.used_tile, n_tiles_ptr=self.n_tiles, E=E,
                    USED_PAD=triton.next_power_of_2(E))


def max_tiles(slots: int, num_experts: int, block_m: int) -> int:
    """The most block_m-slot tiles `slots` filled slots can take over `num_experts` experts
    (each used expert's last tile may be partly filled): bounds the persistent grids."""
    return min(num_experts, slots) + slots // block_m


def check_slot_layout(name: str, routing: torch.Tensor, slots: Optional[int],
                      shared: bool) -> None:
    """The grouped path's launches take the routing's ids or weights as contiguous [T, top_k]
    and add a shared expert's slot themselves (kernels/moe_matmul.py, _routed_at): a flat
    tensor, or one that already holds that slot, is a ValueError naming `name`, not a misread.
    slots: the T * (top_k + shared) rows of the caller's slot buffers, or None."""
    rows = None if routing.dim() != 2 else routing.shape[0] * (routing.shape[1] + shared)
    if rows is None or not routing.is_contiguous() or (slots is not None and rows != slots):
        raise ValueError(
            f"{name} must be a contiguous [T, top_k] tensor whose T * (top_k + {int(shared)}) "
            f"slots match the {slots} slot rows (a shared expert's slot is added by the "
            f"kernels), got shape {_shape(routing)} and strides {tuple(routing.stride())}")


def align_slots(ids: torch.Tensor, num_experts: int, block_m: int,
                shared: bool = False) -> SlotLists:
    """Slots sorted by expert, the list of used experts and their tiles of block_m slots, on
    the device, no sync: a counting sort in three launches (kernels/moe_matmul.py), shaped by
    launch.align_launch. reference.align_slots_reference gives the same lists in torch ops.

    ids: int32/int64 [T, top_k] contiguous (-1 or out of range = empty). The slots are T *
    (top_k + shared): with shared, each token's last slot is a shared expert's, expert
    num_experts - 1, which `ids` does not hold (the routed ids lie in [0, num_experts - 1)).
    Returns SlotLists. Raises ValueError for other ids layouts (check_slot_layout).
    """
    from .kernels.moe_matmul import align_count_kernel, align_lists_kernel, align_scatter_kernel

    check_slot_layout("ids", ids, None, shared)
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64 expert ids, got {ids.dtype}")
    T, top_k = ids.shape
    slots_per_token = top_k + shared
    S, E = T * slots_per_token, num_experts
    plan = align_launch(S, E)
    dev = ids.device
    bins = triton.next_power_of_2(E + 1)
    chunks = triton.cdiv(S, plan.chunk)
    lists = SlotLists(*[torch.empty(n, dtype=torch.int32, device=dev)
                        for n in (S, E, E, E, 1, E, 1)])
    chunk_counts = torch.empty(chunks, bins, dtype=torch.int32, device=dev)
    common = dict(NUM_BINS=bins, num_warps=plan.warps, **pdl(dev))
    slot_args = dict(TOP_K=slots_per_token, CHUNK=plan.chunk, SHARED=shared)
    align_count_kernel[(chunks,)](ids, chunk_counts, S, E, **slot_args, **common)
    align_lists_kernel[(1,)](
        chunk_counts, chunks, lists.used_expert, lists.used_start, lists.used_count,
        lists.n_used, lists.used_tile, lists.n_tiles, E, BLOCK_M=block_m, ROWS=plan.rows,
        **common)
    align_scatter_kernel[(chunks,)](ids, chunk_counts, lists.sorted_slots, S, E, **slot_args,
                                    **common)
    return lists


_SCALED_DTYPES = {"fp16": torch.float16, "fp8": FP8_DTYPE}


def scaled_dot(hidden, config, fp8) -> str:
    """The FP8 weights' dot (kernels/moe_fp8.py) for bf16 activations under `config` (already
    fitted: launch.fit_scale_blocks, which also decides where the fp8 dot cannot run for the
    config's shapes): config.dot, except that "fp8" becomes "fp16" for weights read as bytes
    (GPUs below sm_89, no FP8 tensor cores: launch.fp8_bits). Other activations and bf16
    weights: "model"."""
    if fp8 is None or hidden.dtype != torch.bfloat16:
        return "model"
    if config.dot == "fp8" and fp8[2]:
        return "fp16"
    return config.dot


def fp8_activation_groups(hidden, config, scales: Fp8Scales):
    """(x_group, act_group): how the fp8 dot (W8A8) quantizes the activations of hidden [T, H]
    under `config` (DecodeConfig or GroupedConfig) for FP8 weights with `scales`: x per token in
    groups of the scale blocks' columns, act in groups of the fitted block_i columns (a divisor
    of them: launch.fit_scale_blocks); None where the launch runs another dot (scaled_dot). For
    moe_forward_reference's activation_groups, so a reference matches the kernels' numerics."""
    config = fit_scale_blocks(config, scales.block[1])
    if scaled_dot(hidden, config, (None, scales.block, fp8_bits(hidden.device))) != "fp8":
        return None
    return scales.block[1], config.block_i


class ActRows(NamedTuple):
    """What a gate/up launch hands to its down launch (act_buffers).

    act [rows, I]: hidden's dtype, or fp16 / e4m3 with FP8 weights' fp16 / fp8 dot; scale:
    None, or with those dots fp32 [rows, cdiv(I, block_i)] the act rows' inverse scales
    (kernels/moe_fp8.py);
    used: None, or on the decode path int32 [U + 1] (U = min(E, T * top_k), + 1 with a shared
    expert): the used experts in rank order, used[u] the u-th (E: the shared expert, after
    them), as the gate/up found them, and used[U] their number, so that the down reads them
    instead of searching;
    row_weight: None, or on the decode path fp32 [U, T_PAD]: row_weight[u, t] token t's
    routing weight for expert used[u] (0 where t does not use it), which the FP8 down applies
    (bf16 / fp32 act rows come weighed by the gate/up: _act_args' WEIGHED_ACT). The decode path's
    act rows are by expert: row u * T_PAD + t (moe_gate_up_decode_kernel).
    """
    act: torch.Tensor
    scale: Optional[torch.Tensor] = None
    used: Optional[torch.Tensor] = None
    row_weight: Optional[torch.Tensor] = None


def act_buffers(rows: int, inter: int, hidden, config, fp8) -> ActRows:
    """Uninitialised ActRows for `rows` act rows of I = inter columns; the scales with a scaled
    dot (scaled_dot). The decode path's list and table (ActRows.used, row_weight) are
    decode_gate_up's."""
    dot = scaled_dot(hidden, config, fp8)
    dev = hidden.device
    act = torch.empty(rows, inter, dtype=_SCALED_DTYPES.get(dot, hidden.dtype), device=dev)
    scale = None
    if dot != "model":
        scale = torch.empty(rows, triton.cdiv(inter, config.block_i), dtype=torch.float32,
                            device=dev)
    return ActRows(act, scale)


def _act_args(acts: ActRows, config, down: bool) -> dict:
    """The kernels' keyword arguments for ActRows (the scales', the decode lists' where there
    are); the down kernels also take the gate/up's column chunk a scale covers."""
    args = dict(act_ptr=acts.act, stride_as=acts.act.stride(0))
    if down:
        # Also without act scales: with FP8 weights the down's dots are act chunks wide (each
        # inside one scale block: launch.fit_scale_blocks, kernels/moe_fp8.fp8_down_step).
        args["ACT_CHUNK"] = config.block_i
    if acts.scale is not None:
        dot = "fp16" if acts.act.dtype == torch.float16 else "fp8"
        args.update(act_scale_ptr=acts.scale, stride_ss=acts.scale.stride(0), DOT=dot)
    if acts.used is not None:
        # The decode gate/up weighs model-dtype act rows by their routing weights where their
        # dtype has fp32's range (bf16, fp32); a weighed fp16 row could pass 65504 where the
        # unweighed one does not, so the down weighs fp16 rows' products instead. (FP8
        # weights' launches ignore it: their down weighs every product.)
        args.update(used_ptr=acts.used, row_weight_ptr=acts.row_weight,
                    WEIGHED_ACT=acts.act.dtype != torch.float16)
    return args


def _x_args(hidden, config, fp8) -> dict:
    """The gate/up kernels' activation arguments: hidden itself (the model dot, or a scaled dot
    without config.x_prepass: the gate/up scales each k step's tile; the fp8 dot so only where
    a k step is a scale block's columns: launch.fit_scale_blocks), or its rows in the dot's
    type and their inverse scales per scale block's columns (scaled_rows_kernel, one more
    launch)."""
    dot = scaled_dot(hidden, config, fp8)
    if dot == "model" or not config.x_prepass:
        return dict(x_ptr=hidden, stride_xt=hidden.stride(0), stride_xh=hidden.stride(1))
    from .kernels.moe_fp8 import scaled_rows_kernel

    T, H = hidden.shape
    chunk = fp8[1][1]  # the scale blocks' columns: the k steps lie inside (fit_scale_blocks)
    xs = torch.empty(T, H, dtype=_SCALED_DTYPES[dot], device=hidden.device)
    inverse = torch.empty(T, triton.cdiv(H, chunk), dtype=torch.float32, device=hidden.device)
    scaled_rows_kernel[(T, triton.cdiv(H, chunk))](
        x_ptr=hidden, stride_xt=hidden.stride(0), stride_xh=hidden.stride(1), xs_ptr=xs,
        inverse_ptr=inverse, H=H, CHUNK=chunk, CHUNK_PAD=triton.next_power_of_2(chunk),
        DOT=dot, num_warps=1, **pdl(hidden.device))
    return dict(x_ptr=xs, stride_xt=H, stride_xh=1, x_inverse_ptr=inverse,
                stride_xi=inverse.stride(0))


def expert_gate_up(hidden, w_gate_up, lists, top_k: int, config: GroupedConfig,
                   fp8=None, shared_gate_up=None, shared_scale=None) -> ActRows:
    """ActRows of T*top_k rows: silu(x W_gate^T) * (x W_up^T) for every filled slot.

    hidden [T, H]; w_gate_up [E, 2I, H] in hidden's dtype (or FP8 with fp8 = (scale, block,
    bits): _weight_args); lists: align_slots' outputs, over E + 1 experts with a shared
    expert: shared_gate_up [2I, H] (and with FP8 its scales shared_scale) is expert E.
    """
    from .kernels.moe_matmul import moe_gate_up_kernel

    T, H = hidden.shape
    E, inter = lists.used_expert.numel(), w_gate_up.shape[1] // 2
    cfg = config
    acts = act_buffers(T * top_k, inter, hidden, cfg, fp8)
    grid = persistent_grid(hidden.device, cfg.programs_per_sm,
                           max_tiles(T * top_k, E, cfg.block_m) * triton.cdiv(inter, cfg.block_i))
    moe_gate_up_kernel[grid](
        **_x_args(hidden, cfg, fp8),
        **_weight_args(w_gate_up, ("stride_we", "stride_wn", "stride_wk"), fp8),
        **_act_args(acts, cfg, down=False), **lists.kernel_args(),
        **_shared_args(shared_gate_up, shared_scale, fp8), H=H, I=inter, TOP_K=top_k,
        BLOCK_M=cfg.block_m, BLOCK_I=cfg.block_i, BLOCK_K=cfg.k_tile_gate_up,
        PRECISION=dot_precision(hidden.dtype),
        num_warps=cfg.warps_gate_up, num_stages=pipeline_stages(cfg.stages_gate_up, hidden.dtype),
        **pdl(hidden.device))
    return acts


def _strides(*names, w) -> dict:
    """A weight tensor's strides as named kernel arguments."""
    return dict(zip(names, w.stride()))


def _weight_args(w, names, fp8) -> dict:
    """A weight's kernel arguments: w_ptr and its strides `names`; with fp8 = (scale fp32,
    block (bn, bk), bits) also its block scales (s_ptr, strides, SCALE_N, SCALE_K) and FP8_BITS
    (then w goes as its uint8 bytes: launch.fp8_bits)."""
    if fp8 is None:
        return dict(w_ptr=w, **_strides(*names, w=w))
    scale, block, bits = fp8
    return dict(w_ptr=w.view(torch.uint8) if bits else w, **_strides(*names, w=w), s_ptr=scale,
                **_strides("stride_se", "stride_sn", "stride_sk", w=scale), SCALE_N=block[0],
                SCALE_K=block[1], FP8_BITS=bits)


def _down_step(config, acts: ActRows, fp8) -> int:
    """The down launch's k step: config.k_tile_down, except that a step wider than the scale
    block, which launch.fit_scale_blocks keeps for the fp8 dot (its dots are the act groups),
    is cut to the block where the launch runs another dot (act rows of 2 or 4 bytes: the fp16
    dot below sm_89, the model dot for fp16 / fp32 activations): sized for e4m3 act tiles, it
    would take 2-4x the shared memory (offline for sm_90: 360448 bytes for the decode down
    with fp16 activations at steps of 512, over the 232448 a program may take)."""
    if fp8 is None or acts.act.dtype == FP8_DTYPE:
        return config.k_tile_down
    return min(config.k_tile_down, fp8[1][1])  # a fitted step is never wider than the block


def expert_down(acts: ActRows, w_down, lists, weights, dtype: torch.dtype,
                config: GroupedConfig, fp8=None, shared_down=None, shared_scale=None):
    """partial [T*(top_k + shared), H] in `dtype` (the layer output's): w * act W_down^T for
    every filled slot, w its routing weight (1 for a shared expert's slot), computed in fp32
    and rounded once (other rows unwritten).

    acts: expert_gate_up's; w_down [E, H, I] in the act rows' model dtype (or FP8 with fp8, as
    in expert_gate_up); lists: align_slots' outputs; weights fp32 [T, top_k] contiguous, the
    routed slots' routing weights; shared_down [H, I] (shared_scale) as in expert_gate_up: each
    token's last slot (one past top_k), of weight 1. Raises ValueError where weights does not
    give the act rows' T * (top_k + shared) slots (check_slot_layout).

    The weight is applied here, not in the combine, so that a partial in the output's dtype
    loses no more than one rounding of its own term (fp32 partials were 2x the bytes: at 64 x
    32 tokens, 134 MB written and read again).
    """
    from .kernels.moe_matmul import moe_down_kernel

    act = acts.act
    slots, inter = act.shape
    E, H = lists.used_expert.numel(), w_down.shape[1]
    shared = shared_down is not None
    check_slot_layout("weights", weights, slots, shared)
    partial = torch.empty(slots, H, dtype=dtype, device=act.device)
    cfg = config
    grid = persistent_grid(act.device, cfg.programs_per_sm,
                           max_tiles(slots, E, cfg.block_m) * triton.cdiv(H, cfg.block_h))
    moe_down_kernel[grid](
        **_act_args(acts, cfg, down=True),
        **_weight_args(w_down, ("stride_we", "stride_wh", "stride_wi"), fp8),
        partial_ptr=partial, stride_ps=partial.stride(0), weights_ptr=weights,
        **lists.kernel_args(), **_shared_args(shared_down, shared_scale, fp8), H=H, I=inter,
        TOP_K=weights.shape[1] + shared, SHARED=shared, BLOCK_M=cfg.block_m,
        BLOCK_H=cfg.block_h, BLOCK_K=_down_step(cfg, acts, fp8),
        PRECISION=dot_precision(act.dtype), num_warps=cfg.warps_down,
        num_stages=pipeline_stages(cfg.stages_down, act.dtype), **pdl(act.device))
    return partial


def combine_slots(partial, ids, weights, out, num_experts: int,
                  launch: CombineLaunch = DEFAULT_COMBINE, shared: bool = False):
    """out[t] = sum_j partial[t*(k + shared) + j] over filled slots, in slot order, in fp32.

    partial [T*(top_k + shared), H] (expert_down's weighted terms); ids int [T, top_k];
    weights fp32 [T, top_k] (read for the NaN rule: docs/routing.md); out [T, H].
    shared: each token has one more slot, its last, the shared expert's (expert num_experts -
    1, weight 1: moe_combine_kernel's SHARED). Raises ValueError where ids or weights does not
    give partial's T * (top_k + shared) slots (check_slot_layout).
    """
    from .kernels.moe_matmul import moe_combine_kernel

    for name, routing in (("ids", ids), ("weights", weights)):
        check_slot_layout(name, routing, partial.shape[0], shared)
    T, H = out.shape
    moe_combine_kernel[(triton.cdiv(T, launch.block_t), triton.cdiv(H, launch.block_h))](
        partial_ptr=partial, stride_ps=partial.stride(0), ids_ptr=ids, weights_ptr=weights,
        out_ptr=out, stride_ot=out.stride(0), T=T, H=H, E=num_experts,
        TOP_K=ids.shape[1] + shared,
        BLOCK_T=launch.block_t, BLOCK_H=launch.block_h, UNROLL=launch.unroll, SHARED=shared,
        num_warps=launch.warps, **pdl(out.device))
    return out


def _decode_pads(T, top_k, dtype, num_experts=None) -> dict:
    """The decode kernels' padded sizes (powers of two; T_PAD >= 16 for tl.dot); with
    num_experts, also the sizes of the ids' histogram over them (the gate/up's; the down reads
    its list instead)."""
    pads = dict(T_PAD=max(16, triton.next_power_of_2(T)),
                TOP_K_PAD=triton.next_power_of_2(top_k), PRECISION=dot_precision(dtype))
    if num_experts is not None:
        pads.update(S_PAD=triton.next_power_of_2(T * top_k),
                    NUM_BINS=triton.next_power_of_2(num_experts + 1))
    return pads


def down_arrivals(H: int, device, config: DecodeConfig):
    """The down launch's arrival counters, int32 [cdiv(H, block_h)], or None with one split."""
    if config.down_splits == 1:
        return None
    return torch.empty(triton.cdiv(H, config.block_h), dtype=torch.int32, device=device)


def decode_gate_up(hidden, ids, weights, w_gate_up, arrivals, config: DecodeConfig,
                   shared_gate_up=None, fp8=None, shared_scale=None) -> ActRows:
    """ActRows for the used experts: act rows by expert (u * T_PAD + t for the u-th used
    expert, the shared expert last; zeros where t does not use it), weighed by their routing
    weights (1: the shared expert's; fp16 rows and FP8 weights' are not weighed), the used
    experts' list and each one's tokens' routing weights (ActRows.row_weight); also zeroes
    `arrivals` (if any).

    hidden [T, H]; ids int [T, top_k] contiguous; weights fp32 [T, top_k] contiguous, the
    routing weights; w_gate_up [E, 2I, H]; arrivals: down_arrivals' counters or None;
    shared_gate_up: [2I, H] with a routed expert's strides, or None; fp8: FP8 w_gate_up's
    (scale, block, bits) (_weight_args), or None; shared_scale: with fp8 and shared_gate_up,
    its scales [2 * cdiv(I, bn), cdiv(H, bk)] with a routed expert's strides.
    """
    from .kernels.moe_matmul import moe_gate_up_decode_kernel

    T, H = hidden.shape
    top_k = ids.shape[1]
    E, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    has_shared = shared_gate_up is not None
    cfg = config
    pads = _decode_pads(T, top_k, hidden.dtype, num_experts=E)
    experts = min(E, T * top_k) + has_shared
    dev, table = hidden.device, (experts, pads["T_PAD"])
    acts = act_buffers(experts * pads["T_PAD"], inter, hidden, cfg, fp8)
    # For the down: the used experts' list and its length, each one's tokens' routing weights.
    acts = acts._replace(used=torch.empty(experts + 1, dtype=torch.int32, device=dev),
                         row_weight=torch.empty(table, dtype=torch.float32, device=dev))
    grid = persistent_grid(hidden.device, cfg.programs_per_sm,
                           experts * triton.cdiv(inter, cfg.block_i))
    tma = fp8 is not None and takes_tma(
        [w for w in (w_gate_up, shared_gate_up) if w is not None], cfg, hidden.device)
    _with_descriptor_scratch(
        tma, hidden.device, moe_gate_up_decode_kernel[grid],
        **_x_args(hidden, cfg, fp8),
        **_weight_args(w_gate_up, ("stride_we", "stride_wn", "stride_wk"), fp8),
        **_act_args(acts, cfg, down=False), ids_ptr=ids, weights_ptr=weights,
        arrivals_ptr=arrivals,
        n_arrivals=0 if arrivals is None else arrivals.numel(),
        **_shared_args(shared_gate_up, shared_scale, fp8), T=T,
        H=H, I=inter, E=E, TOP_K=top_k, BLOCK_I=cfg.block_i, BLOCK_K=cfg.k_tile_gate_up,
        HAS_SHARED=has_shared, TAIL_SPLIT=cfg.block_i // cfg.tail_cols if fp8 is None else 1,
        TAIL_K=cfg.tail_k_tile, TMA=tma,
        num_warps=cfg.warps_gate_up,
        num_stages=pipeline_stages(cfg.stages_gate_up, hidden.dtype), **pads,
        **pdl(hidden.device))
    return acts


def _descriptor_scratch(size: int, alignment: int, stream):
    """Triton's allocator for a kernel's global scratch (the 128-byte records of tensor
    descriptors made in the kernel): on the current CUDA device, where the launch runs
    (torch's allocations are 256-byte aligned, above the alignment Triton asks)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _with_descriptor_scratch(tma: bool, device: torch.device, launch_kernel, **kwargs) -> None:
    """launch_kernel(**kwargs); with tma (a kernel that makes TMA descriptors) on CUDA, with
    _descriptor_scratch as Triton's allocator (triton.set_allocator) in a copy of the caller's
    context, so that an allocator the caller set is left as it was."""
    if not tma or device.type != "cuda":  # the interpreter needs no scratch
        launch_kernel(**kwargs)
        return

    def launch_with_scratch():
        triton.set_allocator(_descriptor_scratch)
        launch_kernel(**kwargs)

    contextvars.copy_context().run(launch_with_scratch)


def _shared_args(shared_weight, shared_scale, fp8) -> dict:
    """The expert kernels' shared-expert arguments: its weight (as bytes where the routed
    weights go so: _weight_args) and, with FP8 weights, its scales."""
    if shared_weight is not None and fp8 is not None and fp8[2]:
        shared_weight = shared_weight.view(torch.uint8)
    args = dict(shared_ptr=shared_weight)
    if fp8 is not None:
        args["shared_s_ptr"] = shared_scale
    return args


def decode_down_combine(acts: ActRows, ids, weights, w_down, out, arrivals,
                        config: DecodeConfig, shared_down=None, fp8=None, shared_scale=None):
    """out = sum over slots of weight * act W_down^T (+ the shared expert's rows of act times
    shared_down^T; with bf16 / fp32 act rows the weight is in act already); `arrivals` must
    hold zeros (or be None with one split): decode_gate_up zeroes them, and the launch leaves
    them zeroed.

    acts: decode_gate_up's, of the same ids and weights (their act rows weighed by the routing
    weights, or with fp16 rows or FP8 weights the products by ActRows.row_weight); ids int
    [T, top_k] and weights fp32 [T, top_k], read here for the NaN rule only (a token whose
    every slot is empty and every weight NaN outputs NaN);
    w_down [E, H, I]; out [T, H]; shared_down: [H, I] with a routed expert's strides, or
    None; fp8: FP8 w_down's (scale, block, bits) or None, shared_scale its shared expert's (as
    in decode_gate_up).
    """
    from .kernels.moe_matmul import moe_down_combine_decode_kernel

    T, H = out.shape
    top_k = ids.shape[1]
    E, inter = w_down.shape[0], w_down.shape[2]
    cfg = config
    pads = _decode_pads(T, top_k, acts.act.dtype)
    if acts.row_weight.shape[1] != pads["T_PAD"]:  # the tables' rows: T_PAD tokens wide
        raise ValueError(f"acts must be decode_gate_up's for the same {T} tokens (tables of "
                         f"{pads['T_PAD']} token columns), got {acts.row_weight.shape[1]}")
    partial = None  # one split writes out directly
    if cfg.down_splits > 1:
        partial = torch.empty(cfg.down_splits, T, H, dtype=torch.float32, device=out.device)
    moe_down_combine_decode_kernel[(triton.cdiv(H, cfg.block_h), cfg.down_splits)](
        **_act_args(acts, cfg, down=True),
        **_weight_args(w_down, ("stride_we", "stride_wh", "stride_wi"), fp8),
        ids_ptr=ids, weights_ptr=weights, out_ptr=out, stride_ot=out.stride(0),
        partial_ptr=partial, arrivals_ptr=None if partial is None else arrivals,
        **_shared_args(shared_down, shared_scale, fp8), T=T, H=H, I=inter, E=E, TOP_K=top_k,
        BLOCK_H=cfg.block_h, BLOCK_K=_down_step(cfg, acts, fp8), EXPERT_SPLITS=cfg.down_splits,
        HAS_SHARED=shared_down is not None, num_warps=cfg.warps_down,
        num_stages=pipeline_stages(cfg.stages_down, acts.act.dtype),
        **pads, **pdl(out.device))
    return out


def decode_forward(hidden, ids, weights, w_gate_up, w_down, out, config: DecodeConfig,
                   shared=None, fp8=None, shared_scales=None):
    """Two launches: gate/up into act [U * T_PAD, I], then down + sum straight into out
    (the shared expert, if any, as one more expert that every token uses with weight 1).
    fp8: (gate_up's, down's) (scale, block, bits) of FP8 weights (_weight_args), or None;
    shared_scales: the FP8 shared expert's (gate_up, down) scales (Fp8Scales.shared)."""
    shared_gate_up, shared_down = shared if shared is not None else (None, None)
    fp8_gate_up, fp8_down = fp8 if fp8 is not None else (None, None)
    scale_gate_up, scale_down = shared_scales if shared_scales is not None else (None, None)
    arrivals = down_arrivals(hidden.shape[1], hidden.device, config)
    acts = decode_gate_up(hidden, ids, weights, w_gate_up, arrivals, config, shared_gate_up,
                          fp8_gate_up, scale_gate_up)
    return decode_down_combine(acts, ids, weights, w_down, out, arrivals, config, shared_down,
                               fp8_down, scale_down)


def grouped_forward(hidden, ids, weights, w_gate_up, w_down, out, config: GroupedConfig,
                    combine: CombineLaunch = DEFAULT_COMBINE, fp8=None, shared=None,
                    shared_scales=None):
    """Align (three short launches), gate/up, down into per-slot partials, combine. fp8 as in
    decode_forward; shared (gate_up [2I, H], down [H, I]) and with FP8 its scales
    (shared_scales, Fp8Scales.shared): one more expert E, of weight 1 in one more slot of every
    token (the sum's last term), in the same launches; the kernels derive that slot
    (align_slots), so ids and weights stay [T, top_k]."""
    with_shared = shared is not None
    fp8_gate_up, fp8_down = fp8 if fp8 is not None else (None, None)
    shared_gate_up, shared_down = shared if with_shared else (None, None)
    scale_gate_up, scale_down = shared_scales if shared_scales is not None else (None, None)
    experts = w_gate_up.shape[0] + with_shared
    lists = align_slots(ids, experts, config.block_m, with_shared)
    acts = expert_gate_up(hidden, w_gate_up, lists, ids.shape[1] + with_shared, config,
                          fp8_gate_up, shared_gate_up, scale_gate_up)
    partial = expert_down(acts, w_down, lists, weights, out.dtype, config, fp8_down,
                          shared_down, scale_down)
    return combine_slots(partial, ids, weights, out, experts, combine, with_shared)


def moe_forward_triton(hidden, topk_ids, topk_weights, w_gate_up, w_down, out=None,
                       path: str = "auto", decode: Optional[DecodeConfig] = None,
                       grouped: Optional[GroupedConfig] = None, shared=None,
                       scales: Optional[Fp8Scales] = None) -> torch.Tensor:
    """The Triton path of `moe_forward` (inputs already checked; same arguments).

    path "auto", decode and grouped None: launch.moe_launch's choice (the decode path for
    T <= DECODE_MAX_TOKENS, else the grouped one, with FP8 weights' own tile shapes; a
    `launch.override` replaces it); given values win over both, except that with no routed
    slot (top_k 0) the path is always the grouped one. FP8 weights (scales given):
    k steps fitted to the scale blocks and the act chunks (launch.fit_scale_blocks), weights
    read as launch.fp8_bits says. A shared expert is one more expert of either path's launches.
    """
    T, top_k = topk_ids.shape
    # Row-major whatever hidden's layout (empty_like would inherit a transposed hidden's
    # strides, and the kernels write rows: issue 11).
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if out is None else out
    if T == 0:
        return out
    ids, weights = topk_ids.contiguous(), topk_weights.contiguous()
    plan = moe_launch(T, top_k, w_gate_up.shape[0], hidden.dtype, hidden.device,
                      fp8=scales is not None)
    # With no routed slot the plan's path (grouped) wins over a given one too.
    path = plan.path if path == "auto" or top_k == 0 else path
    decode, grouped, fp8 = decode or plan.decode, grouped or plan.grouped, None
    if scales is not None:
        bits = fp8_bits(hidden.device)
        fp8 = tuple((s, scales.block, bits) for s in (scales.gate_up, scales.down))
        decode, grouped = (fit_scale_blocks(c, scales.block[1]) for c in (decode, grouped))
    if top_k == 0 and shared is None:
        return out.zero_()
    # the gate/up's dot (its FP8 weights' (scale, block, bits): fp8[0]) is the down's too
    gate_up_fp8 = None if fp8 is None else fp8[0]
    if scaled_dot(hidden, decode if path == "decode" else grouped, gate_up_fp8) == "model":
        check_interpreted_dot("hidden", hidden)  # bf16 x bf16 products go wrong there
    if path != "decode":
        return grouped_forward(hidden, ids, weights, w_gate_up, w_down, out, grouped,
                               plan.combine, fp8, shared,
                               None if scales is None else scales.shared)
    return decode_forward(hidden, ids, weights, w_gate_up, w_down, out, decode, shared, fp8,
                          None if scales is None else scales.shared)


def _required(obj, path: str):
    """getattr along a dotted path, with an error naming what is missing."""
    for part in path.split("."):
        if not hasattr(obj, part) or getattr(obj, part) is None:
            raise ValueError(f"the official MoE module has no `{path}` (missing `{part}`)")
        obj = getattr(obj, part)
    return obj


def _refresh_after_load(block, incompatible_keys) -> None:
    """load_state_dict post-hook: the loaded gate_weight's bf16 copy, and the shared expert's
    stack again where an assigning load replaced its tensors (a function, not a lambda, so a
    block still pickles)."""
    block.refresh_gate_copy()
    block.restack_shared()


class DMoEBlock(torch.nn.Module):
    """One LLaDA2 MoE MLP: router GEMM, `route`, routed experts, plus the shared expert.

    Expert weights are stacked in transformers 5's layout (w_gate_up [E, 2I, H], w_down [E, H, I]),
    in the model's dtype or, after `quantize_` (or built with `scales`), float8_e4m3fn with fp32
    block scales in the buffers `w_gate_up_scale` / `w_down_scale` (dmoe_triton/quant.py); the
    shared expert then is FP8 too, each projection with its `weight_scale_inv` (the published
    names), and runs as one more expert of the routed launches.
    The routing policy can be switched at run time with `set_policy` (no repacking).
    After each forward, `self.last_route` holds the RouteResult (tensors only, no sync).
    """

    def __init__(self, router_cfg: RouterConfig, policy: RoutingPolicy, gate_weight: torch.Tensor,
                 expert_bias: Optional[torch.Tensor], w_gate_up: torch.Tensor, w_down: torch.Tensor,
                 shared_expert: Optional[torch.nn.Module] = None, backend: str = "auto",
                 scales: Optional[Fp8Scales] = None):
        super().__init__()
        if not isinstance(router_cfg, RouterConfig):
            raise TypeError(f"router_cfg must be a RouterConfig, got {type(router_cfg).__name__}")
        E = router_cfg.num_experts
        if _shape(gate_weight) != (E, w_gate_up.shape[-1]):
            raise ValueError(f"gate_weight must have shape [{E}, H={w_gate_up.shape[-1]}], "
                             f"got {_shape(gate_weight)}")
        if w_gate_up.shape[0] != E:
            raise ValueError(f"w_gate_up must hold num_experts={E} experts, got {_shape(w_gate_up)}")
        if expert_bias is not None and _shape(expert_bias) != (E,):
            raise ValueError(f"expert_bias must have shape ({E},), got {_shape(expert_bias)}")
        self.router_cfg = router_cfg
        self.backend = backend
        self.set_policy(policy)
        # The router runs in fp32; keep an fp32 copy so a forward does not cast it every time
        # (the name save/load and calibration use), and beside it the bf16 copy the router GEMM
        # reads when the two hold the same numbers (refresh_gate_copy; derived, never saved).
        self.register_buffer("gate_weight", gate_weight.detach().float())
        self.register_buffer("gate_weight_bf16", None, persistent=False)
        self.refresh_gate_copy()
        self.register_load_state_dict_post_hook(_refresh_after_load)
        bias = None if expert_bias is None else expert_bias.detach().float()
        self.register_buffer("expert_bias", bias)
        self.w_gate_up = torch.nn.Parameter(w_gate_up.detach(), requires_grad=False)
        self.w_down = torch.nn.Parameter(w_down.detach(), requires_grad=False)
        self.shared_expert = shared_expert
        self.register_buffer("shared_gate_up", None, persistent=False)
        self.register_buffer("shared_gate_up_scale", None, persistent=False)
        stacked = self._stack_shared(shared_expert)
        if stacked is not None:
            self._set_shared(stacked, shared_expert.down_proj.weight.detach())
        self.register_buffer("w_gate_up_scale", None if scales is None else scales.gate_up)
        self.register_buffer("w_down_scale", None if scales is None else scales.down)
        self.weight_block = None if scales is None else scales.block
        self._fp8_dense_dtype = None  # dense_dtype while the experts are FP8
        if scales is not None:
            scales.check(w_gate_up, w_down, check_values=not w_gate_up.is_meta)
            shared_dtypes = [p.dtype for p in (shared_expert.parameters() if shared_expert
                                               else ()) if p.dtype != FP8_DTYPE]
            self._fp8_dense_dtype = shared_dtypes[0] if shared_dtypes else torch.float32
            self._quantize_shared(scales.block)
        self.last_route = None

    @property
    def dense_dtype(self) -> torch.dtype:
        """The model's dtype (hidden's, the saved router's): the experts' dtype, or with FP8
        experts the one they had before quantize_ (built with `scales`: the shared expert's,
        else fp32); casts (.to, .half) carry it along."""
        return self.w_gate_up.dtype if self.weight_block is None else self._fp8_dense_dtype

    @torch.no_grad()
    def refresh_gate_copy(self) -> None:
        """gate_weight_bf16 := gate_weight in bf16 when every value round-trips exactly (a bf16
        checkpoint's gate), else None (e.g. a router trained or calibrated in fp32): then the
        router GEMM stays fp32. Call it after changing gate_weight; the package does (the
        constructor, load_state_dict, .to() and the like, calibrate's router writers, leaving
        patch.Unpatched). A copy that stays valid is updated in place, so a captured CUDA graph
        reads the new values; one that appears or goes changes the module's buffers (graphs'
        graph_key). One host sync (the comparison): never call it in a forward."""
        bf16 = bf16_copy(self.gate_weight)
        if bf16 is None:
            self.gate_weight_bf16 = None
            return
        copy = self.gate_weight_bf16
        if copy is not None and (copy.dtype, copy.shape, copy.device) == (
                bf16.dtype, bf16.shape, bf16.device):
            copy.copy_(bf16)
        else:
            self.gate_weight_bf16 = bf16

    def gate_weight_for(self, hidden: torch.Tensor) -> torch.Tensor:
        """The gate weight [E, H] the router GEMM reads for `hidden`: the bf16 copy for bf16
        hidden when there is one (route_hidden then runs a bf16 GEMM on CUDA, skinny_gemm or
        cuBLAS's, the same fp32 sum: router.py), else the fp32 gate_weight."""
        if hidden.dtype == torch.bfloat16 and self.gate_weight_bf16 is not None:
            return self.gate_weight_bf16
        return self.gate_weight

    def fp8_scales(self) -> Optional[Fp8Scales]:
        """The FP8 experts' block scales for moe_forward (with the shared expert's, when it is
        stacked), or None (experts in the model dtype)."""
        if self.w_gate_up_scale is None:
            return None
        shared = None
        if self.shared_gate_up_scale is not None:
            shared = (self.shared_gate_up_scale, self.shared_expert.down_proj.weight_scale_inv)
        return Fp8Scales(self.w_gate_up_scale, self.w_down_scale, self.weight_block, shared)

    @torch.no_grad()
    def quantize_(self, block=DEFAULT_BLOCK) -> "DMoEBlock":
        """Routed experts to FP8 e4m3 in [bn, bk] = block scale blocks, in place (quant.py: amax /
        448 per block; the model-dtype stacks are released), and the shared expert with them
        (one more expert of the same launches; one that cannot be stacked stays in the model's
        dtype and runs apart). Meta weights (a model being loaded) become meta FP8 tensors of
        the right shapes. Already FP8 in another block size: ValueError."""
        block = check_block(block)
        if self.weight_block is not None:
            if self.weight_block != block:
                raise ValueError(f"experts are FP8 in weight_block_size {list(self.weight_block)}"
                                 f", cannot requantize to {list(block)}")
            return self
        if self.w_gate_up.is_meta:
            scales = Fp8Scales.empty(self.w_gate_up.shape, self.w_down.shape, block, device="meta")
            w_gate_up, w_down = (torch.empty_like(w, dtype=FP8_DTYPE)
                                 for w in (self.w_gate_up, self.w_down))
        else:
            w_gate_up, w_down, scales = quantize_experts(self.w_gate_up, self.w_down, block)
        self._fp8_dense_dtype = self.w_gate_up.dtype
        self.w_gate_up = torch.nn.Parameter(w_gate_up, requires_grad=False)
        self.w_down = torch.nn.Parameter(w_down, requires_grad=False)
        self.w_gate_up_scale, self.w_down_scale = scales.gate_up, scales.down
        self.weight_block = block
        self._quantize_shared(block)
        return self

    @torch.no_grad()
    def _quantize_shared(self, block) -> None:
        """The stacked shared expert (if any, and not FP8 yet) to FP8 in `block` scale blocks
        (quant.quantize_shared; meta stays meta)."""
        stack = self.shared_gate_up
        if stack is None or stack.dtype == FP8_DTYPE:
            return
        down = self.shared_expert.down_proj.weight
        if stack.is_meta:
            empty = Fp8Scales.empty((1, *stack.shape), (1, *down.shape), block, device="meta")
            scales = (empty.gate_up[0], empty.down[0])
            gate_up, down = (torch.empty_like(w, dtype=FP8_DTYPE) for w in (stack, down))
        else:
            gate_up, down, scales = quantize_shared(stack, down, block)
        self._set_shared(gate_up, down, scales)

    def _set_shared(self, gate_up, down, scales=None) -> None:
        """shared_gate_up := gate_up [2I, H] (and shared_gate_up_scale := scales[0] with FP8
        scales (gate_up's, down's)), the shared module's projections made views of them, each
        FP8 one with its weight_scale_inv buffer (a view too: saved under the published
        names)."""
        mlp, inter = self.shared_expert, gate_up.shape[0] // 2
        frozen = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
        mlp.gate_proj.weight, mlp.up_proj.weight = frozen(gate_up[:inter]), frozen(gate_up[inter:])
        mlp.down_proj.weight = frozen(down)
        self.shared_gate_up = gate_up
        self.shared_gate_up_scale = None if scales is None else scales[0]
        if scales is None:
            return
        n_gate = scales[0].shape[0] // 2  # the gate rows' blocks, then the up rows'
        for proj, scale in ((mlp.gate_proj, scales[0][:n_gate]),
                            (mlp.up_proj, scales[0][n_gate:]), (mlp.down_proj, scales[1])):
            if "weight_scale_inv" in proj._buffers:
                proj.weight_scale_inv = scale
            else:
                proj.register_buffer("weight_scale_inv", scale)

    @torch.no_grad()
    def restack_shared(self) -> None:
        """The shared expert's stack rebuilt from its module's projections when they are no
        longer views of it (an assigning load_state_dict replaced them: the FP8 checkpoint
        loader); a no-op otherwise."""
        stack, mlp = self.shared_gate_up, self.shared_expert
        if stack is None:
            return
        gate, up = mlp.gate_proj, mlp.up_proj
        parts = [(gate.weight, stack), (up.weight, stack[stack.shape[0] // 2:])]
        fp8 = self.shared_gate_up_scale
        if fp8 is not None:
            parts += [(gate.weight_scale_inv, fp8), (up.weight_scale_inv, fp8[fp8.shape[0] // 2:])]
        if any(t.is_meta for t, _ in parts):
            return  # a load that failed (torch names the tensor): nothing to stack
        if not stack.is_meta and all(t.data_ptr() == view.data_ptr() for t, view in parts):
            return
        scales = None
        if fp8 is not None:
            scales = (torch.cat((gate.weight_scale_inv, up.weight_scale_inv)),
                      mlp.down_proj.weight_scale_inv)
        self._set_shared(torch.cat((gate.weight, up.weight)), mlp.down_proj.weight, scales)

    def _stack_shared(self, mlp) -> Optional[torch.Tensor]:
        """The shared expert's gate|up rows stacked like a routed expert's (a copy, which
        _set_shared then makes the module's weights views of: no second copy), so moe_forward
        runs it as one more expert of its launches; None (module called apart) if its shape
        differs."""
        gate = getattr(getattr(mlp, "gate_proj", None), "weight", None)
        up = getattr(getattr(mlp, "up_proj", None), "weight", None)
        down = getattr(getattr(mlp, "down_proj", None), "weight", None)
        like_gu, like_d = self.w_gate_up[0], self.w_down[0]
        if any(t is None for t in (gate, up, down)) or any(
                getattr(getattr(mlp, n), "bias", None) is not None
                for n in ("gate_proj", "up_proj", "down_proj")):
            return None
        if (gate.shape[0] * 2, gate.shape[1]) != like_gu.shape or up.shape != gate.shape \
                or down.shape != like_d.shape or down.stride() != like_d.stride() \
                or gate.dtype != like_gu.dtype and like_gu.dtype != FP8_DTYPE:
            return None  # (beside FP8 experts it is quantized: _quantize_shared)
        return torch.cat((gate.detach(), up.detach()), 0)

    def shared_weights(self):
        """(gate_up, down) for moe_forward's `shared`, or None when not stacked."""
        if self.shared_gate_up is None:
            return None
        return self.shared_gate_up, self.shared_expert.down_proj.weight

    @classmethod
    def from_official(cls, mlp: torch.nn.Module, config, policy: RoutingPolicy,
                      backend: str = "auto") -> "DMoEBlock":
        """Build from an official LLaDA2 MoE MLP (`mlp.gate`, `mlp.experts`, `mlp.shared_experts`).

        Per-expert Linear weights are copied into stacked tensors expert by expert, and each
        expert's weights are released (set to None) as soon as they are copied, so the extra
        memory at any time is one layer's experts, never a second copy of the model. Experts
        already stacked in transformers 5's layout (`experts.gate_up_proj`, `experts.down_proj`)
        are used as they are.
        """
        cfg = RouterConfig.from_hf(config)
        gate_weight = _required(mlp, "gate.weight")
        expert_bias = getattr(mlp.gate, "expert_bias", None)
        experts = _required(mlp, "experts")
        shared = getattr(mlp, "shared_experts", None)
        if shared is not None and not any(p.numel() for p in shared.parameters()):
            shared = None  # num_shared_experts: 0 (zero-width tensors): no shared expert
        if hasattr(experts, "gate_up_proj"):
            return cls(cfg, policy, gate_weight, expert_bias, experts.gate_up_proj.data,
                       experts.down_proj.data, shared, backend)
        if len(experts) != cfg.num_experts:
            raise ValueError(f"mlp.experts holds {len(experts)} experts, config says "
                             f"num_experts={cfg.num_experts}")
        first_gate = _required(experts[0], "gate_proj.weight")
        inter, H = first_gate.shape
        like = dict(dtype=first_gate.dtype, device=first_gate.device)
        w_gate_up = torch.empty(cfg.num_experts, 2 * inter, H, **like)
        w_down = torch.empty(cfg.num_experts, H, inter, **like)
        with torch.no_grad():
            for e, expert in enumerate(experts):
                for name, rows in (("gate_proj", w_gate_up[e, :inter]),
                                   ("up_proj", w_gate_up[e, inter:]), ("down_proj", w_down[e])):
                    weight = _required(expert, f"{name}.weight")
                    if weight.shape != rows.shape:
                        raise ValueError(f"mlp.experts.{e}.{name}.weight has shape "
                                         f"{_shape(weight)}, expected {_shape(rows)}")
                    rows.copy_(weight)
                    setattr(getattr(expert, name), "weight", None)  # release as we go
        return cls(cfg, policy, gate_weight, expert_bias, w_gate_up, w_down, shared, backend)

    def set_policy(self, policy: RoutingPolicy) -> None:
        """Route with `policy` from the next forward on (checked against the router config)."""
        if not isinstance(policy, RoutingPolicy):
            raise TypeError(f"policy must be a RoutingPolicy, got {type(policy).__name__}")
        policy.check(self.router_cfg)
        self.policy = policy

    def _apply(self, fn, recurse=True):
        # The router's fp32 copies (gate_weight, expert_bias) keep their values through
        # .to(bf16)/.half(): only their device moves (issue 11); so do FP8 experts, the shared
        # one's too, and their fp32 scales (a cast would drop the scales' meaning).
        keep_dtypes(super()._apply, fn, recurse,
                    fp32_router_state(self, ("gate_weight", "expert_bias"))
                    + list(self._fp8_tensors()))
        if self._fp8_dense_dtype is not None:  # the model's dtype follows the cast
            self._fp8_dense_dtype = fn(torch.empty(0, dtype=self._fp8_dense_dtype)).dtype
        self.restack_shared()  # each tensor was moved apart: the shared views, again
        self.refresh_gate_copy()  # the bf16 copy was cast with the rest: derive it again
        return self

    def _fp8_tensors(self):
        """(module, name) of every FP8 weight and fp32 block scale in this block (the routed
        stacks, the shared expert's stack and projections)."""
        for module in self.modules():
            for name, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is not None and (t.dtype == FP8_DTYPE
                                      or name.endswith(("_scale", "weight_scale_inv"))):
                    yield module, name

    def forward(self, hidden: torch.Tensor, first_position: Optional[torch.Tensor] = None,
                row_valid: Optional[torch.Tensor] = None,
                row_masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden [B, L, H] -> [B, L, H]; B independent sequences.

        first_position [B] (int, device) and row_valid [B, L] (bool): the routing windows, as
        `route` takes them (windows by absolute position; padding rows never vote). None: row 0
        at position 0, every row real. row_masked [B, L] (bool): the rows holding the mask token
        (the expert-choice schedules' mask ratio), or None."""
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [B, L, H], got {_shape(hidden)}")
        B, L, H = hidden.shape
        # The router GEMM and the routing (cuBLAS, then kernels/routing.py's launches).
        r = route_hidden(hidden, self.gate_weight_for(hidden), self.expert_bias, self.router_cfg,
                         self.policy, self.backend, first_position=first_position,
                         row_valid=row_valid, row_masked=row_masked)
        self.last_route = r
        top_k = r.topk_ids.shape[-1]
        shared = self.shared_weights()
        y = moe_forward(hidden.reshape(B * L, H), r.topk_ids.reshape(B * L, top_k),
                        r.topk_weights.reshape(B * L, top_k), self.w_gate_up, self.w_down,
                        backend=self.backend, check_ids=False, shared=shared,
                        scales=self.fp8_scales()).view(B, L, H)
        if self.shared_expert is not None and shared is None:
            y = y + self.shared_expert(hidden)
        return y

    def extra_repr(self) -> str:
        E, two_i, H = self.w_gate_up.shape
        fp8 = "" if self.weight_block is None else f", fp8 blocks {list(self.weight_block)}"
        return f"experts={E}, hidden={H}, intermediate={two_i // 2}, policy={self.policy}{fp8}"


__all__ = ["moe_forward", "DMoEBlock", "DecodeConfig", "GroupedConfig", "check_moe_inputs"]
