"""FP8 (e4m3) expert weights with block scales, routed and shared (issue 16).

The format is the one fine-grained FP8 checkpoints publish (DeepSeek-V3 style; transformers'
`FineGrainedFP8Config`, transformers/integrations/finegrained_fp8.py): config.json carries

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}

and each quantized Linear weight `X.weight` [N, K] (float8_e4m3fn) has beside it
`X.weight_scale_inv` [cdiv(N, bn), cdiv(K, bk)] (float32), where [bn, bk] = weight_block_size
(bn along the output rows, bk along the input columns). Despite the name, the stored value is
the dequantization multiplier: W = W_fp8 * weight_scale_inv, block by block. We quantize with
scale = amax(|W| over the block) / 448 (448: e4m3's largest finite value), W_fp8 = round(W /
scale), so no block saturates.

Stacked in DMoEBlock (transformers 5's expert layout): `w_gate_up` [E, 2I, H] and `w_down`
[E, H, I] in float8_e4m3fn, with `Fp8Scales.gate_up` [E, 2 * cdiv(I, bn), cdiv(H, bk)] (the
gate rows' blocks, then the up rows': each projection keeps its own blocks, so an I that is no
multiple of bn still matches a checkpoint's per-projection scales) and `Fp8Scales.down`
[E, cdiv(H, bn), cdiv(I, bk)]. The shared expert is quantized the same way, as one more expert
(`quantize_shared`): its gate|up stack [2I, H] and down [H, I] in e4m3, their scales in
`Fp8Scales.shared`; it saves as `shared_experts.{gate,up,down}_proj.weight` beside their
`weight_scale_inv`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
DEFAULT_BLOCK = (128, 128)
EXPERT_DTYPES = (None, "fp8")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_block(block) -> Tuple[int, int]:
    """weight_block_size as (bn, bk): two positive ints, bk a multiple of 16 (the kernels' k
    step must divide it and tl.dot needs 16 rows); else a ValueError naming it."""
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"weight_block_size must be two positive ints [bn, bk], got {block!r}")
    if block[1] % 16:
        raise ValueError(f"weight_block_size [bn, bk] needs bk a multiple of 16 (a kernel k "
                         f"step lies inside one scale block), got {list(block)}")
    return int(block[0]), int(block[1])


def scale_shape(weight_shape, block) -> tuple:
    """The weight_scale_inv shape of a [..., N, K] weight in [bn, bk] blocks."""
    *lead, n, k = weight_shape
    return (*lead, _cdiv(n, block[0]), _cdiv(k, block[1]))


def _blocks(w: torch.Tensor, block) -> torch.Tensor:
    """w [..., N, K] zero-padded to whole blocks, as [..., nN, bn, nK, bk]."""
    *lead, n, k = w.shape
    bn, bk = block
    nn_, nk = _cdiv(n, bn), _cdiv(k, bk)
    padded = torch.nn.functional.pad(w, (0, nk * bk - k, 0, nn_ * bn - n))
    return padded.reshape(*lead, nn_, bn, nk, bk)


def quantize_blocks(w: torch.Tensor, block=DEFAULT_BLOCK, name: str = "weight"):
    """w [..., N, K] (float) -> (w_fp8 [..., N, K] float8_e4m3fn, scale_inv fp32 [..., cdiv(N,
    bn), cdiv(K, bk)]) with scale_inv = amax(block) / 448 (1 for an all-zero block), so that
    dequantize_blocks(w_fp8, scale_inv) ~ w within e4m3's rounding (relative 2**-4 per element).
    A non-finite w is a ValueError naming `name` (a host check: load time only)."""
    block = check_block(block)
    if not w.is_floating_point() or w.dim() < 2:
        raise ValueError(f"{name} must be a float tensor [..., N, K], got {w.dtype} {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} holds non-finite values: cannot quantize it to FP8")
    blocks = _blocks(w.float(), block)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    *lead, n, k = w.shape
    q = q.reshape(*lead, q.shape[-4] * q.shape[-3], q.shape[-2] * q.shape[-1])[..., :n, :k]
    return q.to(FP8_DTYPE).contiguous(), scale.contiguous()


def dequantize_blocks(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block=DEFAULT_BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = w_fp8 * scale_inv per [bn, bk] block: [..., N, K] in `dtype`, computed in fp32 (in
    float64 when dtype is float64: then every product is exact, the oracle's weights)."""
    bn, bk = check_block(block)
    n, k = w_fp8.shape[-2:]
    acc = torch.promote_types(dtype, torch.float32)
    s = scale_inv.to(acc).repeat_interleave(bn, dim=-2)[..., :n, :]
    s = s.repeat_interleave(bk, dim=-1)[..., :k]
    return (w_fp8.to(acc) * s).to(dtype)


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """The activation values that the fp8 dot multiplies (W8A8: kernels/moe_fp8.py,
    `_pow2_scaled` with DOT "fp8"), as a reference: x [..., K] with each row's `group`
    consecutive columns (the last group may be shorter) scaled by the power of two 2**p that
    puts their largest |x| in [2**7, 2**8) (p <= 126), rounded to e4m3 (to nearest, ties to
    even: never past 448, so nothing saturates), then scaled back by 2**-p. Returns x's dtype
    promoted to fp32 (exact products in float64). A group holding inf or NaN comes back all NaN
    (e4m3 has no inf: the kernels make its products NaN, never finite)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    k = x.shape[-1]
    if x.numel() == 0:
        return x.to(acc)
    groups = torch.nn.functional.pad(x.to(acc), (0, _cdiv(k, group) * group - k))
    groups = groups.reshape(*x.shape[:-1], -1, group)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    p = (8 - torch.frexp(amax).exponent).clamp(max=126)
    q = torch.ldexp(torch.ldexp(groups, p).to(FP8_DTYPE).to(acc), -p)
    q = torch.where(torch.isfinite(amax), q, float("nan"))
    return q.reshape(*x.shape[:-1], -1)[..., :k]


def check_scale(name: str, weight: torch.Tensor, scale: Optional[torch.Tensor], block,
                expected_shape=None, check_values: bool = True) -> None:
    """`name`'s weight_scale_inv against its FP8 weight: present, fp32, shaped for `block`
    (expected_shape overrides scale_shape(weight)), and (check_values, a host sync) finite,
    and the weight free of e4m3 NaN bytes. ValueError (TypeError for a dtype) naming the
    tensor."""
    if scale is None:
        raise ValueError(f"{name} is float8_e4m3fn but its weight_scale_inv is missing")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError(f"{name}_scale_inv must be a float32 tensor, got "
                        f"{getattr(scale, 'dtype', type(scale).__name__)}")
    want = tuple(expected_shape or scale_shape(weight.shape, block))
    if tuple(scale.shape) != want:
        raise ValueError(f"{name}_scale_inv has shape {tuple(scale.shape)}, expected {want} for "
                         f"weight shape {tuple(weight.shape)} in weight_block_size "
                         f"{list(block)} blocks (a checkpoint quantized with another block "
                         f"size, or a mis-shaped scale)")
    if scale.device != weight.device:
        raise TypeError(f"{name}_scale_inv is on {scale.device} but its weight on {weight.device}")
    if check_values and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{name}_scale_inv holds non-finite values (NaN or inf): the weight "
                         f"would dequantize to garbage")
    # A negative scale flips a block's signs; one above fp32 max / 448 dequantizes to inf. (0 is
    # kept: a checkpoint may store it for an all-zero block.)
    limit = torch.finfo(torch.float32).max / FP8_MAX
    if check_values and not bool(((scale >= 0) & (scale <= limit)).all()):
        raise ValueError(f"{name}_scale_inv holds values outside [0, {limit:.3g}]: a block would "
                         f"dequantize with flipped signs or to inf")
    if check_values and weight.dtype == FP8_DTYPE and not weight.is_meta and _has_nan_codes(weight):
        raise ValueError(f"{name} holds float8_e4m3fn NaN codes (bytes 0x7F / 0xFF): a corrupt "
                         f"FP8 weight")


def _has_nan_codes(weight: torch.Tensor) -> bool:
    """Whether an e4m3 (fn) tensor holds a NaN code, S.1111.111 (a host sync). The kernels
    decode weights with cheap conversions that give such a byte a finite value, where
    dequantizing gives NaN, so check_scale refuses them and no forward computes with one
    silently (no quantizer writes them: they clamp to +-448). The two codes are the largest
    bytes as int8 (0x7F) and as uint8 (0xFF): two max reductions, about 50x faster on the CPU
    than masking every byte (35 ms against 1.7 s for 512 MB), which matters at load time."""
    if weight.numel() == 0:
        return False
    return (int(weight.view(torch.int8).max()) == 0x7F
            or int(weight.view(torch.uint8).max()) == 0xFF)


@dataclass(frozen=True)
class Fp8Scales:
    """Block scales of stacked FP8 expert weights (module docstring): gate_up fp32 [E, 2 *
    cdiv(I, bn), cdiv(H, bk)], down fp32 [E, cdiv(H, bn), cdiv(I, bk)]; block = (bn, bk);
    shared: the FP8 shared expert's (gate_up [2 * cdiv(I, bn), cdiv(H, bk)], down [cdiv(H, bn),
    cdiv(I, bk)]) when there is one (quantize_shared), else None."""

    gate_up: torch.Tensor
    down: torch.Tensor
    block: Tuple[int, int] = DEFAULT_BLOCK
    shared: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def check(self, w_gate_up: torch.Tensor, w_down: torch.Tensor, check_values: bool) -> None:
        """FP8 w_gate_up [E, 2I, H] / w_down [E, H, I]; scales fp32, shaped for them, finite
        (check_values: a host sync). TypeError / ValueError naming the tensor. (The shared
        expert's scales: moe.check_shared.)"""
        block = check_block(self.block)
        for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
            if w.dtype != FP8_DTYPE:
                raise TypeError(f"{name} must be float8_e4m3fn with FP8 scales, got {w.dtype}")
        gate_up, down = expert_scale_shapes(w_gate_up.shape, w_down.shape, block)
        check_scale("w_gate_up", w_gate_up, self.gate_up, block, gate_up, check_values)
        check_scale("w_down", w_down, self.down, block, down, check_values)

    @classmethod
    def empty(cls, w_gate_up_shape, w_down_shape, block=DEFAULT_BLOCK, **like) -> "Fp8Scales":
        """Uninitialised scales for weights of these shapes (e.g. on the meta device)."""
        block = check_block(block)
        shapes = expert_scale_shapes(w_gate_up_shape, w_down_shape, block)
        return cls(*(torch.empty(s, dtype=torch.float32, **like) for s in shapes), block)


def expert_scale_shapes(w_gate_up_shape, w_down_shape, block) -> tuple:
    """(gate_up, down) scale shapes of stacked experts [E, 2I, H] / [E, H, I] (module docstring):
    the gate and the up rows each in their own blocks."""
    E, two_i, H = w_gate_up_shape
    return (E, 2 * _cdiv(two_i // 2, block[0]), _cdiv(H, block[1])), scale_shape(w_down_shape, block)


def quantize_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor, block=DEFAULT_BLOCK):
    """Stacked experts -> (w_gate_up fp8, w_down fp8, Fp8Scales); gate and up rows quantized as
    the separate projections a checkpoint holds."""
    inter = w_gate_up.shape[1] // 2
    q_gate, s_gate = quantize_blocks(w_gate_up[:, :inter], block, "w_gate_up (gate rows)")
    q_up, s_up = quantize_blocks(w_gate_up[:, inter:], block, "w_gate_up (up rows)")
    q_down, s_down = quantize_blocks(w_down, block, "w_down")
    scales = Fp8Scales(torch.cat((s_gate, s_up), 1), s_down, check_block(block))
    return torch.cat((q_gate, q_up), 1), q_down, scales


def quantize_shared(gate_up: torch.Tensor, down: torch.Tensor, block=DEFAULT_BLOCK):
    """A shared expert (gate_up [2I, H], down [H, I]) quantized like one routed expert:
    (gate_up fp8, down fp8, (gate_up scales, down scales)) for Fp8Scales.shared."""
    q_gate_up, q_down, scales = quantize_experts(gate_up[None], down[None], block)
    return q_gate_up[0], q_down[0], (scales.gate_up[0], scales.down[0])


def dequantize_shared(shared, scales: "Fp8Scales", dtype: torch.dtype = torch.float32):
    """The inverse of quantize_shared: the FP8 shared expert `shared` (gate_up, down) with its
    scales.shared, as (gate_up [2I, H], down [H, I]) in `dtype`."""
    gate_up, down = dequantize_experts(
        shared[0][None], shared[1][None],
        Fp8Scales(scales.shared[0][None], scales.shared[1][None], scales.block), dtype)
    return gate_up[0], down[0]


def dequantize_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor, scales: Fp8Scales,
                       dtype: torch.dtype = torch.float32):
    """The inverse of quantize_experts: (w_gate_up [E, 2I, H], w_down [E, H, I]) in `dtype`."""
    inter = w_gate_up.shape[1] // 2
    n_gate = _cdiv(inter, scales.block[0])
    gate = dequantize_blocks(w_gate_up[:, :inter], scales.gate_up[:, :n_gate], scales.block, dtype)
    up = dequantize_blocks(w_gate_up[:, inter:], scales.gate_up[:, n_gate:], scales.block, dtype)
    return torch.cat((gate, up), 1), dequantize_blocks(w_down, scales.down, scales.block, dtype)


# ---------------------------------------------------------------------------------------------
# quantization_config (config.json)


def quantization_config(block=DEFAULT_BLOCK) -> dict:
    """The config.json entry a saved FP8 model carries (transformers' FineGrainedFP8Config keys)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(check_block(block))}


def fp8_block(config) -> Optional[Tuple[int, int]]:
    """The weight_block_size a config's quantization_config declares (None: not quantized);
    anything but fine-grained e4m3 block FP8 is a ValueError naming the field."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "fp8":
        raise ValueError(f"quantization_config.quant_method {qc.get('quant_method')!r} is not "
                         f"supported (only 'fp8' with weight_block_size)")
    if qc.get("fmt", "e4m3") != "e4m3" or qc.get("scale_fmt", "float") != "float":
        raise ValueError("quantization_config: only fmt 'e4m3' with float32 scales is supported, "
                         f"got fmt {qc.get('fmt')!r}, scale_fmt {qc.get('scale_fmt')!r}")
    if qc.get("weight_block_size") is None:
        raise ValueError("quantization_config.weight_block_size is missing (per-tensor FP8 is "
                         "not supported; expected e.g. [128, 128])")
    try:
        return check_block(tuple(qc["weight_block_size"]))
    except (ValueError, TypeError) as err:
        raise ValueError(f"quantization_config.{err}") from None


__all__ = ["FP8_DTYPE", "FP8_MAX", "DEFAULT_BLOCK", "Fp8Scales", "quantize_blocks",
           "dequantize_blocks", "quantize_experts", "quantize_shared", "dequantize_experts",
           "dequantize_shared",
           "check_scale", "check_block", "scale_shape", "quantization_config", "fp8_block"]


# ---------------------------------------------------------------------------------------------
# Fine-grained FP8 checkpoints into our LLaDA2 model (LLaDA2MoePreTrainedModel.from_pretrained)


def read_checkpoint(model_dir: str, device="cpu") -> dict:
    """Every tensor of a safetensors checkpoint directory (one file, or the shards its
    model.safetensors.index.json lists), loaded straight to `device`."""
    import json
    import os

    from safetensors.torch import load_file

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(model_dir, shard), device=str(device)))
    return state


