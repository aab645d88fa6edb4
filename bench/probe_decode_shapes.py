"""Decode launch shapes against the default, on the H200: the down alone and the gate/up + down
pair, us per layer call (graphs of 4 layer calls on 4 weight copies, 32 tokens, exact-u token
routing, the shared expert), each shape checked against the fp32 reference first, in
alternating rounds. A shape is a dict of DecodeConfig fields, given as JSON:

    python bench/probe_decode_shapes.py '{"stages_down": 7}' \
        '{"k_tile_down": 128, "stages_down": 9}'
    python bench/probe_decode_shapes.py --experts 15,70 --rounds 1 '{"warps_down": 4}'

For one question about a few shapes (bench_moe.py --sweep times every variant it knows, and
picks); the sessions' earlier one-off probes of this kind (bench/results/*/probe_down_*.py)
are records of what ran.
"""
import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from bench_moe import (CFG, COPIES, DTYPE, E, EXPERT_BYTES, H, I, MAX_REL_ERR, TOP_K,  # noqa: E402
                       exact_logits, graph_us, launch_closures, make_layers, rel_err,
                       shared_experts, unique_counts)
from common import copy_bandwidth  # noqa: E402
from dmoe_triton import RoutingPolicy, route  # noqa: E402
from dmoe_triton.launch import DEFAULT_DECODE, DecodeConfig  # noqa: E402
from dmoe_triton.moe import moe_forward_triton  # noqa: E402
from dmoe_triton.reference import moe_forward_reference  # noqa: E402


def parse_shape(text: str) -> dict:
    """One shape from its JSON, checked as DecodeConfig checks its fields
    (argparse.ArgumentTypeError, which argparse prints, when it is not a JSON object of valid
    DecodeConfig fields: before any GPU work)."""
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    try:
        change = json.loads(text)
    except json.JSONDecodeError:
        change = None
    if not isinstance(change, dict) or set(change) - fields:
        raise argparse.ArgumentTypeError(f"a shape is a JSON object of DecodeConfig fields "
                                         f"{sorted(fields)}, got {text!r}")
    try:
        dataclasses.replace(DEFAULT_DECODE, **change)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"shape {text}: {exc}") from None
    return change


# bench_moe.exact_logits' range: a token's top-k distinct experts, inside the gate's 4 kept groups
MIN_UNIQUE, MAX_UNIQUE = TOP_K, CFG.topk_group * (E // CFG.n_group)


def expert_counts(text: str) -> list:
    """--experts: comma-separated unique-expert counts, each MIN_UNIQUE..MAX_UNIQUE."""
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or not all(MIN_UNIQUE <= c <= MAX_UNIQUE for c in counts):
        raise argparse.ArgumentTypeError(f"--experts takes counts {MIN_UNIQUE}..{MAX_UNIQUE} "
                                         f"separated by commas, got {text!r}")
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shapes", nargs="+", type=parse_shape, help="JSON dicts of DecodeConfig "
                    "fields, each timed against the default")
    ap.add_argument("--experts", type=expert_counts, default=[15, 17, 70],
                    help="unique routed experts of the 32 tokens (exact routing), e.g. 15,70")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_decode_shapes.py times CUDA graphs: it needs a CUDA device")
    shapes = [dict()] + args.shapes
    names = ["default"] + [json.dumps(s) for s in args.shapes]
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s, default "
          f"{DEFAULT_DECODE}")
    layers = make_layers(COPIES, E, H, I, DTYPE, "cuda")
    shared = shared_experts(layers)
    outs = [torch.empty(32, H, device="cuda", dtype=DTYPE) for _ in layers]
    gen = torch.Generator().manual_seed(0)
    print("| experts (+1) | round | " + " | ".join(f"down, {n}" for n in names) + " | "
          + " | ".join(f"pair, {n}" for n in names) + " | down floor us |")
    print("|---|---|" + "---|" * (2 * len(shapes) + 1))
    for unique in args.experts:
        r = route(exact_logits(1, unique, gen).cuda(), None, CFG, RoutingPolicy.token(),
                  "triton")
        ids, weights = r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)
        u, _ = unique_counts(ids)
        hidden = torch.randn(32, H, device="cuda", dtype=DTYPE)
        ref = moe_forward_reference(hidden.float(), ids, weights, *layers[0], shared=shared[0])
        configs = [dataclasses.replace(DEFAULT_DECODE, **s) for s in shapes]
        for name, cfg in zip(names, configs):
            y = moe_forward_triton(hidden, ids, weights, *layers[0], decode=cfg,
                                   shared=shared[0])
            err = rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf")
            if not err <= MAX_REL_ERR:
                sys.exit(f"shape {name} at {u} experts: relative error {err:.1e} against the "
                         f"fp32 reference (at most {MAX_REL_ERR})")
        for rnd in range(1, args.rounds + 1):
            down, pair = [], []
            for cfg in configs:
                def both(cfg=cfg):
                    for (wg, wd), s, o in zip(layers, shared, outs):
                        moe_forward_triton(hidden, ids, weights, wg, wd, out=o, decode=cfg,
                                           shared=s)

                down.append(graph_us(launch_closures(layers, shared, ids, weights, hidden,
                                                     cfg)[1]))
                pair.append(graph_us(both))
            floor = (u + 1) * EXPERT_BYTES / 3 / bw / 1e3
            print(f"| {u} | {rnd} | " + " | ".join(f"{t:.1f}" for t in down + pair)
                  + f" | {floor:.1f} |", flush=True)


if __name__ == "__main__":
    main()
