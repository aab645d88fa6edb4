#!/usr/bin/env bash
# Planned for the next session (not run here: no device time was left), after the GPU smoke's
# part 1 on main (its gpu_tests and routing tests have not run on the landed tables and
# coreset tile; part 2 has). From the repository root on the device:
#   STOP_AT=560 bash bench/results/h200-2026-12-01-s18/next_call.sh
# 1. Deeper prefetch for the decode down: the compiled loop (Triton 3.6, sm_90) keeps 3 tile
#    buffers at stages_down 5, so one step's tiles are in flight during a step's MMAs; the
#    probe (call_a/1_probe_parts.log) read act and weight loads as adding up, not overlapping.
#    stages_down 7 keeps 4 buffers (197004 bytes at 32 tokens; 262924 at 64, over the 232448
#    a program may take), k steps of 128 at 9 / 11 stages keep 5 / 6 half-size buffers (123408
#    / 148116 bytes at 32 tokens, 164880 / 197908 at 64). The gate/up (4 buffers at 4 stages)
#    at 5 stages as a control (204800 bytes at 32 tokens; 245760 at 64: does not fit). Shared
#    memory from Triton 3.6 compiling for sm_90 offline (tests/offline_compile.py's way).
# 2. The 20-layer forward (bench/ab_e2e.sh, alternating until STOP_AT seconds of this script):
#    main against deep_down_prefetch.patch (moe_launch takes stages_down 7 up to 32 tokens;
#    bench_moe times moe_launch's choice) and against the split-sum patch (the down's shares
#    added by the next add + norm, regenerated on 2b5b19f). Their GPU tests come after, for a
#    winner only.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-01-s18
R=$OUT/r; mkdir -p $R
timeout 200 python3 bench/probe_decode_shapes.py '{"stages_down": 7}' \
  '{"k_tile_down": 128, "stages_down": 9}' '{"k_tile_down": 128, "stages_down": 11}' \
  '{"stages_gate_up": 5}' > $OUT/1_shapes.log 2>&1
echo "shapes rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
STOP_AT=$(( ${STOP_AT:-560} - SECONDS )) bash bench/ab_e2e.sh $R \
  deep=$S/deep_down_prefetch.patch ss=$S/split_sum_into_norm.patch > $R/ab_e2e_console.log 2>&1
tar czf $OUT/0_all.tgz -C $OUT --exclude=./0_all.tgz . 2>/dev/null
cat $OUT/1_shapes.log; tail -n 40 $R/ab_e2e_console.log
