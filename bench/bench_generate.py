"""The speed users see: `generate()` timed as a user calls it, against the bare forward (issue 18).

LLaDA2.0-mini's layout (LLaDA2MoeConfig() defaults, or --layers of them) with RANDOM bf16 weights
built on the GPU (dmoe_triton.testing.build_model), patched (`patch_model`) and switched with
`set_policy`; the router calibrated so that token routing touches ~70 unique experts per block
(dmoe_triton/calibrate.py, the paper's figure for the trained model; `--router plain` keeps the
random router). Per row (sequences x policy: token routing, dMoE p=0.6): prompts of 512 random
tokens, one warm-up call of the same layout (stopped after its first block: its graphs are kept
all the same), then `generate(model, prompts, gen_length=G)` with everything else default
(stats on), and a second timed call with stats=False. Reported per row:

- ms per forward from the call's stats (mean CUDA-event time of a denoising step), stats on/off;
- the bare forward of the same shape and the same content: each sequence's prompt in a static
  cache of the call's capacity, then the block the call itself decoded (its first 32 generated
  tokens, MASK past an early EOS, half of them masked, seeded), captured in a CUDA graph and
  replayed (median), with its unique experts per block (route_summary of the last replay). Why
  the same content: the experts a block reads depend on its tokens. Under token routing a block
  of random tokens (what the router is calibrated on) reads ~70 experts per layer, generate's
  own blocks ~37 (a random model's blocks are mostly MASK, then repetitive argmax tokens), so
  a bare forward on random blocks timed about twice the expert reads of generate's steps, and
  "speed-up via generate / via the bare forward" compared unlike work. The random block stays
  as a second column (same prompt), with its unique experts;
- step / bare forward; wall time per forward split into step, prefill, cache writes and the
  rest (the host: checks, launches, syncs), from GenerationStats' prefill_time_s and
  cache_write_time_s (CUDA events, no extra sync), and wall / step;
- tokens/s per sequence and aggregate (generated tokens up to EOS / wall time), and what the bare
  forward predicts (the call's tokens per forward / the bare forward's time);
- whether the timed call captured a graph (it should not: graphs are kept between calls).
Then dMoE's speed-up over token routing through generate and through the bare forward (same
content; the random block beside it), beside the paper's 1.14x-1.66x. Random weights commit
about one token per step per sequence (nothing passes the 0.95 threshold), so a call runs about
gen_length steps.

    python bench/bench_generate.py --out $OUT            # H200: 1, 16, 64 sequences, G = 256
    python bench/bench_generate.py --quick --out $OUT    # 1 and 16 sequences, G = 64
    python bench/bench_generate.py --smoke --out /tmp/g  # CPU, tiny model, logic only
Writes generate{,_quick,_smoke}.{md,json} under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from dmoe_triton import RoutingPolicy, patch_model, set_policy
from dmoe_triton.calibrate import calibrate_router, route_summary
from dmoe_triton import decoding
from dmoe_triton.decoding import generate
from dmoe_triton.defaults import scaled_guard
from dmoe_triton.graphs import clear_graph_cache
from dmoe_triton.models import LLaDA2MoeConfig
from dmoe_triton.testing import SMALL, build_model

# bench/common.py (bench/ is on sys.path)
from common import capture, fmt, graph_ms, random_tokens, time_ms

BLOCK = 32
SEED = 0
PAPER_SPEEDUP = (1.14, 1.66)


@dataclass
class Setup:
    name: str
    device: torch.device
    config: LLaDA2MoeConfig
    batches: tuple
    prompt: int
    gen_length: int
    replays: int
    trials: int


def make_setup(args) -> Setup:
    if args.smoke:
        # 32 + 64 tokens: a prefill and a span cache write, so their columns are exercised
        return Setup("generate_smoke", torch.device("cpu"), LLaDA2MoeConfig(**SMALL), (1, 2),
                     32, 64, 1, 1)
    config = LLaDA2MoeConfig() if args.layers is None else LLaDA2MoeConfig(
        num_hidden_layers=args.layers)
    if args.quick:
        return Setup("generate_quick", torch.device("cuda"), config, (1, 16), args.prompt, 64,
                     10, 5)
    return Setup("generate", torch.device("cuda"), config, (1, 16, 64), args.prompt, 256, 10, 7)


def policies(config) -> list:
    return [("token", RoutingPolicy.token()),
            ("dmoe p=0.6", RoutingPolicy.dmoe(0.6, scaled_guard(config.num_experts)))]


# ---------------------------------------------------------------------------------------------
# The bare forward of a decoding step's shape


def generated_blocks(result, batch: int, mask_id: int, seed: int) -> torch.Tensor:
    """[batch, BLOCK] (CPU): each sequence's first BLOCK generated tokens (MASK after an early
    EOS), half of them masked (seeded): the content generate's steps decode."""
    block = torch.full((batch, BLOCK), mask_id, dtype=torch.long)
    for i, tokens in enumerate(result.tokens):
        head = tokens[:BLOCK]
        block[i, :len(head)] = torch.tensor(head, dtype=torch.long)
    masked = torch.rand(batch, BLOCK, generator=torch.Generator().manual_seed(seed)) < 0.5
    return torch.where(masked, mask_id, block)


