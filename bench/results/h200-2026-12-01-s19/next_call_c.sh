#!/usr/bin/env bash
# Planned for the next session, after next_call_a.sh and next_call_b.sh (not run): where the
# graphed 20-layer forward's time goes, kernel by kernel, with the gaps between kernels. The
# eighteenth and nineteenth sessions' breakdowns (bench_e2e's parts timed one by one) add up to
# 1.705 ms of dMoE's 1.849 ms forward (token routing: 3.254 of 3.298): about 140 us of dMoE's
# step that no part's own time shows. From the repository root on the device:
#   bash bench/results/h200-2026-12-01-s19/next_call_c.sh
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/c; mkdir -p $R
timeout 400 python3 bench/profile_e2e.py --layers 20 --prefix 512 --graph-timeline --top 40 \
  > $R/profile_20layers.log 2>&1
echo "profile rc=$?"
tar czf $OUT/0_c.tgz -C $OUT c
grep -A 44 "graph replay under the profiler" $R/profile_20layers.log
