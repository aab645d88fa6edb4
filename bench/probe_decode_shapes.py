"""Decode launch shapes against the default, each launch alone and the pair (H200).

The gate/up alone, the down alone and the pair, us per layer call (graphs of 4 layer calls
on 4 weight copies, 32 tokens, exact-u token routing, the shared expert), each shape checked
against the fp32 reference first, in alternating rounds. A shape is a dict of DecodeConfig
fields, given as JSON; with --fp8 the layers are FP8 (128 x 128 block scales,
launch.DEFAULT_DECODE_FP8 the default, the gate/up's time including the activations' prepass
launch):

    python bench/probe_decode_shapes.py '{"stages_down": 7}' \
        '{"k_tile_down": 128, "stages_down": 9}'
    python bench/probe_decode_shapes.py --experts 15,70 --rounds 1 '{"warps_down": 4}'
    python bench/probe_decode_shapes.py --fp8 --experts 8,15,30,70 '{"block_i": 64}'

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
                       exact_logits, fp8_expert_bytes, fp8_reference, fp8_shared_experts,
                       graph_us, launch_closures, make_layers, rel_err, shared_experts,
                       unique_counts)
from common import copy_bandwidth  # noqa: E402
from dmoe_triton import RoutingPolicy, route  # noqa: E402
from dmoe_triton.launch import DEFAULT_DECODE, DEFAULT_DECODE_FP8, DecodeConfig  # noqa: E402
from dmoe_triton.moe import moe_forward_triton  # noqa: E402
from dmoe_triton.quant import dequantize_experts, quantize_experts  # noqa: E402
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
DEVICE = "cuda"
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


class Layers:
    """The weight copies the probe times (bf16, or FP8 with --fp8) and how to run and check
    one layer call: run(copy, hidden, ids, weights, cfg, out) and reference(hidden, row, cfg),
    the copies' shared experts and, FP8, their scales (launch_closures' arguments)."""

    def __init__(self, fp8: bool):
        bf16 = make_layers(COPIES, E, H, I, DTYPE, DEVICE)
        self.fp8 = fp8
        if not fp8:
            self.weights, self.shared, self.scales = bf16, shared_experts(bf16), None
            self.default, self.expert_bytes = DEFAULT_DECODE, EXPERT_BYTES
            return
        eights = [quantize_experts(wg, wd) for wg, wd in bf16]
        shared = fp8_shared_experts(eights)  # [((gate_up, down), scales with .shared)]
        self.weights = [(wg, wd) for wg, wd, _ in eights]
        self.shared = [pair for pair, _ in shared]
        self.scales = [scales for _, scales in shared]
        self.dequantized = dequantize_experts(*eights[0])
        self.default, self.expert_bytes = DEFAULT_DECODE_FP8, fp8_expert_bytes(eights[0][2])

    def run(self, copy, hidden, ids, weights, cfg, out=None):
        kw = dict(scales=self.scales[copy]) if self.fp8 else {}
        return moe_forward_triton(hidden, ids, weights, *self.weights[copy], out=out, decode=cfg,
                                  path="decode", shared=self.shared[copy], **kw)

    def reference(self, hidden, row, cfg):
        if self.fp8:
            return fp8_reference(hidden, row, self.dequantized, self.scales[0], cfg,
                                 self.shared[0])
        return moe_forward_reference(hidden.float(), row["ids"], row["weights"],
                                     *self.weights[0], shared=self.shared[0])


def positive(text: str) -> int:
    """--rounds: an int >= 1 (argparse.ArgumentTypeError otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--rounds takes an int >= 1, got {text!r}")
    return value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shapes", nargs="*", type=parse_shape, help="JSON dicts of DecodeConfig "
                    "fields, each timed against the default (none: the default alone)")
    ap.add_argument("--experts", type=expert_counts, default=[15, 17, 70],
                    help="unique routed experts of the 32 tokens (exact routing), e.g. 15,70")
    ap.add_argument("--rounds", type=positive, default=2)
    ap.add_argument("--fp8", action="store_true", help="FP8 experts (issue 16)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_decode_shapes.py times CUDA graphs: it needs a CUDA device")
    shapes = [dict()] + args.shapes
    names = ["default"] + [json.dumps(s) for s in args.shapes]
    bw = copy_bandwidth(torch.device(DEVICE)) / 1e9
    layers = Layers(args.fp8)
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s, "
          f"{'FP8' if args.fp8 else 'bf16'} experts, default {layers.default}")
    outs = [torch.empty(32, H, device=DEVICE, dtype=DTYPE) for _ in layers.weights]
    gen = torch.Generator().manual_seed(0)
    print("| experts (+1) | round | " + " | ".join(f"{part}, {n}" for part in
                                                 ("gate/up", "down", "pair") for n in names)
          + " | gate/up floor us | down floor us |")
    print("|---|---|" + "---|" * (3 * len(shapes) + 2))
    for unique in args.experts:
        r = route(exact_logits(1, unique, gen).to(DEVICE), None, CFG, RoutingPolicy.token(),
                  "triton")
        row = dict(ids=r.topk_ids.view(32, -1), weights=r.topk_weights.view(32, -1))
        ids, weights = row["ids"], row["weights"]
        u, _ = unique_counts(ids)
        hidden = torch.randn(32, H, device=DEVICE, dtype=DTYPE)
        configs = [dataclasses.replace(layers.default, **s) for s in shapes]
        for name, cfg in zip(names, configs):
            y = layers.run(0, hidden, ids, weights, cfg)
            err = (rel_err(y, layers.reference(hidden, row, cfg))
                   if bool(torch.isfinite(y).all()) else float("inf"))
            if not err <= MAX_REL_ERR:
                sys.exit(f"shape {name} at {u} experts: relative error {err:.1e} against the "
                         f"reference (at most {MAX_REL_ERR})")
        for rnd in range(1, args.rounds + 1):
            gate_up, down, pair = [], [], []
            for cfg in configs:
                def both(cfg=cfg):
                    for copy, o in enumerate(outs):
                        layers.run(copy, hidden, ids, weights, cfg, o)

                launches = launch_closures(layers.weights, layers.shared, ids, weights, hidden,
                                           cfg, layers.scales)
                gate_up.append(graph_us(launches[0]))
                down.append(graph_us(launches[1]))
                pair.append(graph_us(both))
            floor = (u + 1) * layers.expert_bytes / 3 / bw / 1e3  # one third: one projection
            print(f"| {u} | {rnd} | " + " | ".join(f"{t:.1f}" for t in gate_up + down + pair)
                  + f" | {2 * floor:.1f} | {floor:.1f} |", flush=True)


if __name__ == "__main__":
    main()
