"""A trained-like router for random-weight models: a seeded expert-popularity skew (issue 5).

Why: with random weights every expert is about as likely as any other, so token routing touches
~163 of 256 experts per 32-token block, where a trained LLaDA2.0-mini touches ~70 (the paper's
measurement). Byte-bound timings on the random model would then overstate the cost of token
routing. So benchmarks can give the router a popularity skew and say that they did.

What: MoE layer l gets `expert_bias = strength * z_l`, with z_l ~ N(0, 1) per expert drawn from a
generator seeded with `seed` (layer by layer, on the CPU, so every device gets the same values).
The bias only ranks experts (routing-spec: weights come from the sigmoid scores), so popular
experts are chosen by more tokens of a block and a block touches fewer distinct experts; the
gate weights and the hidden states are left as they are. `calibrate_router` searches `strength`
so that token routing touches `target` unique experts per block on the model's own hidden states.

Limit (state it with any number measured this way): the skew does not depend on the hidden
state, so all sequences favour the same experts; the union of experts across the blocks of many
sequences is likely smaller than in a trained model, whose popular experts depend on content.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch


def moe_layers(model: torch.nn.Module) -> list:
    """The MoE MLPs of `model` in layer order (anything that reports `last_route`)."""
    return [m for m in model.modules() if hasattr(m, "last_route")]


def router_bias(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 expert_bias a MoE MLP ranks with (a DMoEBlock's, or the official gate's)."""
    bias = getattr(module, "expert_bias", None)
    if bias is None:
        bias = getattr(getattr(module, "gate", None), "expert_bias", None)
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no expert_bias tensor to calibrate "
                         "(config.moe_router_enable_expert_bias must be true)")
    return bias


