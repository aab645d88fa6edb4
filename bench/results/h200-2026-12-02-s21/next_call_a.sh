#!/usr/bin/env bash
# Planned for the next session (not run), from the repository root on the device:
#   STOP_AT=560 bash bench/results/h200-2026-12-02-s21/next_call_a.sh
# The two patches prepared in the 21st session (README.md here), in one tree ab_dss:
# dense_skinny.patch (the attention's dense projection through skinny_gemm) + skinny_split.patch
# (skinny_gemm split over K, deterministic; skinny_splits' ranges by default).
# 1. bench/probe_skinny.py in ab_dss: skinny_launch's own shape (router 8 ranges, QKV and dense
#    2) against no split and other splits, weights from HBM, 16 and 32 tokens;
# 2. ab_dss's tests on CUDA: test_skinny (the split order under real arrival orders, graph
#    replay of 8 ranges), test_router, test_gpu_model (-m gpu: the model graphed and eager);
# 3. the GPU smoke's part 1 on main, as time allows (bench_routing's new router rows; the
#    smoke's part 2 has not run since the eighteenth session: a later call).
# Packed into 0_a.tgz after every step (only 8 files come back, in name order).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-02-s21
R=$OUT/a; mkdir -p $R
trap 'rm -rf ab_dss' EXIT
pack() { tar czf $OUT/0_a.tgz -C $OUT a; }
bash bench/ab_tree.sh ab_dss $S/dense_skinny.patch $S/skinny_split.patch > $R/ab_tree.log 2>&1 \
  || { cat $R/ab_tree.log; exit 1; }
(cd ab_dss && PYTHONPATH=$PWD timeout 150 python3 bench/probe_skinny.py '{"splits": 1}' \
  '{"splits": 4}' '{"splits": 16}' '{"block_n": 32, "splits": 4}' '{"block_k": 128}' \
  > $R/probe_skinny.log 2>&1)
echo "probe rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
(cd ab_dss && PYTHONPATH=$PWD timeout 200 python3 -m pytest -q tests/test_skinny.py \
  tests/test_router.py > $R/tests_skinny_router.log 2>&1 && PYTHONPATH=$PWD timeout 150 \
  python3 -m pytest -q -m gpu tests/test_gpu_model.py >> $R/tests_skinny_router.log 2>&1)
echo "tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
left=$(( ${STOP_AT:-560} - SECONDS - 20 ))
if [ $left -gt 120 ]; then
  timeout $left bash bench/smoke_gpu.sh $R/smoke1 1 > $R/smoke1.log 2>&1
  echo "smoke part 1 rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
fi
cat $R/probe_skinny.log; tail -n 2 $R/tests_*.log; cat $R/smoke1/summary.md 2>/dev/null
