#!/usr/bin/env bash
# Planned for the next session (not run), from the repository root on the device:
#   STOP_AT=560 bash bench/results/h200-2026-12-02-s20/next_call_a.sh
# The four patches prepared in the twentieth session (README.md here), in one tree ab_all:
# skinny_router.patch + skinny_proj.patch + skinny_prefetch.patch (the skinny GEMM, its use in
# the attention projections, its weights into L2 before the PDL wait) + one_block_down.patch (7
# down stages for one 32-token block).
# 1. bench/probe_skinny.py in ab_all (router + attention projections):
#    skinny_launch's own shape, the same without the prefetch, and three others against cuBLAS
#    at the router's, QKV's and the dense projection's shapes, 32 and 64 tokens, weights from
#    HBM;
# 2. ab_all's GPU tests of the new paths: test_skinny and test_router (its ties and graph
#    replay run on CUDA), test_gpu_model (the whole model, graphed and eager), all of test_moe
#    on CUDA (the 7-stage down at 32 tokens; main's fp16 fix of 2788772, whose test is not
#    marked gpu);
# 3. the GPU smoke's part 2 on main, as time allows (it has not run since the eighteenth
#    session; its profile step now shows the graph timeline).
# Packed into 0_a.tgz after every step (only 8 files come back, in name order).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=bench/results/h200-2026-12-02-s20
R=$OUT/a; mkdir -p $R
trap 'rm -rf ab_all' EXIT
pack() { tar czf $OUT/0_a.tgz -C $OUT a; }
bash bench/ab_tree.sh ab_all $S/skinny_router.patch $S/skinny_proj.patch $S/skinny_prefetch.patch \
  $S/one_block_down.patch > $R/ab_tree.log 2>&1 \
  || { cat $R/ab_tree.log; exit 1; }
(cd ab_all && PYTHONPATH=$PWD timeout 150 python3 bench/probe_skinny.py '{"prefetch": false}' \
  '{"block_n": 32}' \
  '{"block_n": 16, "block_k": 128, "stages": 6}' '{"block_n": 64, "block_k": 128}' \
  > $R/probe_skinny.log 2>&1)
echo "probe rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
(cd ab_all && PYTHONPATH=$PWD timeout 300 python3 -m pytest -q tests/test_skinny.py \
  tests/test_router.py > $R/tests_skinny_router.log 2>&1)
echo "skinny/router tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
(cd ab_all && PYTHONPATH=$PWD timeout 300 python3 -m pytest -q -m gpu tests/test_gpu_model.py \
  > $R/tests_gpu_model.log 2>&1 && PYTHONPATH=$PWD timeout 300 python3 -m pytest -q \
  tests/test_moe.py >> $R/tests_gpu_model.log 2>&1)
echo "gpu model tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
left=$(( ${STOP_AT:-560} - SECONDS - 20 ))
if [ $left -gt 120 ]; then
  timeout $left bash bench/smoke_gpu.sh $R/smoke2 2 > $R/smoke2.log 2>&1
  echo "smoke part 2 rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
fi
cat $R/probe_skinny.log; tail -n 2 $R/tests_*.log; cat $R/smoke2/summary.md 2>/dev/null
