"""moe_forward at LLaDA2.0-mini shapes against the byte floor and transformers 5 (issue 3).

    PYTHONUNBUFFERED=1 python bench/bench_moe.py --sweep --out $OUT    # GPU, ~3 min on an H100
    python bench/bench_moe.py --smoke                                   # CPU, interpreter, ~4 min
    PYTHONUNBUFFERED=1 python bench/bench_moe.py --fp8 --out $OUT       # GPU, FP8 rows, ~1 min
    PYTHONUNBUFFERED=1 python bench/bench_moe.py --fp8 --sweep --out $OUT   # + FP8 variants, ~90 s
    python bench/bench_moe.py --smoke --fp8 [--sweep]                   # CPU check of those

One process: measure the device-to-device copy bandwidth; build 4 copies of one MoE layer's
experts (E=256, H=2048, I=512, bf16: 1.61 GB each) so L2 (50 MB) cannot hold what a call reads;
check moe_forward (bf16) against the fp32 reference on every routing below (abort if off); then,
for each routing, time under a CUDA graph that calls the layer once per weight copy:
  - experts: moe_forward alone on fixed ids / weights;
  - layer: route() from fp32 logits, then moe_forward (the MoE layer minus the router GEMM and
    the shared expert);
  - transformers 5 experts (Qwen3MoeExperts: the same weight layout) on the same routing:
    `grouped_mm` graphed if it can be captured, and the `eager` per-expert loop (it syncs, so it
    runs ungraphed, a few calls only).
Bytes = unique experts x 6.29 MB; floor = bytes / copy bandwidth.
Routings: 32 tokens with exactly 8 / 15 / 32 / 70 unique experts (logits built so that route()
picks a known set: each token's 8 experts inside 4 groups), uniform random logits (~163 unique),
dMoE on uniform logits; and 4 / 16 blocks (128 / 512 tokens, one block per sequence); expert
choice's balanced shapes (issue 15): plain EC (256 experts x 1 token) and EC inside the coreset
(16 x 16), route()'s [T, E] ids, and once compacted to [T, picks] to show that layout's cost.
--sweep first times a handful of DecodeConfig variants per launch (gate/up, down + combine) at
15 and 70 unique experts, and benchmarks with the best of each launch.
Writes moe.md, moe.png and moe.json under --out (default $OUT, else bench/results).
--fp8 (issue 16) times FP8 e4m3 experts with 128 x 128 block scales instead (bf16 activations,
dequantized in the k loop, launch.DEFAULT_DECODE_FP8 / DEFAULT_GROUPED_FP8) at 32 tokens with
15 / 70 unique experts and 16 x 32 tokens, beside bf16 (its defaults) on the same routing, both
e4m3 reads (native, sm_89+; byte-decoded, the pre-sm_89 path); bytes = unique x (3.15 MB of
e4m3 + 768 B of fp32 scales); writes moe_fp8.md / moe_fp8.json. With --sweep it first times
FP8_DECODE_VARIANTS at 15 and 70 unique (with an FP8 shared expert, as the model's layer runs
them) and FP8_GROUPED_VARIANTS at 16 x 32 tokens (each checked against the reference before it
is timed), prints each with its % of copy bandwidth
counting FP8 bytes and the best config of each path, then writes the table with those (native
reads only).
--smoke runs everything but the timing on the CPU under TRITON_INTERPRET=1 (routings, unique
counts, moe_forward vs the reference on a small layer, the peers, the md and png from made-up
times) so this script can be checked without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

if "--smoke" in sys.argv:  # before any @triton.jit is created
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from dmoe_triton import RouterConfig, RoutingPolicy, launch, route  # noqa: E402
from dmoe_triton.launch import (DEFAULT_DECODE, DEFAULT_DECODE_FP8, DEFAULT_GROUPED,  # noqa: E402
                                DEFAULT_GROUPED_FP8, DecodeConfig, fit_scale_blocks)
from dmoe_triton.moe import (decode_down_combine, decode_gate_up, down_arrivals,  # noqa: E402
                             fp8_activation_groups, moe_forward_triton)
from dmoe_triton.quant import dequantize_experts, dequantize_shared, quantize_experts  # noqa: E402
from dmoe_triton.reference import moe_forward_reference  # noqa: E402
# bench/common.py: bench/ is on sys.path as a script
from common import capture, copy_bandwidth, fmt, graph_ms  # noqa: E402

E, H, I, TOP_K, BLOCK = 256, 2048, 512, 8, 32
CFG = RouterConfig(num_experts=E, top_k=TOP_K, n_group=8, topk_group=4, routed_scaling_factor=2.5)
COPIES = 4
DTYPE = torch.bfloat16
EXPERT_BYTES = 3 * H * I * 2  # gate + up + down, bf16
MAX_REL_ERR = 1e-2            # bf16 vs the fp32 reference (the method's half-precision bound)
SWEEP_UNIQUE = (15, 70)
QUICK_CASES = ("32 tok, exact 15", "32 tok, exact 17", "32 tok, exact 70", "2x32 tok, exact 15",
               "2x32 tok, exact 70", "4x32 tok, exact 15")


# ---------------------------------------------------------------------------------------------
# Routings
# ---------------------------------------------------------------------------------------------

def exact_logits(n_seq, unique, gen):
    """Logits [n_seq, 32, E] for which route() (token policy, no bias) picks exactly `unique`
    experts per block: the block's set lies in 4 groups, token t takes set[(8t + j) % unique]
    (logit +4, every other expert -4), so the 4 groups it uses are the 4 the gate keeps."""
    group = E // CFG.n_group
    logits = -4 + 0.1 * torch.randn(n_seq, BLOCK, E, generator=gen)
    for q in range(n_seq):
        groups = torch.randperm(CFG.n_group, generator=gen)[: CFG.topk_group]
        pool = torch.cat([g * group + torch.arange(group) for g in groups.tolist()])
        chosen = pool[torch.randperm(len(pool), generator=gen)[:unique]]
        for t in range(BLOCK):
            picks = chosen[(t * TOP_K + torch.arange(TOP_K)) % unique]
            logits[q, t, picks] = 4 + 0.1 * torch.randn(TOP_K, generator=gen)
    return logits


def cases(gen):
    """(name, logits [n_seq, 32, E], policy, exact unique per block or None)."""
    out = [(f"32 tok, exact {u}", exact_logits(1, u, gen), RoutingPolicy.token(), u)
           for u in (8, 15, 32, 70)]
    out.append(("32 tok, uniform", torch.randn(1, BLOCK, E, generator=gen),
                RoutingPolicy.token(), None))
    out.append(("32 tok, dmoe(uniform)", torch.randn(1, BLOCK, E, generator=gen),
                RoutingPolicy.dmoe(), None))
    for n in (4, 16, 64):
        out.append((f"{n}x32 tok, exact 15", exact_logits(n, 15, gen), RoutingPolicy.token(), 15))
        out.append((f"{n}x32 tok, uniform", torch.randn(n, BLOCK, E, generator=gen),
                    RoutingPolicy.token(), None))
    return out + expert_choice_cases(gen) + decode_edge_cases(gen)


def decode_edge_cases(gen):
    """Shapes at the decode path's edges (drawn last, so the cases above keep their routings):
    17 experts, past one wave of gate/up items on a 132-SM GPU (16 experts and the shared one
    make 136 items of 64 columns; docs/moe.md), and two blocks, 64 tokens, the decode path's
    largest call, with dMoE's and token routing's expert counts (at 70 a block, the act rows
    by expert, U x 64 of them, are the most the down reads from L2; twentieth session)."""
    return [("32 tok, exact 17", exact_logits(1, 17, gen), RoutingPolicy.token(), 17),
            ("2x32 tok, exact 15", exact_logits(2, 15, gen), RoutingPolicy.token(), 15),
            ("2x32 tok, exact 70", exact_logits(2, 70, gen), RoutingPolicy.token(), 70)]


def expert_choice_cases(gen):
    """The balanced shapes expert choice makes (docs/routing.md, Expert choice), ids [T, E]:
    plain EC on uniform logits, every expert takes c = 32 * 8 / 256 = 1 token; EC inside the
    coreset on the exact-15 logits (coreset = the guard's 16), each takes c = 256 / 16 = 16;
    the same shape with the ids compacted to the row's picks (the [T, E] layout's cost)."""
    core = RoutingPolicy.expert_choice(TOP_K, coreset_top_p=0.6, guard=16)
    out = [("32 tok, EC k=8 (c=1)", torch.randn(1, BLOCK, E, generator=gen),
            RoutingPolicy.expert_choice(TOP_K), 256)]
    logits = exact_logits(1, 15, gen)
    out += [("32 tok, EC-core 16 (c=16)", logits, core, 16),
            ("32 tok, EC-core 16 compact", logits, core, 16),
            ("4x32 tok, EC-core 16", exact_logits(4, 15, gen), core, 16)]
    return out


def compact(ids, weights):
    """Each row's filled slots first, cut to the fullest row's count (bench only: a host sync)."""
    order = torch.sort((ids < 0).to(torch.int8), dim=-1, stable=True).indices
    width = max(1, int((ids >= 0).sum(-1).max()))
    return ids.gather(-1, order)[:, :width].contiguous(), weights.gather(-1, order)[:, :width].contiguous()


def unique_counts(ids):
    """(distinct experts in the whole layer call, mean distinct experts per 32-token block)."""
    blocks = ids.reshape(-1, BLOCK * ids.shape[-1]).cpu()
    per_block = [len(set(b[b >= 0].tolist())) for b in blocks]
    flat = ids.reshape(-1).cpu()
    return len(set(flat[flat >= 0].tolist())), sum(per_block) / len(per_block)


def build_routings(device, route_backend):
    """Every case routed once (for the checks and the experts-only timing), unique counts checked."""
    gen = torch.Generator().manual_seed(0)
    routed = []
    for name, logits, policy, exact in cases(gen):
        logits = logits.to(device)
        r = route(logits, None, CFG, policy, route_backend)
        T = logits.shape[0] * BLOCK
        ids, weights = r.topk_ids.view(T, -1), r.topk_weights.view(T, -1)  # EC: [T, E]
        if name.endswith("compact"):
            ids, weights = compact(ids, weights)
        u_layer, u_block = unique_counts(ids)
        if exact is not None and u_block != exact:
            raise SystemExit(f"routing {name!r}: {u_block} unique experts per block, wanted {exact}")
        routed.append(dict(case=name, logits=logits, policy=policy, ids=ids, weights=weights,
                           tokens=T, unique_layer=u_layer, unique_block=u_block))
    return routed


# ---------------------------------------------------------------------------------------------
# Correctness before timing
# ---------------------------------------------------------------------------------------------

def rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def check_routings(routed, layer, decode_configs, max_err):
    """moe_forward's kernels (each decode config) vs the fp32 reference on every routing."""
    wg, wd = layer
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for row in routed:
        hidden = torch.randn(row["tokens"], wg.shape[2], generator=gen).to(wg.device, wg.dtype)
        ref = moe_forward_reference(hidden.float(), row["ids"], row["weights"], wg, wd)
        for config in decode_configs:
            out = torch.full_like(hidden, float("nan"))  # poison: every row must be written
            y = moe_forward_triton(hidden, row["ids"], row["weights"], wg, wd, out=out,
                                   decode=config)
            err = rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf")
            row["err"] = max(row.get("err", 0.0), err)
            worst = max(worst, err)
            if not err <= max_err:
                raise SystemExit(f"moe_forward is off on {row['case']!r} with {config}: "
                                 f"relative error {err:.2e} > {max_err:.0e}")
    print(f"moe_forward vs fp32 reference on {len(routed)} routings x {len(decode_configs)} "
          f"config(s): max relative error {worst:.2e} (bound {max_err:.0e})")
    return worst


