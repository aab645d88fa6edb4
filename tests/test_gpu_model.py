"""The LLaDA2 model on CUDA: the graphed decoding step and the fused MoE path against the
unpatched model (collected only with a GPU)."""
import copy

import pytest
import torch

from dmoe_triton import RoutingPolicy, generate, patch_model
from dmoe_triton.models import LLaDA2MoeConfig, LLaDA2MoeModelLM
from dmoe_triton.testing import GPU_CONFIG, gpu_model

pytestmark = pytest.mark.gpu

@pytest.mark.parametrize("policy", [RoutingPolicy.token(), RoutingPolicy.dmoe(0.6, 4)])
def test_graphed_generate_gives_the_eager_tokens(policy):
    model = patch_model(gpu_model(), policy)
    prompts = [[5, 6, 7, 8, 9] * 9, [11, 12, 13]]
    eager = generate(model, prompts, gen_length=64, cuda_graph=False, stats=False)
    graphed = generate(model, prompts, gen_length=64, cuda_graph=True, stats=False)
    assert graphed.stats.cuda_graph and not eager.stats.cuda_graph
    assert graphed.tokens == eager.tokens


def test_patched_token_policy_matches_the_unpatched_model_in_bf16():
    model = gpu_model(1)
    ids = torch.randint(3, 500, (2, 64), device="cuda")
    with torch.no_grad():
        unpatched = model(ids).logits
        patched = patch_model(copy.deepcopy(model), RoutingPolicy.token())(ids).logits
    # bf16 activations: the fused kernels round at other points than the per-expert loop.
    torch.testing.assert_close(patched, unpatched, rtol=0.05, atol=0.05)
    agree = (patched.argmax(-1) == unpatched.argmax(-1)).float().mean()
    assert agree > 0.9


def test_training_step_under_autocast():
    """bench/train_tiny.py's step: fp32 parameters, bf16 autocast (issue 17: the fused attention
    prep refused the bf16 projection beside fp32 RoPE tables)."""
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**GPU_CONFIG)).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 500, (4, 64), device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids, block_length=32).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    # Inference under autocast too (no grad, the fused kernels' branch): the eager ops run.
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("policy", [RoutingPolicy.token(), RoutingPolicy.dmoe(0.6, 4),
                                    RoutingPolicy.capacity(16)])
def test_fused_step_replays_in_a_graph_at_a_long_prefix(policy):
    """Issue 13's fused path in one denoising step (route_hidden, add_rms_norm, attention split
    over 1100 cached keys): the graph's replay gives the eager logits bit for bit, and the step
    agrees with the model's eager ops (the unfused reference path)."""
    from dmoe_triton import launch
    model = patch_model(gpu_model(), policy)
    prompt = torch.randint(3, 500, (1, 1088), device="cuda")
    cache = model.new_cache(1, 1088, scratch=32)
    block = torch.randint(3, 500, (1, 32), device="cuda")
    positions = torch.arange(1088, 1120, device="cuda")[None]
    with torch.no_grad():
        model(prompt, past_key_values=cache, write_cache=True, return_logits=False)
        cache.static = True
        assert launch.attention_launch(1, 1088 + 32).key_splits > 1
        step = lambda: model(block, positions, past_key_values=cache).logits  # noqa: E731
        eager = step().clone()
        graph = torch.cuda.CUDAGraph()
        step()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # eager_ops: the reference path
            reference = step()
    agree = (eager.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree > 0.9
