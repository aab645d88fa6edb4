"""Throwaway probe (fourteenth session): does reading the expert weights through the Hopper
tensor-memory accelerator (Triton tensor descriptors) stream faster than pointer loads
(cp.async), in a gate/up kernel of the decode path's shape? One 32-token block, LLaDA2.0-mini's
experts (gate|up [2I=1024, H=2048] bf16), 16 and 72 experts per call, persistent grid.

Run: python probe_tma.py            (GPU: timing table)
     TRITON_INTERPRET=1 python probe_tma.py --check   (CPU: the variants agree with torch)
"""
import argparse
import itertools
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def gate_up_kernel(x_ptr, w_ptr, w_desc, act_ptr, experts_ptr, n_items, H, I,
                   T_PAD: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                   TMA: tl.constexpr, WEIGHTS_ON_M: tl.constexpr):
    n_splits = I // BLOCK_I
    t = tl.arange(0, T_PAD)
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        u = item // n_splits
        e = tl.load(experts_ptr + u).to(tl.int64)
        i0 = (item % n_splits) * BLOCK_I
        offs_i = i0 + tl.arange(0, BLOCK_I)
        row_gate = e * 2 * I + i0
        acc_g = tl.zeros((BLOCK_I, T_PAD), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_I, T_PAD), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if TMA:
                row = row_gate.to(tl.int32)  # descriptor offsets are int32
                g = w_desc.load([row, k0])
                up = w_desc.load([row + I, k0])
            else:
                g = tl.load(w_ptr + (row_gate + tl.arange(0, BLOCK_I))[:, None] * H
                            + offs_k[None, :])
                up = tl.load(w_ptr + (row_gate + I + tl.arange(0, BLOCK_I))[:, None] * H
                             + offs_k[None, :])
            if WEIGHTS_ON_M:
                xt = tl.load(x_ptr + t[None, :] * H + offs_k[:, None])  # [BLOCK_K, T_PAD]
                acc_g = tl.dot(g, xt, acc_g)
                acc_u = tl.dot(up, xt, acc_u)
            else:
                x = tl.load(x_ptr + t[:, None] * H + offs_k[None, :])  # [T_PAD, BLOCK_K]
                acc_g += tl.trans(tl.dot(x, tl.trans(g)))
                acc_u += tl.trans(tl.dot(x, tl.trans(up)))
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(act_ptr + (u * T_PAD + t)[None, :] * I + offs_i[:, None],
                 act.to(act_ptr.dtype.element_ty))