# ---------------------------------------------------------------------------------------------
# Timing (GPU)
# ---------------------------------------------------------------------------------------------

def graph_us(fn):
    """Median microseconds per layer call of a graph of COPIES calls (common.graph_ms)."""
    graph = capture(fn)
    for _ in range(10):
        graph.replay()
    return 1e3 * graph_ms(graph, COPIES)


def cpu_us(fn):
    """The smoke test's stand-in for graph_us: one call, wall time."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6 / COPIES


def few_calls_us(fn, calls=3):
    """Ungraphed, for slow code (transformers' eager loop): one warm-up, median of `calls`."""
    fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] * 1000 / COPIES


# ---------------------------------------------------------------------------------------------
# Sweep of the decode path's launch configs (32 tokens)
# ---------------------------------------------------------------------------------------------

# Gate/up variants around DEFAULT_DECODE (block_i 64, 4 stages of 128-wide k steps: 163840
# bytes of shared memory, one program per SM, tests/test_fit.py). k steps of 64 (81920 bytes)
# with two programs per SM: second, so that `--quick --sweep` times it. Each fits in shared
# memory at 32 tokens (offline compile; 3 stages of 256 and 6 stages of 128 did not); 2 and 3
# programs per SM of the default do not fit together (a second wave).
GATE_UP_VARIANTS = [dict(), dict(k_tile_gate_up=64, programs_per_sm=2), dict(block_i=16),
                    dict(block_i=32), dict(k_tile_gate_up=256, stages_gate_up=2),
                    dict(k_tile_gate_up=64, stages_gate_up=8), dict(warps_gate_up=8),
                    dict(stages_gate_up=3), dict(programs_per_sm=2), dict(programs_per_sm=3)]
