#!/usr/bin/env bash
# 23rd session, call C (from the repository root on the device):
#   STOP_AT=540 bash bench/results/h200-2026-12-02-s23/call_c.sh
# Issue 16: the FP8 step with the decode down's k steps of 256 on 4 stages (wide_down_default.patch,
# the best of call B's sweep) against the working tree (k 128, 3 stages), bench_e2e --fp8
# alternately, two rounds; the wide-step tests on the GPU in the patched tree; a 4-layer FP8
# profile of the working tree (kernel by kernel).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
D=bench/results/h200-2026-12-02-s23
R=$OUT/c; mkdir -p $R
pack() { tar czf $OUT/0_c.tgz -C $OUT c; }
bash bench/ab_tree.sh ab_wide $D/wide_down_default.patch > $R/tree.log 2>&1 || { cat $R/tree.log; exit 1; }
(cd ab_wide && PYTHONPATH=$PWD timeout 120 python3 -m pytest -q tests/test_fp8.py -k "gpu or wide_down") \
  > $R/tests_wide.log 2>&1
echo "wide tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
for round in 1 2; do
  for tree in base wide; do
    [ $SECONDS -lt $(( ${STOP_AT:-540} - 90 )) ] || break 2
    dir=.; [ $tree = wide ] && dir=ab_wide
    (cd $dir && PYTHONPATH=$PWD PYTHONUNBUFFERED=1 timeout 120 python3 bench/bench_e2e.py --fp8 \
      --policies "token,dmoe p=0.6" --out $R/e2e_$tree$round) > $R/e2e_$tree$round.log 2>&1
    echo "e2e $tree$round rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
  done
done
if [ $SECONDS -lt $(( ${STOP_AT:-540} - 60 )) ]; then
  PYTHONUNBUFFERED=1 timeout 60 python3 bench/profile_e2e.py --fp8 --layers 4 > $R/profile_fp8.log 2>&1
  echo "profile rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
fi
rm -rf ab_wide; find $R -name '*.png' -delete; pack
tail -2 $R/tests_wide.log
for f in $R/e2e_*/e2e_fp8.md; do echo "$f"; grep -E "^\| (token|dmoe)" $f; done
head -40 $R/profile_fp8.log
