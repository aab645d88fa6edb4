#!/usr/bin/env bash
# Seventeenth session, device call 2 (as run, from the repository root with the coreset patch
# at ../s17_coreset_sum.patch, now coreset_votes_tile.patch here): bench_routing --quick on main
# and on the coreset patch, alternating; the split-sum patch's GPU tests; smoke part 2.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/r; mkdir -p $R
mk() {  # mk DIR PATCH: HEAD with PATCH applied, kernels copied into the package
  rm -rf $1 && mkdir $1 && git archive HEAD | tar -x -C $1
  (cd $1 && git apply $2) || echo "patch $2 failed" | tee -a $R/steps.txt
  rm -rf $1/dmoe_triton/kernels && cp -r $1/kernels $1/dmoe_triton/kernels
}
mk ab_ss ../bench/results/h200-2026-12-01-s16/split_sum_into_norm.patch
mk ab_cs ../s17_coreset_sum.patch
for i in 1 2; do
  python3 bench/bench_routing.py --quick --out $R/routing_base$i.md > $R/routing_base$i.log 2>&1
  echo "routing base$i rc=$?" | tee -a $R/steps.txt
  (cd ab_cs && PYTHONPATH=$PWD python3 bench/bench_routing.py --quick --out $R/routing_cs$i.md > $R/routing_cs$i.log 2>&1)
  echo "routing cs$i rc=$?" | tee -a $R/steps.txt
done
(cd ab_cs && PYTHONPATH=$PWD timeout 120 python3 -m pytest -q -x tests/test_routing.py > $R/cs_routing_tests.log 2>&1; echo "cs routing tests rc=$?" | tee -a $R/steps.txt)
(cd ab_ss && PYTHONPATH=$PWD timeout 170 python3 -m pytest -q -m gpu tests/test_gpu_model.py \
  tests/test_moe.py tests/test_add_norm.py > $R/ss_gpu_tests.log 2>&1; echo "ss tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt)
bash bench/smoke_gpu.sh $OUT/s2 2 > $R/smoke2_console.log 2>&1; echo "smoke2 rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
cp $OUT/s2/summary.md $R/smoke2_summary.md 2>/dev/null
rm -rf ab_ss ab_cs
tar czf $R/all.tgz -C $OUT --exclude=./r . 2>/dev/null
tail -n 3 $R/ss_gpu_tests.log $R/cs_routing_tests.log
for f in $R/routing_*.md; do echo "== $f"; grep -E "^\| 1 " $f; done
cat $R/smoke2_summary.md $R/steps.txt