# Down variants around DEFAULT_DECODE (64 columns, 8 warps, 5 stages of 256-wide k steps: the
# expert list's load takes one, so 3 tile buffers: one step's tiles in flight during a step's
# MMAs, Triton 3.6 on sm_90); each fits in shared memory at 32 tokens, the sweep's size
# (stages_down 7 only there). block_h 32 is the transposed product at 32 columns (below
# wgmma's 64), not the tokens-on-M tile the default replaced. The last one, and k steps of
# 512, take half the steps per program, each twice the bytes (2 weight tiles in flight: 163972
# / 196740 bytes at 32 tokens, compiled offline for sm_90; 3 and 4 stages compile alike).
# stages_down 7 and k steps of 128 at 9 stages keep 4 and 5 tile buffers (6 stages keep the
# default's 3): a deeper prefetch, tried as the down's act and weight loads add up rather than
# overlap (bench/results/h200-2026-12-01-s18); both were slower than the default on the H200
# (17.5 / 18.8 against 16.0 us at 15 experts, bench/results/h200-2026-12-01-s19).
DOWN_VARIANTS = [dict(), dict(down_splits=2), dict(down_splits=8), dict(warps_down=4),
                 dict(block_h=32, warps_down=4), dict(block_h=32, down_splits=8, warps_down=4),
                 dict(block_h=16, warps_down=4), dict(k_tile_down=128),
                 dict(k_tile_down=512, stages_down=3), dict(stages_down=7), dict(stages_down=4),
                 dict(k_tile_down=128, stages_down=9), dict(down_splits=1),
                 dict(block_h=128, down_splits=8, stages_down=4)]


def shared_experts(layers):
    """A shared expert per weight copy, (gate_up [2I, H], down [H, I]) with a routed expert's
    strides, as LLaDA2's MoE layers carry one: the decode launches run it beside the routed
    experts, so a launch shape is timed on the work the model gives it."""
    return [(wg[0].clone(), wd[0].clone()) for wg, wd in layers]


def launch_closures(layers, shared, ids, weights, hidden, config, scales=None):
    """The two decode launches (with the shared expert), each alone over the weight copies
    (inputs made once here). scales: FP8 layers' Fp8Scales per copy (with the shared
    expert's in .shared: fp8_shared_experts), the config then fitted as moe_forward fits it;
    the gate/up closure includes the activations' prepass launch (decode_gate_up's)."""
    arrivals = [down_arrivals(hidden.shape[1], hidden.device, config) for _ in layers]
    gate_up_fp8 = down_fp8 = [{} for _ in layers]  # per copy: the launches' FP8 arguments
    if scales is not None:
        bits = launch.fp8_bits(hidden.device)
        config = fit_scale_blocks(config, scales[0].block[1])
        gate_up_fp8 = [dict(fp8=(s.gate_up, s.block, bits), shared_scale=s.shared[0])
                       for s in scales]
        down_fp8 = [dict(fp8=(s.down, s.block, bits), shared_scale=s.shared[1]) for s in scales]
    acts = [decode_gate_up(hidden, ids, weights, wg, a, config, sgu, **f)
            for (wg, *_), (sgu, _), a, f in zip(layers, shared, arrivals, gate_up_fp8)]
    out = torch.empty_like(hidden)

    def gate_up():
        for (wg, *_), (sgu, _), a, f in zip(layers, shared, arrivals, gate_up_fp8):
            decode_gate_up(hidden, ids, weights, wg, a, config, sgu, **f)

    def down():
        for (_, wd, *_), (_, sd), act, a, f in zip(layers, shared, acts, arrivals, down_fp8):
            decode_down_combine(act, ids, weights, wd, out, a, config, sd, **f)

    return gate_up, down


def best_change(label, changes, measure, percents):
    """Time each change (a dict of config fields) with measure(change) -> (times, err); print
    each with percents(times) -> ["%"...]; return the change of the lowest mean time relative to
    the first (a variant off the reference is shown, never picked; one that fails to compile or
    launch, e.g. out of shared memory, is skipped)."""
    scores, base = [], None
    for change in changes:
        try:
            times, err = measure(change)
        except Exception as exc:
            print(f"  {label:8s} {json.dumps(change):56s} failed: {type(exc).__name__}: "
                  f"{str(exc)[:100]}")
            continue
        base = base or times
        score = sum(t / b for t, b in zip(times, base)) / len(times)
        if err <= MAX_REL_ERR:
            scores.append((score, change))
        cells = "  ".join(f"{t:7.1f} ({p:3.0f}%)" for t, p in zip(times, percents(times)))
        print(f"  {label:8s} {json.dumps(change or 'default'):56s} {cells}  rel {score:.3f}  "
              f"err {err:.1e}", flush=True)
    best = min(scores, key=lambda s: s[0])[1] if scores else {}
    print(f"  {label}: best {json.dumps(best or 'default')}")
    return best


def sweep(layers, routed, bw, timer=None, variants=None):
    """Time each decode launch's variants at 15 and 70 unique experts, the shared expert
    included (shared_experts: 16 and 71 experts' bytes); return the best combination.

    timer(fn) -> us per layer call; graph_us on the GPU (the smoke test passes a CPU stand-in).
    variants: time only the first this many variants of each launch (None: all).
    """
    timer = timer or graph_us
    picked = [next(r for r in routed if r["case"] == f"32 tok, exact {u}") for u in SWEEP_UNIQUE]
    wg = layers[0][0]
    hidden = torch.randn(BLOCK, wg.shape[2], device=wg.device, dtype=wg.dtype)
    shared = shared_experts(layers)
    refs = [moe_forward_reference(hidden.float(), r["ids"], r["weights"], *layers[0],
                                  shared=shared[0]) for r in picked]
    floors = {"gate_up": 2 / 3 * EXPERT_BYTES / bw / 1e3, "down": 1 / 3 * EXPERT_BYTES / bw / 1e3}
    print(f"sweep: each launch alone, us per layer call at {SWEEP_UNIQUE} unique experts + the "
          "shared one (% of that launch's byte floor in brackets)")

    def measure(launch, change):
        config = dataclasses.replace(DEFAULT_DECODE, **change)
        times, err = [], 0.0
        for row, ref in zip(picked, refs):
            y = moe_forward_triton(hidden, row["ids"], row["weights"], *layers[0], decode=config,
                                   shared=shared[0])
            err = max(err, rel_err(y, ref) if bool(torch.isfinite(y).all()) else 1.0)
            launches = dict(zip(("gate_up", "down"), launch_closures(
                layers, shared, row["ids"], row["weights"], hidden, config)))
            times.append(timer(launches[launch]))
        return times, err

    best = {launch: best_change(
        launch, changes[:variants] if variants else changes, lambda c, lc=launch: measure(lc, c),
        lambda ts, lc=launch: [100 * (u + 1) * floors[lc] / t for t, u in zip(ts, SWEEP_UNIQUE)])
        for launch, changes in (("gate_up", GATE_UP_VARIANTS), ("down", DOWN_VARIANTS))}
    return dataclasses.replace(DEFAULT_DECODE, **best["gate_up"], **best["down"])


# ---------------------------------------------------------------------------------------------
# Sweep of the grouped path's launch configs (several blocks; issue 14)
# ---------------------------------------------------------------------------------------------

