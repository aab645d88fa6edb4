"""Probe (fifteenth session): what the decode down's fan-in costs.

With down_splits > 1 every down program writes an fp32 partial, counts itself on an arrival
counter, and the last of a column block's programs reads the others' partials and writes out
(kernels/moe_matmul.py, _sum_shares): a serial chain of L2 round trips at the launch's tail.
This times the down launch alone (bench_moe.py's way: graph of 4 layer calls on 4 weight
copies, the shared expert included, 32 tokens) as main has it, and as a copy of the kernel that
only stores its partial (the fan-in left to whoever reads the partials: the sum is checked here
against the fp32 reference), at several splits:

    python bench/results/h200-2026-12-01-s15/probe_down_fanin.py   # GPU, about a minute
"""
import dataclasses
import importlib
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402
import triton  # noqa: E402

from bench_moe import (CFG, COPIES, DTYPE, E, EXPERT_BYTES, H, exact_logits,  # noqa: E402
                       graph_us, make_layers, rel_err, shared_experts, unique_counts)
from common import copy_bandwidth  # noqa: E402
from dmoe_triton import RoutingPolicy, route  # noqa: E402
from dmoe_triton import moe as M  # noqa: E402
from dmoe_triton.launch import DEFAULT_DECODE  # noqa: E402
from dmoe_triton.reference import moe_forward_reference  # noqa: E402

FANIN = """        _sum_shares(y, partial_tile, out_tile, tile_ok, arrivals_ptr + tl.program_id(0), share,
                    T * H, T_PAD, BLOCK_H, EXPERT_SPLITS)"""
STORE_ONLY = "        tl.store(partial_tile + share * T * H, y, mask=tile_ok)"


def store_only_kernel():
    """kernels/ copied to a package of its own with the fan-in replaced by the partial's store."""
    root = tempfile.mkdtemp()
    shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(root, "probe_kernels"))
    path = os.path.join(root, "probe_kernels", "moe_matmul.py")
    source = open(path).read()
    assert source.count(FANIN) == 1, "kernels/moe_matmul.py's fan-in call changed"
    open(path, "w").write(source.replace(FANIN, STORE_ONLY))
    sys.path.insert(0, root)
    return importlib.import_module("probe_kernels.moe_matmul").moe_down_combine_decode_kernel


def down_launch(kernel, acts, ids, weights, w_down, out, partial, arrivals, cfg, shared_down):
    """decode_down_combine's launch (dmoe_triton/moe.py) with a given kernel and partial."""
    T, H_ = out.shape
    kernel[(triton.cdiv(H_, cfg.block_h), cfg.down_splits)](
        **M._act_args(acts, cfg, down=True),
        **M._weight_args(w_down, ("stride_we", "stride_wh", "stride_wi"), None),
        ids_ptr=ids, weights_ptr=weights, out_ptr=out, stride_ot=out.stride(0),
        partial_ptr=partial, arrivals_ptr=arrivals, **M._shared_args(shared_down, None, None),
        T=T, H=H_, I=w_down.shape[2], E=w_down.shape[0], TOP_K=ids.shape[1],
        BLOCK_H=cfg.block_h, BLOCK_K=cfg.k_tile_down, EXPERT_SPLITS=cfg.down_splits,
        HAS_SHARED=True, num_warps=cfg.warps_down,
        num_stages=M.pipeline_stages(cfg.stages_down, acts.act.dtype),
        **M._decode_pads(T, ids.shape[1], w_down.shape[0], acts.act.dtype), **M.pdl(out.device))


def main():
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s")
    store_only = store_only_kernel()
    main_kernel = importlib.import_module("dmoe_triton.kernels.moe_matmul") \
        .moe_down_combine_decode_kernel
    layers = make_layers(COPIES, E, H, 512, DTYPE, "cuda")
    shared = shared_experts(layers)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for unique in (15, 70):
        logits = exact_logits(1, unique, gen).cuda()
        r = route(logits, None, CFG, RoutingPolicy.token(), "triton")
        ids, weights = r.topk_ids.view(32, -1), r.topk_weights.view(32, -1)
        u_layer, _ = unique_counts(ids)
        hidden = torch.randn(32, H, device="cuda", dtype=DTYPE)
        ref = moe_forward_reference(hidden.float(), ids, weights, *layers[0], shared=shared[0])
        floor = (u_layer + 1) * EXPERT_BYTES / 3 / bw / 1e3  # the down's third of the bytes
        for splits in (2, 4, 8, 16):
            cfg = dataclasses.replace(DEFAULT_DECODE, down_splits=splits)
            arrivals = [M.down_arrivals(H, hidden.device, cfg) for _ in layers]
            acts = [M.decode_gate_up(hidden, ids, wg, a, cfg, sgu)
                    for (wg, _), (sgu, _), a in zip(layers, shared, arrivals)]
            partials = [torch.full((splits, 32, H), float("nan"), device="cuda")
                        for _ in layers]
            outs = [torch.full_like(hidden, float("nan")) for _ in layers]
            for name, kernel in (("main (fan-in in the kernel)", main_kernel),
                                 ("partials only", store_only)):
                def down():
                    for (_, wd), (_, sd), act, a, p, o in zip(layers, shared, acts, arrivals,
                                                              partials, outs):
                        down_launch(kernel, act, ids, weights, wd, o, p, a, cfg, sd)
                down()
                torch.cuda.synchronize()
                y = outs[0] if kernel is main_kernel else partials[0].sum(0)
                err = rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf")
                us = graph_us(down)
                rows.append((u_layer, splits, name, us, 100 * floor / us, err))
                print(f"{u_layer:3d}+1 experts, {splits:2d} splits, {name:28s} {us:6.1f} us "
                      f"({100 * floor / us:4.1f}% of the down's copy bw)  err {err:.1e}",
                      flush=True)
    print("\n| experts | splits | down | us | % of copy bw | err |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| %d+1 | %d | %s | %.1f | %.1f | %.1e |" % row)


if __name__ == "__main__":
    main()
