"""Routing of one LLaDA2.0-mini MoE layer (E=256, top-8, 8 groups keep 4) on the GPU.

For 1, 4 and 16 blocks of 32 tokens: the Triton kernels (three launches for block policies:
votes, coreset, picks; one for token policies; `route()` minus its host-side input checks)
against a vectorised PyTorch version of the same gate (what a user would write: votes, sort,
cumsum, masked group-limited top-k), each timed eagerly and under a CUDA graph (median over
many replays of a graph holding REPS calls). Prints a table and writes bench/results/routing.md.

    python bench/bench_routing.py [--sweep] [--out bench/results/routing.md]

--sweep first times launch shapes of the kernel (rows per program or chunk, warps, the vote
tile's experts per slice) on one block, checks each against the reference, prints the fastest
six and today's default, and uses the fastest for the table.

--router adds the router GEMM (issue 13): logits [T, 256] fp32 = hidden [T, 2048] bf16 @ W^T,
W a bf16 checkpoint's gate [256, 2048], as the fp32 GEMM of the spec (hidden.float() @ W32.T,
W32 the fp32 buffer: a cast, an fp32 sgemm and its split-K reduction), cuBLAS's bf16 GEMM with
fp32 output on the bf16 copy (torch.mm(out_dtype=float32)) and what the router runs on that
copy (router.gate_logits: skinny_gemm where launch.takes_skinny says so, up to 32 rows on
Hopper, else the same cuBLAS call), at 32 and 512 rows (--quick: 32). Each graph holds one
call per layer on ROUTER_COPIES weight copies (96 MB of fp32: L2 holds none), as in a forward;
beside each, the max |logit - fp64 logit|.
"""
import argparse
import dataclasses
import sys

import torch

from dmoe_triton import RouterConfig, RoutingPolicy, route
from dmoe_triton.launch import DEFAULT_ROUTE, takes_skinny
from dmoe_triton.router import gate_logits
from dmoe_triton.routing import route_triton

from common import capture, graph_ms, time_ms  # bench/common.py (bench/ is on sys.path as a script)

