"""The skinny GEMM (kernels/skinny_gemm.py) against cuBLAS at LLaDA2.0-mini's decode shapes, on
the GPU: the router's logits (256 x 2048, fp32 out), and for a look at the attention
projections, QKV (3072 x 2048) and the dense output projection (2048 x 2048), bf16 out; 16 and
32 tokens (skinny_gemm takes up to SKINNY_MAX_ROWS). Each row: us per call in a CUDA graph of
calls on weight copies that do not fit in L2 (so the weights come from HBM, as in a forward),
the byte floor (weight bytes over the copy bandwidth measured here), each result checked
against the fp64 product first. Launch shapes besides skinny_launch's own are JSON objects of
SkinnyLaunch fields, each changing skinny_launch's shape for every GEMM:

    python bench/probe_skinny.py '{"block_n": 32}' '{"block_n": 16, "block_k": 128}'
"""
import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from common import capture, copy_bandwidth, graph_ms  # noqa: E402
from dmoe_triton.launch import DEFAULT_SKINNY, override, skinny_launch  # noqa: E402
from dmoe_triton.skinny import skinny_gemm  # noqa: E402

# (name, N, K, out dtype)
SHAPES = [("router", 256, 2048, torch.float32), ("qkv", 3072, 2048, torch.bfloat16),
          ("o_proj", 2048, 2048, torch.bfloat16)]
L2_BYTES = 50 << 20  # the H200's (and H100's) L2: the copies together pass it twice over
EPS32 = torch.finfo(torch.float32).eps


def parse_shape(text: str) -> dict:
    """SkinnyLaunch field changes from their JSON, checked on DEFAULT_SKINNY
    (argparse.ArgumentTypeError naming them when invalid)."""
    try:
        change = json.loads(text)
        dataclasses.replace(DEFAULT_SKINNY, **change)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"shape {text!r}: {exc}") from None
    return change


def check(y, x, w, out_dtype) -> None:
    """y within an fp32 sum's bound of the fp64 product (+ one rounding to out_dtype)."""
    exact = x.double() @ w.double().T
    bound = x.shape[1] * EPS32 * (x.double().abs() @ w.double().abs().T)
    bound += torch.finfo(out_dtype).eps * exact.abs()
    if not ((y.double() - exact).abs() <= bound).all():
        raise SystemExit(f"result off the fp64 product beyond the bound ({tuple(w.shape)})")


def cublas(x, w, out_dtype):
    """What a user runs: torch.mm, with fp32 out through out_dtype (router.gate_logits')."""
    return torch.mm(x, w.T) if out_dtype == x.dtype else torch.mm(x, w.T, out_dtype=out_dtype)


def graph_us(fn, copies: int) -> float:
    graph = capture(lambda: [fn(i) for i in range(copies)])
    for _ in range(5):
        graph.replay()
    return 1e3 * graph_ms(graph, copies, trials=50)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shapes", nargs="*", type=parse_shape, help="SkinnyLaunch fields as JSON")
    ap.add_argument("--tokens", default="16,32")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    launches = [{}] + args.shapes  # changes to skinny_launch's shape ({}: its own)
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s; shapes: "
          + "; ".join(f"[{i}] skinny_launch + {json.dumps(c)}" for i, c in enumerate(launches)))
    print("| GEMM | tokens | floor us | cuBLAS us | " + " | ".join(
        f"skinny [{i}] us" for i in range(len(launches))) + " |")
    print("|---" * (4 + len(launches)) + "|")
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, N, K, out_dtype in SHAPES:
        copies = max(4, 2 * L2_BYTES // (N * K * 2))
        ws = [(torch.randn(N, K, device=dev, generator=gen) * 0.02).bfloat16()
              for _ in range(copies)]
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, K, device=dev, generator=gen).bfloat16()
            check(cublas(x, ws[0], out_dtype), x, ws[0], out_dtype)
            row = [graph_us(lambda i: cublas(x, ws[i], out_dtype), copies)]
            for change in launches:
                with override(skinny=dataclasses.replace(skinny_launch(N, dev), **change)):
                    check(skinny_gemm(x, ws[0], out_dtype), x, ws[0], out_dtype)
                    row.append(graph_us(lambda i: skinny_gemm(x, ws[i], out_dtype), copies))
            floor = N * K * 2 / bw * 1e6
            print(f"| {name} | {T} | {floor:.2f} | " + " | ".join(f"{v:.2f}" for v in row)
                  + f" | (skinny_launch: block_n {skinny_launch(N, dev).block_n})")


if __name__ == "__main__":
    main()
