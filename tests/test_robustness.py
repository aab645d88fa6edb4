"""Issue 11: what users of MoE engines hit (router state under dtype moves, tied heads, router
configs the gate cannot run), each kind with the right value as a test."""
import os

import pytest
import torch
from safetensors.torch import load_file

from dmoe_triton.models import LLaDA2MoeConfig, LLaDA2MoeModelLM
from dmoe_triton.testing import SMALL, small_model

CLOSE_BIAS = 7.0 + 0.003 * torch.arange(SMALL["num_experts"], dtype=torch.float32)


def gates(model):
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@pytest.mark.parametrize("move", ["to_bf16", "half", "bfloat16", "to_fp16_kwarg"])
def test_dtype_moves_keep_fp32_router_state_exact(move):
    model = small_model()
    for g in gates(model):
        g.expert_bias.copy_(CLOSE_BIAS)
    {"to_bf16": lambda m: m.to(torch.bfloat16), "half": lambda m: m.half(),
     "bfloat16": lambda m: m.bfloat16(),
     "to_fp16_kwarg": lambda m: m.to(dtype=torch.float16)}[move](model)
    for g in gates(model):
        assert g.expert_bias.dtype == torch.float32 and torch.equal(g.expert_bias, CLOSE_BIAS)
    assert model.model.layers[0].attention.dense.weight.dtype != torch.float32  # the rest moved


def test_router_choices_survive_a_dtype_move():
    model = small_model()
    for g in gates(model):
        g.expert_bias.copy_(CLOSE_BIAS)
    x = torch.randn(40, SMALL["hidden_size"])
    before = gates(model)[0](x)[0]
    model.to(torch.bfloat16)
    after = gates(model)[0](x.bfloat16())[0]
    agree = (before.sort(-1).values == after.sort(-1).values).all(-1).float().mean()
    assert agree > 0.9  # only the bf16 rounding of x itself may move a near tie


def test_tied_word_embeddings_tie_save_and_load(tmp_path):
    model = small_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.word_embeddings.weight.data_ptr()
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(os.path.join(tmp_path, "model.safetensors"))
    loaded = LLaDA2MoeModelLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.word_embeddings.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_untied_head_stays_its_own():
    model = small_model()
    assert model.lm_head.weight.data_ptr() != model.model.word_embeddings.weight.data_ptr()


@pytest.mark.parametrize("overrides, field", [
    (dict(num_experts=8, n_group=8), "n_group"),
    (dict(num_experts=16, n_group=4, topk_group=1, num_experts_per_tok=8), "num_experts_per_tok"),
    (dict(num_experts=12, n_group=5), "n_group"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(topk_group=9, n_group=4), "topk_group"),
    (dict(routed_scaling_factor=-1.0), "routed_scaling_factor"),
])
def test_a_router_config_the_gate_cannot_run_is_an_error_at_build(overrides, field):
    with pytest.raises(ValueError, match=field):
        LLaDA2MoeConfig(**{**SMALL, **overrides})


@pytest.mark.parametrize("value", [-4, "sixty-four", 2.5])
def test_num_experts_of_the_wrong_kind_is_named(value):
    with pytest.raises((TypeError, ValueError), match="num_experts"):
        LLaDA2MoeConfig(**{**SMALL, "num_experts": value})


def test_non_finite_weights_are_named_at_load(tmp_path):
    from safetensors.torch import save_file

    model = small_model()
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.2.mlp.experts.5.down_proj.weight"][3, 1] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight"):
        LLaDA2MoeModelLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# Issue 12 item 5: LLaDA2.2 config fields


LLADA22_FIELDS = dict(rope_parameters={"rope_type": "default", "rope_theta": 3e6,
                                       "partial_rotary_factor": 0.5},
                      max_position_embeddings=131072, eos_token_id=[1, 5], delete_token_id=7,
                      split_token_id=8)


def test_llada22_config_fields_are_read_and_round_trip(tmp_path):
    config = LLaDA2MoeConfig(**{**SMALL, **LLADA22_FIELDS})
    assert config.rope_theta == 3e6 and config.rotary_dim == SMALL["head_dim"] // 2
    config.save_pretrained(tmp_path)
    again = LLaDA2MoeConfig.from_pretrained(tmp_path)
    for key, value in LLADA22_FIELDS.items():
        assert getattr(again, key) == value, key
    assert again.rope_theta == 3e6


def test_rope_parameters_of_another_rope_type_is_an_error():
    with pytest.raises(ValueError, match="rope_type"):
        LLaDA2MoeConfig(**{**SMALL, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_patched_router_state_survives_a_dtype_move():
    from dmoe_triton import RoutingPolicy, patch_model

    model = small_model()
    for g in gates(model):
        g.expert_bias.copy_(CLOSE_BIAS)
    patch_model(model, RoutingPolicy.token(), backend="reference")
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate_weight")]
    weights = [b.gate_weight.clone() for b in blocks]
    model.to(torch.bfloat16)
    for block, w in zip(blocks, weights):
        assert block.gate_weight.dtype == torch.float32 and torch.equal(block.gate_weight, w)
        assert torch.equal(block.expert_bias, CLOSE_BIAS)
    assert blocks[0].w_gate_up.dtype == torch.bfloat16
