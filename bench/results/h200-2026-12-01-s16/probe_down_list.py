"""Probe (sixteenth session): the decode down finds each step's expert in a list the gate/up
wrote (one load) instead of searching the used experts' ranks (a 512-bin reduction per step).

The list needs an indirect load in the down's pipelined loop, and Triton's pipeliner then
keeps fewer weight tiles in flight at the same num_stages (2 buffers instead of 3 at 3 stages,
compiled offline), so deeper pipelines are timed too. Each variant: the down alone and gate/up +
down together (graphs of 4 layer calls on 4 weight copies, 32 tokens, exact-u token routing,
the shared expert), checked against the fp32 reference; two alternating rounds:

    python bench/results/h200-2026-12-01-s16/probe_down_list.py   # GPU, about a minute
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from bench_moe import (CFG, COPIES, DTYPE, E, EXPERT_BYTES, H, exact_logits,  # noqa: E402
                       graph_us, launch_closures, make_layers, rel_err, shared_experts,
                       unique_counts)
from common import copy_bandwidth  # noqa: E402
from dmoe_triton import RoutingPolicy, route  # noqa: E402
from dmoe_triton.launch import DEFAULT_DECODE  # noqa: E402
from dmoe_triton.moe import moe_forward_triton  # noqa: E402
from dmoe_triton.reference import moe_forward_reference  # noqa: E402

VARIANTS = (("search, 3 stages", dict(down_list=False, stages_down=3)),
            ("list, 3 stages", dict(down_list=True, stages_down=3)),
            ("list, 4 stages", dict(down_list=True, stages_down=4)),
            ("list, 5 stages", dict(down_list=True, stages_down=5)))


def main():
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s")
    layers = make_layers(COPIES, E, H, 512, DTYPE, "cuda")
    shared = shared_experts(layers)
    gen = torch.Generator().manual_seed(0)
    names = [n for n, _ in VARIANTS]
    print("| experts (+1) | round | " + " | ".join(f"down, {n}" for n in names) + " | "
          + " | ".join(f"pair, {n}" for n in names) + " | down floor us |")
    print("|---|---|" + "---|" * (2 * len(VARIANTS) + 1))
    for unique in (12, 15, 16, 17, 20, 24, 70):
        logits = exact_logits(1, unique, gen).cuda()
        r = route(logits, None, CFG, RoutingPolicy.token(), "triton")
        ids, weights = r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)
        u, _ = unique_counts(ids)
        hidden = torch.randn(32, H, device="cuda", dtype=DTYPE)
        floor = (u + 1) * EXPERT_BYTES / 3 / bw / 1e3
        outs = [torch.empty_like(hidden) for _ in layers]
        for rnd in (1, 2):
            down, pair = [], []
            for _, change in VARIANTS:
                cfg = dataclasses.replace(DEFAULT_DECODE, **change)
                y = moe_forward_triton(hidden, ids, weights, *layers[0], decode=cfg,
                                       shared=shared[0])
                ref = moe_forward_reference(hidden.float(), ids, weights, *layers[0],
                                            shared=shared[0])
                err = rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf")
                assert err < 1e-2, (u, change, err)

                def both(cfg=cfg):
                    for (wg, wd), s, o in zip(layers, shared, outs):
                        moe_forward_triton(hidden, ids, weights, wg, wd, out=o, decode=cfg,
                                           shared=s)

                down.append(graph_us(launch_closures(layers, shared, ids, weights, hidden,
                                                     cfg)[1]))
                pair.append(graph_us(both))
            print(f"| {u} | {rnd} | " + " | ".join(f"{t:.1f}" for t in down) + " | "
                  + " | ".join(f"{t:.1f}" for t in pair) + f" | {floor:.1f} |", flush=True)


if __name__ == "__main__":
    main()
