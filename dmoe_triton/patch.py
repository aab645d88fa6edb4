"""`patch_model` / `set_policy`: put the fused dMoE path into a LLaDA2 model.

Works on any module tree with the official LLaDA2 structure: each decoder layer's `mlp` is either
a dense MLP (`gate_proj`, `up_proj`, `down_proj`; left alone) or a MoE MLP (`gate.weight`,
`gate.expert_bias`, `experts[e].{gate,up,down}_proj`, `shared_experts`), which is replaced by a
`DMoEBlock`. So it patches this project's `LLaDA2MoeModelLM` and the official remote-code class.

A patched model still speaks the published tensor names: its `state_dict()` (so
`save_pretrained`) unpacks each DMoEBlock back into `mlp.gate.weight` (model dtype),
`mlp.gate.expert_bias` (fp32), `mlp.experts.{e}.{gate,up,down}_proj.weight` and
`mlp.shared_experts.*`, and `load_state_dict` takes those names, so a patched model saves a
checkpoint that `from_pretrained` loads, bit-equal to the unpatched original. FP8 experts
(`patch_model(..., expert_dtype="fp8")`, dmoe_triton/quant.py) save as the fine-grained FP8
layout: `experts.{e}.{gate,up,down}_proj.weight` and `shared_experts.{gate,up,down}_proj.weight`
in float8_e4m3fn beside their fp32 `weight_scale_inv`, with `quantization_config` in the config,
and load back the same way (a checkpoint whose shared expert is not FP8 has it quantized at load).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .config import RoutingPolicy
from .quant import (DEFAULT_BLOCK, EXPERT_DTYPES, FP8_DTYPE, Fp8Scales, check_scale,
                    dequantize_blocks, dequantize_experts, dequantize_shared, fp8_block,
                    quantization_config, quantize_blocks)


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


def patch_model(model: nn.Module, policy: Optional[RoutingPolicy] = None,
                backend: str = "auto", expert_dtype: Optional[str] = None) -> nn.Module:
    """Swap every MoE MLP of `model` for a `DMoEBlock` routed by `policy`; returns `model`.

    expert_dtype: None keeps the experts' dtype; "fp8" quantizes the routed and shared experts
    to e4m3 with 128 x 128 block scales (layer by layer, as they are repacked; already FP8
    blocks stay as they are) and records `quantization_config` in model.config, so
    save_pretrained writes a fine-grained FP8 checkpoint. Anything else is a ValueError naming
    it.

    policy None: the routing the checkpoint declares, RoutingPolicy.from_config(model.config)
    (LLaDA2.2's capacity, a dMoE checkpoint's dMoE, else token routing).

    Expert weights are repacked layer by layer (one layer's experts extra at most); the old
    per-expert modules are released. A module named `mlp` that is neither a dense MLP nor an
    official MoE MLP is a ValueError naming its path. Already patched layers (a model loaded
    from an FP8 checkpoint comes patched) just take the new policy and backend.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no .config: patch_model needs the LLaDA2 config "
                         "(num_experts, num_experts_per_tok, n_group, ...)")
    policy = RoutingPolicy.from_config(config) if policy is None else policy
    _check_policy(policy)
    if expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"expert_dtype must be one of {EXPERT_DTYPES}, got {expert_dtype!r}")
    DMoEBlock = _dmoe_block()
    found = []
    for path, parent, mlp in list(_mlps(model)):
        if isinstance(mlp, DMoEBlock):
            mlp.set_policy(policy)
            mlp.backend = backend
            found.append(path)
        elif _is_moe_mlp(mlp):
            gate = mlp.gate
            if not hasattr(gate, "weight") or not isinstance(mlp.experts, (nn.ModuleList, list)):
                raise ValueError(f"{path}: a MoE MLP needs gate.weight and an experts list, "
                                 f"got {type(mlp).__name__}")
            parent.mlp = DMoEBlock.from_official(mlp, config, policy, backend)
            _speak_published_names(parent.mlp)
            found.append(path)
        elif hasattr(mlp, "gate") or not _is_dense_mlp(mlp):
            raise ValueError(
                f"{path}: unrecognised MLP {type(mlp).__name__} (expected a dense MLP with "
                "gate_proj/up_proj/down_proj, or a MoE MLP with gate and experts)"
            )
    if not found:
        raise ValueError("model has no MoE MLP to patch (no `mlp` module with gate and experts)")
    if expert_dtype == "fp8":
        block = fp8_block(config) or DEFAULT_BLOCK
        for module in model.modules():
            if isinstance(module, DMoEBlock):
                module.quantize_(block)
        config.quantization_config = quantization_config(block)
    return model


