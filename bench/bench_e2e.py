"""End to end: one LLaDA2.0-mini denoising forward against its byte floor (issue 5).

The full published config (LLaDA2MoeConfig() defaults) with RANDOM bf16 weights, built directly
on the GPU (meta tensors, then filled in place: 32.5 GB). A denoising forward processes one
32-token block per sequence against a KV cache of a prefix (512 or 2048 tokens, prefilled by the
model itself); half of the block's tokens are MASK, as in the middle of decoding a block.

Rows, for 1, 4 and 16 sequences: the unpatched model (the official per-expert Python loop, timed
eagerly on a few forwards) and, on the fused kernels (`patch_model`, switched with `set_policy`),
token routing, dMoE top_p 0.5-0.8 (guard 16), DES-vote (38), the Top-4 cap and expert choice
(plain, inside the p=0.6 coreset, and that with linear_reverse capacity), each one forward
captured in a CUDA graph (static cache) and replayed many times (median). Two routings, never
mixed: PLAIN random weights and CALIBRATED (dmoe_triton/calibrate.py: a seeded expert-popularity
skew of the router bias when blocks touch too many experts, or the gate weights with the
directions a block's tokens share removed in part when too few, searched here so that token
routing touches ~70 unique experts per block, the paper's figure for the trained model).

Bytes of a forward = non-expert weights actually read (attention, shared experts, dense layer 0,
fp32 router, norms, lm_head, the block's embedding rows) + the KV cache buffer + for every MoE
layer the UNION over sequences of the experts used x 6.29 MB. Floor = bytes / device-to-device
copy bandwidth (read + write) measured in this process.

    PYTHONUNBUFFERED=1 python bench/bench_e2e.py --out $OUT          # H100, ~5-6 minutes
    python bench/bench_e2e.py --smoke --out /tmp/e2e                 # CPU, tiny config, logic only
`--part a` (calibrated rows, breakdown, generations) / `--part b` (plain rows) split the run.
`--quick` (H100, ~2.5 minutes): calibrated rows for 1 and 16 sequences at prefix 512 and the
breakdown only, written to e2e_quick.{md,json,png}.
`--llada22`: the LLaDA2.2-mini layout (expert_capacity 48, routing window 32, RoPE theta 3e6);
the rows gain "capacity 48", the checkpoint's own block routing, beside dMoE on the same model
(files e2e*_llada22.*).

FP8 experts (issue 16), one sequence, prefix 512, calibrated router, token and dMoE p=0.6:
    PYTHONUNBUFFERED=1 python bench/bench_e2e.py --fp8 --out $OUT     # mini, bf16 then FP8 rows
    PYTHONUNBUFFERED=1 python bench/bench_e2e.py --flash --out $OUT   # LLaDA2.0-flash in FP8
--fp8 times the bf16 model, quantizes its routed and shared experts in place (128 x 128 blocks)
and times the same step again, with the logits' agreement against bf16 per policy (relative
error, argmax agreement); --flash builds LLaDA2.0-flash with random FP8 experts directly on the
GPU (never the 206 GB bf16 model): ms per forward, tokens/s, unique experts, peak memory. Both
take --smoke (the SMALL config on the CPU). Written to e2e_fp8.* / e2e_flash.*.

Serving shapes (issue 14): 16 and 64 sequences at prefix 512, 16 sequences at prefix 2048,
token routing and dMoE p=0.6 (and capacity 48 with --llada22; --policies chooses others):
    PYTHONUNBUFFERED=1 python bench/bench_e2e.py --serving --out $OUT  # H200, ~1.5 minutes
    python bench/bench_e2e.py --smoke --serving --out /tmp/e2e         # CPU: 16 and 64 seqs, tiny
Every shape runs twice: under the router calibrated on ONE sequence (as the other modes: ~70
unique experts per block there, ~48 at 16 sequences) and under the router calibrated on that
batch's own step (70 per block per sequence at 16, resp. 64, sequences; the 16-sequence
calibration, at prefix 512, also serves the prefix-2048 rows); the plain router is restored
before each calibration. The report names each row's calibration in its routing column, and
marks issue 14's targets per calibration. Written to e2e_serving.{md,json,png}.
Time on the H200 (20 layers, 2 policies), estimated from the measured forwards (16 sequences ~15
ms, 64 ~40 ms, 16 at prefix 2048 18-21 ms on the H100; prefill of 16 x 512 ~0.13 s, 64 x 512
~0.47 s), not yet measured whole: model 6 s; three calibrations of ~6-8 knob values, each a new
prefill and a forward: ~1 s, ~1.5 s and ~4 s, plus, when the search raises diversity, one SVD
per MoE layer of the router's inputs ([32 x B, 2048]: at 64 sequences 19 SVDs of 2048 x 2048,
guessed ~5-10 s; the report's notes give each search's seconds); rows (7 trials x 10 replays):
~2.5 s (16 x 512), ~6.5 s (64 x 512), ~3.5 s (16 x 2048) per calibration, ~25 s in all; kernel
compiles for the new shapes. About 60-90 s (+15 s with --llada22's third policy); --budget-s
defaults to 140 s (a shape's rows started before it finish after it: ~10 s at most).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from dmoe_triton import RoutingPolicy, patch_model, set_policy
from dmoe_triton.attention import attention_prep
from dmoe_triton.calibrate import (Calibration, calibrate_router, moe_layers, popularity_skew,
                                   route_summary, router_weights, set_router_bias,
                                   set_router_weights)
from dmoe_triton.decoding import generate, pick_tokens
from dmoe_triton.defaults import scaled_guard, scaled_size
from dmoe_triton.models import LLaDA2MoeConfig
from dmoe_triton.modules import cache_bytes, expert_bytes, non_expert_bytes
from dmoe_triton.moe import moe_forward
from dmoe_triton.patch import Unpatched
from dmoe_triton.norm import add_rms_norm
from dmoe_triton.router import route_hidden
from dmoe_triton.testing import SMALL, build_fp8_model, build_model

# bench/common.py (bench/ is on sys.path as a script)
from common import capture, copy_bandwidth, fmt, graph_ms, random_tokens, time_ms

TOKENS_PER_FORWARD = 2.55  # published average of tokens committed per denoising forward
BLOCK = 32
SEED = 0


@dataclass
class Setup:
    smoke: bool
    device: torch.device
    config: LLaDA2MoeConfig
    batches: tuple
    prefixes: tuple
    target_unique: float
    replays: int            # graph replays per timing trial
    trials: int
    loop_forwards: int      # timed eager forwards of the unpatched model
    gen_length: int
    gen_prompt: int
    deadline: float         # time.time() after which remaining rows are skipped
    notes: List[str] = field(default_factory=list)
    only: Optional[tuple] = None  # --policies: the row names to run (None: every policy)
    shapes: Optional[tuple] = None  # (batch, prefix) rows to run; None: every prefix x batch

    def left(self) -> bool:
        return time.time() < self.deadline

    def grid(self) -> tuple:
        """The (batch, prefix) shapes of the rows, prefix by prefix."""
        if self.shapes is not None:
            return self.shapes
        return tuple((batch, prefix) for prefix in self.prefixes for batch in self.batches)


def policies(config) -> list:
    E = config.num_experts
    guard, size = scaled_guard(E), scaled_size(E)  # 16 and 38 at E = 256
    rows = [("token", RoutingPolicy.token())]
    rows += [(f"dmoe p={p}", RoutingPolicy.dmoe(p, guard)) for p in (0.5, 0.6, 0.7, 0.8)]
    rows += [(f"des_vote {size}", RoutingPolicy.des_vote(size)), ("top-4 cap", RoutingPolicy.topk_cap(4))]
    # Expert choice (issue 15), k = top_k at matched expert FLOPs: plain (every expert reads
    # its c = 32 * 8 / 256 = 1 token), inside the dMoE p=0.6 coreset, and inside it with
    # linear_reverse capacity (k / 4 to 5 k / 4 over the half-masked block's ratio).
    k = config.num_experts_per_tok
    rows += [("ec k=8", RoutingPolicy.expert_choice(k)),
             ("ec-core p=0.6", RoutingPolicy.expert_choice(k, coreset_top_p=0.6, guard=guard)),
             ("ec-core-lr", RoutingPolicy.expert_choice(None, "linear_reverse", max(1, k // 4),
                                                        k + k // 4, coreset_top_p=0.6,
                                                        guard=guard))]
    own = RoutingPolicy.from_config(config)
    if own.kind == "capacity":  # a LLaDA2.2 layout: its own block routing, beside dMoE
        rows.append((f"capacity {own.expert_capacity}", own))
    return rows


def llada22_config(base: dict) -> LLaDA2MoeConfig:
    """The LLaDA2.2-mini layout over `base` (the LLaDA2.0 fields): expert_capacity 48 of 256
    experts (scaled to the expert count, at least 2 * top_k), routing window 32, RoPE theta
    3e6 in transformers 5's rope_parameters form, 131072 positions."""
    E, k = base.get("num_experts", 256), base.get("num_experts_per_tok", 8)
    rope = dict(rope_type="default", rope_theta=3e6,
                partial_rotary_factor=base.get("partial_rotary_factor", 0.5))
    return LLaDA2MoeConfig(**{**base, "expert_capacity": max(2 * k, 48 * E // 256),
                              "block_size": BLOCK, "rope_parameters": rope,
                              "max_position_embeddings": 131072})


# ---------------------------------------------------------------------------------------------
# Inputs and timing


@dataclass
class Step:
    """One denoising forward's inputs: a prefilled static cache and a half-masked block."""

    cache: object
    block: torch.Tensor
    positions: torch.Tensor
    batch: int
    prefix: int


def prepare_step(model, batch: int, prefix: int, seed: int = SEED) -> Step:
    c, dev = model.config, model.lm_head.weight.device
    gen = torch.Generator().manual_seed(seed + 1000 * batch + prefix)
    prompt = random_tokens(c, (batch, prefix), gen).to(dev)
    # Spare rows for the block (as decoding's static cache has): attention reads K/V in place.
    cache = model.new_cache(batch, prefix, scratch=BLOCK)
    with torch.no_grad():
        model(prompt, past_key_values=cache, write_cache=True, return_logits=False,
              block_length=BLOCK)
    cache.static = True  # from here on attention reads the whole (full) buffer: fixed shapes
    block = random_tokens(c, (batch, BLOCK), gen)
    masked = torch.rand(batch, BLOCK, generator=gen) < 0.5
    block = torch.where(masked, c.mask_token_id, block).to(dev)
    positions = torch.arange(prefix, prefix + BLOCK, device=dev).expand(batch, BLOCK).contiguous()
    return Step(cache, block, positions, batch, prefix)


def step_fn(model, step: Step) -> Callable[[], object]:
    """One denoising step as decoding runs it: the forward, with the logits in the model's
    dtype, and the greedy pick (pick_tokens at temperature 0, the default); returns the
    logits."""
    def forward():
        logits = model(step.block, step.positions, past_key_values=step.cache,
                       block_length=BLOCK, float_logits=False).logits
        pick_tokens(logits, 0.0, None, None)
        return logits
    return forward


def time_graphed(fn, setup: Setup, reps: int = 1) -> float:
    """ms per call of fn: a graph of `reps` calls replayed `setup.replays` times per trial."""
    if setup.device.type != "cuda":
        with torch.no_grad():
            return time_ms(fn, 1, 1, setup.device) / 1  # smoke: logic only
    with torch.no_grad():
        graph = capture(fn, reps, warmup=2)
        graph.replay()
        ms = graph_ms(graph, reps, setup.trials, setup.replays)
    del graph
    return ms


# ---------------------------------------------------------------------------------------------
# Rows


def measure_row(model, step: Step, setup: Setup, routing: str, name: str, bandwidth: float,
                unpatched: bool = False) -> dict:
    dev = setup.device
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    fn = step_fn(model, step)
    if unpatched:  # host syncs in the per-expert loop: eager, a few forwards
        with torch.no_grad():
            fn()
            ms = time_ms(fn, 1, setup.loop_forwards, dev)
    else:
        ms = time_graphed(fn, setup)  # routes of the last replay stay in last_route
    summary = route_summary(model, BLOCK)
    per_expert = expert_bytes_cache[id(model)]
    union = summary.union.double()
    nbytes = non_expert_bytes(model, step.batch) + cache_bytes(step.cache) \
        + float(union.sum()) * per_expert
    floor_ms = nbytes / bandwidth * 1e3
    row = dict(routing=routing, policy=name, batch=step.batch, prefix=step.prefix, ms=ms,
               tok_s=step.batch * TOKENS_PER_FORWARD / ms * 1e3, tok_s_1=step.batch / ms * 1e3,
               unique=summary.mean_unique, union=summary.mean_union,
               coreset=None if summary.coreset is None else float(summary.coreset.float().mean()),
               gb=nbytes / 1e9, floor_ms=floor_ms, ratio=ms / floor_ms,
               peak_gb=torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
               resident_gb=float(summary.resident().double().sum()) * per_expert / 1e9,
               graph=not unpatched and dev.type == "cuda")
    print(f"  {routing:10s} {name:12s} B={step.batch:2d} P={step.prefix:4d} {ms:9.3f} ms  "
          f"unique {row['unique']:6.1f} union {row['union']:6.1f}  floor {floor_ms:.3f} ms "
          f"x{row['ratio']:.2f}", flush=True)
    return row


expert_bytes_cache = {}
# Breakdown rows that are not parts of the sum: a share of the row above, or a comparison.
ASIDE = ("of which", "attention, old way", "shared expert, unfused")


def run_rows(model, setup: Setup, routing: str, bandwidth: float, rows: list, loop_batches,
             shapes: Optional[tuple] = None):
    """Rows of every policy (and the unpatched loop at loop_batches) for each (batch, prefix)
    of shapes (default: setup.grid()), labelled `routing`; past the budget a shape's rows are
    skipped and named in setup.notes."""
    for batch, prefix in setup.grid() if shapes is None else shapes:
        if not setup.left():
            setup.notes.append(f"skipped {routing} B={batch} P={prefix}: time budget")
            continue
        set_policy(model, RoutingPolicy.token())
        step = prepare_step(model, batch, prefix)
        for name, policy in policies(setup.config):
            if setup.only is not None and name not in setup.only:
                continue
            set_policy(model, policy)
            rows.append(measure_row(model, step, setup, routing, name, bandwidth))
        if batch in loop_batches and setup.left():
            with Unpatched(model):
                rows.append(measure_row(model, step, setup, routing, "unpatched loop",
                                        bandwidth, unpatched=True))
        del step
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Router calibration


def calibrate_on(model, setup: Setup, batch: int, prefix: int) -> Calibration:
    """Calibrate the router (token routing, setup.target_unique experts per block: the mean over
    the `batch` sequences' blocks and the MoE layers) on a `batch`-sequence step at `prefix`,
    prefilled again at each knob value (the prefix's states depend on the router)."""
    def forward():
        step = prepare_step(model, batch, prefix)
        with torch.no_grad():
            step_fn(model, step)()

    set_policy(model, RoutingPolicy.token())
    calib = calibrate_router(model, forward, setup.target_unique, seed=SEED)
    print(f"calibration at {seqs(batch)}, prefix {prefix}: " + calib.describe(), flush=True)
    return calib


def restore_plain(model, plain_router: list) -> None:
    """The plain router: bias 0 and the random gate weights saved before any calibration."""
    set_router_bias(model, 0 * popularity_skew(len(moe_layers(model)),
                                               model.config.num_experts, SEED))
    set_router_weights(model, plain_router)


def seqs(batch: int) -> str:
    return f"{batch} seq{'s' if batch > 1 else ''}"


def run_serving(model, setup: Setup, bandwidth: float, plain_router: list) -> tuple:
    """--serving (issue 14): the rows of setup.shapes under the router calibrated on ONE
    sequence, then under the router calibrated on each batch's own B-sequence step (both at the
    first prefix; a 16-sequence calibration serves the 16-sequence rows of every prefix). The
    plain router is restored before each calibration, so none starts from another's. Returns
    (rows, {routing label: (Calibration, batch it was calibrated at)})."""
    prefix, rows, calibs = setup.prefixes[0], [], {}
    plans = [(1, setup.shapes)]
    plans += [(b, tuple(s for s in setup.shapes if s[0] == b)) for b in setup.batches]
    for batch, shapes in plans:
        label = f"calibrated at {seqs(batch)}"
        if not setup.left():
            setup.notes.append(f"skipped the calibration at {seqs(batch)} and its rows "
                               f"{', '.join(f'B={b} P={p}' for b, p in shapes)}: time budget")
            continue
        restore_plain(model, plain_router)
        began = time.time()
        calibs[label] = (calibrate_on(model, setup, batch, prefix), batch)
        setup.notes.append(f"{label}: the search took {time.time() - began:.1f} s "
                           f"({len(calibs[label][0].history)} knob values, each a prefill and "
                           "a forward)")
        run_rows(model, setup, label, bandwidth, rows, (), shapes)
    return rows, calibs


# ---------------------------------------------------------------------------------------------
# Where the time goes


def round_robin(calls: list) -> Callable:
    """One call that runs the next of `calls` each time; its `period` is len(calls), the calls
    breakdown graphs (so that a replay's last call and the next replay's first are different
    layers). The part then runs the layers' own weights in turn, as the forward meets them:
    one layer's repeated calls would find its weights in L2 (an H200's 50 MB holds a layer's
    attention, 21 MB, or its dMoE coreset's experts, about 36 MB) and time the part faster than
    the forward runs it (the sixteenth session's parts summed to 1.655 ms against the whole
    forward's 1.884, dMoE p=0.6)."""
    turn = itertools.cycle(calls)

    def call():
        return next(turn)()
    call.period = len(calls)
    return call


def breakdown(model, setup: Setup, batch: int, prefix: int, policy_name: str,
              bandwidth: float) -> dict:
    """Time the parts of one forward separately (each captured in a graph of 20 calls, or of
    one call per layer), on a middle layer's real inputs, scaled by how many layers have that
    part; beside each, the byte floor of that part (its bytes / the copy bandwidth,
    part_bytes). Attention, router and experts run each layer's own weights in turn
    (round_robin) on those inputs."""
    c = model.config
    set_policy(model, dict(policies(c))[policy_name])
    step = prepare_step(model, batch, prefix)
    mid = model.model.layers[c.num_hidden_layers // 2]
    seen = {}

    def keep(key):  # a pre-hook that records its inputs and returns None (changes nothing)
        return lambda module, args, *kwargs: seen.setdefault(key, args) and None
    hooks = [mid.register_forward_pre_hook(keep("layer")),
             mid.mlp.register_forward_pre_hook(keep("mlp_in"))]
    with torch.no_grad():
        step_fn(model, step)()
    for h in hooks:
        h.remove()
    x, cos, sin, mask, cache, _, windows = seen["layer"][:7]
    h_in, block = seen["mlp_in"][0], mid.mlp
    B, L, H = h_in.shape
    with torch.no_grad():  # the routing the layer ran, windows included
        r = route_hidden(h_in, block.gate_weight_for(h_in), block.expert_bias,
                         block.router_cfg, block.policy, block.backend, **windows)
    ids, w = r.topk_ids.reshape(B * L, -1), r.topk_weights.reshape(B * L, -1)
    hidden_final = torch.randn(B, L, H, device=x.device, dtype=x.dtype)
    att = mid.attention
    with torch.no_grad():
        qkv = att.query_key_value(mid.input_layernorm(x))
    k_rows, v_rows = cache.scratch_rows(att.layer_idx, L)
    n_moe = len(moe_layers(model))
    layer0 = model.model.layers[0].mlp
    norms = (mid.input_layernorm, mid.post_attention_layernorm)
    nbytes = part_bytes(model, mid, cache, x, r.topk_ids)
    layers, blocks = model.model.layers, moe_layers(model)
    parts = {
        "attention (norm, QKV, qk-norm, RoPE, SDPA, dense)": (round_robin([
            lambda l=l: l.attention(l.input_layernorm(x), cos, sin, mask, cache, False)
            for l in layers]), c.num_hidden_layers),
        "of which q/k norm + RoPE + K/V into the cache (attention_prep)": (
            lambda: attention_prep(qkv, att.query_layernorm.weight, att.key_layernorm.weight, cos,
                                   sin, att.nh, att.nkv, att.query_layernorm.eps, k_rows, v_rows),
            c.num_hidden_layers),
        "attention, old way (cat cache + SDPA enable_gqa)": (round_robin([
            lambda l=l: old_attention(l, x, cos, sin, mask, cache) for l in layers]),
            c.num_hidden_layers),
        "residual adds + norms (two add_rms_norm)": (
            lambda: [add_rms_norm(x, x, n.weight, n.eps) for n in norms], c.num_hidden_layers),
        "router GEMM (bf16 gate: skinny_gemm or cuBLAS bf16, else fp32) + route (route_hidden)": (
            round_robin([lambda b=b: route_hidden(h_in, b.gate_weight_for(h_in), b.expert_bias,
                                                  b.router_cfg, b.policy, b.backend, **windows)
                         for b in blocks]), n_moe),
        # every layer's experts on the middle layer's routing: the same bytes a layer
        "routed + shared experts (moe_forward)": (round_robin([
            lambda b=b: moe_forward(h_in.reshape(B * L, H), ids, w, b.w_gate_up, b.w_down,
                                    check_ids=False, shared=b.shared_weights()) for b in blocks]),
            n_moe),
        "shared expert, unfused (comparison)": (round_robin([
            lambda b=b: b.shared_expert(h_in) for b in blocks]), n_moe),
        "dense MLP (layer 0)": (lambda: layer0(h_in), 1),
        "final norm + lm_head (+ the greedy pick)": (
            lambda: pick_tokens(model.lm_head(model.model.norm(hidden_final)), 0.0, None, None),
            1),
    }
    out = {"batch": batch, "prefix": prefix, "policy": policy_name, "parts": []}
    for label, (fn, count) in parts.items():
        ms = time_graphed(fn, setup, reps=getattr(fn, "period", 20))
        floor = nbytes.get(label.split(" (")[0], 0) * count / bandwidth * 1e3
        out["parts"].append((label, ms, count, ms * count, floor))
    out["whole_ms"] = time_graphed(step_fn(model, step), setup)
    del step
    return out


def _numel_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def part_bytes(model, layer, cache, x, topk_ids) -> dict:
    """Bytes one call of each breakdown part must move (weights read once, the K/V it reads,
    activations in and out), keyed by the part's label up to its first ' (': the floor column.
    Experts: the experts the middle layer's route used (union over sequences) + the shared one."""
    from dmoe_triton.modules import expert_hits
    att, mlp = layer.attention, layer.mlp
    act = x.numel() * x.element_size()  # one [B, l, H] activation
    kv = cache_bytes(cache) // len(cache.keys)
    attention = _numel_bytes(att.query_key_value.weight, att.dense.weight,
                             layer.input_layernorm.weight) + kv + 2 * act
    used = int(expert_hits(topk_ids, mlp.router_cfg.num_experts).any(0).sum())
    shared = 0 if mlp.shared_expert is None else _numel_bytes(*mlp.shared_expert.parameters())
    lm = model.lm_head.weight
    return {
        "attention": attention,
        "of which q/k norm + RoPE + K/V into the cache": 3 * act,
        "residual adds + norms": 2 * (4 * act + layer.input_layernorm.weight.numel() * 2),
        "router GEMM": _numel_bytes(mlp.gate_weight_for(x), mlp.expert_bias) + act,
        "routed + shared experts": used * expert_bytes_cache[id(model)] + shared + 2 * act,
        "dense MLP": _numel_bytes(*model.model.layers[0].mlp.parameters()) + 2 * act,
        # the logits written once and read once by the pick, in the model's dtype
        "final norm + lm_head": _numel_bytes(lm) + 2 * x.shape[0] * x.shape[1] * lm.shape[0]
        * lm.element_size(),
    }


def old_attention(layer, x, cos, sin, mask, cache):
    """The attention before this benchmark's changes, for the breakdown's comparison: the whole
    cache concatenated with the block's K/V, SDPA with enable_gqa (math kernel with a mask)."""
    from dmoe_triton.models.llada2 import apply_rope
    import torch.nn.functional as F
    att = layer.attention
    h = layer.input_layernorm(x)
    B, L, _ = h.shape
    qkv = att.query_key_value(h).view(B, L, att.nh + 2 * att.nkv, att.hd).transpose(1, 2)
    q, k, v = qkv.split([att.nh, att.nkv, att.nkv], dim=1)
    q, k = apply_rope(att.query_layernorm(q), cos, sin), apply_rope(att.key_layernorm(k), cos, sin)
    n = cache.visible()
    keys = torch.cat((cache.keys[att.layer_idx][:, :, :n], k), dim=2)
    values = torch.cat((cache.values[att.layer_idx][:, :, :n], v), dim=2)
    mask = mask[:, :, :L]  # the model's mask stacks the query heads per KV head: one group
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=att.hd ** -0.5,
                                         enable_gqa=True)
    return att.dense(out.transpose(1, 2).reshape(B, L, att.nh * att.hd))


# ---------------------------------------------------------------------------------------------
# Whole generations


def generations(model, setup: Setup, routing: str, prompt_len: int) -> list:
    c = model.config
    gen = torch.Generator().manual_seed(SEED + 7)
    prompt = random_tokens(c, (prompt_len,), gen).tolist()
    out = []
    for name, policy in policies(c)[: 2 if setup.smoke else None]:
        if not setup.left():
            setup.notes.append(f"skipped generation {routing} {name}: time budget")
            continue
        set_policy(model, policy)
        res = generate(model, [prompt], gen_length=setup.gen_length,
                       cuda_graph=setup.device.type == "cuda", stats=False)
        s = res.stats
        out.append(dict(routing=routing, policy=name, forwards=s.forwards,
                        tokens=s.committed_tokens, ms_forward=s.time_per_forward_s * 1e3,
                        wall_s=s.wall_time_s, tok_s=s.tokens_per_s,
                        tok_s_at_255=TOKENS_PER_FORWARD / s.time_per_forward_s
                        if s.time_per_forward_s else float("nan"),
                        peak_gb=(s.peak_memory_bytes or 0) / 1e9))
        print(f"  generate {routing:10s} {name:12s} {s.forwards} forwards, "
              f"{s.time_per_forward_s * 1e3:.3f} ms/forward, {s.tokens_per_s:.1f} tok/s wall",
              flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Report


def table(rows) -> str:
    head = ("| routing | policy | seqs | prefix | ms/forward | tok/s @2.55 | tok/s @1 | unique/block "
            "| union/layer | coreset | GB touched | floor ms | x floor | peak GB | resident expert GB |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['routing']} | {r['policy']}{'' if r['graph'] else ' (eager)'} | {r['batch']} "
            f"| {r['prefix']} | {fmt(r['ms'], '.3f')} | {fmt(r['tok_s'], '.0f')} "
            f"| {fmt(r['tok_s_1'], '.0f')} | {fmt(r['unique'], '.1f')} | {fmt(r['union'], '.1f')} "
            f"| {fmt(r['coreset'], '.1f')} | {fmt(r['gb'])} | {fmt(r['floor_ms'], '.3f')} "
            f"| {fmt(r['ratio'])} | {fmt(r['peak_gb'], '.1f')} | {fmt(r['resident_gb'])} |")
    return "\n".join(lines)


def find(rows, routing, policy, batch, prefix):
    for r in rows:
        if (r["routing"], r["policy"], r["batch"], r["prefix"]) == (routing, policy, batch, prefix):
            return r
    return None


def met(text, ok) -> str:
    return f"- {text}: **{'met' if ok else 'not met'}**"


def targets(rows, prefix, routing: str = "calibrated") -> List[str]:
    """The end-to-end targets of issue 13 (one sequence) and issue 14 (16 sequences), each
    marked met or not met from this run's rows of `routing`."""
    out = []

    def line(text, ok):
        out.append(met(text, ok))
    for batch, dm_max, tok_max, speedup_min, issue in ((1, 1.6, 1.3, 2.0, 13),
                                                       (16, 1.7, 1.5, 1.6, 14)):
        tok = find(rows, routing, "token", batch, prefix)
        dm = find(rows, routing, "dmoe p=0.6", batch, prefix)
        if dm:
            line(f"issue {issue}: {batch} seq, dMoE p=0.6 at most {dm_max}x its byte floor "
                 f"(prefix {prefix}): x{dm['ratio']:.2f}", dm["ratio"] <= dm_max)
        if tok:
            line(f"issue {issue}: {batch} seq, token routing at most {tok_max}x its floor: "
                 f"x{tok['ratio']:.2f}", tok["ratio"] <= tok_max)
        if dm and tok:
            sp = tok["ms"] / dm["ms"]
            line(f"issue {issue}: {batch} seq, dMoE at least {speedup_min}x faster than token "
                 f"routing on the same kernels: {sp:.2f}x", sp >= speedup_min)
    return out


def new_rows(rows, routing: str, shapes, first_prefix: int) -> List[str]:
    """Issue 14's new rows (every shape but 16 sequences at the first prefix): each present with
    tokens/s at 2.55 per forward per sequence and peak memory (the issue's whole target there);
    beside them, measured, the dMoE speed-up over token routing and x floor (no target set)."""
    out = []
    for batch, prefix in shapes:
        if (batch, prefix) == (16, first_prefix):  # the targets() shape
            continue
        for r in rows:
            if (r["routing"], r["batch"], r["prefix"]) != (routing, batch, prefix):
                continue
            out.append(met(f"issue 14: new row {batch} seq, prefix {prefix}, {r['policy']}: "
                           f"{fmt(r['tok_s'], '.0f')} tokens/s at {TOKENS_PER_FORWARD} per "
                           f"forward per sequence, peak {fmt(r['peak_gb'], '.1f')} GB",
                           r["peak_gb"] is not None))
        tok = find(rows, routing, "token", batch, prefix)
        dm = find(rows, routing, "dmoe p=0.6", batch, prefix)
        if dm and tok:
            out.append(f"- {batch} seq, prefix {prefix}: dMoE p=0.6 {tok['ms'] / dm['ms']:.2f}x "
                       f"faster than token routing; dMoE x{dm['ratio']:.2f} its floor, token "
                       f"x{tok['ratio']:.2f} (issue 14 sets no target at this shape)")
    return out


def serving_sections(rows, setup: Setup, calibs: dict) -> tuple:
    """--serving's 'Routing used' lines (which calibration each row used, and what it gives at
    each batch) and its target lines, per calibration."""
    prefix, used, goals = setup.prefixes[0], [], []
    for label, (calib, batch) in calibs.items():
        mine = sorted({(r["batch"], r["prefix"]) for r in rows if r["routing"] == label})
        gives = "; ".join(f"{r['unique']:.1f} at {seqs(r['batch'])}, prefix {r['prefix']}"
                          for r in rows if r["routing"] == label and r["policy"] == "token")
        where = ", ".join(f"{b} seq prefix {p}" for b, p in mine) or "none, see the notes"
        used.append(f"- **{label}** (rows: {where}): the router "
                    f"calibrated on the step of {seqs(batch)} at prefix {prefix} (unique "
                    "experts per block: mean over its sequences' blocks and the MoE layers): "
                    f"{calib.describe()}." + (f" Token routing unique per block in the rows: "
                                              f"{gives}." if gives else ""))
        goals += [f"Rows {label}:", ""] + targets(rows, prefix, label)
        goals += new_rows(rows, label, setup.shapes, prefix) + [""]
    used.append("- Each calibration starts from the plain router (random weights, bias 0), "
                "restored before it.")
    return used, goals


def report_sections(args, setup: Setup, calibs: dict, rows) -> tuple:
    """The report's 'Routing used' lines and its targets section."""
    if args.serving:
        used, goals = serving_sections(rows, setup, calibs)
        return used + [CAVEAT], ["## Targets of issue 14, per calibration", ""] + goals
    calib = calibs["calibrated"][0] if "calibrated" in calibs else None
    used = ["- **plain**: random weights (std 0.02), router bias 0 (tokens of a block share most "
            "of their hidden state, so they agree more than a trained model's).",
            f"- **calibrated**: {calib.describe() if calib else 'not run in this part'}. "
            + CAVEAT[2:]]
    goals = ["## Targets of issues 13 and 14 (calibrated router)", ""]
    for prefix in setup.prefixes:
        goals += targets(rows, prefix)
    return used, goals


CAVEAT = ("- A skew does not depend on the hidden state, so sequences share popular experts (the "
          "union across sequences is likely smaller than a trained model's); the diversity knob "
          "changes the router's scores, not only its ranking.")


def write_report(path_md, setup, args, bandwidth, calibs, rows, parts, gens, device_name):
    cmd = "python bench/bench_e2e.py " + " ".join(sys.argv[1:])
    used, goals = report_sections(args, setup, calibs, rows)
    layout = 'LLaDA2.2-mini' if args.llada22 else 'LLaDA2.0-mini'
    title = (f"# Serving shapes (issue 14): one {layout} denoising forward for many sequences "
             "(random weights)") if args.serving else \
        f"# End to end: one {layout} denoising forward (random weights)"
    lines = [
        title, "",
        f"Device: {device_name}; torch {torch.__version__}; command: `{cmd}`.",
        f"Copy bandwidth (device-to-device, read + write): {fmt(bandwidth / 1e12, '.3f')} TB/s.",
        "", "Every row: one forward of one 32-token block per sequence (half MASK) against a KV "
        "cache of `prefix` tokens prefilled by the model; fused rows replay a CUDA graph "
        f"(median of {setup.trials} trials of {setup.replays} replays), the unpatched loop runs "
        f"eagerly ({setup.loop_forwards} forwards, median). Tokens/s assume "
        f"{TOKENS_PER_FORWARD} tokens committed per forward per sequence (the published average) "
        "or 1. unique/block: distinct experts a sequence's block used, mean over layers and "
        "sequences; union/layer: distinct experts any sequence used, mean over layers; GB touched "
        "counts that union x 6.29 MB per MoE layer + non-expert weights + the KV buffer; "
        "resident: experts the forward may touch (coreset union for block policies).", "",
        "## Routing used", "", *used, "",
        "## Denoising forward", "", table(rows), ""]
    if parts:
        lines += ["## Where the time goes (parts timed separately, x layers)", ""]
        for p in parts:
            total = sum(t for label, _, _, t, _ in p["parts"] if not label.startswith(ASIDE))
            floor = sum(f for label, _, _, _, f in p["parts"] if not label.startswith(ASIDE))
            lines += [f"Calibrated, {p['policy']}, {p['batch']} sequence(s), prefix {p['prefix']}: "
                      f"whole forward {p['whole_ms']:.3f} ms, sum of parts {total:.3f} ms, "
                      f"their byte floor {floor:.3f} ms "
                      "(rows starting 'of which', 'attention, old way' or 'shared expert, "
                      "unfused' are not in the sum: a share of the row above, comparisons).", "",
                      "| part | ms once | x | ms per forward | byte floor ms per forward "
                      "| x floor |", "|---|---|---|---|---|---|"]
            # A comparison row has no byte floor of its own: n/a, not nan.
            lines += [f"| {label} | {ms:.4f} | {n} | {t:.3f} | {f:.4f} | "
                      f"{f'{t / f:.1f}' if f else 'n/a'} |"
                      for label, ms, n, t, f in p["parts"]]
            lines.append("")
    if gens:
        lines += ["## Whole generations (1 sequence, random prompt, CUDA graph step)", "",
                  f"gen_length {setup.gen_length}, prompt {setup.gen_prompt} tokens, threshold "
                  "0.95. Random weights rarely pass the threshold, so about 1 token per forward; "
                  "tok/s wall includes prefill, graph capture and cache writes.", "",
                  "| routing | policy | forwards | tokens | ms/forward | tok/s wall "
                  "| tok/s @2.55 | peak GB |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {g['routing']} | {g['policy']} | {g['forwards']} | {g['tokens']} "
                  f"| {g['ms_forward']:.3f} | {g['tok_s']:.1f} | {g['tok_s_at_255']:.0f} "
                  f"| {g['peak_gb']:.1f} |" for g in gens]
        lines.append("")
    lines += goals
    if setup.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in setup.notes]
    text = "\n".join(lines) + "\n"
    with open(path_md, "w") as f:
        f.write(text)
    return text


def plot(path_png, rows, bandwidth, model, setup):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(setup.prefixes), figsize=(6 * len(setup.prefixes), 4.5),
                             squeeze=False)
    per_expert, n_moe = expert_bytes_cache[id(model)], len(moe_layers(model))
    routings = list(dict.fromkeys(r["routing"] for r in rows))  # calibrated (C0), plain (C1), ...
    for ax, prefix in zip(axes[0], setup.prefixes):
        for batch, marker in zip(setup.batches, "osD^"):
            pts = [r for r in rows if r["batch"] == batch and r["prefix"] == prefix
                   and r["policy"] != "unpatched loop"]
            if not pts:
                continue
            for i, routing in enumerate(routings):
                sel = [r for r in pts if r["routing"] == routing]
                if sel:  # a calibration at 64 sequences has no 16-sequence rows
                    ax.scatter([r["union"] for r in sel], [r["ms"] for r in sel],
                               marker=marker, color=f"C{i}", label=f"{routing}, {batch} seq")
            base = pts[0]
            fixed = base["gb"] * 1e9 - base["union"] * n_moe * per_expert
            xs = [0, max(r["union"] for r in pts) * 1.05]
            ax.plot(xs, [(fixed + x * n_moe * per_expert) / bandwidth * 1e3 for x in xs], "--",
                    color="gray", lw=1)
        ax.set_xlabel("unique experts per MoE layer (union over sequences)")
        ax.set_ylabel("ms per denoising forward")
        ax.set_title(f"prefix {prefix}; dashed: byte floor")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)