# One knob changed at a time from the default; gate/up knobs and down knobs are then combined.
# (The default is the best of the first sweep of 2026-11-30, whose variants were block_i 32 /
# 64 / 128, warps 8, block_m 16, k tile 64, programs per SM 1 / 3, block_h 64 / 128.)
GROUPED_GATE_UP_VARIANTS = [dict(), dict(block_m=64),
                            dict(block_i=128), dict(stages_gate_up=3, programs_per_sm=3),
                            dict(block_m=64, block_i=128, warps_gate_up=8)]
# block_h 256 halves the act rows' re-reads from L2 (once per block_h slice of a tile: about
# 560 MB at 64 x 32 tokens with block_h 128, as many bytes as the down's weights); added in the
# tenth session, not yet timed.
GROUPED_DOWN_VARIANTS = [dict(), dict(block_h=64, warps_down=4, stages_down=6),
                         dict(k_tile_down=128, stages_down=3), dict(block_h=256, stages_down=3)]
GROUPED_SWEEP_CASES = ("4x32 tok, exact 15", "16x32 tok, exact 15", "16x32 tok, uniform",
                       "64x32 tok, exact 15")


def sweep_grouped(layers, routed, bw, timer=None, variants=None):
    """Time GroupedConfig variants (the whole grouped forward, one knob group at a time) on the
    multi-block cases; return the best gate/up knobs combined with the best down knobs.
    timer and variants as in sweep()."""
    timer = timer or graph_us
    picked = [r for r in routed if r["case"] in GROUPED_SWEEP_CASES]
    wg, wd = layers[0]
    gen = torch.Generator().manual_seed(2)
    hiddens = [torch.randn(r["tokens"], wg.shape[2], generator=gen).to(wg.device, wg.dtype)
               for r in picked]
    refs = [moe_forward_reference(h.float(), r["ids"], r["weights"], wg, wd)
            for h, r in zip(hiddens, picked)]
    floors = [r["unique_layer"] * EXPERT_BYTES / bw / 1e3 for r in picked]
    print("grouped sweep: us per layer call (% of copy bandwidth) at "
          + ", ".join(r["case"] for r in picked))

    def measure(change):
        config = dataclasses.replace(DEFAULT_GROUPED, **change)
        times, err = [], 0.0
        for row, hidden, ref in zip(picked, hiddens, refs):
            y = moe_forward_triton(hidden, row["ids"], row["weights"], wg, wd, path="grouped",
                                   grouped=config)
            err = max(err, rel_err(y, ref) if bool(torch.isfinite(y).all()) else 1.0)
            outs = [torch.empty_like(hidden) for _ in layers]
            times.append(timer(lambda: [moe_forward_triton(
                hidden, row["ids"], row["weights"], g, d, out=o, path="grouped", grouped=config)
                for (g, d), o in zip(layers, outs)]))
        return times, err

    percents = lambda ts: [100 * f / t for f, t in zip(floors, ts)]  # noqa: E731
    best = {label: best_change(label, changes[:variants] if variants else changes, measure,
                               percents)
            for label, changes in (("gate_up", GROUPED_GATE_UP_VARIANTS),
                                   ("down", GROUPED_DOWN_VARIANTS))}
    config = dataclasses.replace(DEFAULT_GROUPED, **best["gate_up"], **best["down"])
    times, err = measure(dataclasses.asdict(config))
    print(f"  combined {config}: " + "  ".join(f"{t:7.1f}" for t in times) + f"  err {err:.1e}")
    return config


# ---------------------------------------------------------------------------------------------
# Peers: transformers 5 experts on the same weights
# ---------------------------------------------------------------------------------------------

def hf_experts(layers, implementation):
    """transformers' Qwen3MoeExperts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) per copy."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    n_exp, two_i, hid = layers[0][0].shape
    config = Qwen3MoeConfig(hidden_size=hid, moe_intermediate_size=two_i // 2,
                            num_experts=n_exp, num_experts_per_tok=TOP_K, hidden_act="silu")
    config._experts_implementation = implementation
    mods = []
    for w_gate_up, w_down in layers:
        with torch.device("meta"):
            m = Qwen3MoeExperts(config)
        m.gate_up_proj = torch.nn.Parameter(w_gate_up, requires_grad=False)
        m.down_proj = torch.nn.Parameter(w_down, requires_grad=False)
        mods.append(m)
    return mods


def peer_routing(ids, weights):
    """transformers takes no empty slots: an empty one becomes expert 0 with weight 0."""
    empty = ids < 0
    return torch.where(empty, 0, ids).long(), torch.where(empty, 0.0, weights)


def time_grouped_mm(fn):
    """(us, 'graph') if transformers' grouped_mm can be captured, else (us, 'eager')."""
    try:
        return graph_us(fn), "graph"
    except Exception as exc:
        print(f"  grouped_mm could not be graphed ({type(exc).__name__}: {str(exc)[:100]}); "
              "timing it eagerly")
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return ms * 1000 / COPIES, "eager"


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

def make_layers(copies, n_exp, hid, inter, dtype, device, seed=0):
    torch.manual_seed(seed)
    return [((torch.randn(n_exp, 2 * inter, hid, dtype=dtype, device=device) / math.sqrt(hid)),
             (torch.randn(n_exp, hid, inter, dtype=dtype, device=device) / math.sqrt(inter)))
            for _ in range(copies)]


def time_case(row, layers, config, route_backend, eager_peer, grouped_peer):
    T, ids, weights = row["tokens"], row["ids"], row["weights"]
    hidden = torch.randn(T, H, device="cuda", dtype=DTYPE)
    outs = [torch.empty_like(hidden) for _ in layers]

    def experts():
        for (wg, wd), o in zip(layers, outs):
            moe_forward_triton(hidden, ids, weights, wg, wd, out=o, decode=config)

    def layer():
        for (wg, wd), o in zip(layers, outs):
            r = route(row["logits"], None, CFG, row["policy"], route_backend)
            moe_forward_triton(hidden, r.topk_ids.view(T, -1), r.topk_weights.view(T, -1),
                               wg, wd, out=o, decode=config)

    peer_ids, peer_weights = peer_routing(ids, weights)
    row["bytes"] = row["unique_layer"] * EXPERT_BYTES
    row["experts_us"] = graph_us(experts)
    row["layer_us"] = graph_us(layer)
    row["grouped_mm_us"], row["grouped_mm_mode"] = time_grouped_mm(
        lambda: [m(hidden, peer_ids, peer_weights) for m in grouped_peer])
    row["eager_us"] = few_calls_us(lambda: [m(hidden, peer_ids, peer_weights) for m in eager_peer])


