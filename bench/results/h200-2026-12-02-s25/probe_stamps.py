"""One-off probe (25th session, on a tree with stamps.patch): where a decode MoE layer call's
time goes inside its launches, from global-timer stamps each program writes (kernel entry,
wait for the previous kernel returned, prologue done, end; kernels/pdl.py's `stamp`).

probe_decode_shapes' layers (FP8, then bf16), 32 tokens, the shared expert alone (every slot
empty) and exact routing at 15 and 70 experts; a CUDA graph of 4 layer calls on 4 weight
copies replayed 20 times; the stamps of the third call (after the second call's down), in us
from the first program entry of the call's first launch.
    python bench/results/h200-2026-12-02-s25/probe_stamps.py
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))

import torch  # noqa: E402

from common import capture, graph_ms  # noqa: E402
from bench_moe import CFG, exact_logits, unique_counts  # noqa: E402
from probe_decode_shapes import DEVICE, DTYPE, H, Layers  # noqa: E402
from dmoe_triton import RoutingPolicy, moe, route  # noqa: E402

KERNELS = ("prepass", "gate_up", "down")
SLOTS = 1024  # programs per launch at most


def routing(unique, gen):
    if unique == 0:  # every slot empty: the shared expert alone
        return (torch.full((32, 8), -1, dtype=torch.int32, device=DEVICE),
                torch.zeros(32, 8, device=DEVICE))
    r = route(exact_logits(1, unique, gen).to(DEVICE), None, CFG, RoutingPolicy.token(),
              "triton")
    return r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)


def summary(st, origin):
    """(rows of a launch's programs that ran, text) from its stamps [SLOTS, 5] (ns)."""
    ran = st[st[:, 0] >= 0].double()
    if len(ran) == 0:
        return None
    us = (ran[:, :4] - origin) / 1e3

    def q(col):
        v = us[:, col]
        return f"{v.min():.2f} / {v.median():.2f} / {v.max():.2f}"
    return len(ran), [q(0), q(1), q(2) if bool((ran[:, 2] >= 0).all()) else "n/a", q(3)]


def main():
    gen = torch.Generator().manual_seed(0)
    print(torch.cuda.get_device_name())
    print("| dtype | experts | us per call (graph_ms) | launch | programs | entry min / med / max "
          "| wait returned | prologue done | end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fp8 in (True, False):
        dtype_rows(Layers(fp8), gen)
        torch.cuda.empty_cache()


def dtype_rows(layers, gen):
    """The table's rows of one dtype's layers: the shared expert alone, 15 and 70 experts."""
    outs = [torch.empty(32, H, device=DEVICE, dtype=DTYPE) for _ in layers.weights]
    stamps = {k: [torch.full((SLOTS, 5), -1, dtype=torch.int64, device=DEVICE) for _ in outs]
              for k in KERNELS}
    hidden = torch.randn(32, H, device=DEVICE, dtype=DTYPE)
    for unique in (0, 15, 70):
        ids, weights = routing(unique, gen)
        u = unique_counts(ids)[0] if unique else 0

        def call_all():
            for copy, o in enumerate(outs):
                for k in KERNELS:
                    moe.STAMPS[k] = stamps[k][copy]
                layers.run(copy, hidden, ids, weights, layers.default, o)
            moe.STAMPS.clear()

        graph = capture(call_all)
        for k in KERNELS:
            for s in stamps[k]:
                s.fill_(-1)
        for _ in range(20):
            graph.replay()
        per_call = 1e3 * graph_ms(graph, len(outs))  # the stamps are the last replay's
        torch.cuda.synchronize()
        call = 2
        firsts = [stamps[k][call][:, 0] for k in KERNELS]
        origin = min(int(f[f >= 0].min()) for f in firsts if bool((f >= 0).any()))
        prev_down = stamps["down"][call - 1]
        prev_end = (prev_down[prev_down[:, 0] >= 0][:, 3].double().max() - origin) / 1e3
        print(f"| {'fp8' if layers.fp8 else 'bf16'} | {u} | {per_call:.1f} | previous call's "
              f"down | | | | | last end {prev_end:.2f} |")
        for k in KERNELS:
            got = summary(stamps[k][call].cpu(), origin)
            if got is not None:
                n, cells = got
                print(f"| | | | {k} | {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
