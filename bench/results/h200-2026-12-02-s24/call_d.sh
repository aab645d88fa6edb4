#!/usr/bin/env bash
# 24th session, call D: bash bench/results/h200-2026-12-02-s24/call_d.sh
# Issue 16: the FP8 decode gate/up's weight tiles through TMA (DecodeConfig.tma, in-kernel
# tensor descriptors) against cp.async copies.
# 1. probe_decode_shapes --fp8 (each shape checked against the fp32 reference first);
# 2. the FP8 GPU tests on a tree with tma=True in DEFAULT_DECODE_FP8 (tma_default_only.patch);
# 3. the 20-layer FP8 step, main against that tree (bench/ab_e2e.sh, FP8=1).
set -u
D=bench/results/h200-2026-12-02-s24
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/d; mkdir -p $R
pack() { tar czf $OUT/0_d.tgz -C $OUT d; }
PYTHONUNBUFFERED=1 timeout 150 python3 bench/probe_decode_shapes.py --fp8 --experts 8,15,30,70 \
  --rounds 2 '{"tma": true}' '{"tma": true, "block_i": 64}' '{"tma": true, "stages_gate_up": 3}' \
  > $R/probe_tma.log 2>&1
echo "probe rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; tail -9 $R/probe_tma.log; pack
bash bench/ab_tree.sh ab_tmat $D/tma_default_only.patch > $R/tree.log 2>&1
(cd ab_tmat && PYTHONPATH=$PWD timeout 170 python3 -m pytest -q -x -m gpu tests/test_fp8.py \
  > $R/tests.log 2>&1)
echo "tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; tail -3 $R/tests.log; rm -rf ab_tmat; pack
STOP_AT=$(( 560 - SECONDS )) FP8=1 bash bench/ab_e2e.sh $R/e2e tma=$D/tma_default_only.patch \
  > $R/e2e.log 2>&1
echo "e2e rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
pack; cat $R/steps.txt; tail -12 $R/e2e.log
