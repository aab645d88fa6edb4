"""A trained-like router for random-weight models: unique experts per block set to a target
from above (a seeded expert-popularity skew) or from below (a diversity knob) (issue 5).

Why: with random weights every expert is about as likely as any other, so token routing touches
~163 of 256 experts per 32-token block, where a trained LLaDA2.0-mini touches ~70 (the paper's
measurement). Byte-bound timings on the random model would then overstate the cost of token
routing. So benchmarks can give the router a popularity skew and say that they did.

What: MoE layer l gets `expert_bias = strength * z_l`, with z_l ~ N(0, 1) per expert drawn from a
generator seeded with `seed` (layer by layer, on the CPU, so every device gets the same values).
The bias only ranks experts (docs/routing.md: weights come from the sigmoid scores), so popular
experts are chosen by more tokens of a block and a block touches fewer distinct experts; the
gate weights and the hidden states are left as they are. `calibrate_router` searches `strength`
so that token routing touches `target` unique experts per block on the model's own hidden states.

The skew can only LOWER the unique experts per block. The full random model routes blocks to
fewer experts than the target already (~49-56 < 70: the tokens of a block share most of their
hidden state, e.g. half of them are the same MASK token and attention averages a long prefix
for all of them), so a second knob RAISES diversity: the router stops seeing the directions the
tokens share. Per MoE layer, U = the top `directions` right singular vectors of the router's
inputs in the unskewed forward (deterministic given that forward), and the gate weight becomes
`W - diversity * (W U^T) U`, diversity in [0, 1] (1: those directions removed). Token-specific
parts of the hidden state then decide more of the ranking, so tokens disagree more. A random
extra direction per expert does not do this (it sees the shared part as much as W does).

Limits (state them with any number measured this way): the skew does not depend on the hidden
state, so all sequences favour the same experts; the union of experts across the blocks of many
sequences is likely smaller than in a trained model, whose popular experts depend on content.
The diversity knob changes the router's weights (scores, so expert weights, too), not only the
ranking; it is a stand-in for a trained router's spread, not a model of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .modules import (bf16_copy, expert_hits, moe_layers,  # noqa: F401  (re-exported)
                      refresh_gate_copies)


def router_bias(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 expert_bias a MoE MLP ranks with (a DMoEBlock's, or the official gate's)."""
    bias = getattr(module, "expert_bias", None)
    if bias is None:
        bias = getattr(getattr(module, "gate", None), "expert_bias", None)
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no expert_bias tensor to calibrate "
                         "(config.moe_router_enable_expert_bias must be true)")
    return bias


def router_weight(module: torch.nn.Module) -> torch.Tensor:
    """The gate weight [E, H] a MoE MLP scores with (a DMoEBlock's, or the official gate's)."""
    weight = getattr(module, "gate_weight", None)
    if weight is None:
        weight = getattr(getattr(module, "gate", None), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no gate weight to calibrate")
    return weight


def shared_directions(model: torch.nn.Module, run_forward: Callable[[], None],
                      directions: int) -> List[torch.Tensor]:
    """Per MoE layer, the top `directions` right singular vectors [r, H] (fp32) of the router's
    inputs in the LAST call of that layer during run_forward() (the step, after any prefill)."""
    layers = moe_layers(model)
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    inputs = {}

    def keep(i):
        return lambda module, args: inputs.__setitem__(i, args[0].detach())
    hooks = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(layers)]
    try:
        run_forward()
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i in range(len(layers)):
        x = inputs[i].reshape(-1, inputs[i].shape[-1]).float()
        out.append(torch.linalg.svd(x, full_matrices=False).Vh[:directions].contiguous())
    return out


def router_weights(model: torch.nn.Module) -> List[torch.Tensor]:
    """Copies of every MoE layer's gate weight (to restore with set_router_weights)."""
    return [router_weight(m).detach().clone() for m in moe_layers(model)]


def set_router_weights(model: torch.nn.Module, weights: List[torch.Tensor]) -> None:
    """Copy weights (one [E, H] per MoE layer) into the gate weights, in place."""
    layers = moe_layers(model)
    if len(weights) != len(layers):
        raise ValueError(f"weights need one entry per MoE layer ({len(layers)}), got {len(weights)}")
    with torch.no_grad():
        for m, w in zip(layers, weights):
            router_weight(m).copy_(w)
    refresh_gate_copies(model)


def set_router_diversity(model: torch.nn.Module, diversity: float, base: List[torch.Tensor],
                         basis: List[torch.Tensor]) -> None:
    """Gate weight of MoE layer l := base_l - diversity * (base_l U_l^T) U_l, in place (a
    captured CUDA graph keeps reading the same buffers). A bf16-valued base (a bf16
    checkpoint's gate, LLaDA2's) gives a gate rounded to bf16, as such a checkpoint would store
    it, so the router runs the model's bf16 GEMM (moe.DMoEBlock.refresh_gate_copy); another
    base keeps fp32 values. diversity 0 restores base."""
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be in [0, 1], got {diversity}")
    layers = moe_layers(model)
    if len(base) != len(layers) or len(basis) != len(layers):
        raise ValueError(f"base and basis need one entry per MoE layer ({len(layers)})")
    with torch.no_grad():
        for m, w, u in zip(layers, base, basis):
            target = router_weight(m)
            w, u = w.to(u.device, torch.float32), u.to(torch.float32)
            skewed = w - diversity * (w @ u.T) @ u
            if bf16_copy(w) is not None:  # a bf16 checkpoint's gate (host sync: not a forward)
                skewed = skewed.to(torch.bfloat16)
            target.copy_(skewed.to(target.device, target.dtype))
    refresh_gate_copies(model)


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
            # The last window that holds a row: with windows by absolute position a forward
            # has one more window slot than it fills (empty when its rows end on a boundary).
            held = route.coreset.any(-1)  # [B, windows]
            at = held.shape[1] - 1 - held.flip(-1).int().argmax(-1)
            last = route.coreset[torch.arange(len(at), device=at.device), at]
            core.append(last.sum(-1))
            core_union.append(last.any(0).sum())
    stack = lambda xs: torch.stack(xs) if xs else None  # noqa: E731
    return RouteSummary(stack(unique), stack(union), stack(core), stack(core_union))