def run_gpu(args):
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(torch.device("cuda")) / 1e9  # GB/s, the unit of this script's tables
    print(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}; copy bandwidth {bw:.0f} GB/s (read + write)")
    layers = make_layers(COPIES, E, H, I, DTYPE, "cuda")
    routed = build_routings("cuda", "triton")
    if args.quick:  # smoke size (bench/smoke_gpu.sh): the sweep's two cases, the decode edges
        # (17 experts, 64 tokens) and one multi-block case
        keep = QUICK_CASES + (GROUPED_SWEEP_CASES if args.sweep_grouped else ())
        routed = [r for r in routed if r["case"] in keep]
    if args.cases is not None:  # e.g. --cases EC: the expert-choice shapes alone (issue 15)
        routed = [r for r in routed if any(w in r["case"] for w in args.cases)]
        if not routed:
            raise SystemExit(f"--cases {args.cases!r} matches no case name")
    check_routings(routed, layers[0], [DEFAULT_DECODE, dataclasses.replace(
        DEFAULT_DECODE, down_splits=1)], MAX_REL_ERR)
    config = DEFAULT_DECODE
    if args.sweep:
        config = sweep(layers, routed, bw, variants=2 if args.quick else None)
        if config != DEFAULT_DECODE:
            check_routings(routed, layers[0], [config], MAX_REL_ERR)
    print(f"decode config: {config}")
    # The sweep's pick for every multi-block case, else launch.moe_launch's choice per shape.
    grouped = sweep_grouped(layers, routed, bw) if args.sweep_grouped else None
    grouped_peer, eager_peer = hf_experts(layers, "grouped_mm"), hf_experts(layers, "eager")
    for row in routed:
        with launch.override(grouped=grouped):
            time_case(row, layers, config, "triton", eager_peer, grouped_peer)
        row["floor_us"] = row["bytes"] / bw / 1e3
        print(f"  {row['case']:22s} T={row['tokens']:3d} unique {row['unique_layer']:3d} "
              f"(per block {row['unique_block']:5.1f})  experts {row['experts_us']:7.1f} us "
              f"({row['floor_us'] * 100 / row['experts_us']:5.1f}% of copy bw)  layer "
              f"{row['layer_us']:7.1f} us  floor {row['floor_us']:6.1f}  grouped_mm "
              f"{row['grouped_mm_us']:7.1f} ({row['grouped_mm_mode']})  eager "
              f"{row['eager_us']:8.0f}", flush=True)
    device = f"{props.name} ({props.multi_processor_count} SMs)"
    write_results(args.out, device, bw, config, routed, grouped)


# ---------------------------------------------------------------------------------------------
# FP8 experts (issue 16)
# ---------------------------------------------------------------------------------------------

FP8_CASES = ("32 tok, exact 15", "32 tok, exact 70", "16x32 tok, exact 15")


def fp8_expert_bytes(scales) -> int:
    """One expert's bytes as the kernels read them: e4m3 weights + its fp32 block scales."""
    return 3 * H * I + (scales.gate_up[0].numel() + scales.down[0].numel()) * 4


def fp8_reference(hidden, row, dequantized, scales, config, shared=None):
    """The dequantize-then-fp32 reference of one routing, with the activations quantized as
    the fp8 dot does where `config` runs it (moe.fp8_activation_groups); shared: an FP8 shared
    expert (its scales in scales.shared), or None."""
    groups = fp8_activation_groups(hidden, config, scales)
    if shared is not None:
        shared = dequantize_shared(shared, scales)
    return moe_forward_reference(hidden.float(), row["ids"], row["weights"], *dequantized,
                                 shared, activation_groups=groups)


def fp8_shared_experts(layers8):
    """shared_experts' FP8 twin: per FP8 copy, expert 0's weights and scales as a shared
    expert ((gate_up, down), Fp8Scales with them in .shared)."""
    return [((wg[0].clone(), wd[0].clone()),
             dataclasses.replace(s, shared=(s.gate_up[0].clone(), s.down[0].clone())))
            for wg, wd, s in layers8]


def check_fp8(routed, layer8, max_err, decode=None, grouped=None, bits=(False, True)):
    """FP8 kernels (native and, in `bits`, byte-decoded reads; `decode` / `grouped` FP8 configs,
    None: the defaults) vs the dequantize-then-fp32 reference."""
    wg, wd, scales = layer8
    dequantized = dequantize_experts(wg, wd, scales)
    gen = torch.Generator().manual_seed(2)
    dtype = DTYPE if wg.is_cuda else torch.float32  # the interpreter's bf16 tl.dot is wrong
    for row in routed:
        hidden = torch.randn(row["tokens"], wg.shape[2], generator=gen).to(wg.device, dtype)
        plan = launch.moe_launch(row["tokens"], row["ids"].shape[1], wg.shape[0], dtype,
                                 wg.device, fp8=True)
        config = (decode or plan.decode) if plan.path == "decode" else (grouped or plan.grouped)
        for read_bits in bits:
            with launch.override(fp8_bits=read_bits):
                ref = fp8_reference(hidden, row, dequantized, scales, config)
                y = moe_forward_triton(hidden, row["ids"], row["weights"], wg, wd,
                                       out=torch.full_like(hidden, float("nan")), scales=scales,
                                       decode=decode, grouped=grouped)
            err = rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf")
            row["fp8_err"] = max(row.get("fp8_err", 0.0), err)
            if not err <= max_err:
                raise SystemExit(f"FP8 moe_forward is off on {row['case']!r} (fp8_bits="
                                 f"{read_bits}): relative error {err:.2e} > {max_err:.0e}")
    print(f"FP8 moe_forward vs the dequantized fp32 reference on {len(routed)} routings: max "
          f"relative error {max(r['fp8_err'] for r in routed):.2e} (bound {max_err:.0e})")


