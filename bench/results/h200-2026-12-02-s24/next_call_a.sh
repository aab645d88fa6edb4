#!/usr/bin/env bash
# Planned for the 25th session (not run), from the repository root on the device:
#   STOP_AT=560 bash bench/results/h200-2026-12-02-s24/next_call_a.sh
# 1. the FP8 GPU tests on main: fdb4a88 (the TMA rework after review) never ran on the GPU,
#    and test_tma_gate_up_reads_the_same_values_on_gpu is new;
# 2. probe_launch_cost.py: what one graphed launch costs (PDL as the kernels use it, none, or
#    the next launch allowed at the end; 1 / 32 / 132 programs);
# 3. down_expert_ids.patch (the FP8 down's share of expert ids loaded once, not at every
#    expert in the loop, where the pipeliner left the load synchronous): its FP8 GPU tests,
#    then probe_decode_shapes --fp8, main and patched alternately (the down column).
set -u
D=bench/results/h200-2026-12-02-s24
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/a; mkdir -p $R
pack() { tar czf $OUT/0_a.tgz -C $OUT a; }
timeout 170 python3 -m pytest -q -m gpu tests/test_fp8.py > $R/tests_main.log 2>&1
echo "tests main rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; tail -2 $R/tests_main.log; pack
PYTHONUNBUFFERED=1 timeout 60 python3 $D/probe_launch_cost.py > $R/launch_cost.log 2>&1
echo "launch cost rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; cat $R/launch_cost.log; pack
bash bench/ab_tree.sh ab_ids $D/down_expert_ids.patch > $R/tree.log 2>&1 \
  || { cat $R/tree.log; exit 1; }
(cd ab_ids && PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -x -m gpu tests/test_fp8.py \
  -k "not test_tma" > $R/tests_ids.log 2>&1)
echo "tests ids rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; tail -2 $R/tests_ids.log; pack
for round in 1 2; do
  for tree in main ab_ids; do
    left=$(( ${STOP_AT:-560} - SECONDS - 15 ))
    [ $left -gt 40 ] || break 2
    if [ $tree = main ]; then dir=.; else dir=ab_ids; fi
    (cd $dir && PYTHONPATH=$PWD PYTHONUNBUFFERED=1 timeout $left python3 \
      bench/probe_decode_shapes.py --fp8 --experts 8,15,30,70 --rounds 1 \
      > $R/probe_${tree}_$round.log 2>&1)
    echo "probe $tree $round rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
  done
done
rm -rf ab_ids
pack; cat $R/steps.txt; for f in $R/probe_*.log; do echo "== $f"; tail -4 $f; done
