#!/usr/bin/env bash
# 24th session, call B (from the repository root on the device):
#   STOP_AT=560 bash bench/results/h200-2026-12-02-s24/call_b.sh
# Issue 16: the FP8 gate/up's scales loaded one step ahead (scale_prefetch.patch) against main.
# 1. the FP8 GPU tests and the wide-step / x-in-loop tests on the patched tree;
# 2. probe_decode_shapes --fp8 (each shape checked against the fp32 reference first), main and
#    patched alternately, two rounds each.
set -u
D=bench/results/h200-2026-12-02-s24
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/b; mkdir -p $R
pack() { tar czf $OUT/0_b.tgz -C $OUT b; }
bash bench/ab_tree.sh ab_pf $D/scale_prefetch.patch > $R/tree.log 2>&1 || { cat $R/tree.log; exit 1; }
(cd ab_pf && PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -x tests/test_fp8.py \
  -k "gpu or wide_down or down_step_follows or x_in_the_loop" > $R/tests.log 2>&1)
echo "tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; tail -3 $R/tests.log; pack
for round in 1 2; do
  for tree in main ab_pf; do
    left=$(( ${STOP_AT:-560} - SECONDS - 15 ))
    [ $left -gt 45 ] || break 2
    if [ $tree = main ]; then dir=.; else dir=ab_pf; fi
    (cd $dir && PYTHONPATH=$PWD PYTHONUNBUFFERED=1 timeout $left python3 \
      bench/probe_decode_shapes.py --fp8 --experts 8,15,30,70 --rounds 1 \
      > $R/probe_${tree}_$round.log 2>&1)
    echo "probe $tree $round rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
  done
done
rm -rf ab_pf
pack; cat $R/steps.txt; for f in $R/probe_*.log; do echo "== $f"; tail -5 $f; done
