#!/usr/bin/env bash
# Planned for the next session, after next_call_a.sh (not run): the 20-layer forward, main
# against the dense projection through skinny_gemm (ds) and the same with skinny_gemm split
# over K (dss: the router in 8 ranges, the dense projection in 2), alternating until STOP_AT
# seconds (3 trees, about 100 s a round). From the repository root on the device:
#   STOP_AT=540 bash bench/results/h200-2026-12-02-s21/next_call_b.sh
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-02-s21
R=$OUT/b; mkdir -p $R
STOP_AT=${STOP_AT:-540} bash bench/ab_e2e.sh $R ds=$S/dense_skinny.patch \
  dss=$S/dense_skinny.patch,$S/skinny_split.patch > $R/console.log 2>&1
rm -f $R/*/e2e_quick.png
tar czf $OUT/0_b.tgz -C $OUT b
tail -n 40 $R/console.log
