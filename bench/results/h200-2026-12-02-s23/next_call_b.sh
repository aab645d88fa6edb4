#!/usr/bin/env bash
# Planned for the next session (not run), from the repository root on the device:
#   STOP_AT=540 bash bench/results/h200-2026-12-02-s23/next_call_b.sh
# Issue 16: the FP8 step with x quantized in the gate/up's loop (x_in_loop_default.patch:
# DEFAULT_DECODE_FP8 with x_prepass=False, one launch fewer per layer) against the working
# tree, bench_e2e --fp8 alternately, two rounds; first the x-in-loop tests on the GPU in the
# patched tree (the path has run on the CPU only); last a 4-layer FP8 profile of the patched
# tree (kernel by kernel). Run it if next_call_a.sh's probe has the pair no slower with
# {"x_prepass": false}.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
D=bench/results/h200-2026-12-02-s23
R=$OUT/b; mkdir -p $R
pack() { tar czf $OUT/0_b.tgz -C $OUT b; }
bash bench/ab_tree.sh ab_xloop $D/x_in_loop_default.patch > $R/tree.log 2>&1 || { cat $R/tree.log; exit 1; }
(cd ab_xloop && PYTHONPATH=$PWD timeout 150 python3 -m pytest -q tests/test_fp8.py \
  -k "gpu or in_the_loop or keep_rows_apart or outside_their_range") > $R/tests_xloop.log 2>&1
echo "x-in-loop tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
for round in 1 2; do
  for tree in base xloop; do
    [ $SECONDS -lt $(( ${STOP_AT:-540} - 90 )) ] || break 2
    dir=.; [ $tree = xloop ] && dir=ab_xloop
    (cd $dir && PYTHONPATH=$PWD PYTHONUNBUFFERED=1 timeout 120 python3 bench/bench_e2e.py --fp8 \
      --policies "token,dmoe p=0.6" --out $R/e2e_$tree$round) > $R/e2e_$tree$round.log 2>&1
    echo "e2e $tree$round rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
  done
done
if [ $SECONDS -lt $(( ${STOP_AT:-540} - 60 )) ]; then
  (cd ab_xloop && PYTHONPATH=$PWD PYTHONUNBUFFERED=1 timeout 60 python3 bench/profile_e2e.py \
    --fp8 --layers 4) > $R/profile_fp8_xloop.log 2>&1
  echo "profile rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
fi
rm -rf ab_xloop; find $R -name '*.png' -delete; pack
tail -2 $R/tests_xloop.log
for f in $R/e2e_*/e2e_fp8.md; do echo "$f"; grep -E "^\| (token|dmoe p=0.6) (bf16|fp8)" $f; done
head -30 $R/profile_fp8_xloop.log
