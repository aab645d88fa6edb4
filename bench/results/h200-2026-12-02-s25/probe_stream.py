"""Prepared for the 26th session (not run): what sets the FP8 decode gate/up's k step of about
1.1 us at few work items (call F's stamps: 68 items of 512 KB take 18 us each at 15 experts).

A minimal kernel with the gate/up's tiles: one program per item, [2 x 128, H] e4m3 weights
(gate rows, then up) against x [32, H] e4m3, k steps of 128, a pipeline of `stages`; what each
k step does with its two dots is the variable (MODE):
  0 plain: acc = dot(w, x, acc) (the MMAs chain; scaled once, after the loop)
  1 scaled: acc += dot(w, x) * s, s a constant (the dot's result consumed at once, as in
    kernels/moe_fp8._fp8_dot)
  2 scaled, loaded: as 1 with s loaded each step (the main kernel's synchronous scale load)
  3 scaled late: each step's dot result scaled and added one step later (the MMA of step k
    can run while step k - 1's result is scaled)
Compiled offline (sm_90, Triton 3.6): mode 0 keeps its MMAs in flight (no dot wait with
0 pending in the loop, 126 registers); modes 1-3 wait for each dot (two such waits a step,
171-199 registers), mode 3 too (Triton waits for the dot before carrying its result), and mode
2's scale load stays synchronous in the loop (one tt.load), as in the main kernel.
us per call (common.graph_ms) over weight copies that L2 cannot hold, at 68 and 280 items,
and the GB/s that makes; each mode checked against torch first.
    python bench/results/h200-2026-12-02-s25/probe_stream.py
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from common import capture, copy_bandwidth, graph_ms  # noqa: E402

H, BLOCK_I, BLOCK_K, T = 2048, 128, 128, 32
MODES = {0: "plain", 1: "scaled", 2: "scaled, loaded", 3: "scaled late"}


@triton.jit
def stream_kernel(w_ptr, x_ptr, s_ptr, out_ptr, H, scale, MODE: tl.constexpr,
                  BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, T: tl.constexpr):
    """out[item] = (gate rows' sum) * (up rows' sum), [BLOCK_I, T] fp32, per MODE."""
    item = tl.program_id(0).to(tl.int64)
    w = w_ptr + item * 2 * BLOCK_I * H
    offs_i = tl.arange(0, BLOCK_I)
    t = tl.arange(0, T)
    acc_g = tl.zeros((BLOCK_I, T), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_I, T), dtype=tl.float32)
    late_g = tl.zeros((BLOCK_I, T), dtype=tl.float32)
    late_u = tl.zeros((BLOCK_I, T), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + t[None, :] * H + offs_k[:, None])
        g = tl.load(w + offs_i[:, None] * H + offs_k[None, :])
        u = tl.load(w + (BLOCK_I + offs_i)[:, None] * H + offs_k[None, :])
        if MODE == 0:
            acc_g = tl.dot(g, x, acc_g)
            acc_u = tl.dot(u, x, acc_u)
        elif MODE == 1:
            acc_g += tl.dot(g, x) * scale
            acc_u += tl.dot(u, x) * scale
        elif MODE == 2:
            s = tl.load(s_ptr + k0 // BLOCK_K)
            acc_g += tl.dot(g, x) * s
            acc_u += tl.dot(u, x) * s
        else:
            acc_g += late_g * scale
            acc_u += late_u * scale
            late_g = tl.dot(g, x)
            late_u = tl.dot(u, x)
    if MODE == 0:  # one scale for the whole sum: the same result as the other modes
        acc_g *= scale
        acc_u *= scale
    if MODE == 3:
        acc_g += late_g * scale
        acc_u += late_u * scale
    tl.store(out_ptr + item * BLOCK_I * T + offs_i[:, None] * T + t[None, :], acc_g * acc_u)


def reference(w, x, scale):
    """torch's out for one copy: [items, BLOCK_I, T]."""
    wf = w.float().view(-1, 2 * BLOCK_I, H)
    g = wf[:, :BLOCK_I] @ x.float().T * scale
    u = wf[:, BLOCK_I:] @ x.float().T * scale
    return g * u


def main():
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev) / 1e9
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, copy bandwidth "
          f"{bw:.0f} GB/s; items of {2 * BLOCK_I * H // 1024} KB, k steps of {BLOCK_K}, "
          f"{T} tokens")
    print("| items | stages | " + " | ".join(f"{n} us (GB/s)" for n in MODES.values()) + " |")
    print("|---|---|" + "---|" * len(MODES))
    gen = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(T, H, device=dev, generator=gen) * 0.5).to(torch.float8_e4m3fn)
    scales = torch.full((H // BLOCK_K,), 0.5, device=dev)
    for items in (68, 280):
        nbytes = items * 2 * BLOCK_I * H
        copies = max(2, -(-120 * 2**20 // nbytes))  # together well past the 50 MB L2
        ws = [(torch.randn(items * 2 * BLOCK_I, H, device=dev, generator=gen) * 0.5).to(
            torch.float8_e4m3fn) for _ in range(copies)]
        outs = [torch.empty(items, BLOCK_I, T, device=dev) for _ in range(copies)]
        want = reference(ws[0], x, 0.5)
        for stages in (3, 4):
            cells = []
            for mode in MODES:
                def run(c, mode=mode, stages=stages):
                    stream_kernel[(items,)](ws[c], x, scales, outs[c], H, 0.5, MODE=mode,
                                            BLOCK_I=BLOCK_I, BLOCK_K=BLOCK_K, T=T,
                                            num_warps=4, num_stages=stages)
                run(0)
                err = float(((outs[0] - want).abs() / (want.abs() + 1.0)).max())
                if not err < 1e-3:
                    sys.exit(f"mode {mode}: relative error {err:.1e}")
                graph = capture(lambda: [run(c) for c in range(copies)])
                us = 1e3 * graph_ms(graph, copies)
                cells.append(f"{us:.1f} ({nbytes / us / 1e3:.0f})")
            print(f"| {items} | {stages} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
