#!/usr/bin/env bash
# Planned for the next session (the nineteenth's device time was spent; not run), from the
# repository root on the device:
#   STOP_AT=560 bash bench/results/h200-2026-12-01-s19/next_call_a.sh
# weighted_act.patch: the decode gate/up weighs each act row by its routing weight, so the
# bf16 down's loop is a plain chain of MMAs into one accumulator. Compiled offline (Triton 3.6,
# sm_90) its loop waits with `warp_group_dot_wait {pendings = 1}` (one step's MMAs in flight
# during the next step) where main's waits for 0 every step (it weighs each expert's sum after
# its last step); shared memory unchanged (147720 bytes at 32 tokens).
# 1. bench_moe --quick, main and the patch alternating, twice (the expert kernels at 15 / 17 /
#    70 experts, checked against the reference);
# 2. the probe in the patched tree: stages_down 7 (4 tile buffers) and 4, now that the MMAs no
#    longer wait every step (this session both deeper shapes were slower on main);
# 3. the patched tree's GPU tests of the expert path and the model.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-01-s19
R=$OUT/a; mkdir -p $R
bash bench/ab_tree.sh ab_wa $S/weighted_act.patch > $R/ab_tree.log 2>&1 || { cat $R/ab_tree.log; exit 1; }
trap 'rm -rf ab_wa' EXIT
for round in 1 2; do
  for t in base wa; do
    d=.; [ $t = base ] || d=ab_$t
    (cd $d && PYTHONPATH=$PWD timeout 120 python3 bench/bench_moe.py --quick --out $R/moe_$t$round \
      > $R/moe_$t$round.log 2>&1)
    echo "moe_$t$round rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
  done
done
(cd ab_wa && PYTHONPATH=$PWD timeout 120 python3 bench/probe_decode_shapes.py '{"stages_down": 7}' \
  '{"stages_down": 4}' > $R/probe_wa.log 2>&1)
echo "probe rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
left=$(( ${STOP_AT:-560} - SECONDS - 20 ))
(cd ab_wa && PYTHONPATH=$PWD timeout $left python3 -m pytest -q -m gpu tests/test_moe.py \
  tests/test_gpu_model.py > $R/gpu_tests_wa.log 2>&1)
echo "gpu tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
tar czf $OUT/0_a.tgz -C $OUT a
for f in $R/moe_*[0-9].log; do echo "== $f"; grep -E "max relative error" $f; grep -A6 "^routing " $f; done
cat $R/probe_wa.log; tail -n 3 $R/gpu_tests_wa.log
