#!/usr/bin/env bash
# The GPU smoke run: every command the README gives, at reduced size, plus the GPU tests.
# Run it on the device before resolving any change to a kernel, the model, the decoding or a
# bench script. Whole it takes more than the device's 10-minute call on an H200 (2026-11-30:
# the first five steps alone took about 7 minutes, most of it compiling), so it runs in two
# parts, one call each:
#
#   bash bench/smoke_gpu.sh OUT_DIR 1   # GPU tests, routing kernel tests, CLI, kernel benches
#   bash bench/smoke_gpu.sh OUT_DIR 2   # e2e, serving, generate, profile, train-and-eval (4 layers)
#   bash bench/smoke_gpu.sh OUT_DIR     # both, one after the other
#
# Each step's output goes to OUT_DIR/<step>.log (its results under OUT_DIR/<step>/); a table of
# steps, exit codes and seconds grows in OUT_DIR/summary.md as steps end (so a run cut short
# still says what passed) and is printed last. Exit status:
# non-zero if any step failed. The reduced sizes are the scripts' own flags (--quick, --layers,
# DMOE_SMOKE=1): the same code paths as the full runs, with sweeps cut short, one to a few
# training steps per stage and a handful of evaluation problems.
set -uo pipefail

out=${1:?usage: bash bench/smoke_gpu.sh OUT_DIR [1|2]}
part=${2:-all}
case "$part" in 1|2|all) ;; *) echo "part must be 1, 2 or omitted (both), got '$part'"; exit 2;; esac
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the steps run from the repository root
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 CI=true

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "smoke_gpu.sh needs a CUDA device"; exit 2; }
# The package maps kernels/ to dmoe_triton.kernels: install it (no network needed) if the
# machine has not yet.
python3 -c "import dmoe_triton.kernels" 2>/dev/null \
  || python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
  || { echo "install failed: see $out/install.log"; exit 2; }

failed=0
{
  echo "# GPU smoke run, part $part ($(python3 -c 'import torch; print(torch.cuda.get_device_name())'), $(date -u +%F), $(git rev-parse --short HEAD 2>/dev/null))"
  echo
  echo "| step | exit | seconds | command |"
  echo "|---|---|---|---|"
} > "$out/summary.md"
step() {  # step NAME COMMAND...: run it, log it, append its rc and seconds to the summary
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc | $((SECONDS - start)) | \`$*\` |" >> "$out/summary.md"
  [ "$rc" -eq 0 ] || { failed=1; echo "!! $name failed (exit $rc); last lines:"; tail -n 15 "$out/$name.log"; }
}

if [ "$part" != 2 ]; then
step gpu_tests python3 -m pytest -q -m gpu tests
# The routing kernels against the reference on CUDA (these files run on the GPU when there is
# one, unmarked: CI runs them under the interpreter): coresets, capacity, windows, exact ties.
step routing_tests python3 -m pytest -q tests/test_capacity.py tests/test_windows.py tests/test_votes.py
step cli python3 -m dmoe_triton generate
step routing python3 bench/bench_routing.py --quick --router --out "$out/routing.md"
step moe python3 bench/bench_moe.py --quick --out "$out/moe"
step attention python3 bench/bench_attention.py --quick --out "$out/attention.md"
step pick python3 bench/bench_pick.py --out "$out/pick.md"
fi
if [ "$part" != 1 ]; then
# three rows of the ten: token, dMoE and expert choice inside the coreset (their kernels differ)
step e2e python3 bench/bench_e2e.py --quick --layers 4 --budget-s 60 --out "$out/e2e" \
  --policies "token,dmoe p=0.6,ec-core p=0.6"
step serving python3 bench/bench_e2e.py --serving --layers 4 --budget-s 60 --out "$out/serving"
step generate python3 bench/bench_generate.py --quick --layers 4 --out "$out/generate"
step profile python3 bench/profile_e2e.py --layers 2 --graph-timeline
step train_and_eval env DMOE_SMOKE=1 bash bench/train_and_eval.sh "$out/train_and_eval"
fi

cat "$out/summary.md"
exit "$failed"
