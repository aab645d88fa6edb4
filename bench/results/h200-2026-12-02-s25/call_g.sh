#!/usr/bin/env bash
# 25th session, call G, on the scales_ahead tree (DecodeConfig.scales_ahead, default off):
#   bash bench/results/h200-2026-12-02-s25/call_g.sh
# 1. its GPU tests (bit for bit against the per-step loads); 2. probe_decode_shapes --fp8 with
# scales_ahead; 3. the 20-layer FP8 step, base against sa_default.patch (scales_ahead on in
# DEFAULT_DECODE_FP8), alternating until STOP_AT.
set -u
D=bench/results/h200-2026-12-02-s25
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/g; mkdir -p $R
pack() { tar czf $OUT/0_g.tgz -C $OUT g; }
timeout 150 python3 -m pytest -q -m gpu tests/test_fp8.py -k "scales_ahead or tma_gate_up" \
  > $R/tests.log 2>&1
echo "tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; tail -2 $R/tests.log; pack
PYTHONUNBUFFERED=1 timeout 100 python3 bench/probe_decode_shapes.py --fp8 --experts 8,15,70 \
  --rounds 2 '{"scales_ahead": true}' > $R/probe.log 2>&1
echo "probe rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; cat $R/probe.log; pack
left=$(( ${STOP_AT:-330} - SECONDS ))
if [ $left -gt 60 ]; then
  FP8=1 STOP_AT=$left bash bench/ab_e2e.sh $R/e2e sa=$D/sa_default.patch > $R/e2e.log 2>&1
  echo "e2e rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; tail -15 $R/e2e.log
fi
pack
