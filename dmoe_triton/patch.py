"""`patch_model` / `set_policy`: put the fused dMoE path into a LLaDA2 model.

Works on any module tree with the official LLaDA2 structure: each decoder layer's `mlp` is either
a dense MLP (`gate_proj`, `up_proj`, `down_proj`; left alone) or a MoE MLP (`gate.weight`,
`gate.expert_bias`, `experts[e].{gate,up,down}_proj`, `shared_experts`), which is replaced by a
`DMoEBlock`. So it patches this project's `LLaDA2MoeModelLM` and the official remote-code class.
"""
from __future__ import annotations

from typing import Iterator, Tuple

from torch import nn

from .config import RoutingPolicy


def _dmoe_block():
    from .moe import DMoEBlock

    return DMoEBlock


def _is_dense_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and not hasattr(
        module, "gate")


def _is_moe_mlp(module: nn.Module) -> bool:
    return hasattr(module, "gate") and hasattr(module, "experts")


def _mlps(model: nn.Module) -> Iterator[Tuple[str, nn.Module, nn.Module]]:
    """(path, parent, mlp) for every module registered under the name `mlp`."""
    for path, parent in model.named_modules():
        mlp = parent._modules.get("mlp")
        if mlp is not None:
            yield (f"{path}.mlp" if path else "mlp"), parent, mlp


def _check_policy(policy) -> None:
    if not isinstance(policy, RoutingPolicy):
        raise TypeError(f"policy must be a RoutingPolicy (e.g. RoutingPolicy.dmoe()), "
                        f"got {type(policy).__name__}")


def patch_model(model: nn.Module, policy: RoutingPolicy, backend: str = "auto") -> nn.Module:
    """Swap every MoE MLP of `model` for a `DMoEBlock` routed by `policy`; returns `model`.

    Expert weights are repacked layer by layer (one layer's experts extra at most); the old
    per-expert modules are released. A module named `mlp` that is neither a dense MLP nor an
    official MoE MLP is a ValueError naming its path. Already patched layers just take the
    new policy.
    """
    _check_policy(policy)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no .config: patch_model needs the LLaDA2 config "
                         "(num_experts, num_experts_per_tok, n_group, ...)")
    DMoEBlock = _dmoe_block()
    found = []
    for path, parent, mlp in list(_mlps(model)):
        if isinstance(mlp, DMoEBlock):
            mlp.set_policy(policy)
            found.append(path)
        elif _is_moe_mlp(mlp):
            gate = mlp.gate
            if not hasattr(gate, "weight") or not isinstance(mlp.experts, (nn.ModuleList, list)):
                raise ValueError(f"{path}: a MoE MLP needs gate.weight and an experts list, "
                                 f"got {type(mlp).__name__}")
            parent.mlp = DMoEBlock.from_official(mlp, config, policy, backend)
            found.append(path)
        elif hasattr(mlp, "gate") or not _is_dense_mlp(mlp):
            raise ValueError(
                f"{path}: unrecognised MLP {type(mlp).__name__} (expected a dense MLP with "
                "gate_proj/up_proj/down_proj, or a MoE MLP with gate and experts)"
            )
    if not found:
        raise ValueError("model has no MoE MLP to patch (no `mlp` module with gate and experts)")
    return model


def set_policy(model: nn.Module, policy: RoutingPolicy) -> nn.Module:
    """Switch the routing policy of every patched layer (no repacking); returns `model`."""
    _check_policy(policy)
    blocks = [m for m in model.modules() if isinstance(m, _dmoe_block())]
    if not blocks:
        raise ValueError("model is not patched: call patch_model(model, policy) first")
    for block in blocks:
        block.set_policy(policy)
    return model


def is_patched(model: nn.Module) -> bool:
    """True when every MoE MLP of `model` is a DMoEBlock (so a decoding step has no host sync)."""
    DMoEBlock = _dmoe_block()
    kinds = [isinstance(m, DMoEBlock) for _, _, m in _mlps(model) if not _is_dense_mlp(m)]
    return bool(kinds) and all(kinds)


def official_view(block: nn.Module, config) -> nn.Module:
    """The official per-expert-loop MoE MLP over the SAME weights as DMoEBlock `block` (views,
    no copy), so an unpatched forward runs the published code path on the patched model's
    memory."""
    import torch

    from .models.llada2 import LLaDA2MoeSparseMoeBlock

    with torch.device("meta"):
        mlp = LLaDA2MoeSparseMoeBlock(config)
    I = block.w_gate_up.shape[1] // 2
    frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
    mlp.gate.weight = frozen(block.gate_weight)  # fp32, as the official gate computes
    mlp.gate.expert_bias = block.expert_bias      # shared: calibration applies to both
    for e, expert in enumerate(mlp.experts):
        expert.gate_proj.weight = frozen(block.w_gate_up[e, :I])
        expert.up_proj.weight = frozen(block.w_gate_up[e, I:])
        expert.down_proj.weight = frozen(block.w_down[e])
    mlp.shared_experts = block.shared_expert
    return mlp


class Unpatched:
    """Context: every DMoEBlock of a patched model swapped for its official per-expert-loop
    view (official_view); the blocks come back on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved = [(layer, layer.mlp) for layer in model.model.layers
                      if isinstance(layer.mlp, _dmoe_block())]

    def __enter__(self) -> nn.Module:
        for layer, block in self.saved:
            layer.mlp = official_view(block, self.model.config)
        return self.model

    def __exit__(self, *exc) -> None:
        for layer, block in self.saved:
            layer.mlp = block