def launch(x, w2d, desc, act, experts, inter, cfg):
    block_i, block_k, warps, stages, per_sm, tma, on_m = cfg
    n_items = experts.numel() * (inter // block_i)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count \
        if x.is_cuda else 4
    grid = (min(n_items, sms * per_sm),)
    gate_up_kernel[grid](x, w2d, desc, act, experts, n_items, x.shape[1], inter, T_PAD=32,
                         BLOCK_I=block_i, BLOCK_K=block_k, TMA=tma, WEIGHTS_ON_M=on_m,
                         num_warps=warps, num_stages=stages)


def reference(x, w3, experts, inter):
    outs = []
    for e in experts.tolist():
        g = x.float() @ w3[e, :inter].float().T
        u = x.float() @ w3[e, inter:].float().T
        outs.append((torch.nn.functional.silu(g) * u).T)  # [I, T]
    return torch.stack(outs)  # [n, I, T]


def graph_median_us(call, s, e_):
    """call(r) for r in 0..11 captured in one CUDA graph; the median of 15 replays, us per call."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(12):
            call(r)
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(15):
        s.record(); g.replay(); e_.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e_) * 1000 / 12)
    return sorted(ts)[7]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    dev = "cpu" if args.check else "cuda"
    dtype = torch.float16 if args.check else torch.bfloat16
    E, inter, H = (4, 64, 128) if args.check else (256, 512, 2048)
    torch.manual_seed(0)
    w3 = (torch.randn(E, 2 * inter, H, device=dev) * 0.02).to(dtype)
    w2d = w3.view(E * 2 * inter, H)
    x = torch.randn(32, H, device=dev).to(dtype)
    configs = [(bi, bk, 4, st, ps, tma, on_m)
               for (bi, bk, st, ps) in ((64, 128, 4, 2), (64, 256, 3, 2), (128, 128, 4, 1),
                                        (64, 128, 6, 1), (32, 256, 4, 2))
               for tma, on_m in ((False, False), (False, True), (True, True))]
    if args.check:
        configs = [(32, 64, 4, 2, 1, tma, on_m) for tma, on_m in
                   ((False, False), (False, True), (True, True))]
        experts = torch.tensor([3, 1], dtype=torch.int32)
        ref = reference(x, w3, experts, inter)
        for cfg in configs:
            desc = TensorDescriptor.from_tensor(w2d, [cfg[0], cfg[1]])
            act = torch.full((2 * 32, inter), float("nan"), dtype=dtype)
            launch(x, w2d, desc, act, experts, inter, cfg)
            got = act.view(2, 32, inter).transpose(1, 2).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            print(cfg, f"rel err {err:.2e}")
            assert err < 2e-2
        return
    # copy bandwidth, same process
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    s, e_ = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(10):
        s.record(); dst.copy_(src); e_.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e_))
    bw = 2 * src.numel() / (sorted(ts)[5] / 1e3) / 1e9
    del src, dst
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, copy bw {bw:.0f} GB/s")
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in (16, 72):
        perm = torch.randperm(E, generator=gen)
        sets = [perm[(j * n) % (E - n):][:n].to(torch.int32).to(dev) for j in range(3)]
        ref = reference(x, w3, sets[0], inter)
        bytes_ = n * 2 * inter * H * 2
        for cfg in configs:
            desc = TensorDescriptor.from_tensor(w2d, [cfg[0], cfg[1]])
            act = torch.full((n * 32, inter), float("nan"), dtype=dtype, device=dev)
            try:
                launch(x, w2d, desc, act, sets[0], inter, cfg)
                torch.cuda.synchronize()
            except Exception as exc:  # e.g. out of shared memory
                print(cfg, "failed", type(exc).__name__, str(exc)[:80])
                continue
            got = act.view(n, 32, inter).transpose(1, 2).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            us = graph_median_us(
                lambda r: launch(x, w2d, desc, act, sets[r % 3], inter, cfg), s, e_)
            rows.append((n, cfg, us, bytes_ / us / 1e3 / bw * 100, err))
            print(f"n={n:3d} {cfg} {us:7.1f} us  {rows[-1][3]:5.1f}% of copy bw  err {err:.1e}",
                  flush=True)
        # the real decode gate/up (dmoe_triton, DEFAULT_DECODE) on ids that use exactly the set
        from dmoe_triton.launch import DEFAULT_DECODE
        from dmoe_triton.moe import decode_gate_up
        ids_sets = []
        for st in sets:
            slots = st[torch.arange(32 * 8, device=dev) % n].view(32, 8)
            ids_sets.append(slots.contiguous())
        decode_gate_up(x, ids_sets[0], w3, None, DEFAULT_DECODE)
        us = graph_median_us(
            lambda r: decode_gate_up(x, ids_sets[r % 3], w3, None, DEFAULT_DECODE), s, e_)
        rows.append((n, ("decode_gate_up",) * 7, us, bytes_ / us / 1e3 / bw * 100, 0.0))
        print(f"n={n:3d} decode_gate_up (main) {us:7.1f} us  {rows[-1][3]:5.1f}%", flush=True)
    print("\n| experts | block_i, block_k, warps, stages, per_sm | loads | weights on | us | % copy bw |")
    print("|---|---|---|---|---|---|")
    for n, cfg, us, pct, err in rows:
        if cfg[0] == "decode_gate_up":
            print(f"| {n} | main's decode_gate_up | pointers | N | {us:.1f} | {pct:.1f} |")
            continue
        print(f"| {n} | {cfg[:5]} | {'TMA' if cfg[5] else 'pointers'} | "
              f"{'M' if cfg[6] else 'N'} | {us:.1f} | {pct:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