def popularity_skew(num_layers: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """z [num_layers, num_experts] fp32 ~ N(0, 1), the same for a seed on every machine."""
    if num_layers < 1 or num_experts < 1:
        raise ValueError(f"num_layers and num_experts must be >= 1, got {num_layers}, {num_experts}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_layers, num_experts, generator=gen, dtype=torch.float32)


def set_router_bias(model: torch.nn.Module, bias: torch.Tensor) -> None:
    """Write bias [moe_layers, E] into every MoE layer's expert_bias, in place (a captured CUDA
    graph keeps reading the same buffers)."""
    layers = moe_layers(model)
    targets = [router_bias(m) for m in layers]
    if bias.dim() != 2 or bias.shape[0] != len(targets) or any(
            t.shape != bias.shape[1:] for t in targets):
        shape = (len(targets), *(targets[0].shape if targets else ()))
        raise ValueError(f"bias must have shape {shape} (MoE layers, experts), got {tuple(bias.shape)}")
    with torch.no_grad():
        for t, b in zip(targets, bias):
            t.copy_(b.to(t.device, t.dtype))


def expert_hits(topk_ids: torch.Tensor, num_experts: int, rows: Optional[int] = None):
    """Which experts each sequence's last `rows` rows picked: topk_ids [B, L, k] -> bool [B, E].

    Empty slots (-1) and out-of-range ids count for nothing. Device ops only.
    """
    ids = topk_ids if rows is None else topk_ids[:, -rows:]
    ids = ids.reshape(ids.shape[0], -1).long()
    valid = (ids >= 0) & (ids < num_experts)
    hit = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.bool, device=ids.device)
    hit.scatter_(1, torch.where(valid, ids, num_experts), True)
    return hit[:, :num_experts]


@dataclass
class RouteSummary:
    """Routing of the last forward over the last block of each sequence, per MoE layer."""

    unique: torch.Tensor            # [layers, B] distinct experts each sequence's block used
    union: torch.Tensor             # [layers] distinct experts used by any sequence
    coreset: Optional[torch.Tensor]  # [layers, B] coreset size (block policies), else None
    coreset_union: Optional[torch.Tensor]  # [layers] experts in any sequence's coreset

    @property
    def mean_unique(self) -> float:
        return float(self.unique.float().mean())

    @property
    def mean_union(self) -> float:
        return float(self.union.float().mean())

    def resident(self) -> torch.Tensor:
        """[layers] experts a forward may touch: the coreset union for block policies (what must
        be loaded before tokens choose), else the union of used experts."""
        return self.union if self.coreset_union is None else self.coreset_union


def route_summary(model: torch.nn.Module, rows: int = 32) -> RouteSummary:
    """Summarise `last_route` of every MoE layer over the last `rows` rows of each sequence."""
    unique, union, core, core_union = [], [], [], []
    for m in moe_layers(model):
        route = m.last_route
        if route is None:
            raise ValueError("run a forward first: a MoE layer has no last_route")
        E = router_bias(m).shape[0]
        hit = expert_hits(route.topk_ids, E, rows)
        unique.append(hit.sum(-1))
        union.append(hit.any(0).sum())
        if route.coreset is not None:
            last = route.coreset[:, -1]
            core.append(last.sum(-1))
            core_union.append(last.any(0).sum())
    stack = lambda xs: torch.stack(xs) if xs else None  # noqa: E731
    return RouteSummary(stack(unique), stack(union), stack(core), stack(core_union))


@dataclass
class Calibration:
    strength: float                  # expert_bias = strength * popularity_skew(...)
    unique: float                    # measured unique experts per block at that strength
    target: float
    seed: int
    history: List[tuple] = field(default_factory=list)  # (strength, unique) in search order

    def describe(self) -> str:
        steps = ", ".join(f"{s:.4g}->{u:.1f}" for s, u in self.history)
        return (f"expert_bias = {self.strength:.4g} * N(0,1) per expert (seed {self.seed}, "
                f"layer by layer); token routing then touches {self.unique:.1f} unique experts "
                f"per block (target {self.target:g}); search: {steps}")


def calibrate_router(model: torch.nn.Module, run_forward: Callable[[], None], target: float,
                     seed: int = 0, rows: int = 32, tolerance: float = 1.5, start: float = 0.05,
                     max_steps: int = 14) -> Calibration:
    """Find the skew strength at which token routing touches `target` unique experts per block.

    run_forward(): one forward of the model under the token policy (it may rebuild a KV cache
    first, since the prefix's hidden states depend on the bias too); unique experts are read
    from the last `rows` rows of each sequence. Unique experts fall as the strength grows, so:
    double from `start` until below the target, then bisect (geometric mean) until within
    `tolerance` or `max_steps` forwards. Leaves the best strength set and returns it.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no MoE layer to calibrate")
    skew = popularity_skew(len(layers), router_bias(layers[0]).shape[0], seed)
    history = []

    def measure(strength: float) -> float:
        set_router_bias(model, strength * skew)
        run_forward()
        unique = route_summary(model, rows).mean_unique
        history.append((strength, unique))
        return unique

    lo, lo_u = 0.0, measure(0.0)
    if lo_u <= target + tolerance:  # already as concentrated as asked: no skew
        return Calibration(0.0, lo_u, target, seed, history)
    hi, hi_u = start, measure(start)
    while hi_u > target and len(history) < max_steps:
        lo, lo_u, hi = hi, hi_u, hi * 2
        hi_u = measure(hi)
    while abs(hi_u - target) > tolerance and abs(lo_u - target) > tolerance \
            and len(history) < max_steps:
        mid = (lo * hi) ** 0.5 if lo > 0 else hi / 2
        mid_u = measure(mid)
        if mid_u > target:
            lo, lo_u = mid, mid_u
        else:
            hi, hi_u = mid, mid_u
    best, best_u = min(history, key=lambda h: abs(h[1] - target))
    if history[-1][0] != best:
        measure(best)  # leave the model (and its last_route) at the chosen strength
        history.pop()
    return Calibration(best, best_u, target, seed, history)
