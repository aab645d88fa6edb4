#!/usr/bin/env bash
# Planned for the next session (not run), from the repository root on the device:
#   STOP_AT=560 bash bench/results/h200-2026-12-02-s23/next_call_a.sh
# Issue 16: where the FP8 decode's time goes at few experts (README.md here, last section).
# 1. probe_decode_shapes --fp8: the gate/up alone, the down alone and the pair at 8 / 15 / 30 /
#    70 experts, the default against twice the gate/up items (block_i 64: 64-column act groups,
#    so the down then makes two dots per 128 columns) and one gate/up program per SM. If the
#    gate/up's time barely grows from 8 to 30 experts, a fixed cost per launch dominates
#    (the in-kernel search for used experts, the PDL wait, x loads); if block_i 64 halves the
#    gate/up at 15 but the down grows as much, per-SM bandwidth limits the gate/up and a split
#    along H (items of (expert, 128 columns, half of H), a sum by the last arrival) is next.
#    Also x quantized in the gate/up's loop (x_prepass false: no scaled_rows launch; landed
#    unmeasured as an option, the default keeps the launch): if the pair is faster, time the
#    20-layer step (bench_e2e --fp8) with it before changing DEFAULT_DECODE_FP8.
# 2. the same for bf16 (default only), for the intercepts side by side;
# 3. smoke part 1's steps that this session's call D did not reach (attention, pick).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/a; mkdir -p $R
pack() { tar czf $OUT/0_a.tgz -C $OUT a; }
PYTHONUNBUFFERED=1 timeout 240 python3 bench/probe_decode_shapes.py --fp8 --experts 8,15,30,70 \
  --rounds 2 '{"block_i": 64}' '{"programs_per_sm": 1}' '{"x_prepass": false}' > $R/probe_fp8.log 2>&1
echo "probe fp8 rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
PYTHONUNBUFFERED=1 timeout 120 python3 bench/probe_decode_shapes.py --experts 8,15,30,70 \
  --rounds 1 > $R/probe_bf16.log 2>&1
echo "probe bf16 rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
left=$(( ${STOP_AT:-560} - SECONDS - 20 ))
if [ $left -gt 60 ]; then
  (timeout $left python3 bench/bench_attention.py --quick --out $R/attention.md > $R/attention.log 2>&1
   echo "attention rc=$? at ${SECONDS}s" >> $R/steps.txt
   left=$(( ${STOP_AT:-560} - SECONDS - 20 ))
   [ $left -gt 30 ] && timeout $left python3 bench/bench_pick.py --out $R/pick.md > $R/pick.log 2>&1
   echo "pick rc=$? at ${SECONDS}s" >> $R/steps.txt)
fi
pack; cat $R/steps.txt; cat $R/probe_fp8.log; cat $R/probe_bf16.log; tail -5 $R/attention.md 2>/dev/null
