"""Training the tiny arithmetic LLaDA2 MoE of issue 6 (driven by bench/train_tiny.py).

Stage 1 trains from scratch with token routing (the model's own gate). Stage 2 fine-tunes the
same weights with dMoE block routing in the forward pass, as the paper does: no new parameters,
the plain masked-token loss, expert_bias frozen.

Objective (LLaDA2 block diffusion, SFT form). Every sequence is prompt, answer, then eos to the
end of its last 32-token block. Per sample, one block that holds answer tokens is noised: each of
its answer tokens becomes MASK with probability t ~ U(0, 1) (one t per sample); earlier blocks
stay clean, which is the context the decoder has when it reaches that block; later blocks are
left out of the loss (block-causal attention keeps them from touching it). The loss is the plain
mean cross-entropy over all masked tokens of the batch (no 1/t weight: the same minimiser,
lower variance). Prompt tokens are never masked.

Routing in training. Each MoE layer computes its fp32 router logits, takes the expert ids from
`dmoe_triton.route` (no gradient; the same routing the inference path runs), and recomputes the
weights differentiably: sigmoid(logits) gathered at the ids, renormalised, times the routed
scaling factor, so gradients reach the router. For speed the experts then run densely: every
expert on every token, its activations scaled by the token's routing weight (0 when not routed),
which is the same sum as the sparse MoE (`dense_moe_training_forward`, training only).
Stage 1 balances expert load without an auxiliary loss, as LLaDA2 (Ling) trains its router:
after each step, expert_bias rises by `balance_rate` for experts below the mean load and falls
for those above. Stage 2 freezes expert_bias.

Guard. The paper trains with guard 12 and evaluates with guard 16 at E = 256 experts; scaled to
this model's E (12/256 and 16/256 of E, rounded) that is guard 3 in training and 4 in
evaluation for E = 64.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import sys
import time

import torch
import torch.nn.functional as F

from . import tasks
from .config import RouterConfig, RoutingPolicy
from .defaults import scaled_guard
from .models.llada2 import LLaDA2MoeConfig, LLaDA2MoeSparseMoeBlock
from .patch import patch_model, set_policy
from .reference import scaled_weights
from .routing import route

BLOCK = 32
TRAIN_TOP_P = 0.6

SIZES = {
    # ~2.8 M parameters, 5.6 MB in bf16: both checkpoints fit the repo's 12 MB budget.
    "tiny": dict(hidden_size=128, intermediate_size=512, moe_intermediate_size=32,
                 num_hidden_layers=4, num_experts=64, num_experts_per_tok=8, n_group=8,
                 topk_group=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    # For tests on the CPU: one dense and one MoE layer, 16 experts top-4.
    "micro": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=8,
                  num_hidden_layers=2, num_experts=16, num_experts_per_tok=4, n_group=4,
                  topk_group=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16),
}


def model_config(size: str = "tiny") -> LLaDA2MoeConfig:
    """The LLaDA2 layout at toy scale: layer 0 dense, one shared expert, sigmoid gate."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    ids = tasks.token_ids()
    return LLaDA2MoeConfig(
        vocab_size=32, first_k_dense_replace=1, num_shared_experts=1, routed_scaling_factor=2.5,
        partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=4 * BLOCK,
        pad_token_id=ids[tasks.PAD], eos_token_id=ids[tasks.EOS],
        mask_token_id=ids[tasks.MASK], **SIZES[size])


def train_policy(config) -> RoutingPolicy:
    return RoutingPolicy.dmoe(top_p=TRAIN_TOP_P, guard=scaled_guard(config.num_experts, 12))


def eval_policy(config, top_p: float = 0.6) -> RoutingPolicy:
    return RoutingPolicy.dmoe(top_p=top_p, guard=scaled_guard(config.num_experts, 16))


# ---------------------------------------------------------------------------------------------
# Data