def _is_expert(name: str) -> bool:
    """A routed or shared expert's tensor (kept FP8: patch.py's load hook takes it)."""
    return ".mlp.experts." in name or ".mlp.shared_experts." in name


def prepare_state(state: dict, block, dtype: torch.dtype) -> dict:
    """A checkpoint's tensors as the FP8 model takes them: routed and shared experts' FP8
    weights and scales as they are (patch.py's hook stacks and checks them, and quantizes a
    shared expert the checkpoint left in a float dtype); any other FP8 weight (attention or
    dense MLP, when a checkpoint quantized them too) dequantized with its scale to `dtype`;
    other float tensors cast to `dtype`, the router bias kept fp32. An FP8 weight outside the
    experts without its scale, or a scale without its weight, is a ValueError."""
    out = {}
    for name, t in state.items():
        if name.endswith(".weight_scale_inv"):
            if name[:-len("_scale_inv")] not in state:
                raise ValueError(f"{name} has no weight {name[:-len('_scale_inv')]} beside it")
            if _is_expert(name):
                out[name] = t
            continue
        if t.dtype == FP8_DTYPE:
            if _is_expert(name):
                out[name] = t
                continue
            scale = state.get(name + "_scale_inv")
            check_scale(name, t, scale, block)
            out[name] = dequantize_blocks(t, scale, block, dtype)
        elif t.is_floating_point():
            out[name] = t.float() if name.endswith("expert_bias") else t.to(dtype)
        else:
            out[name] = t
    return out