CFG = RouterConfig(256, 8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
REPS = 20


def torch_gate(logits, bias, cfg, policy):
    """The dMoE (or LLaDA2.2 capacity) gate in plain vectorised PyTorch (one sequence per
    leading row, L % 32 == 0): the peer a user would write."""
    S, L, E = logits.shape
    s = logits.sigmoid()
    r = s + bias
    if policy.kind == "capacity":  # LLaDA2.2: window max, top-C, plain top-k inside
        bs = policy.block_size
        window_max = r.view(S, L // bs, bs, E).amax(2)
        allowed = torch.zeros_like(window_max, dtype=torch.bool).scatter_(
            -1, window_max.topk(policy.expert_capacity, -1).indices, True)
        ids = torch.where(allowed.repeat_interleave(bs, 1), r, float("-inf")).topk(cfg.top_k, -1).indices
        w = s.gather(-1, ids)
        return ids, w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    if policy.is_block:
        bs = policy.block_size
        top = r.topk(cfg.top_k, dim=-1)
        kept = torch.zeros_like(r).scatter_(-1, top.indices, top.values)
        votes = kept.view(S, L // bs, bs, E).sum(2)
        votes = votes / (votes.sum(-1, keepdim=True) + 1e-20)
        sorted_v, order = votes.sort(dim=-1, descending=True, stable=True)
        cum = sorted_v.cumsum(-1)
        keep = cum <= policy.top_p
        keep |= torch.cat([torch.ones_like(keep[..., :1]), keep[..., :-1]], -1)
        n = keep.sum(-1, keepdim=True)
        keep = torch.where(n < policy.guard, torch.arange(E, device=r.device) < policy.guard, keep)
        coreset = torch.zeros_like(keep).scatter_(-1, order, keep)
        r = torch.where(coreset.repeat_interleave(bs, 1), r, float("-inf"))
    grouped = r.view(S, L, cfg.n_group, -1)
    group_score = grouped.topk(2, -1).values.sum(-1)
    groups = group_score.topk(cfg.topk_group, -1).indices
    gmask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, groups, True)
    r = torch.where(gmask.repeat_interleave(E // cfg.n_group, -1), r, float("-inf"))
    ids = r.topk(cfg.top_k, -1).indices
    w = s.gather(-1, ids)
    return ids, w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor


def time_us(fn, graphed):
    """Median microseconds per call: eager calls, or replays of a graph of REPS calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graphed:
        return 1e3 * graph_ms(capture(fn, REPS), REPS, trials=50)
    return 1e3 * time_ms(fn, 1, 50, torch.device("cuda"))


def check_same(a, b):
    """Same ids (as sets per row: slot order is free) and weights to 1e-5."""
    ia, order_a = a.topk_ids.sort(-1)
    ib, order_b = b.topk_ids.sort(-1)
    wa, wb = a.topk_weights.gather(-1, order_a), b.topk_weights.gather(-1, order_b)
    assert torch.equal(ia, ib), "kernel ids differ from the reference"
    assert torch.allclose(wa, wb, atol=1e-5), "kernel weights differ from the reference"


def sweep(logits, bias, quick=False):
    """Fastest launch shape for one block, per policy family; prints the timings.
    quick: two variants per family (the GPU smoke run checks the code path, not the choice)."""
    # vote_cols: experts per slice of a row in the vote tile; a row stays inside one warp when
    # vote_rows * vote_cols >= 128 * warps (Triton 3.6, sm_90: kernels/routing.py).
    # vote_split: programs sharing a window's votes (1: the coreset program votes alone).
    block_variants = [dict(vote_split=1, coreset_warps=w, vote_cols=vc)
                      for w in (4, 8) for vc in (32, 64)]
    block_variants += [dict(vote_split=s, vote_warps=vw, coreset_warps=w, vote_cols=vc)
                       for s in (4, 8, 16, 32) for vw in (1, 2, 4) for w in (4, 8)
                       for vc in (32, 64)]
    # With split votes the coreset program only sums the shares and sorts 256 keys: on fewer
    # warps its sort stays in shuffles (no shared-memory rounds); never timed before.
    block_variants += [dict(vote_split=32, vote_warps=1, coreset_warps=w) for w in (1, 2)]
    token_variants = [dict(route_rows=rr, route_warps=w) for rr in (1, 2, 4) for w in (1, 2, 4)]
    if quick:
        block_variants, token_variants = block_variants[::4][:2], token_variants[:2]
    best = {}
    # Route shapes first (token policy: route_kernel alone), then coreset shapes with them.
    for family, policy, variants in (("token", RoutingPolicy.token(), token_variants),
                                     ("block", RoutingPolicy.dmoe(), block_variants)):
        want = route(logits.cpu(), bias.cpu(), CFG, policy, backend="reference")
        timings = []
        for v in variants:
            launch = dataclasses.replace(DEFAULT_ROUTE, **best.get("token", {}), **v)
            fn = lambda: route_triton(logits, bias, CFG, policy, launch)  # noqa: E731
            got = fn()
            check_same(type(want)(got.topk_ids.cpu(), got.topk_weights.cpu(), None), want)
            timings.append((time_us(fn, True), v))
        default = [us for us, v in timings
                   if all(getattr(DEFAULT_ROUTE, k) == value for k, value in v.items())]
        timings.sort(key=lambda x: x[0])
        print(f"sweep ({family}, 1 block): " + ", ".join(f"{us:.1f}us {v}" for us, v in timings[:6])
              + (f"; today's default {default[0]:.1f}us" if default else ""))
        best[family] = timings[0][1]
    return dataclasses.replace(DEFAULT_ROUTE, **best["block"], **best["token"]), best


ROUTER_COPIES = 48  # 2 MB of fp32 router weights each (1 MB in bf16)


def router_rows(dev, quick=False):
    """[(tokens, path, us per call, max |logit - fp64|)] for the router GEMM's paths on a
    bf16-valued gate (module docstring); quick: 32 rows only (the GPU smoke run checks the code
    path)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    w32 = [(torch.randn(256, 2048, device=dev, generator=gen) * 0.02).bfloat16().float()
           for _ in range(ROUTER_COPIES)]
    w16 = [w.bfloat16() for w in w32]  # the same numbers: DMoEBlock.gate_weight_bf16
    rows = []
    for tokens in (32,) if quick else (32, 512):
        hidden = torch.randn(tokens, 2048, device=dev, generator=gen).bfloat16()
        want = hidden.double() @ w32[0].double().T
        skinny = "skinny_gemm" if takes_skinny(tokens, dev) else "cuBLAS"
        for name, weights, one in (
                ("fp32 GEMM (hidden.float() @ W32.T)", w32,
                 lambda w: gate_logits(hidden, w, "triton")),
                ("cuBLAS bf16, fp32 out (mm out_dtype)", w16,
                 lambda w: torch.mm(hidden, w.T, out_dtype=torch.float32)),
                (f"gate_logits bf16, fp32 out ({skinny})", w16,
                 lambda w: gate_logits(hidden, w, "triton"))):
            err = float((one(weights[0]).double() - want).abs().max())
            fn = lambda: [one(w) for w in weights]  # noqa: E731
            fn()
            torch.cuda.synchronize()
            us = 1e3 * graph_ms(capture(fn, 1), ROUTER_COPIES)
            rows.append((tokens, name, us, err))
            print(f"router GEMM T={tokens}: {us:6.1f} us  max err {err:.1e}  {name}", flush=True)
    return rows


def router_table(rows) -> str:
    lines = ["", "## Router GEMM (fp32 logits, E=256, H=2048, bf16-valued gate)", "",
             f"One call per layer on {ROUTER_COPIES} weight copies in one graph (L2 holds none); "
             "err: max |logit - fp64 logit| (logits of order 1).", "",
             "| tokens | path | us per call | err |", "|---|---|---|---|"]
    lines += [f"| {tokens} | {name} | {us:.1f} | {err:.1e} |" for tokens, name, us, err in rows]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/routing.md")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="smoke size: 2 sweep variants per family, one block (bench/smoke_gpu.sh)")
    ap.add_argument("--router", action="store_true",
                    help="also time the router GEMM: fp32 GEMM, cuBLAS bf16 with fp32 out, "
                    "gate_logits")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    launch, best = DEFAULT_ROUTE, None
    if args.sweep:
        logits = torch.randn(1, 32, 256, device=dev) + 2 * torch.randn(256, device=dev).clamp(min=0)
        launch, best = sweep(logits, torch.randn(256, device=dev) * 0.01, args.quick)
    rows = []
    policies = [("dmoe p=0.6", RoutingPolicy.dmoe()), ("token", RoutingPolicy.token()),
                ("des_vote 38", RoutingPolicy.des_vote(38)),
                ("capacity 48 (LLaDA2.2)", RoutingPolicy.capacity(48))]
    for blocks in (1,) if args.quick else (1, 4, 16):
        # One sequence per block, as in batched decoding with a KV cache.
        logits = torch.randn(blocks, 32, 256, device=dev) + 2 * torch.randn(256, device=dev).clamp(min=0)
        bias = torch.randn(256, device=dev) * 0.01
        for name, policy in policies:
            kernel = lambda: route_triton(logits, bias, CFG, policy, launch)  # noqa: E731
            peer = lambda: torch_gate(logits, bias, CFG, policy)  # noqa: E731
            rows.append((blocks, name, time_us(kernel, True), time_us(kernel, False),
                         time_us(peer, True), time_us(peer, False)))
    header = ("| blocks x 32 tokens | policy | kernels, graph (us) | kernels, eager (us) "
              "| PyTorch gate, graph (us) | PyTorch gate, eager (us) | speedup (graph) |")
    lines = [header, "|" + "---|" * 7]
    for b, name, kg, ke, pg, pe in rows:
        lines.append(f"| {b} | {name} | {kg:.1f} | {ke:.1f} | {pg:.1f} | {pe:.1f} | {pg / kg:.1f}x |")
    dev_name = torch.cuda.get_device_name()
    text = (f"# Routing of one MoE layer (E=256, top-8, groups 8/4)\n\n"
            f"Device: {dev_name}; torch {torch.__version__}; command: "
            f"`python bench/bench_routing.py {' '.join(sys.argv[1:])}`. Median of 50 "
            f"timings; graph rows replay a CUDA graph of {REPS} calls (10 replays a timing, "
            f"behind a spin: common.graph_ms); eager rows launch the kernels from Python (no "
            f"input checks). Router logits: normal plus a skewed "
            f"per-expert offset. "
            f"Kernel launch: {launch}.\n\n"
            + "\n".join(lines) + "\n")
    if args.router:
        text += router_table(router_rows(dev, args.quick))
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
