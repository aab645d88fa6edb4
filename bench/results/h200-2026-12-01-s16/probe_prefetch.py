"""Probe (sixteenth session): the decode down's weights prefetched into L2 before its PDL wait.

The gate/up's last wave leaves most SMs idle (at 16 coreset experts and the shared one, 136
items on 132 SMs: 4 SMs take a second 512 KB item for about 9 us, bench/results/h200-2026-12-01-
s15/). The down's programs start on the idle SMs as soon as every gate/up program has passed its
own wait (PDL), so they can ask L2 for their share's weights then, and read them from L2 once
the gate/up is done. This times the two launches together (gate/up then down, each weight copy
once, a graph of 4 layer calls on 4 copies, 32 tokens, exact-u token routing, the shared expert)
with DecodeConfig.prefetch_down off / normal / last (the lines' L2 eviction priority), in two
alternating rounds, each checked against the fp32 reference:

    python bench/results/h200-2026-12-01-s16/probe_prefetch.py   # GPU, about a minute
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

MODES = ("off", "normal", "last")


def main():
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, copy bandwidth {bw:.0f} GB/s")
    layers = make_layers(COPIES, E, H, 512, DTYPE, "cuda")
    shared = shared_experts(layers)
    gen = torch.Generator().manual_seed(0)
    print("| experts (+1) | round | " + " | ".join(f"pair us, {m}" for m in MODES)
          + " | " + " | ".join(f"down alone, {m}" for m in MODES) + " | floor us |")
    print("|---|---|" + "---|" * (2 * len(MODES) + 1))
    for unique in (12, 15, 16, 17, 18, 20, 24, 70):
        logits = exact_logits(1, unique, gen).cuda()
        r = route(logits, None, CFG, RoutingPolicy.token(), "triton")
        ids, weights = r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)
        u, _ = unique_counts(ids)
        hidden = torch.randn(32, H, device="cuda", dtype=DTYPE)
        floor = (u + 1) * EXPERT_BYTES / bw / 1e3
        outs = [torch.empty_like(hidden) for _ in layers]
        for rnd in (1, 2):
            pair, alone = [], []
            for mode in MODES:
                cfg = dataclasses.replace(DEFAULT_DECODE, prefetch_down=mode)
                y = moe_forward_triton(hidden, ids, weights, *layers[0], decode=cfg,
                                       shared=shared[0])
                ref = moe_forward_reference(hidden.float(), ids, weights, *layers[0],
                                            shared=shared[0])
                err = rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf")
                assert err < 1e-2, (u, mode, err)

                def both(cfg=cfg):
                    for (wg, wd), s, o in zip(layers, shared, outs):
                        moe_forward_triton(hidden, ids, weights, wg, wd, out=o, decode=cfg,
                                           shared=s)

                pair.append(graph_us(both))
                alone.append(graph_us(launch_closures(layers, shared, ids, weights, hidden,
                                                      cfg)[1]))
            print(f"| {u} | {rnd} | " + " | ".join(f"{t:.1f}" for t in pair) + " | "
                  + " | ".join(f"{t:.1f}" for t in alone) + f" | {floor:.1f} |", flush=True)


if __name__ == "__main__":
    main()
