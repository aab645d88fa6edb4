#!/usr/bin/env bash
# 22nd session, device call 2 (run inline as the device command; kept here as the record), from
# the repository root on the device: main against the attention's dense projection through
# skinny_gemm (the 21st session's dense_skinny.patch), alternating until STOP_AT.
S=bench/results/h200-2026-12-02-s21; python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; R=$OUT/b; mkdir -p $R; STOP_AT=470 bash bench/ab_e2e.sh $R ds=$S/dense_skinny.patch > $R/console.log 2>&1; rm -f $R/*/e2e_quick.png; tar czf $OUT/0_b.tgz -C $OUT b; tail -n 30 $R/console.log
