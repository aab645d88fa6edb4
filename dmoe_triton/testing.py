"""Small random LLaDA2 models for the tests and the benchmarks' smoke runs (one home, so that no
test imports a bench script or repeats a config)."""
from __future__ import annotations

import torch

from .models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM

# Where the tests run the kernels: the GPU when there is one, else the CPU under Triton's
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# A CPU-sized LLaDA2 layout: one dense layer, two MoE layers of 16 experts top-4, shared expert
# (also bench_e2e --smoke's model).
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_hidden_layers=3, first_k_dense_replace=1, num_experts=16, num_experts_per_tok=4,
             n_group=4, topk_group=2, num_shared_experts=1, routed_scaling_factor=2.5,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
             rope_theta=600000.0, rms_norm_eps=1e-6, eos_token_id=1, pad_token_id=1,
             mask_token_id=2)

# A GPU-sized one: 64 experts top-8, bf16.
GPU_CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
                  num_hidden_layers=3, first_k_dense_replace=1, num_experts=64,
                  num_experts_per_tok=8, n_group=8, topk_group=4, num_shared_experts=1,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, eos_token_id=1,
                  pad_token_id=1, mask_token_id=2)


def small_model(seed: int = 0, **overrides) -> LLaDA2MoeModelLM:
    """A random fp32 SMALL model whose every weight matters (norms, router bias not at their
    init)."""
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("gate.weight"):
                p.normal_(0, 0.3)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.expert_bias.normal_(0, 0.05)
    return model


def gpu_model(seed: int = 0) -> LLaDA2MoeModelLM:
    """A random GPU_CONFIG model in bf16 on CUDA, router logits of order one."""
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**GPU_CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.1)
        for layer in model.model.layers[1:]:
            layer.mlp.gate.expert_bias.normal_(0, 0.05)
    return model.to("cuda", torch.bfloat16)


def micro_model(seed: int = 0) -> LLaDA2MoeModelLM:
    """The micro arithmetic model of training.SIZES with a non-zero router bias (so that ranking
    and weighing differ)."""
    from .training import model_config

    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(model_config("micro"))
    for m in model.modules():
        if hasattr(m, "expert_bias"):
            m.expert_bias.copy_(0.05 * torch.randn_like(m.expert_bias))
    return model


def micro_data(n: int = 8, seed: int = 0):
    """(tokens, prompt_len) of n training problems, encoded for training."""
    from . import tasks
    from .training import encode_problems

    return encode_problems(tasks.sample_problems("train", n, seed))


def build_model(config, device, seed: int = 0) -> LLaDA2MoeModelLM:
    """Random bf16 weights created on `device` with no CPU copy: meta tensors first, then memory
    on the device, filled in place (std 0.02, norms 1, router bias 0)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LLaDA2MoeModelLM(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():
            b.zero_()
    return model.eval()


def build_fp8_model(config, device, seed: int = 0) -> LLaDA2MoeModelLM:
    """build_model's random model with FP8 routed and shared experts, made on `device` without
    ever holding the model-dtype experts (LLaDA2.0-flash: 206 GB in bf16, ~106 GB so): patched
    and quantized on the meta device, then memory on the device, filled in place (to_empty;
    the shared experts are stacked again by DMoEBlock._apply). Expert weights are e4m3
    values of N(0, 64) (clamped to +-448) with block scales 0.02 / 64 (x a seeded factor in
    [0.5, 1.5]), so they dequantize to std ~0.02 like build_model's; other weights std 0.02,
    norms 1, router bias 0."""
    from .modules import refresh_gate_copies
    from .patch import patch_model
    from .quant import FP8_DTYPE, FP8_MAX

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = patch_model(LLaDA2MoeModelLM(config), expert_dtype="fp8")
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype == FP8_DTYPE:
                for chunk in t:  # one expert at a time: no large temporary
                    chunk.copy_(torch.randn(chunk.shape, generator=gen, device=device,
                                            dtype=torch.bfloat16).mul_(64).clamp_(-FP8_MAX, FP8_MAX))
            elif name.endswith(("_scale", "weight_scale_inv")):
                t.uniform_(0.5, 1.5, generator=gen).mul_(0.02 / 64)
            elif name.endswith("norm.weight"):
                t.fill_(1.0)
            elif name.endswith("expert_bias"):
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=gen)
    refresh_gate_copies(model)  # gate weights were written in place (and their copies apart)
    return model.eval()
