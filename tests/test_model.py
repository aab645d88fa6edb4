"""LLaDA2 model: numerics against an independent eager forward, checkpoint names, loading errors,
the block KV cache."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from dmoe_triton.models import BlockKVCache, LLaDA2MoeConfig, LLaDA2MoeModel, LLaDA2MoeModelLM
from dmoe_triton.testing import SMALL, small_model


# ---------------------------------------------------------------------------------------------
# An independent eager forward, written from ../shared/docs/llada2.md over the state dict.


def rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu(sd, prefix, x):
    g = x @ sd[f"{prefix}.gate_proj.weight"].T
    u = x @ sd[f"{prefix}.up_proj.weight"].T
    return (torch.nn.functional.silu(g) * u) @ sd[f"{prefix}.down_proj.weight"].T


def official_gate(logits, bias, c):
    """Per token: sigmoid, + bias to rank, groups scored by their top-2 sum, top-k in kept groups."""
    s = torch.sigmoid(logits)
    ids, weights = [], []
    size = c.num_experts // c.n_group
    for row_s in s:
        r = row_s + bias
        group_score = [float(r[g * size:(g + 1) * size].topk(2).values.sum()) for g in range(c.n_group)]
        kept = sorted(range(c.n_group), key=lambda g: -group_score[g])[: c.topk_group]
        candidates = [e for g in kept for e in range(g * size, (g + 1) * size)]
        top = sorted(candidates, key=lambda e: -float(r[e]))[: c.num_experts_per_tok]
        w = row_s[top] / row_s[top].sum() * c.routed_scaling_factor
        ids.append(top)
        weights.append(w)
    return ids, weights


def eager_forward(model, input_ids, block_length):
    c = model.config
    sd = {k: v.float() for k, v in model.state_dict().items()}
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    rd = int(hd * c.partial_rotary_factor)
    B, L = input_ids.shape
    x = sd["model.word_embeddings.weight"][input_ids]
    pos = torch.arange(L, dtype=torch.float64)
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    ang = pos[:, None] * inv_freq[None]
    # [L, 1, rd]: broadcast over heads of q/k laid out [B, L, heads, hd]
    cos = torch.cat([ang.cos()] * 2, -1).float()[:, None]
    sin = torch.cat([ang.sin()] * 2, -1).float()[:, None]

    def rope(t):  # NeoX halves on the first rd dims
        a, b = t[..., : rd // 2], t[..., rd // 2: rd]
        rotated = torch.cat([-b, a], -1)
        return torch.cat([t[..., :rd] * cos + rotated * sin, t[..., rd:]], -1)

    blk = torch.arange(L) // block_length
    allowed = blk[None, :] <= blk[:, None]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        h = rms(x, sd[f"{p}.input_layernorm.weight"], c.rms_norm_eps)
        qkv = h @ sd[f"{p}.attention.query_key_value.weight"].T
        q = qkv[..., : nh * hd].view(B, L, nh, hd)
        k = qkv[..., nh * hd: (nh + nkv) * hd].view(B, L, nkv, hd)
        v = qkv[..., (nh + nkv) * hd:].view(B, L, nkv, hd)
        q = rope(rms(q, sd[f"{p}.attention.query_layernorm.weight"], c.rms_norm_eps))
        k = rope(rms(k, sd[f"{p}.attention.key_layernorm.weight"], c.rms_norm_eps))
        k = k.repeat_interleave(nh // nkv, dim=2)
        v = v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, nh * hd)
        x = x + attn @ sd[f"{p}.attention.dense.weight"].T
        h = rms(x, sd[f"{p}.post_attention_layernorm.weight"], c.rms_norm_eps)
        if i < c.first_k_dense_replace:
            x = x + swiglu(sd, f"{p}.mlp", h)
            continue
        flat = h.reshape(B * L, -1)
        ids, weights = official_gate(flat @ sd[f"{p}.mlp.gate.weight"].T,
                                     sd[f"{p}.mlp.gate.expert_bias"], c)
        routed = torch.zeros_like(flat)
        for e in range(c.num_experts):  # the per-expert loop
            for t in range(B * L):
                if e in ids[t]:
                    y = swiglu(sd, f"{p}.mlp.experts.{e}", flat[t])
                    routed[t] += weights[t][ids[t].index(e)] * y
        x = x + routed.view(B, L, -1) + swiglu(sd, f"{p}.mlp.shared_experts", h)
    x = rms(x, sd["model.norm.weight"], c.rms_norm_eps)
    return x @ sd["lm_head.weight"].T


def test_logits_match_an_independent_eager_forward():
    model = small_model()
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        ours = model(ids, block_length=8).logits
    ref = eager_forward(model, ids, block_length=8)
    assert ours.dtype == torch.float32 and ours.shape == (2, 20, 96)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_logits_in_the_model_dtype_are_the_fp32_logits_before_the_copy():
    """float_logits=False (what decoding asks for) returns lm_head's output in the model's
    dtype; the default is its fp32 copy, the same values."""
    model = small_model().to(torch.bfloat16)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(ids, block_length=8, float_logits=False).logits
        fp32 = model(ids, block_length=8).logits
    assert plain.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert torch.equal(plain.float(), fp32)
    with pytest.raises(TypeError, match="float_logits must be a bool, got None"):
        model(ids, block_length=8, float_logits=None)


def test_block_causal_attention():
    model = small_model()
    ids = torch.randint(0, 96, (1, 24))
    changed = ids.clone()
    changed[0, 17] = (ids[0, 17] + 1) % 96  # a token of the third block of 8
    with torch.no_grad():
        a, b = model(ids, block_length=8).logits, model(changed, block_length=8).logits
    torch.testing.assert_close(a[:, :16], b[:, :16], rtol=1e-5, atol=1e-5)  # earlier blocks blind
    assert (a[0, 16] - b[0, 16]).abs().max() > 1e-3  # inside the block: bidirectional


# ---------------------------------------------------------------------------------------------
# Config and checkpoints


def test_config_defaults_are_the_published_mini_checkpoint():
    c = LLaDA2MoeConfig()
    assert (c.hidden_size, c.intermediate_size, c.moe_intermediate_size, c.num_hidden_layers) == (
        2048, 5120, 512, 20)
    assert (c.num_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 8, 8, 4)
    assert (c.num_shared_experts, c.first_k_dense_replace, c.routed_scaling_factor) == (1, 1, 2.5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim) == (16, 4, 128, 64)
    assert (c.rope_theta, c.rms_norm_eps, c.use_bias, c.use_qkv_bias, c.use_qk_norm) == (
        600000.0, 1e-6, False, False, True)
    assert (c.vocab_size, c.eos_token_id, c.mask_token_id, c.tie_word_embeddings) == (
        157184, 156892, 156895, False)
    assert AutoConfig.for_model("llada2_moe").model_type == "llada2_moe"


def official_names(c):
    names = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        names |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                  f"{p}.attention.query_key_value.weight", f"{p}.attention.query_layernorm.weight",
                  f"{p}.attention.key_layernorm.weight", f"{p}.attention.dense.weight"}
        mlps = [f"{p}.mlp"] if i < c.first_k_dense_replace else (
            [f"{p}.mlp.experts.{e}" for e in range(c.num_experts)] + [f"{p}.mlp.shared_experts"])
        names |= {f"{m}.{w}_proj.weight" for m in mlps for w in ("gate", "up", "down")}
        if i >= c.first_k_dense_replace:
            names |= {f"{p}.mlp.gate.weight", f"{p}.mlp.gate.expert_bias"}
    return names


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A bf16 sharded checkpoint (with index) of the small model, and the model."""
    model = small_model().to(torch.bfloat16)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path, max_shard_size="40KB")
    return path, model


