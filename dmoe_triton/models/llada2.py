"""LLaDA2.0 (`model_type "llada2_moe"`): config and model with the published parameter names.

The spec is ../shared/docs/llada2.md. Loading and saving speak the official tensor names, so a
published checkpoint directory loads unchanged with `from_pretrained`. The MoE MLP here is the
plain one (official gate in vectorised torch, a Python loop over experts); `patch_model` swaps it
for the fused `DMoEBlock`.

Attention is block-causal: bidirectional inside a block of `block_length` positions, causal
across blocks, blocks aligned to each sequence's position 0. For decoding, `BlockKVCache` holds
the K/V of finished blocks; a forward with `write_cache=True` appends its rows to it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from ..attention import attention_prep, block_attention
from ..config import RouterConfig, RoutingPolicy
from ..modules import keep_fp32_router_state
from ..norm import add_rms_norm
from ..reference import (  # noqa: F401 (rotate_half: public name)
    add_rms_norm_reference, apply_rope, attention_prep_reference, rms_norm, rotate_half)
from ..routing import RouteResult, route

MODEL_TYPE = "llada2_moe"


class LLaDA2MoeConfig(PretrainedConfig):
    """Defaults are the published LLaDA2.0-mini checkpoint's values (not the remote code's defaults).

    Extra keys of a checkpoint's config.json (auto_map, rotary_dim, ...) are kept as attributes.
    """

    model_type = MODEL_TYPE

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    moe_intermediate_size: int = 512
    num_hidden_layers: int = 20
    first_k_dense_replace: int = 1
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: Optional[int] = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    router_dtype: str = "fp32"
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: Optional[int] = 128
    partial_rotary_factor: float = 0.5
    rotary_dim: Optional[int] = None  # derived from partial_rotary_factor when absent
    rope_theta: float = 600000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    use_qk_norm: bool = True
    use_bias: bool = False
    use_qkv_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: Optional[int] = 156892
    eos_token_id: Optional[int] = 156892
    mask_token_id: Optional[int] = 156895

    def __post_init__(self, **kwargs):
        self._read_rope_parameters(kwargs.get("rope_parameters"))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        derived = int(self.head_dim * self.partial_rotary_factor)
        if self.rotary_dim is None:
            self.rotary_dim = derived
        elif self.rotary_dim != derived:
            raise ValueError(
                f"rotary_dim ({self.rotary_dim}) must equal head_dim * partial_rotary_factor "
                f"({derived}); the published model derives it that way"
            )
        super().__post_init__(**kwargs)
        if self.rope_scaling:
            raise ValueError(f"rope_scaling is not supported (got {self.rope_scaling!r})")
        if self.score_function != "sigmoid":
            raise ValueError(f"score_function must be 'sigmoid', got {self.score_function!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts:
            self.router_config()  # the router's rules, checked when the config is built
            RoutingPolicy.from_config(self)  # and expert_capacity's range (LLaDA2.2)

    def router_config(self) -> RouterConfig:
        """The MoE layers' gate as a RouterConfig; a ValueError/TypeError naming the config
        field (num_experts, num_experts_per_tok, n_group, topk_group, routed_scaling_factor)
        when the router could not run it, e.g. a group left with fewer than two experts, or
        kept groups that hold fewer than num_experts_per_tok experts."""
        try:
            return RouterConfig.from_hf(self)
        except (TypeError, ValueError) as err:
            message = str(err).replace("top_k", "num_experts_per_tok")
            raise type(err)(f"LLaDA2MoeConfig: {message}") from None

    def _read_rope_parameters(self, rope) -> None:
        """LLaDA2.2 writes RoPE in transformers 5's form, `rope_parameters: {rope_type,
        rope_theta, partial_rotary_factor}`, without the top-level keys: when present it is the
        source of both (ignored, it silently ran theta 6e5 instead of 3e6)."""
        if rope is None:
            return
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a dict, got {type(rope).__name__}")
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.rope_type {rope['rope_type']!r} is not supported "
                             f"(only 'default' RoPE, as every LLaDA2 checkpoint uses)")
        self.rope_theta = float(rope.get("rope_theta", self.rope_theta))
        self.partial_rotary_factor = float(rope.get("partial_rotary_factor",
                                                    self.partial_rotary_factor))

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.num_experts) and i >= self.first_k_dense_replace


# ---------------------------------------------------------------------------------------------
# Building blocks


class LLaDA2MoeRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        # fp32 statistics, cast back, then the weight: the published order of operations.
        # F.rms_norm upcasts internally and rounds once at the end (one fused kernel on CUDA
        # instead of seven elementwise ones).
        return rms_norm(x, self.weight, self.eps)


class LLaDA2MoeMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense layer 0, every routed expert and the shared expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """The official router: sigmoid scores (+ expert_bias to rank), group-limited top-k."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # The bias stays fp32 whatever the model's dtype, as published. The weight follows the
        # model's dtype like every published weight (bf16 in the checkpoint; the router
        # upcasts it, and transformers' loader casts it to the load dtype anyway).
        keep_fp32_router_state(self, super()._apply, fn, recurse, ("expert_bias",))
        return self

    def route_windows(self, x, policy: RoutingPolicy, first_position=None, row_valid=None):
        """x [B, L, H] -> ids [B * L, k] (int64, -1 = empty), weights [B * L, k] (fp32) under a
        block policy (docs/routing.md), computed by the reference."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        r = route(logits, self.expert_bias.float(), self.config.router_config(), policy,
                  "reference", first_position=first_position, row_valid=row_valid)
        k = r.topk_ids.shape[-1]
        return r.topk_ids.reshape(-1, k).long(), r.topk_weights.reshape(-1, k)

    def forward(self, x):
        """x [T, H] -> ids [T, k] (int64), weights [T, k] (fp32)."""
        c = self.config
        T = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):  # router_dtype fp32, even under autocast
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        ranking = scores + self.expert_bias.float()
        group_scores = ranking.view(T, c.n_group, -1).topk(2, dim=-1).values.sum(-1)
        kept_groups = group_scores.topk(c.topk_group, dim=-1).indices
        in_kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        in_kept = in_kept.repeat_interleave(c.num_experts // c.n_group, dim=1)
        ids = ranking.masked_fill(~in_kept, float("-inf")).topk(c.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, ids)
        if c.num_experts_per_tok > 1:  # as published: a top-1 gate does not normalise
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * c.routed_scaling_factor
        return ids, w


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts (looped in Python, as the official code does) plus the shared expert."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        H, I = config.hidden_size, config.moe_intermediate_size
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(LLaDA2MoeMLP(H, I) for _ in range(config.num_experts))
        n_shared = config.num_shared_experts
        # As published: a shared expert of width I * num_shared_experts whenever the key is
        # set, so a `num_shared_experts: 0` checkpoint carries zero-width tensors; they load,
        # and the forward skips the expert.
        self.shared_experts = LLaDA2MoeMLP(H, I * n_shared) if n_shared is not None else None
        self.has_shared = bool(n_shared)
        self.last_route: Optional[RouteResult] = None  # for decoding statistics
        # LLaDA2.2 checkpoints route by windows in their own gate, so the unpatched model does
        # too. A dMoE checkpoint's gate stays the official token gate here: dMoE is what
        # patch_model / --policy auto run on it (the unpatched model is the token baseline).
        policy = RoutingPolicy.from_config(config)
        self.block_policy = policy if policy.kind == "capacity" else None

    def forward(self, x, first_position=None, row_valid=None, row_masked=None):
        """x [B, L, H]. A LLaDA2.2 checkpoint (expert_capacity > 0) routes by windows, through
        the reference (first_position / row_valid: the windows, docs/routing.md); else the
        official gate routes each token alone. row_masked: read by no policy this gate runs."""
        B, L, H = x.shape
        flat = x.reshape(-1, H)
        if self.block_policy is not None:
            ids, w = self.gate.route_windows(x, self.block_policy, first_position, row_valid)
        else:
            ids, w = self.gate(flat)
        self.last_route = RouteResult(ids.view(B, L, -1).to(torch.int32), w.view(B, L, -1), None)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():  # a host sync: this is the slow reference path
            if e < 0:
                continue  # an empty slot (a window of padding keeps no expert)
            token, slot = torch.where(ids == e)
            y = self.experts[e](flat[token]).float() * w[token, slot, None]
            out.index_add_(0, token, y)
        out = out.to(x.dtype).view(B, L, H)
        if self.shared_experts is not None and self.has_shared:
            out = out + self.shared_experts(x)
        return out


def rope_cos_sin(position_ids, rotary_dim: int, theta: float, dtype):
    """NeoX RoPE tables [B, L, rotary_dim], computed in fp32 and cast to the activations' dtype."""
    exponent = torch.arange(0, rotary_dim, 2, device=position_ids.device).float() / rotary_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class BlockKVCache:
    """K/V of finished blocks for every layer, preallocated to `capacity` positions.

    `valid [B, capacity]` marks written, non-padding rows; attention never looks at the rest.
    With `static=True` attention reads the whole buffer (fixed shapes, for CUDA graphs);
    otherwise only the written prefix. Rows are appended by a forward with `write_cache=True`.
    """

    def __init__(self, config: LLaDA2MoeConfig, batch: int, capacity: int, dtype, device,
                 static: bool = False, scratch: Optional[int] = None):
        # A static cache keeps `scratch` spare rows after `capacity` for the current rows of a
        # forward, so attention reads the buffer in place instead of concatenating the whole
        # cache with them in every layer of every step.
        self.scratch = (64 if static else 0) if scratch is None else scratch
        shape = (batch, config.num_key_value_heads, capacity + self.scratch, config.head_dim)
        n = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity, self.static, self.length = capacity, static, 0

    def visible(self) -> int:
        return self.capacity if self.static else self.length

    def scratch_rows(self, layer: int, l: int):
        """Views [B, nkv, l, hd] of the spare rows after the visible ones, where a forward can
        write its K/V so that attention reads the buffer in place; (None, None) when there is
        no room for l rows there (not static, or l > scratch)."""
        if not (self.static and 0 < l <= self.scratch):
            return None, None
        n = self.visible()
        return self.keys[layer][:, :, n:n + l], self.values[layer][:, :, n:n + l]

    def with_current(self, layer: int, k, v):
        """Keys and values [B, nkv, visible + l, hd]: the visible cache rows, then k, v.

        Where scratch_rows has room, k and v are (or are copied into) those rows and the result
        is a view of the buffer; else a concatenation.
        """
        n, l = self.visible(), k.shape[2]
        k_rows, v_rows = self.scratch_rows(layer, l)
        if k_rows is not None:
            if k.data_ptr() != k_rows.data_ptr():  # not written in place by attention_prep
                k_rows.copy_(k)
            if v.data_ptr() != v_rows.data_ptr():
                v_rows.copy_(v)
            return self.keys[layer][:, :, :n + l], self.values[layer][:, :, :n + l]
        return (torch.cat((self.keys[layer][:, :, :n], k), dim=2),
                torch.cat((self.values[layer][:, :, :n], v), dim=2))

    def write(self, layer: int, k, v):
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"BlockKVCache is full: {end} rows > capacity {self.capacity}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v

    def advance(self, row_valid):
        """After every layer wrote its rows: mark them (row_valid [B, l] bool) and move on."""
        end = self.length + row_valid.shape[1]
        self.valid[:, self.length:end] = row_valid
        self.length = end

    def append_scratch(self, row_valid):
        """Append the l = row_valid.shape[1] rows that the last forward over this static cache
        left in every layer's scratch rows (where attention writes a forward's K/V): the rows a
        forward with write_cache=True appends. Why: a forward replayed from a CUDA graph cannot
        follow `length` (its slices are fixed at capture), so decoding replays the forward
        without writing and appends its K/V here."""
        l = row_valid.shape[1]
        for layer in range(len(self.keys)):
            k, v = self.scratch_rows(layer, l)
            if k is None:
                raise ValueError(f"append_scratch needs a static cache with {l} scratch rows "
                                 f"(static={self.static}, scratch={self.scratch})")
            self.write(layer, k, v)
        self.advance(row_valid)

    def clear(self):
        """Empty the cache (zeros everywhere, length 0), as new_cache makes it: a kept static
        cache then serves another call exactly as a fresh one would."""
        for t in (*self.keys, *self.values, self.valid):
            t.zero_()
        self.length = 0


def block_causal_mask(position_ids, row_valid, cache: Optional[BlockKVCache], block_length: int,
                      query_groups: int = 1):
    """Boolean [B, 1, query_groups * l, C + l] mask for l query rows against C cached + l
    current keys, repeated for the query heads stacked per KV head (grouped_query_attention's
    layout: stacked row g * l + i is query row i), built once per forward for every layer.

    Cached keys are finished earlier blocks: visible where valid. Current keys: visible where
    their block is not after the query's block and the row is real; every row also sees itself,
    so a padding row never has an empty softmax (which would put NaN into the cache).
    """
    blk = torch.div(position_ids, block_length, rounding_mode="floor")
    l = position_ids.shape[1]
    current = (blk[:, None, :] <= blk[:, :, None]) & row_valid[:, None, :]
    current = current | torch.eye(l, dtype=torch.bool, device=position_ids.device)
    if cache is not None and cache.visible() > 0:
        cached = cache.valid[:, None, : cache.visible()].expand(-1, l, -1)
        current = torch.cat((cached, current), dim=-1)
    return current[:, None].repeat(1, 1, query_groups, 1)


class LLaDA2MoeAttention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.rotary_dim, self.theta = config.rotary_dim, config.rope_theta
        self.query_key_value = nn.Linear(
            config.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=config.use_qkv_bias
        )
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(self.hd, config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(self.hd, config.rms_norm_eps)
        self.dense = nn.Linear(self.nh * self.hd, config.hidden_size, bias=config.use_bias)

    def forward(self, x, cos, sin, mask, cache: Optional[BlockKVCache], write_cache: bool):
        """mask: block_causal_mask(..., query_groups=nh // nkv), shared by every layer."""
        B, L, _ = x.shape
        qkv = self.query_key_value(x)
        eager = eager_ops(qkv)
        if hasattr(self, "query_layernorm") and eager:
            q, k, v = attention_prep_reference(qkv, self.query_layernorm.weight,
                                               self.key_layernorm.weight, cos, sin, self.nh,
                                               self.nkv, self.query_layernorm.eps)
        elif hasattr(self, "query_layernorm"):
            # One launch on CUDA (norms, RoPE, layout, K/V straight into the cache's spare
            # rows) instead of ~25 small kernels; on the CPU the same eager ops as above (the
            # CPU model must not need Triton's interpreter).
            k_rows, v_rows = cache.scratch_rows(self.layer_idx, L) if cache is not None else (None, None)
            q, k, v = attention_prep(qkv, self.query_layernorm.weight, self.key_layernorm.weight,
                                     cos, sin, self.nh, self.nkv, self.query_layernorm.eps,
                                     k_rows, v_rows)
        else:
            heads = qkv.view(B, L, self.nh + 2 * self.nkv, self.hd).transpose(1, 2)
            q, k, v = heads.split([self.nh, self.nkv, self.nkv], dim=1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = k, v
        if cache is not None and cache.visible() > 0:
            keys, values = cache.with_current(self.layer_idx, k, v)
        if write_cache:
            cache.write(self.layer_idx, k, v)
        if q.is_cuda and not eager:
            # One launch, output already in the dense projection's layout (no transpose copy).
            out = block_attention(q, keys, values, mask, self.hd ** -0.5)
        else:  # CPU, training and autocast (see eager_ops): SDPA
            out = grouped_query_attention(q, keys, values, mask, self.hd ** -0.5)
            out = out.transpose(1, 2).reshape(B, L, self.nh * self.hd)
        return self.dense(out)


def eager_ops(t: torch.Tensor) -> bool:
    """True where the model must run its eager torch ops (the fused kernels' references)
    instead of the fused attention kernels: wherever autograd needs the graph (the kernels have
    no backward), and under autocast, which mixes dtypes that the kernels refuse (a bf16 QKV
    projection beside fp32 RoPE tables and cache) and whose casts only the eager ops get."""
    return (torch.is_grad_enabled() and t.requires_grad) or torch.is_autocast_enabled(t.device.type)


def grouped_query_attention(q, keys, values, mask, scale):
    """q [B, nh, l, hd], keys/values [B, nkv, n, hd], mask [B, 1, (nh / nkv) * l, n] (bool, or
    additive in q's dtype; block_causal_mask with query_groups = nh / nkv) -> [B, nh, l, hd].

    The query heads that share a KV head are stacked along the rows (head h uses KV head
    h // (nh / nkv), as with enable_gqa), so SDPA sees nkv heads of (nh / nkv) * l rows and reads
    each K/V row once: with a mask, `enable_gqa=True` falls back to the math kernel, which
    copies K/V once per query head.
    """
    B, nh, l, hd = q.shape
    nkv, n = keys.shape[1], keys.shape[2]
    group = nh // nkv
    if mask.shape[-2] != group * l:
        raise ValueError(f"mask must have {group * l} rows (query heads stacked per KV head), "
                         f"got shape {tuple(mask.shape)}")
    stacked = q.reshape(B, nkv, group * l, hd)
    out = F.scaled_dot_product_attention(stacked, keys, values, attn_mask=mask, scale=scale)
    return out.view(B, nh, l, hd)


class LLaDA2MoeDecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = LLaDA2MoeSparseMoeBlock(config)
        else:
            self.mlp = LLaDA2MoeMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, write_cache, windows: dict, delta=None):
        """windows: the MoE routing windows of these rows, `first_position` [B] and
        `row_valid` [B, l] (route's arguments; None where they are the defaults).
        delta: the previous layer's MLP output, not yet added to x (None: x is the whole
        residual stream). Returns (h, out): the layer's output is h + out, left for the next
        norm to add in its own launch (add_then_norm: one launch per add and norm)."""
        x, normed = add_then_norm(x, delta, self.input_layernorm)
        attended = self.attention(normed, cos, sin, mask, cache, write_cache)
        h, normed = add_then_norm(x, attended, self.post_attention_layernorm)
        if isinstance(self.mlp, LLaDA2MoeMLP):  # the dense layer: no routing
            return h, self.mlp(normed)
        return h, self.mlp(normed, **windows)


def add_then_norm(x, delta, norm: LLaDA2MoeRMSNorm):
    """(x + delta, norm(x + delta)); x itself when delta is None. One launch on CUDA
    (dmoe_triton/norm.py); the eager ops wherever eager_ops says (autograd, autocast) or on CPU."""
    if x.is_cuda and not eager_ops(x) and (delta is None or not eager_ops(delta)):
        return add_rms_norm(x, delta, norm.weight, norm.eps)
    return add_rms_norm_reference(x, delta, norm.weight, norm.eps)


# ---------------------------------------------------------------------------------------------
# transformers models


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LLaDA2MoeGate):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            module.expert_bias.zero_()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, then a strict check: a missing, extra or mis-shaped tensor is an
        error naming it (transformers alone would only warn and initialise it randomly). A
        fine-grained FP8 checkpoint (quantization_config quant_method "fp8") loads through
        quant.load_fp8_pretrained instead: FP8 routed experts in patched DMoEBlocks."""
        from ..quant import fp8_checkpoint_config, load_fp8_pretrained

        want_info = kwargs.pop("output_loading_info", False)
        fp8_config = fp8_checkpoint_config(cls, args, kwargs)
        if fp8_config is not None:  # our FP8 experts, not transformers' FP8Linear (quant.py)
            path = args[0] if args else kwargs["pretrained_model_name_or_path"]
            model, info = load_fp8_pretrained(cls, path, fp8_config, kwargs.get("dtype"),
                                              kwargs.get("device_map") or "cpu")
        else:
            kwargs["ignore_mismatched_sizes"] = True  # so that the check below can name it
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        # A zero-width tensor (num_shared_experts: 0) has nothing to load: absent is fine.
        state = model.state_dict()
        info["missing_keys"] = [k for k in info.get("missing_keys") or []
                                if k not in state or state[k].numel() > 0]
        check_loading_info(info, model.config)
        check_finite(model)
        for module in model.modules():
            if isinstance(module, LLaDA2MoeGate):  # the router's bias stays fp32 whatever dtype
                module.expert_bias.data = module.expert_bias.data.float()
        return (model, info) if want_info else model


def check_finite(model: nn.Module) -> None:
    """A ValueError naming the first tensor that holds a NaN or an infinity: a checkpoint whose
    bytes were corrupted would otherwise decode garbage (all-NaN logits give token 0
    everywhere) with exit code 0. One pass over the weights at load, never in a forward."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or t.is_meta:
            continue
        # e4m3fn has no infinity, and torch has no isfinite for it
        bad = int(torch.isnan(t).sum()) if t.element_size() == 1 else int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"checkpoint tensor {name} holds {bad} non-finite values (NaN or "
                             f"inf): the file is corrupted or was saved from a diverged run")


def check_loading_info(info: dict, config: LLaDA2MoeConfig) -> None:
    def name(entry):  # mismatched keys come as (name, checkpoint shape, model shape)
        if isinstance(entry, (tuple, list)):
            return f"{entry[0]} (checkpoint {list(entry[1])}, model {list(entry[2])})"
        return str(entry)

    missing = info.get("missing_keys") or []
    if not config.moe_router_enable_expert_bias:  # then the bias is zeros, as a default
        missing = [k for k in missing if not str(k).endswith("mlp.gate.expert_bias")]
    problems = []
    for kind, entries in (("missing", missing), ("unexpected", info.get("unexpected_keys")),
                          ("mis-shaped", info.get("mismatched_keys"))):
        if entries:
            problems.append(f"{kind} tensors: " + ", ".join(sorted(map(name, entries))))
    if info.get("error_msgs"):
        problems.append("errors: " + "; ".join(map(str, info["error_msgs"])))
    if problems:
        raise ValueError("checkpoint does not match the llada2_moe layout: " + " | ".join(problems))


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    # The bare model loads from a full checkpoint too: its lm_head is simply not used.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids, position_ids=None, past_key_values: Optional[BlockKVCache] = None,
                attention_mask=None, block_length: int = 32, write_cache: bool = False, **kwargs):
        """Final hidden states [B, l, H] of l rows (see LLaDA2MoeModelLM.forward)."""
        cache = past_key_values
        B, l = input_ids.shape
        if write_cache and cache is None:
            raise ValueError("write_cache=True needs past_key_values (a BlockKVCache)")
        # Routing windows follow absolute positions (docs/routing.md): each sequence's row-0
        # position, a device tensor (graph-safe); None where it is 0 by construction.
        first_position = None if position_ids is None else position_ids[:, 0]
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + l, device=input_ids.device).expand(B, l)
            if start:
                first_position = position_ids[:, 0]
        if attention_mask is None:
            row_valid = torch.ones(B, l, dtype=torch.bool, device=input_ids.device)
        else:
            if tuple(attention_mask.shape) != (B, l):
                raise ValueError(
                    f"attention_mask must have shape {(B, l)} (one flag per input row; the cache "
                    f"keeps its own), got {tuple(attention_mask.shape)}"
                )
            row_valid = attention_mask.bool()
        x = self.word_embeddings(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta, x.dtype)
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        allowed = block_causal_mask(position_ids, row_valid, cache, block_length, groups)
        # SDPA turns a bool mask into an additive one (0 / -inf in the query's dtype: two
        # kernels and an allocation) at every call; doing it here once serves every layer.
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask.masked_fill_(~allowed, float("-inf"))
        # row_masked: the rows that hold the mask token, a device tensor like row_valid: the
        # expert-choice capacity schedules read each window's mask ratio from it, no host sync.
        mask_id = self.config.mask_token_id
        windows = dict(first_position=first_position,
                       row_valid=None if attention_mask is None else row_valid,
                       row_masked=None if mask_id is None else input_ids == mask_id)
        delta = None
        for layer in self.layers:
            x, delta = layer(x, cos, sin, mask, cache, write_cache, windows, delta)
        if write_cache:
            cache.advance(row_valid)
        return add_then_norm(x, delta, self.norm)[1]


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    # transformers ties lm_head to the input embeddings when config.tie_word_embeddings is
    # true (and then saves and loads the checkpoint without lm_head.weight).
    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def new_cache(self, batch: int, capacity: int, static: bool = False,
                  scratch: Optional[int] = None) -> BlockKVCache:
        p = self.lm_head.weight
        return BlockKVCache(self.config, batch, capacity, p.dtype, p.device, static=static,
                            scratch=scratch)

    def forward(self, input_ids, position_ids=None, past_key_values: Optional[BlockKVCache] = None,
                attention_mask=None, block_length: int = 32, write_cache: bool = False,
                return_logits: bool = True, float_logits: bool = True, **kwargs):
        """Logits [B, l, V] for l input rows, in fp32 (default) or with float_logits=False in
        the model's dtype (decoding's: its pick reads them so); row i's logits predict token i.

        position_ids [B, l]: absolute positions (default: continue after the cache). Blocks of
        `block_length` are aligned to position 0. past_key_values: a BlockKVCache of finished
        earlier blocks, all visible to every row. attention_mask [B, l]: 1 for real rows, 0 for
        padding (never attended to). write_cache: append these rows' K/V to the cache.
        return_logits=False skips lm_head (a cache-writing forward does not need it).
        float_logits=False returns lm_head's output in the model's dtype: the same values
        (fp32 holds every bf16 exactly) without a fp32 copy of [B, l, V], which at 64
        sequences of 32 rows is 1.3 GB written (0.9 ms on an H200); the decoding loop takes
        them so (decoding.pick_tokens: the greedy pick reads them in their dtype, sampling
        upcasts them). A float_logits that is not a bool is a TypeError.
        """
        if not isinstance(float_logits, bool):  # None or 0 would pick the dtype silently
            raise TypeError(f"float_logits must be a bool, got {float_logits!r}")
        hidden = self.model(input_ids, position_ids, past_key_values, attention_mask,
                            block_length, write_cache)
        logits = self.lm_head(hidden) if return_logits else None
        if logits is not None and float_logits:
            logits = logits.float()
        return CausalLMOutput(logits=logits)


AutoConfig.register(MODEL_TYPE, LLaDA2MoeConfig, exist_ok=True)
AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModel, exist_ok=True)
AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)
