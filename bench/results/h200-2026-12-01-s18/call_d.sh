#!/usr/bin/env bash
# Eighteenth session, device call D: the FP8 scales loaded one step ahead against main (2b5b19f
# plus this script), both trees from this working tree (call C's "new" tree was built from the
# device's stale HEAD, without the down tables: not comparable). bench_moe --fp8, alternating
# while SECONDS < STOP_AT.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
bash bench/ab_tree.sh ab_fp8 bench/results/h200-2026-12-01-s17/fp8_prefetch_scales.patch || exit 1
i=1
while [ $SECONDS -lt ${STOP_AT:-150} ]; do
  for t in base new; do
    d=.; [ $t = base ] || d=ab_fp8
    (cd $d && PYTHONPATH=$PWD timeout 60 python3 bench/bench_moe.py --fp8 --out $OUT/$t$i) \
      > $OUT/$t$i.log 2>&1; echo "$t$i rc=$? at ${SECONDS}s"
  done
  i=$((i+1))
done
rm -rf ab_fp8
for f in $OUT/*[0-9]; do echo "== $f"; grep "^| 32\|^| 16" $f/moe_fp8.md | cut -d'|' -f2,7,8,10,11; done