# ---------------------------------------------------------------------------------------------


# LLaDA2.0-flash: LLaDA2.0-mini's layout at these sizes. Sources: /work/shared/docs/llada2.md
# (hidden 4096, 32 layers, intermediate 9216, moe_intermediate 1024, 32 heads); the model card
# https://huggingface.co/inclusionAI/LLaDA2.0-flash ("100BA6B", 103 B parameters); dFactory's
# llada2_flash model config as https://deepwiki.com/inclusionAI/dFactory/6.1-supported-models
# lists it (hidden 4096, 32 heads, 4 KV heads, head_dim 128, moe_intermediate 1024, 256 experts,
# top-8, n_group 8, topk_group 4); https://www.sotaaz.com/post/llada2x-en (32 layers, 32 heads,
# vocab 157184). NOT confirmed from the checkpoint's own config.json: intermediate_size (dense
# layer 0 only; deepwiki's table says 14336). These give 102.8 B parameters, 6.1 B active.
FLASH = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=9216,
             moe_intermediate_size=1024, num_attention_heads=32, num_key_value_heads=4,
             head_dim=128)


def logits_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """FP8 logits `a` against bf16 logits `b` of the same step: relative error, argmax agreement."""
    a, b = a.float(), b.float()
    return dict(logits_rel_err=float((a - b).norm() / b.norm()),
                argmax_agree=float((a.argmax(-1) == b.argmax(-1)).float().mean()))


