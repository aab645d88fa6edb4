#!/usr/bin/env bash
# Planned for the next session (not run), from the repository root on the device:
#   STOP_AT=540 bash bench/results/h200-2026-12-02-s23/next_call_b.sh
# Issue 16: the FP8 step with x quantized in the gate/up's loop (x_in_loop_default.patch:
# DEFAULT_DECODE_FP8 with x_prepass=False, one launch fewer per layer) against the working
# tree: first the x-in-loop tests on the GPU in a patched tree (the path has run on the CPU
# only), then `FP8=1 bench/ab_e2e.sh` (bench_e2e --fp8, alternating rounds). Run it if
# next_call_a.sh's probe has the pair no slower with {"x_prepass": false}.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
D=bench/results/h200-2026-12-02-s23
R=$OUT/b; mkdir -p $R
pack() { tar czf $OUT/0_b.tgz -C $OUT b; }
bash bench/ab_tree.sh ab_xtest $D/x_in_loop_default.patch > $R/tree.log 2>&1 || { cat $R/tree.log; exit 1; }
(cd ab_xtest && PYTHONPATH=$PWD timeout 150 python3 -m pytest -q tests/test_fp8.py \
  -k "gpu or in_the_loop or keep_rows_apart or outside_their_range") > $R/tests_xloop.log 2>&1
echo "x-in-loop tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; rm -rf ab_xtest; pack
FP8=1 STOP_AT=$(( ${STOP_AT:-540} - SECONDS - 15 )) bash bench/ab_e2e.sh $R/ab \
  xloop=$D/x_in_loop_default.patch > $R/ab.log 2>&1
echo "ab rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
find $R -name '*.png' -delete; pack
tail -2 $R/tests_xloop.log; tail -30 $R/ab.log