_REPACKED = ("gate_weight", "expert_bias", "w_gate_up", "w_down", "w_gate_up_scale",
             "w_down_scale")
_PROJECTIONS = ("gate", "up", "down")


def _expert_parts(w_gate_up, w_down, scales):
    """(e, projection, weight [N, K], its weight_scale_inv or None) of stacked experts: the
    official per-expert tensors as views (quant.py's layout for the scales)."""
    inter = w_gate_up.shape[1] // 2
    n_gate = None if scales is None else -(-inter // scales.block[0])
    for e in range(w_gate_up.shape[0]):
        parts = ((w_gate_up[e, :inter], None if scales is None else scales.gate_up[e, :n_gate]),
                 (w_gate_up[e, inter:], None if scales is None else scales.gate_up[e, n_gate:]),
                 (w_down[e], None if scales is None else scales.down[e]))
        for name, (weight, scale) in zip(_PROJECTIONS, parts):
            yield e, name, weight, scale


def _published_state(block, state: dict, prefix: str) -> None:
    """state_dict hook: the block's repacked tensors under the official names (copies, so that
    no two saved tensors share memory)."""
    if not all(prefix + n in state for n in ("gate_weight", "w_gate_up", "w_down")):
        return  # not a whole block: leave it as it is
    rest = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
    copy = lambda t: t.detach().clone()  # noqa: E731
    state[prefix + "gate.weight"] = rest["gate_weight"].detach().to(block.dense_dtype).clone()
    if rest.get("expert_bias") is not None:
        state[prefix + "gate.expert_bias"] = copy(rest["expert_bias"]).float()
    scales = None
    if rest.get("w_gate_up_scale") is not None:
        scales = Fp8Scales(rest["w_gate_up_scale"], rest["w_down_scale"], block.weight_block)
    for e, name, weight, scale in _expert_parts(rest["w_gate_up"], rest["w_down"], scales):
        state[f"{prefix}experts.{e}.{name}_proj.weight"] = copy(weight)
        if scale is not None:
            state[f"{prefix}experts.{e}.{name}_proj.weight_scale_inv"] = copy(scale)
    for name, value in rest.items():
        if name.startswith("shared_expert."):
            state[prefix + "shared_experts." + name[len("shared_expert."):]] = copy(value)
        elif name not in _REPACKED:
            state[prefix + name] = value  # anything else the block holds, unchanged


def _load_published(block, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: official names (as _published_state writes them) back into the
    block's repacked tensors. FP8 experts take their weight_scale_inv beside each weight; a
    checkpoint whose experts are FP8 while the block's are not (or the reverse), or a missing,
    mis-shaped or non-finite scale, is a ValueError naming the tensor."""
    if prefix + "gate.weight" not in state:
        return
    state[prefix + "gate_weight"] = state.pop(prefix + "gate.weight").float()
    if prefix + "gate.expert_bias" in state:
        state[prefix + "expert_bias"] = state.pop(prefix + "gate.expert_bias").float()
    E = block.w_gate_up.shape[0]
    expert = lambda e, n: f"{prefix}experts.{e}.{n}_proj.weight"  # noqa: E731
    if all(expert(e, n) in state for e in range(E) for n in _PROJECTIONS):
        if block.weight_block is not None:
            _stack_fp8_scales(block, state, prefix, expert)
        else:
            _refuse_fp8(state, expert(0, "gate"))
        state[prefix + "w_gate_up"] = torch.stack([
            torch.cat((state.pop(expert(e, "gate")), state.pop(expert(e, "up"))))
            for e in range(E)])
        state[prefix + "w_down"] = torch.stack([state.pop(expert(e, "down")) for e in range(E)])
    _shared_fp8_state(block, state, prefix + "shared_experts.")
    for k in [k for k in state if k.startswith(prefix + "shared_experts.")]:
        state[prefix + "shared_expert." + k[len(prefix + "shared_experts."):]] = state.pop(k)


def _shared_fp8_state(block, state: dict, prefix: str) -> None:
    """The shared expert's projections in `state` (names under prefix) as the block holds them:
    beside FP8 experts FP8 with a valid weight_scale_inv each (a checkpoint that left them in a
    float dtype is quantized here, as patch_model(expert_dtype="fp8") would; one the block
    cannot stack, e.g. wider than a routed expert, runs apart in the model's dtype: dequantized
    here); beside model-dtype experts a ValueError for FP8 ones."""
    fp8 = block.shared_gate_up_scale is not None
    for name in (f"{prefix}{n}_proj.weight" for n in _PROJECTIONS):
        if name not in state:
            continue
        if block.weight_block is not None and not fp8:  # FP8 experts, shared apart
            if state[name].dtype == FP8_DTYPE:
                scale = state.pop(name + "_scale_inv", None)
                check_scale(name, state[name], scale, block.weight_block)
                state[name] = dequantize_blocks(state[name], scale, block.weight_block,
                                                block.dense_dtype)
        elif not fp8:
            _refuse_fp8(state, name)
        elif state[name].dtype != FP8_DTYPE:
            if name + "_scale_inv" in state:
                raise ValueError(f"{name} has a weight_scale_inv but is {state[name].dtype}, "
                                 f"not float8_e4m3fn")
            state[name], state[name + "_scale_inv"] = quantize_blocks(
                state[name], block.weight_block, name)
        else:
            check_scale(name, state[name], state.get(name + "_scale_inv"), block.weight_block)


def _refuse_fp8(state: dict, name: str) -> None:
    if state[name].dtype == FP8_DTYPE or name + "_scale_inv" in state:
        raise ValueError(f"{name} is an FP8 expert weight but this model's experts are not FP8: "
                         f"load FP8 checkpoints with from_pretrained, or patch with "
                         f"expert_dtype='fp8' before load_state_dict")


def _stack_fp8_scales(block, state: dict, prefix: str, expert) -> None:
    """Each expert weight of `state` FP8 with a valid weight_scale_inv (popped), stacked into
    the block's w_gate_up_scale / w_down_scale entries."""
    scales = {}
    for e in range(block.w_gate_up.shape[0]):
        for n in _PROJECTIONS:
            name = expert(e, n)
            if state[name].dtype != FP8_DTYPE:
                raise ValueError(f"{name} is {state[name].dtype}, expected float8_e4m3fn (this "
                                 f"model's experts are FP8 in blocks {list(block.weight_block)})")
            scale = state.pop(name + "_scale_inv", None)
            check_scale(name, state[name], scale, block.weight_block)
            scales[e, n] = scale
    E = block.w_gate_up.shape[0]
    state[prefix + "w_gate_up_scale"] = torch.stack([
        torch.cat((scales[e, "gate"], scales[e, "up"])) for e in range(E)])
    state[prefix + "w_down_scale"] = torch.stack([scales[e, "down"] for e in range(E)])


def _save_published(module, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook (a module-level function, not a lambda, so a patched model pickles:
    torch.save(model))."""
    _published_state(module, state, prefix)


def _speak_published_names(block: nn.Module) -> None:
    """Save and load `block` under the official LLaDA2 names (module docstring)."""
    block.register_state_dict_post_hook(_save_published)
    block.register_load_state_dict_pre_hook(_load_published)


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
    memory. FP8 experts (the shared one too): dequantized copies in the model's dtype (a second
    copy of them)."""
    from .models.llada2 import LLaDA2MoeSparseMoeBlock

    with torch.device("meta"):
        mlp = LLaDA2MoeSparseMoeBlock(config)
    frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
    mlp.gate.weight = frozen(block.gate_weight)  # fp32, as the official gate computes
    mlp.gate.expert_bias = block.expert_bias      # shared: calibration applies to both
    w_gate_up, w_down = block.w_gate_up, block.w_down
    scales = block.fp8_scales()
    if scales is not None:  # the official loop runs the model's dtype
        w_gate_up, w_down = dequantize_experts(w_gate_up, w_down, scales, block.dense_dtype)
    for e, name, weight, _ in _expert_parts(w_gate_up, w_down, None):
        getattr(mlp.experts[e], f"{name}_proj").weight = frozen(weight)
    if scales is None or scales.shared is None:
        mlp.shared_experts = block.shared_expert
        return mlp
    gate_up, down = dequantize_shared(block.shared_weights(), scales, block.dense_dtype)
    inter = gate_up.shape[0] // 2
    for name, weight in zip(_PROJECTIONS, (gate_up[:inter], gate_up[inter:], down)):
        getattr(mlp.shared_experts, f"{name}_proj").weight = frozen(weight)
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
            block.refresh_gate_copy()  # the view's gate weight IS gate_weight: it may be changed
