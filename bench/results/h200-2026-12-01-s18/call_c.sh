#!/usr/bin/env bash
# Eighteenth session, device call C (the last of the session's device time): the GPU smoke's
# part 2 on main with the down tables and the coreset votes as a tile (uncommitted then; the
# same code as call B's "new" tree), then, while time is left (STOP_AT s), the FP8 scales
# loaded one step ahead (fp8_prefetch_scales.patch): bench_moe --fp8 (which checks the kernels
# against the reference before timing) on main and on the patch.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S17=bench/results/h200-2026-12-01-s17
bash bench/smoke_gpu.sh $OUT/s2 2 > $OUT/1_smoke2_console.log 2>&1
echo "smoke2 rc=$? at ${SECONDS}s" | tee $OUT/0_steps.txt
bash bench/ab_tree.sh ab_fp8 $S17/fp8_prefetch_scales.patch || exit 1
for t in base new; do
  [ $SECONDS -lt ${STOP_AT:-330} ] || break
  d=.; [ $t = base ] || d=ab_fp8
  (cd $d && PYTHONPATH=$PWD timeout 110 python3 bench/bench_moe.py --fp8 --out $OUT/3_$t) \
    > $OUT/3_$t.log 2>&1; echo "fp8 bench $t rc=$? at ${SECONDS}s" | tee -a $OUT/0_steps.txt
done
rm -rf ab_fp8
cat $OUT/s2/summary.md
for t in base new; do echo "== $t"; grep "^| " $OUT/3_$t/moe_fp8.md 2>/dev/null | head -9; done
cat $OUT/0_steps.txt