# FP8 launch variants (issue 16), each a change to launch.DEFAULT_DECODE_FP8 /
# DEFAULT_GROUPED_FP8 timed as a whole forward (the gate/up's block_i is the down's act scale
# chunk, and the prepass feeds the gate/up), so a short list: one knob group each.
FP8_DECODE_VARIANTS = [
    dict(),
    dict(dot="fp16", block_i=64),                          # e4m3 -> fp16, exact activations
    dict(dot="model", block_i=64),                         # e4m3 -> bf16, bf16 dot
    dict(stages_gate_up=6, programs_per_sm=1),
    # The default's 2 gate/up programs per SM do not fit together (147456 bytes each at 32
    # tokens: tests/test_fit.py), so its grid's second half waits: the same grid without it.
    dict(programs_per_sm=1),
    dict(down_splits=16),
    # act groups narrower than the scale block (launch.fit_scale_blocks): twice or four times
    # the gate/up items, where 15 experts gave 60 items for 264 programs (issue 16)
    dict(block_i=64),
    dict(block_i=32),
    dict(block_i=64, stages_gate_up=6),
    # The down (issue 16: 12 us a layer in the FP8 dMoE step, whose bytes need 4.4). k steps
    # of 256 on 4 stages since the 23rd session (launch.fit_scale_blocks keeps a step wider
    # than the 128-column scale block for the fp8 dot: one dot per act group); before, 128 on
    # 3 (64 x 128 e4m3 tiles of 8 KB, 4 steps per expert). 512 is the whole I, one step per
    # expert (offline, sm_90: 98304 bytes at 2 stages, 147456 at 3, 32 tokens; 262144, too
    # many, at 3 stages from 33 tokens). 8 warps, 4 splits (the bf16 down's) and block_h 128
    # on 8 warps (the FP8 down's shape before the sixth session's sweep) were slower at 128.
    dict(k_tile_down=128, stages_down=3),
    dict(stages_down=3),
    dict(stages_down=5),
    dict(warps_down=8),
    dict(down_splits=4),
    dict(k_tile_down=512, stages_down=2),
    dict(k_tile_down=512, stages_down=3),
    dict(k_tile_down=512, stages_down=2, warps_down=8),
    dict(k_tile_down=512, stages_down=2, block_i=64),
    # x quantized in the gate/up's k loop (its steps are the 128-column groups): one launch
    # fewer (scaled_rows_kernel, 1.5 us a layer in the FP8 dMoE profile), the quantization
    # repeated by every program (23rd session; launch.fit_scale_blocks)
    dict(x_prepass=False),
]
FP8_GROUPED_VARIANTS = [
    dict(),
    dict(dot="fp16", block_m=32, block_i=64, warps_gate_up=4, stages_gate_up=4),
    dict(block_m=32),
    dict(warps_gate_up=4, stages_gate_up=4),
    dict(block_h=128, warps_down=8),
    dict(programs_per_sm=1, stages_gate_up=4),
    # The default's gate/up (8 warps x 255 registers, 120 KB) fits once per SM, not the two
    # programs_per_sm asks; this one fits twice, offline for sm_90: gate/up 4 warps x 255
    # registers, 108 KB, no spills; down 149 registers, 72 KB (issue 16).
    dict(block_m=32, warps_gate_up=4, stages_gate_up=3),
    dict(block_i=64),
    dict(block_m=32, block_i=64, warps_gate_up=4, stages_gate_up=4),
    # down k steps over several scale blocks, as in FP8_DECODE_VARIANTS
    dict(k_tile_down=256, stages_down=3),
    dict(k_tile_down=512, stages_down=2),
    dict(x_prepass=False),  # as in FP8_DECODE_VARIANTS
]
FP8_SWEEP_CASES = {"decode": ("32 tok, exact 15", "32 tok, exact 70"),
                   "grouped": ("16x32 tok, exact 15",)}


def sweep_fp8(routed, layers8, bw, path, timer=None, variants=None):
    """Time the FP8 variants of `path` ("decode" or "grouped") at FP8_SWEEP_CASES[path], each
    checked against the dequantized fp32 reference first (one off by more than MAX_REL_ERR is
    reported and never timed); return the best config, fitted to the scale blocks. Both paths
    run with an FP8 shared expert inside their launches, as the model's layers do
    (fp8_shared_experts). timer and variants as in sweep()."""
    timer = timer or graph_us
    base = DEFAULT_DECODE_FP8 if path == "decode" else DEFAULT_GROUPED_FP8
    changes = FP8_DECODE_VARIANTS if path == "decode" else FP8_GROUPED_VARIANTS
    picked = [r for r in routed if r["case"] in FP8_SWEEP_CASES[path]]
    wg, wd, scales = layers8[0]
    dequantized = dequantize_experts(wg, wd, scales)
    gen = torch.Generator().manual_seed(3)
    dtype = DTYPE if wg.is_cuda else torch.float32
    hiddens = [torch.randn(r["tokens"], wg.shape[2], generator=gen).to(wg.device, dtype)
               for r in picked]
    shared = fp8_shared_experts(layers8)  # [(shared, scales)] per copy
    floors = [(r["unique_layer"] + 1) * fp8_expert_bytes(scales) / bw / 1e3 for r in picked]
    print(f"FP8 {path} sweep: us per layer call (% of copy bandwidth counting FP8 bytes, the "
          "shared expert included) at " + ", ".join(r["case"] for r in picked), flush=True)

    def measure(change):
        kw = {path: dataclasses.replace(base, **change)}
        times, err = [], 0.0
        for row, hidden in zip(picked, hiddens):
            ref = fp8_reference(hidden, row, dequantized, shared[0][1], kw[path], shared[0][0])
            y = moe_forward_triton(hidden, row["ids"], row["weights"], wg, wd, path=path,
                                   out=torch.full_like(hidden, float("nan")),
                                   shared=shared[0][0], scales=shared[0][1], **kw)
            err = max(err, rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf"))
            if not err <= MAX_REL_ERR:
                raise ValueError(f"off the reference on {row['case']!r}: relative error {err:.1e}")
            outs = [torch.empty_like(hidden) for _ in layers8]
            times.append(timer(lambda: [moe_forward_triton(
                hidden, row["ids"], row["weights"], g, d, out=o, path=path, shared=sh, scales=s,
                **kw) for (g, d, _), (sh, s), o in zip(layers8, shared, outs)]))
        return times, err

    best = best_change(f"fp8 {path}", changes[:variants] if variants else changes, measure,
                       lambda ts: [100 * f / t for f, t in zip(floors, ts)])
    config = fit_scale_blocks(dataclasses.replace(base, **best), scales.block[1])
    print(f"  fp8 {path} best config (paste as launch.DEFAULT_{path.upper()}_FP8): {config}")
    return config


def time_fp8_row(row, layers, layers8, bw, decode, grouped, bits=True):
    """bf16 (its defaults) and FP8 (the `decode` / `grouped` FP8 configs; with `bits` also the
    byte-decoded reads) on one routing, us per layer call."""
    T, ids, weights = row["tokens"], row["ids"], row["weights"]
    hidden = torch.randn(T, H, device="cuda", dtype=DTYPE)
    outs = [torch.empty_like(hidden) for _ in layers]

    def bf16():
        for (wg, wd), o in zip(layers, outs):
            moe_forward_triton(hidden, ids, weights, wg, wd, out=o)

    def fp8():
        for (wg, wd, sc), o in zip(layers8, outs):
            moe_forward_triton(hidden, ids, weights, wg, wd, out=o, scales=sc, decode=decode,
                               grouped=grouped)

    row["bf16_us"] = graph_us(bf16)
    for read_bits, key in ((False, "fp8_us"), (True, "fp8_bits_us"))[:1 + bits]:
        with launch.override(fp8_bits=read_bits):  # the launch choice is made at capture
            row[key] = graph_us(fp8)
    row["fp8_bytes"] = row["unique_layer"] * fp8_expert_bytes(layers8[0][2])
    row["fp8_floor_us"] = row["fp8_bytes"] / bw / 1e3


def write_fp8(out, device, bw, rows, decode, grouped):
    lines = [f"# FP8 e4m3 experts (128 x 128 block scales, bf16 activations): {device}", "",
             f"Copy bandwidth {bw:.0f} GB/s. Bytes = unique experts x (3 H I e4m3 + fp32 "
             "scales); floor = bytes / copy bandwidth; % copy bw = floor / time. `bytes` "
             "column: the pre-sm_89 path (e4m3 decoded from uint8 with integer ops; n/a after "
             "a sweep). Times per layer call, CUDA graph of 4 calls on 4 weight copies, "
             "replayed 10 times per timing behind a spin (common.graph_ms). bf16: "
             "the bf16 defaults.", "", f"- FP8 decode config: `{decode}`",
             f"- FP8 grouped config: `{grouped}`", "",
             "| routing | tokens | unique | FP8 MB | floor us | FP8 us | % copy bw | FP8 bytes "
             "us | bf16 us | FP8 / bf16 | err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['tokens']} | {r['unique_layer']} | {r['fp8_bytes'] / 1e6:.0f} | "
            f"{r['fp8_floor_us']:.1f} | {r['fp8_us']:.1f} | "
            f"{100 * r['fp8_floor_us'] / r['fp8_us']:.1f} | {fmt(r.get('fp8_bits_us'), '.1f')} | "
            f"{r['bf16_us']:.1f} | {r['fp8_us'] / r['bf16_us']:.2f} | {r['fp8_err']:.1e} |")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "moe_fp8.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    keep = ("case", "tokens", "unique_layer", "fp8_bytes", "fp8_floor_us", "fp8_us",
            "fp8_bits_us", "bf16_us", "fp8_err")
    with open(os.path.join(out, "moe_fp8.json"), "w") as f:
        json.dump(dict(device=device, copy_gbps=bw, decode=dataclasses.asdict(decode),
                       grouped=dataclasses.asdict(grouped),
                       rows=[{k: r.get(k) for k in keep} for r in rows]), f, indent=1)
    print("\n".join(lines))


