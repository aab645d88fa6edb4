"""Where a denoising forward's GPU time goes, kernel by kernel (H100; a diagnosis tool).

Builds the LLaDA2.0-mini config with `--layers` layers (default 4: layer 0 dense + 3 MoE layers;
every layer has the full width, so per-layer kernel times are those of the full model) and random
bf16 weights, prefills a cache of `--prefix` tokens, then for token routing and dMoE p=0.6:
profiles a few eager forwards (torch.profiler, CUDA kernel durations) and times the same forward
replayed from a CUDA graph. Prints, per policy, each kernel's total time per forward, its count,
and the graphed forward's time against the sum of its kernels (the rest: gaps between kernels).

    python bench/profile_e2e.py --layers 4 --prefix 512 --batch 1 [--fp8]

--fp8 quantizes the routed and shared experts to FP8 (128 x 128 blocks) first, as
`bench_e2e.py --fp8` does.

--graph-timeline also profiles replays of the graphed forward itself and attributes its span to
kernels (dmoe_triton.profiling.graph_timeline): the GPU idle before each kernel and the time its
run added past the kernels before it, per kernel name and forward. The eager profile cannot show
the idle, and it is the part of the forward that no kernel's own time accounts for.
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from dmoe_triton import RoutingPolicy, patch_model, set_policy
from dmoe_triton.profiling import graph_timeline
from dmoe_triton.models import LLaDA2MoeConfig
from dmoe_triton.testing import build_model

from bench_e2e import prepare_step, step_fn
from common import capture, graph_ms


def op_table(fn, forwards: int, rows: int) -> str:
    """The aten ops (with input shapes) that launched the most GPU time per forward."""
    with torch.no_grad():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     record_shapes=True) as prof:
            for _ in range(forwards):
                fn()
            torch.cuda.synchronize()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_device_time_total", row_limit=rows, max_name_column_width=40,
        max_shapes_column_width=70)


def kernel_times(fn, forwards: int) -> dict:
    """{kernel name: (us per forward, launches per forward)} over `forwards` eager calls."""
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(forwards):
                fn()
            torch.cuda.synchronize()
    totals = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals[e.name[:90]]
            t[0] += e.device_time / forwards
            t[1] += 1 / forwards
    return dict(totals)


def graph_kernels(graph, replays: int) -> list:
    """[(name, start us, end us)] of the kernels of `replays` replays of `graph` under the
    profiler (CUPTI records each kernel node of a graph), in start order."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [(e.name[:90], e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(kernels, key=lambda k: k[1])


def timeline_table(kernels: list, replays: int, top: int) -> str:
    """graph_timeline's rows as a table, the names that added most to the span first."""
    rows, span = graph_timeline(kernels, replays)
    own = sum(r[1] for r in rows.values())
    idle = sum(r[2] for r in rows.values())
    lines = [f"graph replay under the profiler ({replays} replays): span {span:.1f} us per "
             f"forward = idle {idle:.1f} + kernels' advance {span - idle:.1f} (their own time "
             f"{own:.1f}, of which {own - span + idle:.1f} overlapped other kernels)",
             "| us/forward added (idle + advance) | idle before us | advance us | own us | "
             "launches | kernel |", "|---|---|---|---|---|---|"]
    for name, (n, t, gap, adv) in sorted(rows.items(), key=lambda kv: -(kv[1][2] + kv[1][3]))[:top]:
        lines.append(f"| {gap + adv:.1f} | {gap:.1f} | {adv:.1f} | {t:.1f} | {n:.0f} | {name} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--fp8", action="store_true", help="FP8 routed and shared experts (issue 16)")
    ap.add_argument("--graph-timeline", action="store_true",
                    help="also attribute the graphed forward's span to kernels and the gaps "
                         "before them (profiled replays)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    config = LLaDA2MoeConfig(num_hidden_layers=args.layers)
    model = build_model(config, dev)
    patch_model(model, RoutingPolicy.token(), expert_dtype="fp8" if args.fp8 else None)
    step = prepare_step(model, args.batch, args.prefix)
    fn = step_fn(model, step)
    for name, policy in (("token", RoutingPolicy.token()), ("dmoe p=0.6", RoutingPolicy.dmoe(0.6, 16))):
        set_policy(model, policy)
        times = kernel_times(fn, 5)
        with torch.no_grad():
            graph = capture(fn, 1, warmup=2)
            graphed = graph_ms(graph, 1, trials=5, replays=50)
        kernels_us = sum(t for t, _ in times.values())
        launches = sum(n for _, n in times.values())
        print(f"\n## {name}: {args.layers} layers, batch {args.batch}, prefix {args.prefix}"
              f"{', FP8 experts' if args.fp8 else ''}")
        print(f"graphed forward {graphed * 1e3:.1f} us; kernels {kernels_us:.1f} us in "
              f"{launches:.0f} launches; gaps {graphed * 1e3 - kernels_us:.1f} us")
        print("| us/forward | launches | kernel |\n|---|---|---|")
        for k, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"| {t:.1f} | {n:.0f} | {k} |")
        if args.graph_timeline:
            replays = 20
            print("\n" + timeline_table(graph_kernels(graph, replays), replays, args.top))
        del graph
        if name == "token":
            print(op_table(fn, 5, 30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
