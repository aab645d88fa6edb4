#!/usr/bin/env bash
# Twentieth session, second device call, from the repository root on the device:
#   STOP_AT=380 bash bench/results/h200-2026-12-02-s20/call_bc.sh
# 1. The 20-layer forward (bench/ab_e2e.sh), main against weighted_act.patch (wa) and
#    weighted_act_rows.patch (rows), alternating until STOP_AT seconds; packed into 0_b.tgz.
# 2. bench/profile_e2e.py --layers 20 --graph-timeline on main (the tool's first GPU run);
#    packed into 0_c.tgz. One call for both saves a machine start (about 95 s of device time).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
P=bench/results/h200-2026-12-01-s19
mkdir -p $OUT/b $OUT/c
STOP_AT=${STOP_AT:-380} bash bench/ab_e2e.sh $OUT/b wa=$P/weighted_act.patch \
  rows=$P/weighted_act_rows.patch > $OUT/b/console.log 2>&1
rm -f $OUT/b/*/e2e_quick.png
tar czf $OUT/0_b.tgz -C $OUT b
timeout 170 python3 bench/profile_e2e.py --layers 20 --prefix 512 --graph-timeline --top 40 \
  > $OUT/c/profile_20layers.log 2>&1
echo "profile rc=$? at ${SECONDS}s"
tar czf $OUT/0_c.tgz -C $OUT c
tail -n 30 $OUT/b/console.log
grep -A 44 "graph replay under the profiler" $OUT/c/profile_20layers.log | head -60
