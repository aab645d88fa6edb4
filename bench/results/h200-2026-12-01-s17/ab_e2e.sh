#!/usr/bin/env bash
# The 20-layer e2e A/B of the seventeenth session (one device call): main ("base") and trees of
# main with patches applied, given as NAME=PATCH[,PATCH...] (paths from the repository root),
# run alternately (bench_e2e --quick, token and dMoE p=0.6) until STOP_AT seconds have passed.
# As run: STOP_AT=300 bash bench/results/h200-2026-12-01-s17/ab_e2e.sh \
#           ss=bench/results/h200-2026-12-01-s16/split_sum_into_norm.patch
# The device brings back 8 files of $OUT (in name order): everything goes into $OUT/0_all.tgz
# (that run wrote r/all.tgz, which did not come back; its table is in the README). A patch that
# does not apply now stops the script (that run only printed it).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/r; mkdir -p $R
trees=(base)
for arg in "$@"; do
  name=${arg%%=*}; patch=${arg#*=}; trees+=("$name")
  rm -rf ab_$name && mkdir ab_$name && git archive HEAD | tar -x -C ab_$name
  for p in ${patch//,/ }; do
    (cd ab_$name && git apply ../$p) || { echo "patch $p failed"; exit 1; }
  done
  rm -rf ab_$name/dmoe_triton/kernels && cp -r ab_$name/kernels ab_$name/dmoe_triton/kernels
done
i=1
while [ $SECONDS -lt ${STOP_AT:-380} ]; do
  for t in "${trees[@]}"; do
    d=.; [ $t = base ] || d=ab_$t
    (cd $d && PYTHONPATH=$PWD python3 bench/bench_e2e.py --quick --budget-s 60 \
      --policies "token,dmoe p=0.6" --out $OUT/${t}$i > $R/${t}$i.log 2>&1)
    echo "$t$i rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
  done
  i=$((i+1))
done
rm -rf ab_*
tar czf $OUT/0_all.tgz -C $OUT --exclude=./0_all.tgz . 2>/dev/null
for f in $OUT/*[0-9]; do
  echo "== $f"
  grep -E "^\| calibrated \| (token|dmoe p=0.6) \| 1 " $f/e2e_quick.md | cut -d'|' -f3,6,12,13
done
cat $R/steps.txt
