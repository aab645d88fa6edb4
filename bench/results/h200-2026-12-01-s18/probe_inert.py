"""Probe (eighteenth session): does the down probe's switch (probe_down_parts.patch) reach the
GPU kernel? The seventeenth session's probe read the same time with every part of the step
removed, even the dot. Here, per probe value: the output's checksum (must differ), the
compiled variants' PROBE values, and the kernel times from a profiler trace of the graph.
Run from a tree with the patch applied (next to its kernels copied into the package)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from bench_moe import (CFG, COPIES, DTYPE, E, H, exact_logits, graph_us,  # noqa: E402
                       launch_closures, make_layers, shared_experts, unique_counts)
from common import capture  # noqa: E402
import dmoe_triton  # noqa: E402
from dmoe_triton import RoutingPolicy, route  # noqa: E402
from dmoe_triton.launch import DEFAULT_DECODE  # noqa: E402
from dmoe_triton.moe import decode_down_combine, decode_gate_up, down_arrivals  # noqa: E402
from dmoe_triton.kernels import moe_matmul  # noqa: E402

print(dmoe_triton.__file__, moe_matmul.__file__)
layers = make_layers(COPIES, E, H, 512, DTYPE, "cuda")
shared = shared_experts(layers)
gen = torch.Generator().manual_seed(0)
for unique in (15, 70):
    logits = exact_logits(1, unique, gen).cuda()
    r = route(logits, None, CFG, RoutingPolicy.token(), "triton")
    ids, weights = r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)
    u, _ = unique_counts(ids)
    hidden = torch.randn(32, H, device="cuda", dtype=DTYPE)
    for probe in (0, 2, 7):
        os.environ["DMOE_PROBE_DOWN"] = str(probe)
        gate_up, down = launch_closures(layers, shared, ids, weights, hidden, DEFAULT_DECODE)
        (wg, wd), (sgu, sd) = layers[0], shared[0]
        arr = down_arrivals(H, "cuda", DEFAULT_DECODE)
        acts = decode_gate_up(hidden, ids, wg, arr, DEFAULT_DECODE, sgu)
        out = torch.full_like(hidden, float("nan"))
        decode_down_combine(acts, ids, weights, wd, out, arr, DEFAULT_DECODE, sd)
        torch.cuda.synchronize()
        print(f"u={u} probe={probe} out checksum {out.float().abs().sum().item():.4e}")
        us = graph_us(down)
        g = capture(down)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                g.replay()
            torch.cuda.synchronize()
        ks = [(e.name, e.device_time) for e in prof.events() if e.device_time > 0]
        names = sorted({n[:40] for n, _ in ks})
        mean = {n: sum(t for m, t in ks if m[:40] == n) / max(1, sum(m[:40] == n for m, _ in ks))
                for n in names}
        print(f"u={u} probe={probe} graph {us:.1f} us/layer; kernels: "
              + "; ".join(f"{n} {t:.1f} us" for n, t in mean.items()), flush=True)
cache = getattr(moe_matmul.moe_down_combine_decode_kernel, "device_caches", {})
for dev, c in cache.items():
    variants = c[0] if isinstance(c, tuple) else c
    print("compiled variants:", len(variants))
    for key in variants:
        print("  ", str(key)[-160:])
