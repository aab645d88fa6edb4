#!/usr/bin/env bash
# 23rd session, call B (from the repository root on the device):
#   STOP_AT=560 bash bench/results/h200-2026-12-02-s23/call_b.sh
# Issue 16: FP8 down k steps over several scale blocks.
# 1. the FP8 tests on the GPU (the new wide-step test and the property test among them);
# 2. bench_moe --fp8 --sweep with the wide-step variants;
# 3. if the sweep's best decode config is not the default, it is written into launch.py as
#    DEFAULT_DECODE_FP8 (this tree only) and bench_e2e --fp8 times the step (FP8 / bf16).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
R=$OUT/b; mkdir -p $R
pack() { tar czf $OUT/0_b.tgz -C $OUT b; }
timeout 150 python3 -m pytest -q -x tests/test_fp8.py -k "gpu or wide_down or match_the_dequantized" \
  > $R/tests_fp8.log 2>&1
echo "fp8 tests rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
PYTHONUNBUFFERED=1 timeout 200 python3 bench/bench_moe.py --fp8 --sweep --out $R/moe_fp8 \
  > $R/moe_fp8.log 2>&1
echo "moe fp8 sweep rc=$? at ${SECONDS}s" | tee -a $R/steps.txt; pack
best=$(grep -o 'paste as launch.DEFAULT_DECODE_FP8): DecodeConfig(.*)' $R/moe_fp8.log \
  | sed 's/^paste as launch.DEFAULT_DECODE_FP8): //')
if [ -n "$best" ] && ! grep -q 'fp8 decode: best "default"' $R/moe_fp8.log; then
  BEST="$best" python3 - <<'PY'
import os, re
path = "dmoe_triton/launch.py"
text = open(path).read()
new, n = re.subn(r"DEFAULT_DECODE_FP8 = DecodeConfig\([^)]*\)",
                 "DEFAULT_DECODE_FP8 = " + os.environ["BEST"], text)
assert n == 1, n
open(path, "w").write(new)
PY
  grep -n "DEFAULT_DECODE_FP8 = " dmoe_triton/launch.py | tee -a $R/steps.txt
  left=$(( ${STOP_AT:-560} - SECONDS - 15 ))
  PYTHONUNBUFFERED=1 timeout $left python3 bench/bench_e2e.py --fp8 --policies "token,dmoe p=0.6" \
    --out $R/e2e_fp8 > $R/e2e_fp8.log 2>&1
  echo "e2e fp8 rc=$? at ${SECONDS}s" | tee -a $R/steps.txt
  git checkout dmoe_triton/launch.py
fi
find $R -name '*.png' -delete; pack
tail -3 $R/tests_fp8.log; grep -E "fp8 decode|fp8 grouped" $R/moe_fp8.log | head -40
cat $R/moe_fp8/moe_fp8.md 2>/dev/null | tail -5; cat $R/e2e_fp8/e2e_fp8.md 2>/dev/null | head -8
tail -2 $R/e2e_fp8.log 2>/dev/null
