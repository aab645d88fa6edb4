#!/usr/bin/env bash
# Planned for the next session, after next_call_a.sh (not run): the 20-layer forward, main
# against the skinny router GEMM (sr), the skinny router + attention projections (sp), the same
# with the weight prefetch (pf) and 7 down stages for one block (ob), alternating until STOP_AT
# seconds (5 trees, about 175 s a round). From the repository root on the device:
#   STOP_AT=540 bash bench/results/h200-2026-12-02-s20/next_call_b.sh
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-02-s20
R=$OUT/b; mkdir -p $R
STOP_AT=${STOP_AT:-540} bash bench/ab_e2e.sh $R sr=$S/skinny_router.patch \
  sp=$S/skinny_router.patch,$S/skinny_proj.patch \
  pf=$S/skinny_router.patch,$S/skinny_proj.patch,$S/skinny_prefetch.patch \
  ob=$S/one_block_down.patch \
  > $R/console.log 2>&1
rm -f $R/*/e2e_quick.png
tar czf $OUT/0_b.tgz -C $OUT b
tail -n 50 $R/console.log