def test_save_writes_the_official_names_sharded(saved):
    path, model = saved
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == official_names(model.config)
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    tensors = {}
    for shard in shards:
        tensors.update(load_file(path / shard))
    assert tensors["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.attention.query_key_value.weight"].shape == ((4 + 2 * 2) * 16, 64)


@pytest.mark.parametrize("auto", [LLaDA2MoeModelLM, AutoModelForCausalLM])
def test_load_round_trip(saved, auto):
    path, model = saved
    loaded = auto.from_pretrained(path)
    assert isinstance(loaded, LLaDA2MoeModelLM)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[2].mlp.gate.expert_bias.dtype == torch.float32
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits)


def test_bare_model_loads_from_a_full_checkpoint(saved):
    assert isinstance(AutoModel.from_pretrained(saved[0]), LLaDA2MoeModel)


def edited_copy(src, dst, edit):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    shard = index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors = load_file(src / shard)
    edit(tensors, "model.layers.1.mlp.experts.3.up_proj.weight")
    save_file(tensors, dst / shard, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("kind,edit,needle", [
    ("missing", lambda t, n: t.pop(n), "missing tensors: model.layers.1.mlp.experts.3.up_proj"),
    ("extra", lambda t, n: t.__setitem__("model.layers.1.mlp.extra.weight", t[n].clone()),
     "unexpected tensors: model.layers.1.mlp.extra.weight"),
    ("shape", lambda t, n: t.__setitem__(n, torch.zeros(3, 64, dtype=torch.bfloat16)),
     "mis-shaped tensors: model.layers.1.mlp.experts.3.up_proj.weight (checkpoint [3, 64]"),
])
def test_bad_checkpoint_is_an_error_naming_the_tensor(saved, tmp_path, kind, edit, needle):
    bad = edited_copy(saved[0], tmp_path, edit)
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_pretrained(bad)
    assert needle in str(err.value)


def test_config_json_keeps_unknown_keys_and_rejects_what_it_cannot_run(tmp_path):
    c = LLaDA2MoeConfig(**SMALL, rotary_dim=8, auto_map={"AutoConfig": "x.Y"})
    c.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, LLaDA2MoeConfig) and again.rotary_dim == 8
    with pytest.raises(ValueError, match="rope_scaling"):
        LLaDA2MoeConfig(**SMALL, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LLaDA2MoeConfig(**{**SMALL, "num_key_value_heads": 3})


# ---------------------------------------------------------------------------------------------
# KV cache of finished blocks


@pytest.mark.parametrize("static", [False, True])
def test_cached_block_equals_full_forward(static):
    model = small_model()
    bl = 8
    ids = torch.randint(0, 96, (2, 3 * bl))
    cache = model.new_cache(2, 4 * bl, static=static)
    for layer_keys in cache.keys:
        layer_keys.fill_(float("nan")) if not static else None  # unwritten rows are never read
    with torch.no_grad():
        full = model(ids, block_length=bl).logits
        model(ids[:, : 2 * bl], past_key_values=cache, write_cache=True, return_logits=False,
              block_length=bl)
        assert cache.length == 2 * bl
        last = model(ids[:, 2 * bl:], past_key_values=cache, block_length=bl).logits
    torch.testing.assert_close(last, full[:, 2 * bl:], rtol=1e-5, atol=1e-5)


def test_left_padding_by_whole_blocks_changes_nothing():
    """Padding rows (masked keys, own positions) leave a sequence's logits as they were alone."""
    model = small_model()
    bl = 8
    ids = torch.randint(3, 96, (1, 2 * bl))
    padded = torch.cat([torch.ones(1, bl, dtype=torch.long), ids], 1)
    positions = torch.arange(-bl, 2 * bl)[None]
    valid = positions >= 0
    with torch.no_grad():
        alone = model(ids, block_length=bl).logits
        out = model(padded, positions, attention_mask=valid, block_length=bl).logits
        assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, bl:], alone, rtol=1e-5, atol=1e-5)


