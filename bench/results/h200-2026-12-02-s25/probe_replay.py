"""One-off probe (25th session): how much of a kernel bench's per-call time is the host's
launch of the graph replay.

The 24th session's empty-kernel probe gave 16.2 us per replay for a graph of 4 launches and
16.8 for 16: nearly all of it a fixed cost per replay. bench_moe's graph_us (a graph of 4 layer
calls on 4 weight copies, one replay between events) divides that by 4. Here, in one process:
- an empty kernel graphed 1 / 4 / 16 / 64 times: us per replay, timed as bench/common.time_ms
  did (one replay between events) and as common.graph_ms does (spin first, 10 replays);
- probe_decode_shapes' layers (bf16, then FP8), 32 tokens at 15 and 70 experts: the gate/up,
  the down and the pair, us per layer call, both ways, alternating twice.
    python bench/results/h200-2026-12-02-s25/probe_replay.py
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from common import capture, copy_bandwidth, graph_ms, time_ms  # noqa: E402
from bench_moe import CFG, COPIES, exact_logits, launch_closures, unique_counts  # noqa: E402
from probe_decode_shapes import Layers, DEVICE, H, DTYPE  # noqa: E402
from dmoe_triton import RoutingPolicy, route  # noqa: E402


@triton.jit
def empty_kernel(x_ptr):
    if tl.program_id(0) == 1 << 30:  # never: a store the compiler keeps
        tl.store(x_ptr, 0)


def both_ways(graph, calls):
    """(us per call one replay between events, us per call graph_ms)."""
    for _ in range(5):
        graph.replay()
    old = 1e3 * time_ms(graph.replay, calls, 100, torch.device("cuda"))
    new = 1e3 * graph_ms(graph, calls, trials=30, replays=10)
    return old, new


def main():
    x = torch.zeros(1, device="cuda")
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, torch "
          f"{torch.__version__}, copy bandwidth {bw:.0f} GB/s")
    print("| empty kernel launches per graph | us per replay, time_ms | us per replay, graph_ms |")
    print("|---|---|---|")
    for n in (1, 4, 16, 64):
        g = capture(lambda: empty_kernel[(132,)](x), reps=n)
        old, new = both_ways(g, 1)
        print(f"| {n} | {old:.2f} | {new:.2f} |", flush=True)
    gen = torch.Generator().manual_seed(0)
    print("\n| experts | dtype | round | gate/up old | gate/up new | down old | down new "
          "| pair old | pair new |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fp8 in (False, True):
        layer_rows(Layers(fp8), gen)
        torch.cuda.empty_cache()


def layer_rows(layers, gen):
    """The gate/up, down and pair rows of one dtype's layers, 15 and 70 experts, two rounds."""
    outs = [torch.empty(32, H, device=DEVICE, dtype=DTYPE) for _ in layers.weights]
    for unique in (15, 70):
        r = route(exact_logits(1, unique, gen).to(DEVICE), None, CFG, RoutingPolicy.token(),
                  "triton")
        ids, weights = r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)
        u, _ = unique_counts(ids)
        hidden = torch.randn(32, H, device=DEVICE, dtype=DTYPE)
        cfg = layers.default

        def pair():
            for copy, o in enumerate(outs):
                layers.run(copy, hidden, ids, weights, cfg, o)

        launches = launch_closures(layers.weights, layers.shared, ids, weights, hidden, cfg,
                                   layers.scales)
        for rnd in (1, 2):
            cells = []
            for fn in (launches[0], launches[1], pair):
                fn()
                cells += both_ways(capture(fn), COPIES)
            print(f"| {u} | {'fp8' if layers.fp8 else 'bf16'} | {rnd} | "
                  + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)

if __name__ == "__main__":
    main()
