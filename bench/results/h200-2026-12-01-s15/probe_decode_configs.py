"""Probe (fifteenth session): the decode path's launch configs at one and two 32-token blocks.

The fourteenth session gave 33-64 tokens their own config (k steps of 128 in the down, to fit
in shared memory) without timing it, and found that the gate/up's programs_per_sm = 2 cannot
hold two programs on an SM. This times, per launch alone (CUDA graph of 4 layer calls on 4
weight copies, the shared expert included, bench_moe.py's launch_closures), a few configs at
32 and 64 tokens, each checked against the fp32 reference first:

    python bench/results/h200-2026-12-01-s15/probe_decode_configs.py   # GPU, about a minute
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from bench_moe import (CFG, DTYPE, E, EXPERT_BYTES, H, I, COPIES, exact_logits,  # noqa: E402
                       graph_us, launch_closures, make_layers, rel_err, shared_experts,
                       unique_counts)
from common import copy_bandwidth  # noqa: E402
from dmoe_triton import RoutingPolicy, route  # noqa: E402
from dmoe_triton.launch import DecodeConfig  # noqa: E402
from dmoe_triton.moe import moe_forward_triton  # noqa: E402
from dmoe_triton.reference import moe_forward_reference  # noqa: E402

OLD = DecodeConfig(programs_per_sm=2, stages_down=4)          # main's DEFAULT_DECODE (e94255c)
CONFIGS = {
    "old 1-32 (pps 2, down k256 s4)": OLD,
    "old 33-64 (pps 2, down k128 s4)": dataclasses.replace(OLD, k_tile_down=128),
    "pps 1, down k256 s3": DecodeConfig(programs_per_sm=1, stages_down=3),
    "pps 2, down k256 s3": DecodeConfig(programs_per_sm=2, stages_down=3),
    "pps 1, down k128 s3": DecodeConfig(programs_per_sm=1, k_tile_down=128, stages_down=3),
}


def main():
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s")
    layers = make_layers(COPIES, E, H, I, DTYPE, "cuda")
    shared = shared_experts(layers)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for blocks in (1, 2):
        for unique in (15, 70):
            logits = exact_logits(blocks, unique, gen).cuda()
            r = route(logits, None, CFG, RoutingPolicy.token(), "triton")
            T = 32 * blocks
            ids, weights = r.topk_ids.view(T, -1), r.topk_weights.view(T, -1)
            u_layer, _ = unique_counts(ids)
            hidden = torch.randn(T, H, device="cuda", dtype=DTYPE)
            ref = moe_forward_reference(hidden.float(), ids, weights, *layers[0],
                                        shared=shared[0])
            floor = (u_layer + 1) * EXPERT_BYTES / bw / 1e3
            for name, config in CONFIGS.items():
                if blocks == 1 and "33-64" in name:
                    continue
                try:
                    y = moe_forward_triton(hidden, ids, weights, *layers[0], decode=config,
                                           shared=shared[0])
                    err = rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf")
                    gate_up, down = launch_closures(layers, shared, ids, weights, hidden, config)
                    tg, td = graph_us(gate_up), graph_us(down)
                except Exception as exc:  # e.g. out of shared memory
                    print(f"{T} tok {unique}: {name}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                rows.append((T, u_layer, name, tg, td, floor, err))
                print(f"{T:3d} tok, {u_layer:3d}+1 experts  {name:34s} gate/up {tg:6.1f}  "
                      f"down {td:6.1f}  sum {tg + td:6.1f} us ({100 * floor / (tg + td):4.1f}% "
                      f"of copy bw)  err {err:.1e}", flush=True)
    print("\n| tokens | experts | config | gate/up us | down us | sum us | % of copy bw | err |")
    print("|---|---|---|---|---|---|---|---|")
    for T, u, name, tg, td, floor, err in rows:
        print(f"| {T} | {u}+1 | {name} | {tg:.1f} | {td:.1f} | {tg + td:.1f} | "
              f"{100 * floor / (tg + td):.1f} | {err:.1e} |")


if __name__ == "__main__":
    main()