def random_blocks(config, batch: int, seed: int) -> torch.Tensor:
    """[batch, BLOCK] (CPU): random tokens, half masked (the calibration's kind of block)."""
    gen = torch.Generator().manual_seed(seed)
    block = random_tokens(config, (batch, BLOCK), gen)
    return torch.where(torch.rand(batch, BLOCK, generator=gen) < 0.5, config.mask_token_id, block)


def bare_forward(model, setup: Setup, prompts: torch.Tensor, block: torch.Tensor,
                 capacity: int) -> tuple:
    """(ms, unique experts per block) of one step on `block` [B, BLOCK] after `prompts` [B, P]
    held in a static cache of `capacity` rows: the forward and the greedy pick of its logits,
    as decoding runs them (the "bare forward" of the tables), a CUDA graph replayed (median;
    eager on the CPU); the unique experts are the last replay's routes (route_summary)."""
    dev = setup.device
    batch, P = prompts.shape
    cache = model.new_cache(batch, capacity, static=True, scratch=max(64, BLOCK))
    prompts, block = prompts.to(dev), block.to(dev)
    positions = torch.arange(P, P + BLOCK, device=dev).expand(batch, BLOCK).contiguous()
    held = torch.ones(batch, BLOCK, dtype=torch.bool, device=dev)
    with torch.no_grad():
        model(prompts, past_key_values=cache, write_cache=True, return_logits=False,
              block_length=BLOCK)

        def forward():  # a step as decoding runs it: logits in the model's dtype, the pick
            logits = model(block, positions, past_key_values=cache, attention_mask=held,
                           block_length=BLOCK, float_logits=False).logits
            return decoding.pick_tokens(logits, 0.0, None, None)
        if dev.type != "cuda":
            ms = time_ms(forward, 1, 1, dev)
        else:
            graph = capture(forward, warmup=2)
            graph.replay()
            ms = graph_ms(graph, 1, setup.trials, setup.replays)
    return ms, route_summary(model, BLOCK).mean_unique


# ---------------------------------------------------------------------------------------------
# generate as a user calls it


def warm_up(model, prompts, setup: Setup, stats: bool) -> None:
    """The row's layout once, stopped after its first block (decoding.warm_up): the timed call
    then replays the kept graphs."""
    decoding.warm_up(model, prompts, gen_length=setup.gen_length, stats=stats)


def timed_call(model, prompts, setup: Setup, stats: bool):
    """The GenerationResult of a call after its warm-up."""
    warm_up(model, prompts, setup, stats)
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    return generate(model, prompts, gen_length=setup.gen_length, stats=stats)


def wall_split(st) -> dict:
    """ms per forward of the call's wall time, step time, prefill, cache writes and the rest
    (the host: checks, the loop's launches and syncs, reading results back)."""
    n = max(st.forwards, 1)
    wall, step = st.wall_time_s * 1e3 / n, st.time_per_forward_s * 1e3
    prefill, writes = st.prefill_time_s * 1e3 / n, st.cache_write_time_s * 1e3 / n
    return dict(wall_ms=wall, step_ms=step, prefill_pf_ms=prefill, writes_pf_ms=writes,
                rest_pf_ms=wall - step - prefill - writes, prefill_ms=st.prefill_time_s * 1e3,
                cache_writes=st.cache_writes,
                wall_over_step=wall / step if step > 0 else float("nan"))


