"""Experiment (issue 13, not merged; run from the repository root with PYTHONPATH=$PWD): do
projections whose weights are prefetched into L2 before the PDL wait beat cuBLAS inside a chain
of PDL kernels? 20 layers of norm -> router -> QKV -> norm -> dense (-> next norm), distinct
weights per layer, one CUDA graph; plus each projection alone."""
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # bench/
from common import capture, copy_bandwidth, time_ms  # noqa: E402
from dmoe_triton.launch import pdl  # noqa: E402
from dmoe_triton.norm import add_rms_norm  # noqa: E402
import triton.language as tl  # noqa: E402
from kernels.pdl import wait_previous_kernel  # noqa: E402


@triton.jit
def _prefetch_l2(ptrs):
    """Ask for the 128-byte lines at ptrs to be brought into L2 (no value, no wait)."""
    tl.inline_asm_elementwise("{ prefetch.global.L2 [$1]; mov.u32 $0, 0; }", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def linear_kernel(x_ptr, stride_xm, w_ptr, stride_wn, y_ptr, stride_ym, M, N, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PREFETCH: tl.constexpr, LINE: tl.constexpr = 64, PDL: tl.constexpr = False):
    """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)). x [M, K], W [N, K] (unit stride along K),
    y [M, N] out (unit stride along N, y's dtype: the model's, or fp32 for the router); fp32
    accumulation. PREFETCH (with PDL only: PTX): the first row tile's programs fetch their W
    rows into L2 before the wait, LINE (W's elements per 128 bytes) apart."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    if PREFETCH and PDL:
        if pid_m == 0:
            for k in range(0, K, BLOCK_K):
                kl = k + tl.arange(0, BLOCK_K // LINE) * LINE
                _prefetch_l2(w_ptr + n[:, None] * stride_wn + kl[None, :])
    wait_previous_kernel(PDL)  # before any load of x or store (kernels/pdl.py)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(x_ptr + m[:, None] * stride_xm + kk[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + n[:, None] * stride_wn + kk[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
H, QKV, L, M = 2048, 3072, 20, int(os.environ.get("ROWS", 32))
DT = torch.bfloat16 if dev.type == "cuda" else torch.float32  # interpreter: bf16 dot is garbage


def linear(x, w, cfg, out_dtype=None):
    if cfg is None:
        if out_dtype == torch.float32:
            return torch.mm(x, w.T, out_dtype=torch.float32)
        return torch.nn.functional.linear(x, w)
    bn, bk, warps, stages, prefetch = cfg
    Mx, K = x.shape
    N = w.shape[0]
    y = torch.empty(Mx, N, dtype=out_dtype or x.dtype, device=x.device)
    bm = max(16, min(64, triton.next_power_of_2(Mx)))
    linear_kernel[(triton.cdiv(N, bn), triton.cdiv(Mx, bm))](
        x, x.stride(0), w, w.stride(0), y, y.stride(0), Mx, N, K, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, PREFETCH=prefetch, LINE=128 // w.element_size(), num_warps=warps,
        num_stages=stages, **pdl(x.device))
    return y


def main():
    g = torch.Generator(device=dev).manual_seed(0)
    wq = [torch.randn(QKV, H, device=dev, generator=g).mul_(0.02).to(DT) for _ in range(L)]
    wd = [torch.randn(H, H, device=dev, generator=g).mul_(0.02).to(DT) for _ in range(L)]
    wr = [torch.randn(256, H, device=dev, generator=g).mul_(0.02).to(DT) for _ in range(L)]
    nw = torch.ones(H, device=dev, dtype=DT)
    x0 = torch.randn(M, H, device=dev, generator=g).to(DT)
    # correctness first
    for cfg in CFGS:
        for w in (wq[0], wd[0]):
            ref = x0.float() @ w.float().T
            got = linear(x0, w, cfg).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, (cfg, err)
        ref = x0.float() @ wr[0].float().T
        got = linear(x0, wr[0], cfg, torch.float32)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4, cfg
    if dev.type != "cuda":
        print("cpu check ok")
        return
    bw = copy_bandwidth(dev)
    floor_layer = (QKV + H + 256) * H * 2 / bw * 1e6
    print(f"copy bw {bw/1e12:.3f} TB/s; rows {M}; weight floor per layer {floor_layer:.2f} us")
    print("| cfg | chain us/layer | x floor | QKV alone | dense alone | router alone |")
    print("|---|---|---|---|---|---|")
    for cfg in CFGS:
        def chain():
            x = x0
            delta = None
            for i in range(L):
                x, y = add_rms_norm(x, delta, nw, 1e-6)
                logits = linear(y, wr[i], cfg, torch.float32)
                qkv = linear(y, wq[i], cfg)
                x, y = add_rms_norm(x, qkv[:, :H], nw, 1e-6)
                delta = linear(y, wd[i], cfg)
            return x, logits
        graph = capture(chain, reps=1, warmup=2)
        t = time_ms(graph.replay, L, 20, dev) * 1e3
        alone = []
        for ws, od in ((wq, None), (wd, None), (wr, torch.float32)):
            gr = capture(lambda: [linear(x0, w, cfg, od) for w in ws], reps=1, warmup=2)
            alone.append(time_ms(gr.replay, L, 20, dev) * 1e3)
        name = "cuBLAS" if cfg is None else str(cfg)
        print(f"| {name} | {t:.2f} | {t/floor_layer:.2f} | {alone[0]:.2f} | {alone[1]:.2f} | "
              f"{alone[2]:.2f} |", flush=True)


CFGS = [None] + [(bn, bk, w, s, p) for p in (False, True)
                 for bn, bk, w, s in ((32, 256, 4, 4), (16, 256, 4, 4), (64, 128, 4, 4),
                                      (32, 128, 4, 3), (16, 512, 4, 3))]
if __name__ == "__main__":
    main()
