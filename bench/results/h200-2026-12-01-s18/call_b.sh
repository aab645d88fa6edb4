#!/usr/bin/env bash
# Eighteenth session, device call B: main against main + the down tables + the coreset votes as
# a tile (both measured faster alone in call A), in the 20-layer forward (bench_e2e --quick,
# token and dMoE p=0.6), alternating until STOP_AT seconds; first the coreset patch's GPU
# routing tests on that tree. Everything under $OUT goes into $OUT/0_all.tgz (8 files return).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S17=bench/results/h200-2026-12-01-s17
R=$OUT/r; mkdir -p $R
bash bench/ab_tree.sh ab_new $S17/down_tables.patch $S17/coreset_votes_tile.patch || exit 1
(cd ab_new && PYTHONPATH=$PWD timeout 120 python3 -m pytest -q -x tests/test_votes.py) \
  > $R/new_votes_gpu_tests.log 2>&1; echo "votes tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
i=1
while [ $SECONDS -lt ${STOP_AT:-480} ]; do
  for t in base new; do
    d=.; [ $t = base ] || d=ab_$t
    (cd $d && PYTHONPATH=$PWD timeout 100 python3 bench/bench_e2e.py --quick --budget-s 60 \
      --policies "token,dmoe p=0.6" --out $OUT/${t}$i > $R/${t}$i.log 2>&1)
    echo "$t$i rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
  done
  i=$((i+1))
done
rm -rf ab_new
tar czf $OUT/0_all.tgz -C $OUT --exclude=./0_all.tgz . 2>/dev/null
tail -n 2 $R/new_votes_gpu_tests.log
for f in $OUT/*[0-9]; do
  echo "== $f"
  grep -E "^\| calibrated \| (token|dmoe p=0.6) \| 1 " $f/e2e_quick.md | cut -d"|" -f3,6,13,14
done
cat $R/steps.txt