def fp8_policies(config) -> list:
    return [(n, p) for n, p in policies(config) if n in ("token", "dmoe p=0.6")]


def calibrated_step(model, setup: Setup, prefix: int):
    """Calibrate the router on one sequence (as --quick does), then that sequence's step."""
    return calibrate_on(model, setup, 1, prefix), prepare_step(model, 1, prefix)


def fp8_rows(model, setup: Setup, step: Step, bandwidth: float, label: str, rows: list,
             baseline: Optional[dict] = None) -> dict:
    """Rows of `model` on `step` per FP8 policy (label in the policy column); returns each
    policy's logits (for the agreement with `baseline`'s)."""
    expert_bytes_cache[id(model)] = expert_bytes(model)
    logits = {}
    for name, policy in fp8_policies(setup.config):
        set_policy(model, policy)
        row = measure_row(model, step, setup, "calibrated", f"{name} {label}", bandwidth)
        with torch.no_grad():
            logits[name] = step_fn(model, step)()
        if baseline is not None:
            row.update(logits_agreement(logits[name], baseline[name]))
        rows.append(row)
    return logits


def run_fp8(args, setup: Setup) -> list:
    """--fp8: bf16 rows, then the same model with FP8 experts on the same step; --flash:
    LLaDA2.0-flash built in FP8 on the device."""
    dev, prefix, rows = setup.device, setup.prefixes[0], []
    if args.flash:
        model = build_fp8_model(setup.config, dev, SEED)
    else:
        model = build_model(setup.config, dev, SEED)
    patch_model(model, RoutingPolicy.token())
    bandwidth = copy_bandwidth(dev) if dev.type == "cuda" else 3.0e12
    _, step = calibrated_step(model, setup, prefix)
    if args.flash:
        fp8_rows(model, setup, step, bandwidth, "fp8", rows)
        return rows
    bf16 = fp8_rows(model, setup, step, bandwidth, "bf16", rows)
    before = every_policy_logits(model, setup, step)
    patch_model(model, RoutingPolicy.token(), expert_dtype="fp8")  # in place, layer by layer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    fp8_rows(model, setup, step, bandwidth, "fp8", rows, baseline=bf16)
    after = every_policy_logits(model, setup, step)
    for name in before:  # untimed rows: the agreement of every policy
        rows.append(dict(policy=f"{name} (agreement only)", prefix=step.prefix,
                         **logits_agreement(after[name], before[name])))
    return rows


