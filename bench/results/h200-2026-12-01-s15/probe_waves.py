"""Probe (fifteenth session): the decode gate/up's work items against the SMs.

The gate/up's items are (used expert, block_i columns): (experts + the shared one) x 8 at
LLaDA2.0-mini's I = 512 and block_i 64, one persistent program per SM (132 on the H200). From
17 experts with the shared one, 136 items, some SMs take two. dMoE's coreset averages about 16.7
experts at p = 0.6 (bench_e2e), so the model sits at that edge. This times each decode launch
alone (bench_moe.py's launch_closures: graph of 4 layer calls on 4 weight copies, 32 tokens,
exact-u token routing) for u = 12 .. 24, at block_i 64 and 32 with whole items, and at block_i
64 with the last partial wave's items cut into pieces of 16 or 32 columns (DecodeConfig.
tail_cols, from 1ae1ab6; probe_waves_f6a3d5d.log is the first run, at f6a3d5d, whose items
were whole and whose down shares were whole experts), and pieces with k steps of 256
(DecodeConfig.tail_k_tile, added after the session's last GPU run: not in the logs):

    python bench/results/h200-2026-12-01-s15/probe_waves.py   # GPU, under a minute
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


def main():
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, copy bandwidth {bw:.0f} GB/s")
    layers = make_layers(COPIES, E, H, 512, DTYPE, "cuda")
    shared = shared_experts(layers)
    gen = torch.Generator().manual_seed(0)
    print("| experts (+1) | block_i | tail_cols | gate/up items | gate/up us | % of its copy bw "
          "| down us |")
    print("|---|---|---|---|---|---|---|")
    for unique in (12, 14, 15, 16, 17, 18, 20, 24):
        logits = exact_logits(1, unique, gen).cuda()
        r = route(logits, None, CFG, RoutingPolicy.token(), "triton")
        ids, weights = r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)
        u, _ = unique_counts(ids)
        hidden = torch.randn(32, H, device="cuda", dtype=DTYPE)
        floor = (u + 1) * EXPERT_BYTES * 2 / 3 / bw / 1e3
        for block_i, tail_cols, tail_k in ((64, 64, 128), (64, 16, 128), (64, 32, 128),
                                           (32, 32, 128), (64, 16, 256)):
            cfg = dataclasses.replace(DEFAULT_DECODE, block_i=block_i, tail_cols=tail_cols,
                                      tail_k_tile=tail_k)
            y = moe_forward_triton(hidden, ids, weights, *layers[0], decode=cfg, shared=shared[0])
            ref = moe_forward_reference(hidden.float(), ids, weights, *layers[0],
                                        shared=shared[0])
            err = rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf")
            assert err < 1e-2, (u, block_i, tail_cols, err)
            gate_up, down = launch_closures(layers, shared, ids, weights, hidden, cfg)
            tg, td = graph_us(gate_up), graph_us(down)
            items = (u + 1) * (512 // block_i)
            print(f"| {u} | {block_i} | {tail_cols}, k {tail_k} | {items} "
                  f"({items / sms:.2f} per SM) | "
                  f"{tg:.1f} | {100 * floor / tg:.1f} | {td:.1f} |", flush=True)


if __name__ == "__main__":
    main()
