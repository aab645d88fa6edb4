"""Throwaway probe (fourteenth session): the decode down alone (with the shared expert), main's
tile (block_h 32, tokens on the MMA's M side) against 64-column tiles with the weights on M
(the working tree's _down_shares_t, taken where block_h >= 64), at 15 and 70 experts; bench_moe's
sweep machinery (4 weight copies, CUDA graph, rel err against the fp32 reference).
Run from the repository root: python bench/results/h200-2026-12-01-s14/probe_down_on_m.py"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import bench_moe as bm  # noqa: E402

bw = bm.copy_bandwidth(bm.torch.device("cuda")) / 1e9
print(f"copy bandwidth {bw:.0f} GB/s")
layers = bm.make_layers(bm.COPIES, bm.E, bm.H, bm.I, bm.DTYPE, "cuda")
routed = [r for r in bm.build_routings("cuda", "triton")
          if r["case"] in ("32 tok, exact 15", "32 tok, exact 70")]
bm.GATE_UP_VARIANTS = [dict()]
bm.DOWN_VARIANTS = [dict(), dict(block_h=64), dict(block_h=64, down_splits=8),
                    dict(block_h=64, down_splits=2), dict(block_h=64, warps_down=8),
                    dict(block_h=128, down_splits=8), dict(), dict(block_h=64, down_splits=8)]
print(bm.sweep(layers, routed, bw))