def load_fp8_pretrained(cls, model_dir: str, config, dtype=None, device="cpu"):
    """A fine-grained FP8 checkpoint (module docstring) as a `cls` model (LLaDA2MoeModelLM)
    whose MoE layers are DMoEBlocks with FP8 experts, routed by the checkpoint's own policy
    (RoutingPolicy.from_config; patch_model / set_policy change it). The model is built on the
    meta device and takes the checkpoint's tensors as they are (no model-dtype copy of the
    experts, ever); `dtype` (None/"auto": the config's dtype, else fp32) is that of every
    other tensor. A missing, unexpected, mis-shaped or non-finite tensor is a ValueError
    naming it."""
    from .patch import patch_model

    block = fp8_block(config)
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = prepare_state(read_checkpoint(model_dir, device), block, dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    patch_model(model, expert_dtype="fp8")
    try:
        info = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # a shape torch refused (mis-shaped tensor)
        raise ValueError(f"{model_dir}: checkpoint does not match the model: {err}") from None
    zero_missing_bias(model, device)
    return model.eval(), dict(missing_keys=info.missing_keys, unexpected_keys=info.unexpected_keys)


def fp8_checkpoint_config(cls, args: tuple, kwargs: dict):
    """The config of a local FP8 checkpoint that from_pretrained(*args, **kwargs) names (its
    `config=` or its config.json), or None: not a local directory, or not quantized (then
    transformers' own loader runs)."""
    import os

    path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        if not (isinstance(path, (str, os.PathLike)) and os.path.isdir(path)):
            return None
        config = cls.config_class.from_pretrained(config or path)
    return config if fp8_block(config) is not None else None


def zero_missing_bias(model, device) -> None:
    """A router bias the checkpoint leaves out (moe_router_enable_expert_bias false: zeros, as
    check_loading_info allows) is still meta after an assigning load: zeros on `device`."""
    for module in model.modules():
        bias = getattr(module, "expert_bias", None)
        if isinstance(bias, torch.Tensor) and bias.is_meta:
            module.expert_bias = torch.zeros(bias.shape, dtype=torch.float32, device=device)
