#!/usr/bin/env bash
# 24th session, call C: STOP_AT=420 bash bench/results/h200-2026-12-02-s24/call_c.sh
# 1. probe_fixed.py: the decode gate/up's time at 0 / 8 / 15 / 70 experts, with its k loop
#    cut to H/4, CUPTI's own time per kernel, and an empty PDL kernel's launch cost;
# 2. FP8 gate/up shapes that let two programs share an SM (3 stages).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/c; mkdir -p $R
pack() { tar czf $OUT/0_c.tgz -C $OUT c; }
PYTHONUNBUFFERED=1 timeout 240 python3 bench/results/h200-2026-12-02-s24/probe_fixed.py \
  > $R/probe_fixed.log 2>&1
echo "probe_fixed rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
left=$(( ${STOP_AT:-420} - SECONDS - 15 ))
[ $left -gt 45 ] && PYTHONUNBUFFERED=1 timeout $left python3 bench/probe_decode_shapes.py --fp8 \
  --experts 8,15,70 --rounds 1 '{"stages_gate_up": 3}' '{"stages_gate_up": 3, "block_i": 64}' \
  '{"stages_gate_up": 2}' > $R/probe_stages.log 2>&1
echo "probe stages rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
pack; cat $R/steps.txt; cat $R/probe_fixed.log | tail -30; tail -6 $R/probe_stages.log