@dataclass
class Calibration:
    strength: float                  # expert_bias = strength * popularity_skew(...)
    unique: float                    # measured unique experts per block at the chosen knob
    target: float
    seed: int
    history: List[tuple] = field(default_factory=list)  # (knob value, unique) in search order
    diversity: float = 0.0           # gate weight W - diversity * (W U^T) U (see module doc)
    directions: int = 0              # rows of U per layer (0: the diversity knob was not used)

    def describe(self) -> str:
        steps = ", ".join(f"{s:.4g}->{u:.1f}" for s, u in self.history)
        if self.diversity > 0:
            knob = (f"gate weight W - {self.diversity:.4g} * (W U^T) U per MoE layer, U = the "
                    f"top {self.directions} right singular vectors of the router's inputs in the "
                    "unskewed forward (raises diversity), expert_bias 0")
        else:
            knob = (f"expert_bias = {self.strength:.4g} * N(0,1) per expert (seed {self.seed}, "
                    "layer by layer)")
        return (f"{knob}; token routing then touches {self.unique:.1f} unique experts per block "
                f"(target {self.target:g}); search (knob->unique): {steps}")


def calibrate_router(model: torch.nn.Module, run_forward: Callable[[], None], target: float,
                     seed: int = 0, rows: int = 32, tolerance: float = 1.5, start: float = 0.05,
                     max_steps: int = 14, directions: int = 16) -> Calibration:
    """Set the router so that token routing touches `target` unique experts per block.

    run_forward(): one forward of the model under the token policy (it may rebuild a KV cache
    first, since the prefix's hidden states depend on the router too); unique experts are read
    from the last `rows` rows of each sequence, as the mean over the sequences and the MoE
    layers (route_summary), so a forward of B sequences calibrates to `target` per sequence at
    that batch (the shared directions then come from all B blocks' rows). First a forward as
    the model is. Above the target: the skew strength, under which unique experts fall, doubles
    from `start` until below the target, then bisects (geometric mean). Below it: the diversity
    knob (`directions` shared directions per layer), under which they rise, is bisected in
    [0, 1]. Either search stops within `tolerance` or after `max_steps` forwards, and leaves
    the best value set.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no MoE layer to calibrate")
    skew = popularity_skew(len(layers), router_bias(layers[0]).shape[0], seed)
    history = []
    measure = _measurer(model, run_forward, rows, history,
                        lambda strength: set_router_bias(model, strength * skew))
    lo, lo_u = 0.0, measure(0.0)
    if lo_u < target - tolerance:
        return _raise_diversity(model, run_forward, target, seed, rows, tolerance, max_steps,
                                directions, history)
    if lo_u <= target + tolerance:  # already where asked
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
    best, best_u = _settle(history, measure, target)
    return Calibration(best, best_u, target, seed, history)


def _measurer(model, run_forward, rows, history, set_knob) -> Callable[[float], float]:
    """measure(value): set the knob, run the forward, record and return unique experts."""
    def measure(value: float) -> float:
        set_knob(value)
        run_forward()
        unique = route_summary(model, rows).mean_unique
        history.append((value, unique))
        return unique
    return measure


def _settle(history, measure, target) -> tuple:
    """The (value, unique) of history closest to target, left set on the model (and in its
    last_route) without adding to history."""
    best, best_u = min(history, key=lambda h: abs(h[1] - target))
    if history[-1][0] != best:
        measure(best)
        history.pop()
    return best, best_u


def _raise_diversity(model, run_forward, target, seed, rows, tolerance, max_steps, directions,
                     history) -> Calibration:
    """The search from below (see calibrate_router); history holds the unskewed forward."""
    base = router_weights(model)
    basis = shared_directions(model, run_forward, directions)
    measure = _measurer(model, run_forward, rows, history,
                        lambda diversity: set_router_diversity(model, diversity, base, basis))
    lo, lo_u = 0.0, history[0][1]
    hi, hi_u = 1.0, measure(1.0)
    while hi_u > target + tolerance and len(history) < max_steps:
        mid = (lo + hi) / 2
        mid_u = measure(mid)
        if mid_u < target - tolerance:
            lo, lo_u = mid, mid_u
        else:
            hi, hi_u = mid, mid_u
    best, best_u = _settle(history, measure, target)
    return Calibration(0.0, best_u, target, seed, history, diversity=best,
                       directions=directions if best > 0 else 0)
