"""dmoe_triton/training.py (bench/train_tiny.py's library) on a microscopic config, on the CPU: noising, the dense training MoE
forward against the model's own MoE paths, and a few training steps."""
import pytest
import torch

from dmoe_triton import RouterConfig, RoutingPolicy
from dmoe_triton import training as tt
from dmoe_triton.models import LLaDA2MoeModelLM
from dmoe_triton.moe import DMoEBlock
from dmoe_triton.testing import micro_data, micro_model


def test_noise_masks_only_answer_tokens_of_one_block():
    g = torch.Generator().manual_seed(0)
    tokens, prompt_len = micro_data(64)
    two_blocks = torch.cat((tokens, tokens), dim=1)  # a second answer block to choose from
    for data in (tokens, two_blocks):
        noisy, masked = tt.noise_one_block(data, prompt_len, 19, g)
        pos = torch.arange(data.shape[1])
        assert not (masked & (pos < prompt_len[:, None])).any()
        assert torch.equal(noisy[~masked], data[~masked])
        assert (noisy[masked] == 19).all()
        blocks_hit = [(m.view(-1, tt.BLOCK).any(1)).sum() for m in masked]
        assert max(blocks_hit) <= 1
    assert masked[:, tt.BLOCK:].any() and masked[:, :tt.BLOCK].any()  # both blocks get chosen


@pytest.mark.parametrize("policy", [RoutingPolicy.token(), RoutingPolicy.dmoe(0.6, guard=2)])
def test_dense_training_forward_equals_the_inference_moe(policy):
    model = micro_model()
    mlp = model.model.layers[1].mlp
    cfg = RouterConfig.from_hf(model.config)
    x = torch.randn(3, 40, model.config.hidden_size)  # 40 rows: a full and a partial block
    with torch.no_grad():
        dense = tt.dense_moe_training_forward(mlp, x, cfg, policy, backend="reference")
        block = DMoEBlock(cfg, policy, mlp.gate.weight, mlp.gate.expert_bias,
                          torch.stack([torch.cat((e.gate_proj.weight, e.up_proj.weight))
                                       for e in mlp.experts]),
                          torch.stack([e.down_proj.weight for e in mlp.experts]),
                          mlp.shared_experts, backend="reference")
        torch.testing.assert_close(dense, block(x), rtol=1e-4, atol=1e-5)
        if policy.kind == "token":  # the model's own gate and expert loop
            torch.testing.assert_close(dense, mlp(x), rtol=1e-4, atol=1e-5)


def test_router_gets_gradients_and_bias_balancing_moves_the_bias():
    model = micro_model()
    tokens, prompt_len = micro_data()
    moe = model.model.layers[1].mlp
    bias_before = moe.gate.expert_bias.clone()
    with tt.dense_training_routing(model, tt.train_policy(model.config), "reference") as moes:
        noisy, masked = tt.noise_one_block(tokens, prompt_len, model.config.mask_token_id)
        loss = tt.masked_token_loss(model(noisy).logits, tokens, masked)
        loss.backward()
        assert torch.equal(moe.gate.expert_bias, bias_before)  # frozen unless balanced
        tt.balance_expert_bias(moes, 1e-3)
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    step = (moe.gate.expert_bias - bias_before).abs()
    torch.testing.assert_close(step, torch.full_like(step, 1e-3))
    assert "forward" not in vars(moe)  # the context restored the model's own forward


def test_training_steps_on_cpu_lower_the_loss():
    model = micro_model()
    tokens, prompt_len = micro_data(16)
    g = torch.Generator().manual_seed(0)
    record = tt.train_stage(model, tokens, prompt_len, RoutingPolicy.token(), steps=12, lr=3e-3,
                            batch_size=16, balance_rate=1e-3, warmup=2, generator=g,
                            backend="reference", log_every=4)
    losses = record["losses"]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    record = tt.train_stage(model, tokens, prompt_len, tt.train_policy(model.config), steps=3,
                            lr=1e-3, batch_size=16, warmup=1, generator=g, backend="reference")
    assert record["steps"] == 3 and all(torch.isfinite(torch.tensor(record["losses"])))


def test_checkpoint_round_trip(tmp_path):
    model = micro_model()
    tt.save_checkpoint(model, str(tmp_path))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / name).exists()
    loaded = LLaDA2MoeModelLM.from_pretrained(str(tmp_path))
    assert loaded.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    torch.testing.assert_close(loaded.model.layers[1].mlp.gate.expert_bias,
                               model.model.layers[1].mlp.gate.expert_bias)