def every_policy_logits(model, setup: Setup, step: Step) -> dict:
    """The step's logits under every policy of the e2e table (eager forwards, untimed)."""
    out = {}
    for name, policy in policies(setup.config):
        set_policy(model, policy)
        with torch.no_grad():
            out[name] = step_fn(model, step)()
    return out


def write_fp8_report(args, rows, device_name) -> str:
    kind = "flash" if args.flash else "fp8"
    lines = [f"# {'LLaDA2.0-flash, FP8 experts' if args.flash else 'FP8 experts vs bf16'}: "
             f"one sequence, prefix {rows[0]['prefix']}, calibrated router ({device_name})", "",
             "| policy | ms / forward | tokens/s (2.55 / forward) | unique | floor ms | x floor "
             "| peak GB | logits rel err vs bf16 | argmax agree |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {fmt(r.get('ms'), '.3f')} | {fmt(r.get('tok_s'), '.0f')} | "
                     f"{fmt(r.get('unique'), '.1f')} | {fmt(r.get('floor_ms'), '.3f')} | "
                     f"{fmt(r.get('ratio'))} | {fmt(r.get('peak_gb'))} | "
                     f"{fmt(r.get('logits_rel_err'), '.2e')} | {fmt(r.get('argmax_agree'), '.3f')} |")
    pair = {r["policy"]: r for r in rows if "ms" in r}
    fp8, bf16 = pair.get("dmoe p=0.6 fp8"), pair.get("dmoe p=0.6 bf16")
    if fp8 and bf16:
        # The floors' ratio bounds what any kernel can reach: only the routed and shared experts
        # are FP8, the rest of the forward's bytes (attention, lm_head, cache) are not.
        lines += ["", f"dMoE p=0.6: FP8 / bf16 time = {fp8['ms'] / bf16['ms']:.2f} (target <= "
                      f"0.65); FP8 / bf16 byte floor = {fp8['floor_ms'] / bf16['floor_ms']:.2f} "
                      "(the ratio at which both run at their floors)"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"e2e_{kind}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"e2e_{kind}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return text


def make_setup(args) -> Setup:
    deadline = time.time() + args.budget_s
    if args.smoke:
        small = llada22_config(SMALL) if args.llada22 else LLaDA2MoeConfig(**SMALL)
        setup = Setup(True, torch.device("cpu"), small, (1, 2), (32,) if args.quick else (32, 64),
                      args.target_unique or 9.0, 1, 1, 1, 8, 40, deadline)
    else:
        # --layers cuts the published config to fewer layers (the GPU smoke run): same shapes
        # per layer, so every kernel and launch choice is the full model's.
        base = {} if args.layers is None else dict(num_hidden_layers=args.layers)
        if getattr(args, "flash", False):
            base = {**FLASH, **base}
        config = llada22_config(base) if args.llada22 else LLaDA2MoeConfig(**base)
        batches, prefixes = ((1, 16), (512,)) if args.quick else ((1, 4, 16), (512, 2048))
        setup = Setup(False, torch.device("cuda"), config, batches, prefixes,
                      args.target_unique or 70.0, 20, 7, 3, 128, args.gen_prompt, deadline)
    if getattr(args, "serving", False):
        # Issue 14's shapes: 16 and 64 sequences at the first prefix, 16 at the second (the
        # smoke keeps the batches, the tiny prefixes); a 64-sequence forward takes ~40 ms on
        # the H200, so 7 trials of 10 replays.
        first, second = setup.prefixes
        setup.batches, setup.shapes = (16, 64), ((16, first), (64, first), (16, second))
        setup.replays = min(setup.replays, 10)
        # token, dMoE p=0.6 and a LLaDA2.2 layout's own capacity routing (--policies overrides)
        setup.only = tuple(name for name, policy in policies(setup.config)
                           if name in ("token", "dmoe p=0.6") or policy.kind == "capacity")
    return setup


def parse_args(argv) -> tuple:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU, no timings")
    ap.add_argument("--part", choices=("all", "a", "b"), default="all",
                    help="a: calibrated rows, breakdown, generations; b: plain rows")
    ap.add_argument("--quick", action="store_true",
                    help="calibrated rows for 1 and 16 sequences at the first prefix + breakdown, "
                         "no generations, no plain rows (e2e_quick.*)")
    ap.add_argument("--serving", action="store_true",
                    help="issue 14's serving rows: 16 and 64 sequences at prefix 512, 16 at 2048, "
                         "router calibrated at 1 sequence and at each batch (e2e_serving.*)")
    ap.add_argument("--fp8", action="store_true", help="bf16 vs FP8-experts rows (e2e_fp8.*)")
    ap.add_argument("--flash", action="store_true",
                    help="LLaDA2.0-flash with random FP8 experts built on the GPU (e2e_flash.*)")
    ap.add_argument("--target-unique", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip remaining rows after this many seconds (report says so); "
                         "default 480, --quick 130, --serving 140")
    ap.add_argument("--gen-prompt", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None,
                    help="layers of the published config to build (default: all 20); the GPU "
                         "smoke run (bench/smoke_gpu.sh) uses 4")
    ap.add_argument("--llada22", action="store_true",
                    help="the LLaDA2.2-mini layout (expert_capacity 48, window 32): rows gain "
                         "'capacity 48', its own routing, beside dMoE (e2e*_llada22.*)")
    ap.add_argument("--policies", default=None,
                    help="comma-separated row names to run, e.g. 'token,dmoe p=0.6' (default: "
                         "every policy; the GPU smoke run takes three)")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 140.0 if args.serving else 130.0 if args.quick else 480.0
    if args.quick and args.part != "all":
        ap.error("--quick runs its own selection; leave --part out")
    if args.serving and (args.quick or args.part != "all" or args.fp8 or args.flash):
        ap.error("--serving runs its own selection; leave --quick, --part, --fp8 and --flash out")
    if args.fp8 or args.flash:
        args.quick = True  # one sequence at the first prefix: the quick setup's
        if args.fp8 and args.flash:
            ap.error("--fp8 and --flash are separate runs")
    return ap, args


def ready_model(setup: Setup, start: float) -> tuple:
    """The bf16 model patched with token routing, and the copy bandwidth in bytes/s."""
    dev = setup.device
    model = build_model(setup.config, dev, SEED)
    patch_model(model, RoutingPolicy.token())
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    expert_bytes_cache[id(model)] = expert_bytes(model)
    bandwidth = copy_bandwidth(dev) if dev.type == "cuda" else 3.0e12  # smoke: nominal
    print(f"model ready in {time.time() - start:.0f} s; copy bandwidth "
          f"{bandwidth / 1e12:.3f} TB/s", flush=True)
    return model, bandwidth


def run_parts(args, model, setup: Setup, bandwidth: float, plain_router: list) -> tuple:
    """--part a (calibrated rows, breakdown, generations) and b (plain rows), or --quick's
    selection. Returns (rows, parts, generations, {"calibrated": (Calibration, 1)})."""
    rows, parts, gens, calibs = [], [], [], {}
    loop_batches = setup.batches  # the unpatched loop is ~1 s per forward on an H100: all fit
    if args.quick:
        loop_batches = setup.batches[:1]  # its 16-sequence row alone takes ~6 s
    if args.part in ("all", "a"):
        # Calibrate on the targets' own step: ONE sequence at the first prefix, token routing.
        # The 16-sequence rows keep that router, whatever their blocks then touch.
        one = setup.batches[0]
        calibs["calibrated"] = (calibrate_on(model, setup, one, setup.prefixes[0]), one)
        run_rows(model, setup, "calibrated", bandwidth, rows, loop_batches)
        for prefix in setup.prefixes[: 1 if setup.smoke else None]:
            if setup.left():
                parts.append(breakdown(model, setup, 1, prefix, "token", bandwidth))
                parts.append(breakdown(model, setup, 1, prefix, "dmoe p=0.6", bandwidth))
        if not args.quick:
            gens += generations(model, setup, "calibrated", setup.gen_prompt)
    if args.part in ("all", "b") and not args.quick:
        restore_plain(model, plain_router)
        run_rows(model, setup, "plain", bandwidth, rows, loop_batches)
        gens += generations(model, setup, "plain", setup.gen_prompt)
    return rows, parts, gens, calibs


def main(argv=None):
    ap, args = parse_args(argv)
    start = time.time()
    setup = make_setup(args)
    if args.policies is not None:
        setup.only = tuple(name.strip() for name in args.policies.split(","))
        known = [name for name, _ in policies(setup.config)]
        unknown = [name for name in setup.only if name not in known]
        if unknown:
            ap.error(f"--policies: unknown row name(s) {unknown}; expected some of {known}")
    os.makedirs(args.out, exist_ok=True)
    suffix = "_serving" if args.serving else "_quick" if args.quick else (
        "" if args.part == "all" else f"_{args.part}")
    suffix += "_llada22" if args.llada22 else ""
    torch.manual_seed(SEED)
    dev = setup.device
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke)"
    print(f"device {device_name}; building the model", flush=True)
    if args.fp8 or args.flash:
        print(write_fp8_report(args, run_fp8(args, setup), device_name))
        print(f"done in {time.time() - start:.0f} s", flush=True)
        return 0

    model, bandwidth = ready_model(setup, start)
    plain_router = router_weights(model)  # the calibration may change gate weights: restore
    if args.serving:
        (rows, calibs), parts, gens = run_serving(model, setup, bandwidth, plain_router), [], []
    else:
        rows, parts, gens, calibs = run_parts(args, model, setup, bandwidth, plain_router)

    md = os.path.join(args.out, f"e2e{suffix}.md")
    text = write_report(md, setup, args, bandwidth, calibs, rows, parts, gens, device_name)
    calib = calibs.get("calibrated", (None,))[0]
    with open(os.path.join(args.out, f"e2e{suffix}.json"), "w") as f:
        json.dump(dict(rows=rows, parts=parts, generations=gens, bandwidth=bandwidth,
                       calibration=None if calib is None else calib.__dict__,
                       calibrations={label: dict(c.__dict__, batch=b, prefix=setup.prefixes[0])
                                     for label, (c, b) in calibs.items()},
                       notes=setup.notes), f, indent=1)
    plot(os.path.join(args.out, f"e2e{suffix}.png"), rows, bandwidth, model, setup)
    print(text)
    print(f"done in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
