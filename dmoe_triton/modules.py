"""The MoE layers of a model and the experts their last routes hit: one walk, one count, shared
by decoding's routing statistics, router calibration and the benchmarks; and the rule that keeps
a router's fp32 state exact through dtype moves, shared by the model's gate and DMoEBlock."""
from __future__ import annotations

from typing import Optional

import torch


def moe_layers(model: torch.nn.Module) -> list:
    """The MoE MLPs of `model` in layer order (anything that reports `last_route`)."""
    return [m for m in model.modules() if hasattr(m, "last_route")]


def bf16_copy(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """weight in bf16 when every value round-trips exactly (a bf16 checkpoint's gate), else
    None; None for a meta tensor. One host sync (the comparison): never in a forward."""
    if weight.is_meta:
        return None
    bf16 = weight.to(torch.bfloat16)
    return bf16 if torch.equal(bf16.float(), weight) else None


def refresh_gate_copies(model: torch.nn.Module) -> None:
    """After writing gate weights in place: every DMoEBlock of `model` derives its router
    GEMM's bf16 copy again (kept only where the new weight is bf16-exact:
    moe.DMoEBlock.refresh_gate_copy; one host sync per layer, never in a forward)."""
    for m in moe_layers(model):
        if hasattr(m, "refresh_gate_copy"):
            m.refresh_gate_copy()


def expert_hits(topk_ids: torch.Tensor, num_experts: int, rows: Optional[int] = None):
    """Which experts each sequence's last `rows` rows picked: topk_ids [B, L, k] -> bool [B, E].

    Empty slots (-1) and out-of-range ids count for nothing. Device ops only.
    """
    return expert_load(topk_ids if rows is None else topk_ids[:, -rows:], num_experts) > 0


def expert_load(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows each expert processes per sequence: topk_ids [B, L, k] -> int64 [B, E] (an expert
    appears at most once in a row). Empty slots (-1) and out-of-range ids count for nothing.
    Device ops only."""
    ids = topk_ids.reshape(topk_ids.shape[0], -1).long()
    valid = (ids >= 0) & (ids < num_experts)
    load = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.long, device=ids.device)
    load.scatter_add_(1, torch.where(valid, ids, num_experts), torch.ones_like(ids))
    return load[:, :num_experts]


# ---------------------------------------------------------------------------------------------
# Bytes a decoding forward reads (the benchmarks' roofline floors)


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of one routed expert's weights (gate, up, down) in a patched model (FP8 experts:
    their e4m3 bytes plus their fp32 block scales)."""
    from .moe import DMoEBlock

    block = next(m for m in model.modules() if isinstance(m, DMoEBlock))
    total = (block.w_gate_up[0].numel() + block.w_down[0].numel()) * block.w_gate_up.element_size()
    if block.w_gate_up_scale is not None:
        total += (block.w_gate_up_scale[0].numel() + block.w_down_scale[0].numel()) * 4
    return total


def non_expert_bytes(model: torch.nn.Module, batch: int, block_length: int = 32) -> int:
    """Weights a forward of one block per sequence reads besides routed experts (embedding:
    only the block's rows)."""
    total = 0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    names = {name for name, _ in tensors}
    for name, t in tensors:
        # shared_gate_up (and its FP8 scales): the shared experts' gate/up, counted once via
        # their module's views.
        if name.endswith(("w_gate_up", "w_down", "shared_gate_up", "shared_gate_up_scale",
                          "w_gate_up_scale", "w_down_scale")) or "word_embeddings" in name:
            continue
        if name + "_bf16" in names:  # a DMoEBlock's router reads its bf16 gate copy instead
            continue
        total += t.numel() * t.element_size()
    emb = model.model.word_embeddings.weight
    return total + batch * block_length * emb.shape[1] * emb.element_size()


def cache_bytes(cache, block_length: int = 32) -> int:
    """K/V a step reads: the whole visible buffer of every layer (static: all of it)."""
    n = cache.visible() + block_length
    k = cache.keys[0]
    return 2 * len(cache.keys) * k.shape[0] * k.shape[1] * n * k.shape[3] * k.element_size()


def keep_dtypes(apply, fn, recurse: bool, tensors) -> None:
    """Run `apply(fn, recurse)` (nn.Module._apply: .to(), .half(), .cuda(), ...) so that each
    (owner module, attribute name) of `tensors` keeps its exact values and dtype and only moves
    device (a cast would change what it means: keep_fp32_router_state; FP8 weights and their
    fp32 block scales)."""
    saved = [(owner, name, getattr(owner, name).data) for owner, name in tensors]
    apply(fn, recurse)
    for owner, name, before in saved:
        now = getattr(owner, name)
        if now.dtype != before.dtype and not before.is_meta:
            now.data = before.to(now.device)


def fp32_router_state(module: torch.nn.Module, names) -> list:
    """(module, name) of the router tensors `names` that are fp32, for keep_dtypes.

    Why they keep fp32: the router runs in fp32 (router_dtype), and a bias such as 7.0 + 0.003
    * e is ranked by differences far below bf16's resolution: rounded through bf16 and cast
    back, it kept 2 of 16 distinct values and 83% of tokens changed experts (issue 11).
    """
    return [(module, n) for n in names
            if getattr(module, n, None) is not None and getattr(module, n).dtype == torch.float32]


def keep_fp32_router_state(module: torch.nn.Module, apply, fn, recurse: bool, names) -> None:
    """Run `apply(fn, recurse)` so that the router tensors `names` that are fp32 keep their
    exact values and dtype and only move device (fp32_router_state, keep_dtypes)."""
    keep_dtypes(apply, fn, recurse, fp32_router_state(module, names))
