"""One-off probe for the 25th session (issue 13): what one graphed launch costs on the H200.

The 24th session timed an empty Triton kernel, 132 programs, launched with programmatic
dependent launch (PDL) and calling kernels/pdl.py's wait_previous_kernel first, at 4.04 us per
launch in a graph of 4; the forward makes 13-14 launches a layer. Here, us per launch in a
graph of 16 launches of an empty kernel (the last of 50 replays' median, events):
- PDL as the kernels use it (wait, then let the next launch), no PDL, and PDL with the next
  launch allowed only at the end (the wait first);
- 1, 32 and 132 programs, 1 and 4 warps;
- torch's own fill of one element (no Triton launcher) for reference.
    python bench/results/h200-2026-12-02-s24/probe_launch_cost.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from common import capture, time_ms  # noqa: E402


@triton.jit
def empty_kernel(x_ptr, MODE: tl.constexpr):
    """MODE 0: no PDL; 1: wait, then allow the next launch (kernels/pdl.py's order); 2: wait,
    allow the next launch at the end."""
    if MODE == 1:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if MODE == 2:
        tl.extra.cuda.gdc_wait()
    if tl.program_id(0) == 1 << 30:  # never: a store the compiler keeps
        tl.store(x_ptr, 0)
    if MODE == 2:
        tl.extra.cuda.gdc_launch_dependents()


def per_launch_us(fn, launches=16):
    """Median us per launch of a graph of `launches` calls of fn (bench/common.py's timing)."""
    graph = capture(fn, reps=launches)
    for _ in range(5):
        graph.replay()
    return 1e3 * time_ms(graph.replay, launches, 50, torch.device("cuda"))


def main():
    x = torch.zeros(1, device="cuda")
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}")
    print("| programs | warps | no PDL us | PDL, wait then allow us | PDL, allow at end us |")
    print("|---|---|---|---|---|")
    for programs in (1, 32, 132):
        for warps in (1, 4):
            row = []
            for mode in (0, 1, 2):
                def fn(mode=mode):
                    empty_kernel[(programs,)](x, MODE=mode, num_warps=warps,
                                              launch_pdl=mode > 0)
                row.append(per_launch_us(fn))
            print(f"| {programs} | {warps} | " + " | ".join(f"{t:.2f}" for t in row) + " |",
                  flush=True)
    print(f"torch fill_ of one element: {per_launch_us(lambda: x.fill_(1.0)):.2f} us per launch")


if __name__ == "__main__":
    main()
