"""Probe (seventeenth session): where the decode down's time goes. The down alone (graphs of
4 layer calls on 4 weight copies, 32 tokens, exact-u token routing, the shared expert) with
parts of each step's work removed by a temporary PROBE switch (probe_down_parts.patch, not on
main; the environment variable DMOE_PROBE_DOWN picks it):
  0 as main; 1 no act tile load (a constant tile); 2 no weight tile load; 3 neither;
  4 no list load (the step's expert taken as its rank: wrong results, the same work), at 3
    stages, which then keep main's 3 weight tiles (compiled offline for sm_90: 147584 bytes
    against main's 147592 at 5; 5 stages would take 245888, too many);
  5: 3 and 4; 6: 5 without the step's token rows and routing weights (all rows, weight 1);
  7: 6 without the dot (an add).
Results are timings only (the probes compute wrong sums). Two rounds at 15, 17 and 70 experts;
with any argument one round at 15 and 70:

    git apply bench/results/h200-2026-12-01-s17/probe_down_parts.patch
    python bench/results/h200-2026-12-01-s17/probe_down_parts.py [quick]   # GPU, ~1 minute
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from bench_moe import (CFG, COPIES, DTYPE, E, EXPERT_BYTES, H, exact_logits,  # noqa: E402
                       graph_us, launch_closures, make_layers, shared_experts, unique_counts)
from common import copy_bandwidth  # noqa: E402
from dmoe_triton import RoutingPolicy, route  # noqa: E402
from dmoe_triton.launch import DEFAULT_DECODE  # noqa: E402

PROBES = ("main", "no act load", "no weight load", "neither", "no list load",
          "no loads at all", "5 + no token rows", "6 + no dot")


def main():
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s, {DEFAULT_DECODE}")
    layers = make_layers(COPIES, E, H, 512, DTYPE, "cuda")
    shared = shared_experts(layers)
    gen = torch.Generator().manual_seed(0)
    print("| experts (+1) | round | " + " | ".join(PROBES) + " | down floor us |")
    print("|---|---|" + "---|" * (len(PROBES) + 1))
    for unique in (15, 70) if len(sys.argv) > 1 else (15, 17, 70):
        logits = exact_logits(1, unique, gen).cuda()
        r = route(logits, None, CFG, RoutingPolicy.token(), "triton")
        ids, weights = r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)
        u, _ = unique_counts(ids)
        hidden = torch.randn(32, H, device="cuda", dtype=DTYPE)
        floor = (u + 1) * EXPERT_BYTES / 3 / bw / 1e3
        for rnd in (1,) if len(sys.argv) > 1 else (1, 2):
            times = []
            for probe in range(len(PROBES)):
                os.environ["DMOE_PROBE_DOWN"] = str(probe)
                cfg = dataclasses.replace(DEFAULT_DECODE, stages_down=3 if probe == 4 else 5)
                times.append(graph_us(launch_closures(layers, shared, ids, weights, hidden,
                                                      cfg)[1]))
            print(f"| {u} | {rnd} | " + " | ".join(f"{t:.1f}" for t in times)
                  + f" | {floor:.1f} |", flush=True)


if __name__ == "__main__":
    main()