def run_fp8_smoke(args, routed):
    """--smoke --fp8 [--sweep]: the checks on a small CPU layer (and the sweep code with CPU
    times, two variants a path), the table from made-up times."""
    small = make_layers(1, E, 32, 32, torch.float32, "cpu")
    layer8 = quantize_experts(*small[0], (16, 16))
    check_fp8(routed, layer8, 1e-4)
    decode, grouped = DEFAULT_DECODE_FP8, DEFAULT_GROUPED_FP8
    if args.sweep:
        print("FP8 sweep code on the small layer (CPU times, meaningless):")
        decode, grouped = (sweep_fp8(routed, [layer8], 3000.0, path, timer=cpu_us, variants=2)
                           for path in ("decode", "grouped"))
    for row in routed:
        row.update(fp8_bytes=row["unique_layer"] * 3 * H * I, bf16_us=9.0, fp8_us=5.0,
                   fp8_bits_us=7.0)
        row["fp8_floor_us"] = row["fp8_bytes"] / 3000.0 / 1e3
    return write_fp8(args.out, "smoke test (made-up times)", 3000.0, routed, decode, grouped)


def run_fp8(args):
    """The FP8 table: GPU timing (after --sweep, with the best FP8 configs), or (--smoke) the
    checks on a small CPU layer and made-up times."""
    start = time.perf_counter()
    routed = [r for r in build_routings("cuda" if not args.smoke else "cpu",
                                        "reference" if args.smoke else "triton")
              if r["case"] in FP8_CASES]
    if args.smoke:
        return run_fp8_smoke(args, routed)
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    layers = make_layers(COPIES, E, H, I, DTYPE, "cuda")
    layers8 = [quantize_experts(wg, wd) for wg, wd in layers]
    decode, grouped = DEFAULT_DECODE_FP8, DEFAULT_GROUPED_FP8
    if args.sweep:
        decode, grouped = (sweep_fp8(routed, layers8, bw, path) for path in ("decode", "grouped"))
    # After a sweep the byte-decoded reads (GPUs below sm_89) are neither checked nor timed.
    check_fp8(routed, layers8[0], MAX_REL_ERR, decode, grouped, (False,) if args.sweep else
              (False, True))
    for row in routed:
        time_fp8_row(row, layers, layers8, bw, decode, grouped, bits=not args.sweep)
    write_fp8(args.out, f"{props.name} ({props.multi_processor_count} SMs)", bw, routed, decode,
              grouped)
    print(f"bench_moe --fp8 took {time.perf_counter() - start:.0f} s")