def encode_problems(problems):
    """tokens [N, L] (prompt, answer, eos to the end of the last block) and prompt_len [N].

    Vectorised (a million problems in about a second): the texts are padded with NUL to L,
    read as bytes and mapped through a lookup table, NUL becoming eos.
    """
    import numpy as np

    vocab = tasks.token_ids()
    texts = [p.prompt + p.answer for p in problems]
    length = -(-(max(map(len, texts)) + 1) // BLOCK) * BLOCK  # room for at least one eos
    table = np.full(256, -1, dtype=np.int64)
    for c in tasks.CHARS:
        table[ord(c)] = vocab[c]
    table[0] = vocab[tasks.EOS]
    raw = "".join(t.ljust(length, "\0") for t in texts).encode("latin-1", errors="replace")
    ids = table[np.frombuffer(raw, dtype=np.uint8)].reshape(len(texts), length)
    if (ids < 0).any():  # a character outside the alphabet: let encode() name it
        for t in texts:
            tasks.encode(t)
    tokens = torch.from_numpy(ids)
    prompt_len = torch.tensor([len(p.prompt) for p in problems])
    return tokens, prompt_len


def noise_one_block(tokens, prompt_len, mask_id: int, generator=None):
    """Mask one answer block per sample at ratio t ~ U(0, 1) (module docstring).

    Returns (noisy tokens, masked [N, L] bool: the positions that carry the loss).
    """
    N, L = tokens.shape
    dev = tokens.device
    pos = torch.arange(L, device=dev)[None]
    first = prompt_len // BLOCK  # the block of the first answer token
    n_blocks = L // BLOCK
    u = torch.rand(N, generator=generator, device=dev)
    chosen = first + (u * (n_blocks - first)).long().clamp(max=n_blocks - 1 - first)
    t = torch.rand(N, generator=generator, device=dev)
    coin = torch.rand(N, L, generator=generator, device=dev)
    masked = (pos >= prompt_len[:, None]) & (pos // BLOCK == chosen[:, None]) & (coin < t[:, None])
    return torch.where(masked, torch.full_like(tokens, mask_id), tokens), masked


def masked_token_loss(logits, targets, masked):
    """Mean cross-entropy over masked positions (no host sync; 0 if nothing is masked)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    m = masked.flatten().float()
    return (ce * m).sum() / m.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# The training-only MoE forward


def dense_moe_training_forward(mlp, x, router_cfg: RouterConfig, policy: RoutingPolicy,
                               backend: str = "auto", first_position=None, row_valid=None,
                               row_masked=None):
    """A LLaDA2 MoE MLP for training: ids from `route` (no grad), differentiable weights, and
    every expert run on every token with its activations scaled by the token's weight for that
    expert (0 where not routed). Equal to the sparse sum; meant for small models only.
    first_position, row_valid, row_masked: the routing windows (route's arguments), from the
    model."""
    B, L, H = x.shape
    E = router_cfg.num_experts
    with torch.autocast(x.device.type, enabled=False):  # the router runs in fp32
        logits = x.float() @ mlp.gate.weight.float().T
        routed = route(logits.detach(), mlp.gate.expert_bias, router_cfg, policy, backend,
                       first_position=first_position, row_valid=row_valid,
                       row_masked=row_masked)
        ids = routed.topk_ids
        # Routing-spec step 3 from the reference, differentiable in the logits; no row is
        # `bad` here (training logits are finite).
        no_bad = torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        w = scaled_weights(torch.sigmoid(logits), ids.long(), no_bad,
                           router_cfg.routed_scaling_factor)
        combine = torch.zeros(B, L, E, device=x.device).scatter_add(-1, ids.clamp(min=0).long(), w)
    mlp.training_ids = ids  # read by balance_expert_bias
    mlp.last_route = routed  # read by generate's routing statistics
    experts = mlp.experts
    gate = torch.cat([e.gate_proj.weight for e in experts])      # [E*I, H]
    up = torch.cat([e.up_proj.weight for e in experts])          # [E*I, H]
    down = torch.cat([e.down_proj.weight.T for e in experts])    # [E*I, H]
    act = F.silu(F.linear(x, gate)) * F.linear(x, up)            # [B, L, E*I]
    act = (act.view(B, L, E, -1) * combine[..., None].to(act.dtype)).view(B, L, -1)
    out = act @ down.to(act.dtype)
    if mlp.shared_experts is not None:
        out = out + mlp.shared_experts(x)
    return out


@contextlib.contextmanager
def dense_training_routing(model, policy: RoutingPolicy, backend: str = "auto"):
    """Within the block, every MoE MLP of `model` runs `dense_moe_training_forward` under
    `policy`; yields the MoE modules. The model is left as it was afterwards."""
    cfg = RouterConfig.from_hf(model.config)
    policy.check(cfg)
    moes = [m for m in model.modules() if isinstance(m, LLaDA2MoeSparseMoeBlock)]
    if not moes:
        raise ValueError("model has no LLaDA2 MoE MLP to train (was it patched already?)")
    for m in moes:
        m.forward = functools.partial(dense_moe_training_forward, m, router_cfg=cfg,
                                      policy=policy, backend=backend)
        m.policy = policy  # what a DMoEBlock exposes: generate reads its routing window
    try:
        yield moes
    finally:
        for m in moes:
            del m.forward, m.policy
            m.training_ids = None


@torch.no_grad()
def balance_expert_bias(moes, rate: float) -> None:
    """Auxiliary-loss-free load balancing: expert_bias += rate * sign(mean load - load)."""
    for m in moes:
        ids = m.training_ids.reshape(-1).long()
        E = m.gate.expert_bias.numel()
        load = torch.zeros(E + 1, device=ids.device)
        load.scatter_add_(0, torch.where(ids >= 0, ids, E), torch.ones_like(ids, dtype=load.dtype))
        load = load[:E]
        m.gate.expert_bias += rate * torch.sign(load.mean() - load)


# ---------------------------------------------------------------------------------------------
# A training stage


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_stage(model, tokens, prompt_len, policy: RoutingPolicy, *, steps: int, lr: float,
                batch_size: int, seconds: float = float("inf"), balance_rate: float = 0.0,
                warmup: int = 50, desc: str = "train", backend: str = "auto", generator=None,
                log_every: int = 25):
    """Train in place for `steps` steps, or fewer if `seconds` would run out (the step time is
    measured over the first steps and the schedule shortened to fit). Returns a dict with the
    loss per step (floats) and timing."""
    from tqdm import tqdm

    device = tokens.device
    mask_id = model.config.mask_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses, pending = [], []
    calibrate = (10, 40)  # steps between which the step time is measured
    total = steps
    model.train()
    start = time.perf_counter()
    marks = {}
    bar = tqdm(total=total, desc=desc, mininterval=3.0, file=sys.stdout)
    with dense_training_routing(model, policy, backend) as moes:
        step = 0
        while step < total:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, min(warmup, total // 4 + 1))
            idx = torch.randint(tokens.shape[0], (batch_size,), device=device, generator=generator)
            target = tokens[idx]
            noisy, masked = noise_one_block(target, prompt_len[idx], mask_id, generator)
            with autocast:
                logits = model(noisy, block_length=BLOCK).logits
            loss = masked_token_loss(logits, target, masked)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if balance_rate:
                balance_expert_bias(moes, balance_rate)
            pending.append(loss.detach())
            step += 1
            if step in calibrate or step % log_every == 0 or step == total:
                losses += torch.stack(pending).tolist()  # one host sync per log interval
                pending = []
                marks[step] = time.perf_counter()
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
            bar.update(1)
            if step == calibrate[1] and math.isfinite(seconds):
                per_step = (marks[calibrate[1]] - marks[calibrate[0]]) / (calibrate[1] - calibrate[0])
                left = seconds - (time.perf_counter() - start)
                total = min(total, step + max(0, int(left / per_step)))
                bar.total = total
                bar.refresh()
            if time.perf_counter() - start > 1.2 * seconds:  # a safety net, never the plan
                break
    bar.close()
    model.eval()
    elapsed = time.perf_counter() - start
    return dict(losses=losses, steps=step, seconds=elapsed, step_ms=1e3 * elapsed / max(step, 1),
                lr=lr, batch_size=batch_size, policy=str(policy), balance_rate=balance_rate)


# ---------------------------------------------------------------------------------------------
# Validation, saving, plotting


def inference_copy(model, policy: RoutingPolicy, dtype):
    """A patched copy of `model` in `dtype` for decoding under `policy` (the model stays as is)."""
    return patch_model(copy.deepcopy(model).to(dtype).eval(), policy)


def solve_under(model, problems, policy: RoutingPolicy, dtype, batch_size: int = 256,
                patched=None, cuda_graph=None):
    """Decode `problems` under `policy`: (answers, GenerationStats list, path used).

    The path is the inference one (a patched copy: fused route + MoE kernels, CUDA graph on the
    GPU unless `cuda_graph` is False; `patched` reuses one). If that raises, the error is
    printed and the decode falls back to the graph-free run, then to the dense training forward,
    so that one GPU run brings its numbers home; the path used is returned and goes into the
    results.
    """
    attempts = [cuda_graph] if cuda_graph is False else [cuda_graph, False]
    for graph in attempts:
        try:
            fast = patched if patched is not None else inference_copy(model, policy, dtype)
            set_policy(fast, policy)
            answers, stats = tasks.solve(fast, problems, batch_size, cuda_graph=graph)
            return answers, stats, "patched" + (", cuda graph" if stats[0].cuda_graph else "")
        except Exception as err:  # noqa: BLE001 (reported, then the next path)
            print(f"!! patched path (cuda_graph={graph}) failed under {policy}: "
                  f"{type(err).__name__}: {err}", flush=True)
    slow = copy.deepcopy(model).to(dtype).eval()
    with torch.no_grad(), dense_training_routing(slow, policy):
        answers, stats = tasks.solve(slow, problems, batch_size, cuda_graph=False)
    return answers, stats, "dense fallback"


def validate(model, problems, policy: RoutingPolicy, dtype, batch_size: int = 256):
    """(accuracy, mean unique experts per block, path) of `model` on `problems` under `policy`."""
    answers, stats, path = solve_under(model, problems, policy, dtype, batch_size)
    return tasks.accuracy(answers, problems), tasks.mean_unique_experts(stats), path


def save_checkpoint(model, directory: str) -> None:
    """config.json + model.safetensors (bf16; expert_bias stays fp32) + tokenizer files."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    # `.to(bf16)` rounds buffers before the gate casts its bias back to fp32: restore it exactly.
    for (_, mine), (_, theirs) in zip(half.named_buffers(), model.named_buffers()):
        if theirs.dtype == torch.float32 and mine.dtype == torch.float32:
            mine.copy_(theirs)
    half.save_pretrained(directory)
    tasks.save_tokenizer(directory)
