#!/usr/bin/env bash
# Planned for the next session (the nineteenth's device time was spent; not run), from the
# repository root on the device:
#   STOP_AT=560 bash bench/results/h200-2026-12-01-s19/next_call_a.sh
# Two patches of the bf16 decode path, each against main (README.md here):
# - wa = weighted_act.patch: the gate/up weighs each act row by its routing weight, so the
#   down's loop is a plain chain of MMAs into one accumulator. Compiled offline (Triton 3.6,
#   sm_90) the loop waits with `warp_group_dot_wait {pendings = 1}` where main's waits for 0
#   every step; shared memory unchanged (147720 bytes at 32 tokens).
# - rows = weighted_act_rows.patch: the same, and act rows by expert (u * T_PAD + t, zeros for
#   the tokens that do not use it, as the FP8 path has them): the down's act tile needs no
#   table of act rows loaded first (4 -> 3 copy groups a step; 147464 bytes), at the price of
#   reading every token row of every expert from L2 (74 MB at 70 experts against 9.4).
# 1. bench_moe --quick, main / wa / rows alternating, twice (the expert kernels at 15 / 17 /
#    70 experts, each checked against the reference);
# 2. the probe in each patched tree: stages_down 7 (4 tile buffers) and k steps of 128 at 8
#    stages, now that the MMAs no longer wait every step (this session both kinds were slower
#    on main);
# 3. the patched trees' GPU tests of the expert path, the model and FP8 (main's FP8 NaN-code
#    check of this session included: it is in both trees), as time allows.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-01-s19
R=$OUT/a; mkdir -p $R
trap 'rm -rf ab_wa ab_rows' EXIT
# Packed again after every step: a call cut short still brings back 0_a.tgz (only 8 files come
# back, in name order; this session's first A/B call lost its results by packing only at the end).
pack() { tar czf $OUT/0_a.tgz -C $OUT a; }
bash bench/ab_tree.sh ab_wa $S/weighted_act.patch > $R/ab_tree.log 2>&1 \
  && bash bench/ab_tree.sh ab_rows $S/weighted_act_rows.patch >> $R/ab_tree.log 2>&1 \
  || { cat $R/ab_tree.log; exit 1; }
for round in 1 2; do
  for t in base wa rows; do
    d=.; [ $t = base ] || d=ab_$t
    (cd $d && PYTHONPATH=$PWD timeout 120 python3 bench/bench_moe.py --quick --out $R/moe_$t$round \
      > $R/moe_$t$round.log 2>&1)
    echo "moe_$t$round rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
    pack
  done
done
for t in wa rows; do
  (cd ab_$t && PYTHONPATH=$PWD timeout 90 python3 bench/probe_decode_shapes.py \
    '{"stages_down": 7}' '{"k_tile_down": 128, "stages_down": 8}' > $R/probe_$t.log 2>&1)
  echo "probe_$t rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
  pack
done
for t in wa rows; do
  left=$(( ${STOP_AT:-560} - SECONDS - 20 ))
  [ $left -gt 30 ] || break
  (cd ab_$t && PYTHONPATH=$PWD timeout $left python3 -m pytest -q -m gpu tests/test_moe.py \
    tests/test_gpu_model.py tests/test_fp8.py > $R/gpu_tests_$t.log 2>&1)
  echo "gpu tests $t rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
  pack
done
for f in $R/moe_*[0-9].log; do echo "== $f"; grep -E "max relative error" $f; grep -A6 "^routing " $f; done
cat $R/probe_*.log; tail -n 2 $R/gpu_tests_*.log