def run_smoke(args):
    """CPU: the routings and their unique counts, the kernels vs the reference on a small layer,
    the peers on the same small layer, and the md / png written from made-up times."""
    routed = build_routings("cpu", "reference")
    for row in routed:
        print(f"  {row['case']:22s} T={row['tokens']:3d} unique {row['unique_layer']:3d} "
              f"(per block {row['unique_block']:5.1f})")
    # 2048-token cases take minutes under the interpreter: the GPU run checks them.
    routed = [r for r in routed if r["tokens"] <= 512]
    small = make_layers(1, E, 32, 32, torch.float32, "cpu")
    configs = [DEFAULT_DECODE, dataclasses.replace(DEFAULT_DECODE, down_splits=1),
               dataclasses.replace(DEFAULT_DECODE, block_i=16, down_splits=4)]
    check_routings(routed, small[0], configs, 1e-4)
    print("sweep code on the small layer (CPU times, meaningless):")
    sweep(small, routed, 3000.0, timer=cpu_us)
    sweep_grouped(small, [r for r in routed if r["case"] == "4x32 tok, exact 15"], 3000.0,
                  timer=cpu_us, variants=2)
    row = routed[1]
    hidden = torch.randn(row["tokens"], 32)
    ref = moe_forward_reference(hidden, row["ids"], row["weights"], *small[0])
    for impl in ("eager", "grouped_mm"):
        try:
            y = hf_experts(small, impl)[0](hidden, *peer_routing(row["ids"], row["weights"]))
            print(f"  transformers {impl}: relative error vs reference {rel_err(y, ref):.1e}")
        except Exception as exc:  # grouped_mm may lack a CPU kernel; it is timed on the GPU
            print(f"  transformers {impl} on CPU failed: {type(exc).__name__}: {str(exc)[:100]}")
    bw = 3000.0
    for i, row in enumerate(routed):
        row["bytes"] = row["unique_layer"] * EXPERT_BYTES
        row["floor_us"] = row["bytes"] / bw / 1e3
        row.update(experts_us=row["floor_us"] * 1.2 + 5, layer_us=row["floor_us"] * 1.3 + 8,
                   grouped_mm_us=300.0 + i, grouped_mm_mode="graph", eager_us=5000.0 + 100 * i)
    write_results(args.out, "smoke test (made-up times)", bw, DEFAULT_DECODE, routed)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def write_results(out, device, bw, config, rows, grouped=None):
    os.makedirs(out, exist_ok=True)
    cmd = "PYTHONUNBUFFERED=1 python bench/bench_moe.py " + " ".join(sys.argv[1:])
    lines = [
        "# moe_forward: one LLaDA2.0-mini MoE layer (E=256, H=2048, I=512, top-8, bf16)",
        "",
        f"- Device: {device}; torch {torch.__version__}, triton {triton.__version__}.",
        f"- Copy bandwidth measured in the same process: **{bw:.0f} GB/s** (read + write).",
        f"- Command: `{cmd}`",
        f"- Decode config (1-64 tokens): `{config}`; more tokens take the grouped path: "
        f"`{grouped or DEFAULT_GROUPED}`" + ("" if grouped else f" (from "
        f"{launch.GROUPED_WIDE_FROM} tokens block_m {launch.DEFAULT_GROUPED_WIDE.block_m})")
        + ".",
        "",
        "Times are per layer call: median over timings of 10 replays of a CUDA graph of 4 "
        "calls on 4 weight copies (6.4 GB, so L2 holds none), queued behind a spin "
        "(common.graph_ms: the host's launch of a replay is not timed). `experts` = "
        "moe_forward alone; `layer` = route() from fp32 logits + moe_forward (no router GEMM, "
        "no shared expert). Bytes = unique "
        "experts in the call x 6.29 MB; floor = bytes / copy bandwidth. transformers 5 "
        "(Qwen3MoeExperts, same weights and routing): `grouped_mm` under a CUDA graph (`g`) or "
        "eager (`e`) where it cannot be captured; `eager` = its per-expert loop, ungraphed, "
        "3 calls. err = relative error of the bf16 output vs the fp32 reference.",
        "",
        "| routing | tokens | unique (call) | unique / block | MB | floor us | experts us | GB/s | "
        "% copy bw | experts / floor | layer us | layer / floor | grouped_mm us | eager us | "
        "err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gbps = r["bytes"] / r["experts_us"] / 1e3
        lines.append(
            f"| {r['case']} | {r['tokens']} | {r['unique_layer']} | {r['unique_block']:.1f} | "
            f"{r['bytes'] / 1e6:.0f} | {r['floor_us']:.1f} | {r['experts_us']:.1f} | {gbps:.0f} | "
            f"{100 * gbps / bw:.1f} | {r['experts_us'] / r['floor_us']:.2f} | "
            f"{r['layer_us']:.1f} | {r['layer_us'] / r['floor_us']:.2f} | "
            f"{r['grouped_mm_us']:.1f} {r['grouped_mm_mode'][0]} | {r['eager_us']:.0f} | "
            f"{r.get('err', float('nan')):.1e} |")
    with open(os.path.join(out, "moe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    keep = ("case", "tokens", "unique_layer", "unique_block", "bytes", "floor_us", "experts_us",
            "layer_us", "grouped_mm_us", "grouped_mm_mode", "eager_us", "err")
    with open(os.path.join(out, "moe.json"), "w") as f:
        json.dump(dict(device=device, copy_gbps=bw, decode_config=dataclasses.asdict(config),
                       rows=[{k: r.get(k) for k in keep} for r in rows]), f, indent=1)
    plot(os.path.join(out, "moe.png"), bw, rows)
    print(f"\nwrote {out}/moe.md, moe.json, moe.png\n")
    print(f"{'routing':22s} {'unique':>6s} {'floor':>7s} {'experts':>8s} {'%bw':>5s} "
          f"{'layer/fl':>8s} {'grouped_mm':>10s} {'eager':>8s}")
    for r in rows:
        print(f"{r['case']:22s} {r['unique_layer']:6d} {r['floor_us']:7.1f} "
              f"{r['experts_us']:8.1f} {100 * r['floor_us'] / r['experts_us']:5.1f} "
              f"{r['layer_us'] / r['floor_us']:8.2f} {r['grouped_mm_us']:10.1f} "
              f"{r['eager_us']:8.0f}")


def plot_block(ax, bw, block):
    """The 32-token cases: time against unique experts, with the byte floor's line."""
    u = [r["unique_layer"] for r in block]
    xs = list(range(1, max(u) + 11))
    ax.plot(xs, [x * EXPERT_BYTES / bw / 1e3 for x in xs], "k--",
            label=f"byte floor ({bw:.0f} GB/s copy)")
    for key, label, style in [("experts_us", "dmoe-triton experts", "o-"),
                              ("layer_us", "dmoe-triton routing + experts", "s-"),
                              ("grouped_mm_us", "transformers 5 grouped_mm (" + "/".join(
                                  sorted({r["grouped_mm_mode"] for r in block})) + ")", "^-"),
                              ("eager_us", "transformers 5 eager loop", "v-")]:
        ax.plot(u, [r[key] for r in block], style, label=label)
    for r in (r for r in block if r["policy"].is_block):
        ax.annotate("dMoE", (r["unique_layer"], r["experts_us"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("unique experts in the 32-token block")
    ax.set_ylabel("time per MoE layer call (us, log)")
    ax.set_title("One LLaDA2.0-mini MoE layer, 32 tokens, bf16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_multi(ax, bw, multi):
    """The multi-block cases: ours, graphed grouped_mm and the byte floor, side by side."""
    xs = range(len(multi))
    width = 0.28
    for shift, key, label in [(-width, "floor_us", f"byte floor ({bw:.0f} GB/s copy)"),
                              (0.0, "experts_us", "dmoe-triton experts"),
                              (width, "grouped_mm_us", "transformers 5 grouped_mm")]:
        ax.bar([x + shift for x in xs], [r[key] for r in multi], width, label=label)
    for x, r in zip(xs, multi):
        ax.annotate(f"{100 * r['floor_us'] / r['experts_us']:.0f}%", (x, r["experts_us"]),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["case"].replace(" tok, ", "\n") for r in multi], fontsize=7)
    ax.set_ylabel("time per MoE layer call (us); % = share of copy bandwidth")
    ax.set_title("Several sequences' blocks in one call (to 64 tokens the decode path, then "
                 "the grouped one), bf16", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot(path, bw, rows):
    """Left: the 32-token cases against their unique experts; right: the multi-block cases
    (several sequences' blocks in one call), each against its byte floor. A panel without
    rows (a --cases selection) is left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = sorted((r for r in rows if r["tokens"] == BLOCK), key=lambda r: r["unique_layer"])
    multi = [r for r in rows if r["tokens"] > BLOCK]
    panels = [p for p, keep in ((plot_block, block), (plot_multi, multi)) if keep]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.8), squeeze=False)
    for ax, draw in zip(axes[0], panels):
        draw(ax, bw, block if draw is plot_block else multi)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="time DecodeConfig variants first")
    parser.add_argument("--sweep-grouped", action="store_true", help="time GroupedConfig "
                        "variants at the multi-block cases first (issue 14)")
    parser.add_argument("--smoke", action="store_true", help="CPU check without timing")
    parser.add_argument("--quick", action="store_true", help="GPU smoke size: 5 cases, 2 sweep "
                        "variants per launch (bench/smoke_gpu.sh)")
    parser.add_argument("--fp8", action="store_true", help="the FP8-experts table instead")
    parser.add_argument("--cases", nargs="+", default=None, help="parts of case names to keep, "
                        "e.g. --cases EC '32 tok, exact 15' (default: every case)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or "
                        "bench/results; a temporary folder with --smoke)")
    args = parser.parse_args()
    if args.smoke and args.cases is not None:
        parser.error("--cases selects the GPU run's rows; --smoke always checks every case")
    if args.out is None:
        args.out = (tempfile.mkdtemp(prefix="bench_moe_") if args.smoke
                    else os.environ.get("OUT") or "bench/results")
    if args.fp8 and (args.smoke or torch.cuda.is_available()):
        run_fp8(args)
    elif args.smoke:
        run_smoke(args)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_moe.py times on a CUDA device; use --smoke on the CPU")
    else:
        run_gpu(args)


if __name__ == "__main__":
    main()