def test_cache_errors():
    model = small_model()
    ids = torch.randint(0, 96, (1, 8))
    with pytest.raises(ValueError, match="write_cache"):
        model(ids, write_cache=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 9))
    cache = model.new_cache(1, 8)
    assert isinstance(cache, BlockKVCache)
    with torch.no_grad():
        model(ids, past_key_values=cache, write_cache=True)
        with pytest.raises(ValueError, match="full"):
            model(ids, past_key_values=cache, write_cache=True)
    assert math.isclose(cache.valid.float().mean().item(), 1.0)


def test_public_generate_stays_the_function_after_its_module_is_imported():
    import importlib

    import dmoe_triton

    importlib.import_module(dmoe_triton.generate.__module__)
    from dmoe_triton import generate
    assert callable(generate) and generate.__name__ == "generate"


# ---------------------------------------------------------------------------------------------
# Autocast (issue 17): training runs the model under bf16 autocast, which mixes dtypes (a bf16
# QKV projection beside fp32 RoPE tables). The fused paths step aside for the eager ops there,
# and the router stays fp32. CPU autocast reproduces the mix, so the kind is tested here too.


def test_training_step_under_autocast_runs_the_eager_ops():
    model = small_model().train()
    ids = torch.randint(3, 96, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, block_length=8).logits
    loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert model.model.layers[0].attention.query_key_value.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("patched", [False, True])
def test_router_stays_fp32_under_autocast(patched):
    from dmoe_triton import RoutingPolicy, patch_model

    model = small_model()
    if patched:
        patch_model(model, RoutingPolicy.token(), backend="reference")
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 20, SMALL["hidden_size"])
    with torch.no_grad():
        plain = mlp(x)
        ids = mlp.last_route.topk_ids.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mlp(x)
    assert torch.equal(mlp.last_route.topk_ids, ids)
    assert plain.dtype == torch.float32


@pytest.mark.parametrize("expert_dtype", [None, "fp8"])
def test_patched_model_pickles(expert_dtype):
    """torch.save / torch.load of a whole patched model (its hooks are module-level functions)
    gives the same logits, the shared expert still one stack."""
    import io

    from dmoe_triton import RoutingPolicy, patch_model

    model = patch_model(small_model(), RoutingPolicy.token(), backend="reference",
                        expert_dtype=expert_dtype)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    block = again.model.layers[1].mlp
    assert block.shared_expert.gate_proj.weight.data_ptr() == block.shared_gate_up.data_ptr()
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_cast_stacks_the_shared_expert_again():
    """A cast gives every tensor new memory: the patched block stacks its shared expert again,
    so the module's projections stay views of what the kernels read (an edit reaches them)."""
    from dmoe_triton import RoutingPolicy, patch_model

    model = patch_model(small_model(), RoutingPolicy.token(), backend="reference").double()
    block = model.model.layers[1].mlp
    gate = block.shared_expert.gate_proj.weight
    assert gate.dtype == torch.float64 and gate.data_ptr() == block.shared_gate_up.data_ptr()
    with torch.no_grad():
        gate.mul_(2.0)
    assert torch.equal(block.shared_gate_up[: gate.shape[0]], gate)
