"""Issue 12 item 6: top-1 gates skip the weight normalisation (every LLaDA2 gate normalises only
when top_k > 1), and a `num_shared_experts: 0` checkpoint with the zero-width shared-expert
tensors a published-style save carries loads and runs without a shared expert."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dmoe_triton import RouterConfig, RoutingPolicy, route
from dmoe_triton.models import LLaDA2MoeModelLM
from dmoe_triton.testing import DEVICE, small_model

TOP1 = RouterConfig(16, 1, n_group=4, topk_group=2, routed_scaling_factor=2.5)


@pytest.mark.parametrize("policy", [RoutingPolicy.token(), RoutingPolicy.dmoe(0.5, 2, 8),
                                    RoutingPolicy.capacity(3, 8), RoutingPolicy.des_vote(4, 8)])
def test_top1_kernel_equals_reference_and_weight_is_the_scaled_score(policy):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 16, generator=gen) * 2
    logits[1, 3, 5] = float("nan")
    bias = torch.randn(16, generator=gen) * 0.1
    got = route(logits.to(DEVICE), bias.to(DEVICE), TOP1, policy, backend="triton")
    ref = route(logits, bias, TOP1, policy, backend="reference")
    assert torch.equal(got.topk_ids.cpu(), ref.topk_ids)
    torch.testing.assert_close(got.topk_weights.cpu(), ref.topk_weights, equal_nan=True)
    ids = ref.topk_ids.long()
    want = torch.sigmoid(logits).gather(-1, ids.clamp(min=0)) * 2.5
    want = torch.where(ids >= 0, want, 0.0)
    want[1, 3] = float("nan")
    torch.testing.assert_close(ref.topk_weights, want, equal_nan=True)


def test_the_unpatched_top1_gate_does_not_normalise():
    model = small_model(0, num_experts_per_tok=1, num_hidden_layers=2)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids, w = gate(x)
        ref = route(x @ gate.weight.T, gate.expert_bias, model.config.router_config(),
                    RoutingPolicy.token(), backend="reference")
    assert torch.equal(ids, ref.topk_ids.long())
    torch.testing.assert_close(w, ref.topk_weights)
    assert (w < model.config.routed_scaling_factor).all()  # normalised it would equal it


def _published_style(tmp_path, model, **config_edits):
    """config.json + one model.safetensors of every tensor of `model` (zero-width ones too)."""
    model.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(config_edits)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    return tmp_path


def test_num_shared_experts_zero_loads_its_zero_width_tensors_and_skips_them(tmp_path):
    from dmoe_triton import patch_model

    zero = small_model(0, num_shared_experts=0, num_hidden_layers=2)
    widths = {tuple(v.shape) for k, v in zero.state_dict().items() if "shared_experts" in k}
    assert widths == {(0, 64), (64, 0)}  # what a published-style save carries
    loaded = LLaDA2MoeModelLM.from_pretrained(_published_style(tmp_path, zero)).eval()
    plain = LLaDA2MoeModelLM(type(zero.config)(**{**zero.config.to_dict(),
                                                  "num_shared_experts": None})).eval()
    plain.load_state_dict({k: v for k, v in zero.state_dict().items()
                           if "shared_experts" not in k})
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = plain(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want)
        patched = patch_model(loaded, RoutingPolicy.token(), backend="reference")
        torch.testing.assert_close(patched(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_num_shared_experts_zero_with_real_shared_tensors_is_named(tmp_path):
    one = small_model(0, num_shared_experts=1, num_hidden_layers=2)
    path = _published_style(tmp_path, one, num_shared_experts=0)
    with pytest.raises(ValueError, match="shared_experts"):
        LLaDA2MoeModelLM.from_pretrained(path)
