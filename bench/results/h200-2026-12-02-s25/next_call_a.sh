#!/usr/bin/env bash
# Prepared for the 26th session (not run), from the repository root on the device:
#   bash bench/results/h200-2026-12-02-s25/next_call_a.sh
# probe_stream.py: a minimal kernel with the FP8 decode gate/up's tiles, its k step's dots
# plain, scaled at once, scaled with a loaded scale, scaled one step late; 68 and 280 items;
# 3 and 4 stages. If "plain" streams 68 items far faster than "scaled", the wait for each
# scaled dot sets the gate/up's k step (call F: about 1.1 us); if all are alike, the stream
# itself (one program's tiles in flight) does.
set -u
R=$OUT/a; mkdir -p $R
PYTHONUNBUFFERED=1 timeout 300 python3 bench/results/h200-2026-12-02-s25/probe_stream.py \
  > $R/probe_stream.log 2>&1
echo "probe_stream rc=$?" | tee -a $R/steps.txt
cat $R/probe_stream.log
