#!/usr/bin/env bash
# 25th session, call B, from the repository root on the device:
#   bash bench/results/h200-2026-12-02-s25/call_b.sh
# 1. probe_replay.py: the graph replay's host launch in the kernel benches' per-call times;
# 2. profile_e2e.py --graph-timeline on today's main (20 layers, prefix 512): per-kernel advance.
set -u
D=bench/results/h200-2026-12-02-s25
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/b; mkdir -p $R
pack() { tar czf $OUT/0_b.tgz -C $OUT b; }
PYTHONUNBUFFERED=1 timeout 240 python3 $D/probe_replay.py > $R/probe_replay.log 2>&1
echo "probe_replay rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
PYTHONUNBUFFERED=1 timeout 240 python3 bench/profile_e2e.py --layers 20 --prefix 512 \
  --graph-timeline --top 40 > $R/profile_20layers.log 2>&1
echo "profile rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
cat $R/probe_replay.log; grep -A45 -i "timeline" $R/profile_20layers.log | tail -60
