"""Probe (seventeenth session, not yet run): decode down launch shapes that take fewer, larger
steps per program, on main and on a tree with down_tables.patch (the script runs on both).
The down alone and gate/up + down (graphs of 4 layer calls on 4 weight copies, 32 tokens,
exact-u token routing, the shared expert), each variant checked against the fp32 reference
first; two alternating rounds:

    python bench/results/h200-2026-12-01-s17/probe_down_configs.py   # GPU, about a minute

Why: the down timed as long without any tile load as with them (probe_down_parts.log), so a
step's chain of other work sets its time; block_h 128 (8 splits to keep 128 programs) and k
steps of 512 halve the steps per program at twice the bytes per step (2 weight tiles in flight:
163972 / 196740 bytes of shared memory at 32 tokens, compiled offline for sm_90); 4 warps
give each step's products to one warpgroup (wgmma m64n32k16 instead of two m64n16k16).
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

VARIANTS = (("default", dict()),
            ("block_h 128, 8 splits", dict(block_h=128, down_splits=8, stages_down=4)),
            ("k 512", dict(k_tile_down=512, stages_down=3)),
            ("4 warps", dict(warps_down=4)),
            ("block_h 128, 8 splits, 4 warps", dict(block_h=128, down_splits=8, stages_down=4,
                                                     warps_down=4)))


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
    for unique in (15, 17, 70):
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
