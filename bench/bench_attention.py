"""Block attention of one LLaDA2.0-mini layer (16 query heads, 4 KV heads, head dim 128) on the GPU.

A denoising forward's attention: 32 queries per sequence against `prefix` cached keys plus the
block's own, with the model's additive block-causal mask (query heads stacked per KV head). The
Triton kernel (`block_attention`, output in the dense projection's layout) against what the
model ran before it: SDPA on the stacked heads (cuDNN / efficient kernels) plus the transpose
copy to [B, L, nh * hd]. Both replay a CUDA graph of REPS calls (common.graph_ms: median of
30 timings of 10 replays, queued behind a spin so the host's launch is not timed). The
floor is the bytes read and written (q, K/V, mask, output) over the copy bandwidth measured in
this process.

    python bench/bench_attention.py [--sweep] [--out bench/results/attention.md]

--sweep first times launch shapes on 1 and on 16 sequences at prefix 512, then the split over
keys (1-8 splits) at prefixes 512 and 2048, and prints them (launch.attention_launch holds the
fastest of each).
"""
import argparse
import dataclasses
import sys

import torch

from dmoe_triton.attention import block_attention
from dmoe_triton.launch import MANY_FROM, AttentionLaunch, attention_launch
from dmoe_triton.models.llada2 import grouped_query_attention
from dmoe_triton.reference import block_attention_reference

from common import capture, copy_bandwidth, graph_ms  # bench/common.py

NH, NKV, HD, L = 16, 4, 128, 32
REPS = 20


def inputs(batch, prefix, dev):
    g = torch.Generator(device=dev).manual_seed(batch * 7919 + prefix)
    n = prefix + L
    q = torch.randn(batch, NH, L, HD, device=dev, generator=g).to(torch.bfloat16)
    cache = torch.randn(2, batch, NKV, n + 64, HD, device=dev, generator=g).to(torch.bfloat16)
    keys, values = cache[0, :, :, :n], cache[1, :, :, :n]  # a static cache's rows, in place
    mask = torch.zeros(batch, 1, (NH // NKV) * L, n, dtype=torch.bfloat16, device=dev)
    return q, keys, values, mask


def time_us(fn):
    """Median microseconds per call of a CUDA graph of REPS calls (common.graph_ms)."""
    fn()
    graph = capture(fn, REPS, warmup=2)
    return 1e3 * graph_ms(graph, REPS)


def sdpa_path(q, keys, values, mask):
    out = grouped_query_attention(q, keys, values, mask, HD ** -0.5)
    return out.transpose(1, 2).reshape(q.shape[0], L, NH * HD)


def check(q, keys, values, mask, launch):
    got = block_attention(q, keys, values, mask, HD ** -0.5, launch=launch)
    want = block_attention_reference(q, keys, values, mask, HD ** -0.5)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def sweep(dev, batch, quick=False):
    """quick: two shapes (the GPU smoke run checks the code path, not the choice)."""
    q, keys, values, mask = inputs(batch, 512, dev)
    timings = []
    for bm in (16,) if quick else (16, 32, 64, 128):
        for bn in (64, 128) if quick else (32, 64, 128):
            for warps in (4,) if quick else (4, 8):
                for stages in (3,) if quick else (2, 3):
                    launch = AttentionLaunch(block_m=bm, block_n=bn, warps=warps, stages=stages)
                    try:
                        check(q, keys, values, mask, launch)
                        us = time_us(lambda: block_attention(q, keys, values, mask, HD ** -0.5,
                                                             launch=launch))
                    except Exception as e:  # e.g. out of shared memory: skip the shape
                        print(f"skip {launch}: {type(e).__name__}")
                        continue
                    timings.append((us, launch))
    timings.sort(key=lambda x: x[0])
    print(f"sweep ({batch} sequences, prefix 512): " + ", ".join(
        f"{us:.1f}us m{l.block_m} n{l.block_n} w{l.warps} s{l.stages}" for us, l in timings[:8]))
    return timings[0][1]


def sweep_key_splits(dev, quick=False):
    """The split over keys (flash-decoding) at each batch and prefix: the default tile with
    1, 2, 4, 8 splits (launch.SPLIT_FROM_KEYS / KEY_SPLITS come from these); prints us each."""
    for batch in (1,) if quick else (1, 2, 4, 16):
        for prefix in (512, 2048):
            q, keys, values, mask = inputs(batch, prefix, dev)
            base = dataclasses.replace(attention_launch(batch, keys.shape[2]), key_splits=1)
            timings = []
            for splits in (1, 2) if quick else (1, 2, 4, 8):
                launch = dataclasses.replace(base, key_splits=splits)
                check(q, keys, values, mask, launch)
                timings.append(time_us(lambda: block_attention(q, keys, values, mask, HD ** -0.5,
                                                               launch=launch)))
            print(f"key splits ({batch} sequences, prefix {prefix}, default "
                  f"{attention_launch(batch, keys.shape[2]).key_splits}): " + ", ".join(
                      f"{s}: {us:.1f}us" for s, us in zip((1, 2, 4, 8), timings)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/attention.md")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="smoke size: 2 sweep shapes, 1 sequence at prefixes 512 and 2048 (bench/smoke_gpu.sh)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.sweep:  # printed: the defaults (launch.attention_launch) come from these
        sweep(dev, 1, args.quick)
        if not args.quick:
            sweep(dev, 16)
        sweep_key_splits(dev, args.quick)
    bandwidth = copy_bandwidth(dev)
    lines = ["| sequences | prefix | kernel (us) | SDPA + transpose (us) | speedup | floor (us) "
             "| kernel / floor |", "|" + "---|" * 7]
    for batch in (1,) if args.quick else (1, 4, 16):
        for prefix in (512, 2048):  # 2048: the split over keys (issue 13), quick too
            q, keys, values, mask = inputs(batch, prefix, dev)
            launch = attention_launch(batch, keys.shape[2])
            check(q, keys, values, mask, launch)
            kernel = time_us(lambda: block_attention(q, keys, values, mask, HD ** -0.5))
            peer = time_us(lambda: sdpa_path(q, keys, values, mask))
            # Bytes read (q, K/V, mask) and written (the output, q's size).
            nbytes = sum(t.numel() * t.element_size() for t in (q, keys, values, mask, q))
            floor = nbytes / bandwidth * 1e6
            lines.append(f"| {batch} | {prefix} | {kernel:.1f} | {peer:.1f} | {peer / kernel:.2f}x "
                         f"| {floor:.1f} | {kernel / floor:.1f} |")
    text = (f"# Block attention of one layer (16 query heads, 4 KV heads, head dim 128, 32 queries "
            f"per sequence)\n\nDevice: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
            f"command: `python bench/bench_attention.py {' '.join(sys.argv[1:])}`. Copy "
            f"bandwidth {bandwidth / 1e12:.2f} TB/s. CUDA graph of {REPS} calls, median of 30 "
            f"timings of 10 replays (common.graph_ms). "
            f"Kernel launch: launch.attention_launch (FEW_SEQUENCES below {MANY_FROM} "
            f"sequences, else MANY_SEQUENCES).\n\n" + "\n".join(lines) + "\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
