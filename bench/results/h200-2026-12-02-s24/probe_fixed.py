"""One-off probe (24th session, issue 16): where the decode gate/up's time goes at few experts.

For FP8 and bf16 layers (probe_decode_shapes.Layers, 4 weight copies, 32 tokens), at 0 routed
experts (every slot empty: the shared expert alone), 8, 15 and 70:
- us per layer call of the gate/up alone, the down alone (graphs, bench_moe.graph_us);
- the same gate/up with its k loop cut to H/4 (the kernel told H // 4: wrong output, timing only);
- CUPTI's own time of each kernel in a replay of the gate/up graph (torch.profiler);
and a graphed chain of empty PDL kernels (the launch cost alone).
    python bench/results/h200-2026-12-02-s24/probe_fixed.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_moe import CFG, H, capture, exact_logits, graph_us, launch_closures  # noqa: E402
from probe_decode_shapes import Layers  # noqa: E402
from dmoe_triton import RoutingPolicy, route  # noqa: E402
from dmoe_triton.kernels import moe_matmul  # noqa: E402
from dmoe_triton.kernels.pdl import wait_previous_kernel  # noqa: E402
from dmoe_triton.launch import pdl  # noqa: E402


class CutH:
    """moe_gate_up_decode_kernel with H // div passed (timing only)."""
    def __init__(self, kernel, div):
        self.kernel, self.div = kernel, div

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            kwargs["H"] = kwargs["H"] // self.div
            return launch(*args, **kwargs)
        return run


@triton.jit
def empty_kernel(x_ptr, PDL: tl.constexpr):
    wait_previous_kernel(PDL)
    if tl.program_id(0) == 100000:
        tl.store(x_ptr, 0)


def own_times(fn, replays=20):
    graph = capture(fn)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    totals = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:40]
            n, t = totals.get(name, (0, 0.0))
            totals[name] = (n + 1, t + e.device_time)
    return {k: (n / replays, t / n) for k, (n, t) in totals.items()}


def main():
    x = torch.zeros(1, device="cuda")

    def empties():
        for _ in range(4):
            empty_kernel[(132,)](x, **pdl(x.device))
    print(f"empty PDL kernel, 132 programs: {graph_us(empties):.2f} us per launch (graph of 4)")
    gen = torch.Generator().manual_seed(0)
    kernel = moe_matmul.moe_gate_up_decode_kernel
    for fp8 in (True, False):
        layers = Layers(fp8)
        print(f"\n{'FP8' if fp8 else 'bf16'} {layers.default}")
        print("| experts | gate/up us | gate/up, H/4 us | down us | own us per kernel (gate/up graph) |")
        print("|---|---|---|---|---|")
        for unique in (0, 8, 15, 70):
            if unique == 0:
                ids = torch.full((32, 8), -1, dtype=torch.int32, device="cuda")
                weights = torch.zeros(32, 8, device="cuda")
            else:
                r = route(exact_logits(1, unique, gen).cuda(), None, CFG, RoutingPolicy.token(),
                          "triton")
                ids, weights = r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)
            hidden = torch.randn(32, H, device="cuda", dtype=torch.bfloat16)
            launches = launch_closures(layers.weights, layers.shared, ids, weights, hidden,
                                       layers.default, layers.scales)
            gate_up, down = graph_us(launches[0]), graph_us(launches[1])
            own = own_times(launches[0])
            moe_matmul.moe_gate_up_decode_kernel = CutH(kernel, 4)
            try:
                cut = launch_closures(layers.weights, layers.shared, ids, weights, hidden,
                                      layers.default, layers.scales)
                quarter = graph_us(cut[0])
            finally:
                moe_matmul.moe_gate_up_decode_kernel = kernel
            own_text = "; ".join(f"{k}: {t:.1f} x{n:.0f}" for k, (n, t) in own.items())
            print(f"| {unique} | {gate_up:.1f} | {quarter:.1f} | {down:.1f} | {own_text} |",
                  flush=True)


if __name__ == "__main__":
    main()