def measure_row(model, setup: Setup, batch: int, name: str, policy) -> dict:
    set_policy(model, policy)
    gen = torch.Generator().manual_seed(SEED + 7 * batch)
    prompt_ids = random_tokens(model.config, (batch, setup.prompt), gen)
    result = timed_call(model, prompt_ids.tolist(), setup, stats=True)
    on, off = result.stats, timed_call(model, prompt_ids.tolist(), setup, stats=False).stats
    capacity = -(-(setup.prompt + setup.gen_length) // BLOCK) * BLOCK
    mask_id = model.config.mask_token_id
    bare, bare_unique = bare_forward(model, setup, prompt_ids, generated_blocks(
        result, batch, mask_id, SEED + batch), capacity)
    rand, rand_unique = bare_forward(model, setup, prompt_ids, random_blocks(
        model.config, batch, SEED + batch), capacity)
    row = dict(batch=batch, policy=name, forwards=on.forwards, tokens=on.generated_tokens,
               **wall_split(on), step_off_ms=off.time_per_forward_s * 1e3, bare_ms=bare,
               bare_unique=bare_unique, bare_random_ms=rand, bare_random_unique=rand_unique,
               tok_s=on.tokens_per_s, tok_s_seq=on.tokens_per_s / batch,
               tok_s_predicted=on.tokens_per_forward / bare * 1e3,
               unique=on.mean_unique_experts, coreset=on.mean_coreset_size,
               captured=on.graphs_captured + off.graphs_captured, graph=on.cuda_graph,
               peak_gb=(on.peak_memory_bytes or 0) / 1e9)
    row["step_over_bare"] = row["step_ms"] / bare
    print(f"  B={batch:2d} {name:11s} step {row['step_ms']:7.3f} ms (stats off "
          f"{row['step_off_ms']:7.3f}) bare {bare:7.3f} x{row['step_over_bare']:.3f} unique "
          f"{fmt(row['unique'], '.1f')}/{bare_unique:.1f} (random block {rand:7.3f} ms, "
          f"{rand_unique:.1f})  wall/forward {row['wall_ms']:7.3f} = step + prefill "
          f"{row['prefill_pf_ms']:.3f} + writes {row['writes_pf_ms']:.3f} + rest "
          f"{row['rest_pf_ms']:.3f}  {row['tok_s']:8.1f} tok/s  captured {row['captured']}",
          flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# Report


def table(rows) -> list:
    lines = ["| seqs | policy | forwards | ms/forward (stats) | ms/forward (stats off) "
             "| bare forward ms | step / bare | unique/block: generate | unique: bare "
             "| bare forward ms, random block | unique: random block | tok/s per seq "
             "| tok/s aggregate | tok/s predicted by the bare forward | captured in timed calls "
             "| peak GB |", "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['policy']}{'' if r['graph'] else ' (eager)'} | {r['forwards']} "
            f"| {fmt(r['step_ms'], '.3f')} | {fmt(r['step_off_ms'], '.3f')} "
            f"| {fmt(r['bare_ms'], '.3f')} | {fmt(r['step_over_bare'], '.3f')} "
            f"| {fmt(r['unique'], '.1f')} | {fmt(r['bare_unique'], '.1f')} "
            f"| {fmt(r['bare_random_ms'], '.3f')} | {fmt(r['bare_random_unique'], '.1f')} "
            f"| {fmt(r['tok_s_seq'], '.1f')} | {fmt(r['tok_s'], '.1f')} "
            f"| {fmt(r['tok_s_predicted'], '.1f')} | {r['captured']} "
            f"| {fmt(r['peak_gb'], '.1f')} |")
    return lines


def wall_table(rows) -> list:
    lines = ["| seqs | policy | wall ms / forward | step | prefill | cache writes | rest (host) "
             "| wall / step | prefill ms (once) | cache writes (prefill + spans) |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['policy']} | {fmt(r['wall_ms'], '.3f')} "
            f"| {fmt(r['step_ms'], '.3f')} | {fmt(r['prefill_pf_ms'], '.3f')} "
            f"| {fmt(r['writes_pf_ms'], '.3f')} | {fmt(r['rest_pf_ms'], '.3f')} "
            f"| {fmt(r['wall_over_step'], '.3f')} | {fmt(r['prefill_ms'], '.1f')} "
            f"| {r['cache_writes']} |")
    return lines


def pairs(rows):
    """(batch, token row, dMoE row) for every batch that has both."""
    for batch in sorted({r["batch"] for r in rows}):
        tok = next((r for r in rows if r["batch"] == batch and r["policy"] == "token"), None)
        dm = next((r for r in rows if r["batch"] == batch and r["policy"] != "token"), None)
        if tok is not None and dm is not None:
            yield batch, tok, dm


def speedups(rows) -> list:
    lines = ["| seqs | dMoE speed-up via generate (step) | via the bare forward "
             "| generate / bare | via the bare forward, random block | via tok/s (wall) "
             "| paper |", "|---|---|---|---|---|---|---|"]
    for batch, tok, dm in pairs(rows):
        via_gen, via_bare = tok["step_ms"] / dm["step_ms"], tok["bare_ms"] / dm["bare_ms"]
        lines.append(f"| {batch} | {via_gen:.3f}x | {via_bare:.3f}x | {via_gen / via_bare:.3f} "
                     f"| {tok['bare_random_ms'] / dm['bare_random_ms']:.3f}x "
                     f"| {dm['tok_s'] / tok['tok_s']:.3f}x "
                     f"| {PAPER_SPEEDUP[0]}x-{PAPER_SPEEDUP[1]}x |")
    return lines


def targets(rows) -> list:
    out = []

    def line(text, ok):
        out.append(f"- {text}: **{'met' if ok else 'not met'}**")
    for r in rows:
        if not r["graph"]:
            continue
        line(f"{r['batch']} seq, {r['policy']}: step {r['step_over_bare']:.3f}x the bare forward "
             "(<= 1.1)", r["step_over_bare"] <= 1.1)
        line(f"{r['batch']} seq, {r['policy']}: wall / step {r['wall_over_step']:.3f} (<= 1.15)",
             r["wall_over_step"] <= 1.15)
        line(f"{r['batch']} seq, {r['policy']}: timed calls captured {r['captured']} (0)",
             r["captured"] == 0)
    for batch, tok, dm in pairs(rows):
        if batch in (1, 16) and tok["graph"]:
            ratio = (tok["step_ms"] / dm["step_ms"]) / (tok["bare_ms"] / dm["bare_ms"])
            line(f"{batch} seq: dMoE speed-up via generate / via the bare forward {ratio:.3f} "
                 "(within 5%)", abs(ratio - 1) <= 0.05)
    return out


def write_report(setup: Setup, args, rows, calib, device_name, seconds) -> str:
    cmd = "python bench/bench_generate.py " + " ".join(sys.argv[1:])
    lines = [f"# generate() as users call it (issue 18): {setup.name}", "",
             f"Device: {device_name}; torch {torch.__version__}; command: `{cmd}`; "
             f"{setup.config.num_hidden_layers} layers, random bf16 weights; router: "
             f"{calib or 'plain random'}. Prompts of {setup.prompt} random tokens, gen_length "
             f"{setup.gen_length}, block 32, 32 steps, threshold 0.95, greedy; each timed call "
             "after a warm-up call of its layout. ms/forward: the call's stats (mean CUDA-event "
             "time of a denoising step: forward, decision, statistics); bare forward: the "
             "model's forward of the same shape replayed from a CUDA graph (median of "
             f"{setup.trials} trials of {setup.replays}) on the block the call decoded (each "
             "sequence's first 32 generated tokens, half masked, after its prompt); random "
             "block: the same on random tokens, half masked. unique: experts per block per layer "
             "(generate: mean over its steps; bare: the last replay's routes). "
             f"Done in {seconds:.0f} s.", "", *table(rows), "",
             "## Wall time per forward, split", "",
             "The call's stats: the steps (mean), the prefill and the span cache writes "
             "(CUDA-event totals / forwards), and the rest (wall - the three: argument checks, "
             "the loop's launches and one sync per step and per block, reading results back).",
             "", *wall_table(rows), "",
             "## dMoE over token routing", "", *speedups(rows), "",
             "## Targets of issue 18", "", *targets(rows), ""]
    text = "\n".join(lines)
    with open(os.path.join(args.out, f"{setup.name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"{setup.name}.json"), "w") as f:
        json.dump(dict(rows=rows, router=calib, setup=dict(
            batches=setup.batches, prompt=setup.prompt, gen_length=setup.gen_length,
            layers=setup.config.num_hidden_layers)), f, indent=1)
    return text


# ---------------------------------------------------------------------------------------------


def calibrate(model, setup: Setup, target: float) -> str:
    """Router calibrated on one sequence's prompt + half-masked block under token routing."""
    set_policy(model, RoutingPolicy.token())
    gen = torch.Generator().manual_seed(SEED + 3)
    ids = random_tokens(model.config, (1, setup.prompt + BLOCK), gen).to(setup.device)

    def forward():
        with torch.no_grad():
            model(ids, block_length=BLOCK, return_logits=False)
    return calibrate_router(model, forward, target, seed=SEED).describe()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="1 and 16 sequences, gen_length 64")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, logic only")
    ap.add_argument("--router", choices=("calibrated", "plain"), default="calibrated")
    ap.add_argument("--target-unique", type=float, default=70.0)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    ap.add_argument("--layers", type=int, default=None,
                    help="layers of the published config (default all 20; smoke_gpu.sh: 4)")
    args = ap.parse_args(argv)
    start = time.time()
    setup = make_setup(args)
    os.makedirs(args.out, exist_ok=True)
    dev = setup.device
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke)"
    print(f"device {device_name}; building the model", flush=True)
    model = patch_model(build_model(setup.config, dev, SEED), RoutingPolicy.token())
    calib = None
    if args.router == "calibrated":
        target = args.target_unique if not args.smoke else 9.0
        calib = calibrate(model, setup, target)
        print("calibration: " + calib, flush=True)
    rows = []
    for batch in setup.batches:
        for name, policy in policies(setup.config):
            rows.append(measure_row(model, setup, batch, name, policy))
        clear_graph_cache()  # this batch size's graphs and caches: not needed again
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(write_report(setup, args, rows, calib, device_name, time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
