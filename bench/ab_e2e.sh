#!/usr/bin/env bash
# The 20-layer forward A/B (issue 13's measure), in one device call: main ("base") against
# trees of main with patches (bench/ab_tree.sh), given as NAME=PATCH[,PATCH...] (NAME: letters,
# digits, _; PATCH paths from the current directory), run alternately, `bench_e2e.py --quick`
# with token routing and dMoE p=0.6, until STOP_AT seconds (default 480) have passed:
#
#   STOP_AT=480 bash bench/ab_e2e.sh OUT_DIR ss=bench/results/.../split_sum_into_norm.patch
#
# FP8=1 runs `bench_e2e.py --fp8` instead (issue 16: the step with FP8 experts against bf16, the
# same two policies; about 20-50 s a run).
#
# Each run's tables go to OUT_DIR/<name><round>/, its log to OUT_DIR/<name><round>.log, the
# steps to OUT_DIR/steps.txt; the one-sequence rows of every run (ms per forward, byte floor ms,
# x floor) are printed last. The trees are removed at the end, or on any failure. Exit status:
# 2 for bad arguments or no CUDA device (checked before anything is built or written), 1 if a
# tree could not be built or any run failed.
set -u
usage="usage: bash bench/ab_e2e.sh OUT_DIR NAME=PATCH[,PATCH...] ..."
out=${1:?$usage}
shift
[ $# -gt 0 ] || { echo "$usage"; exit 2; }
names=() patch_lists=()
for arg in "$@"; do
  name=${arg%%=*} list=${arg#*=}
  case "$arg" in *=*) ;; *) echo "ab_e2e: '$arg' is not NAME=PATCH[,PATCH...]"; exit 2;; esac
  [[ "$name" =~ ^[A-Za-z0-9_]+$ && "$name" != base ]] \
    || { echo "ab_e2e: NAME must be letters, digits or _ and not 'base', got '$name'"; exit 2; }
  [ -n "$list" ] || { echo "ab_e2e: '$name' names no patch (it would be main)"; exit 2; }
  IFS=, read -r -a patches <<< "$list"
  for patch in "${patches[@]}"; do
    [ -f "$patch" ] || { echo "ab_e2e: '$name' names no patch file '$patch'"; exit 2; }
  done
  for seen in "${names[@]}"; do
    [ "$seen" != "$name" ] || { echo "ab_e2e: '$name' given twice"; exit 2; }
  done
  names+=("$name") patch_lists+=("$list")
done
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "ab_e2e: needs a CUDA device"; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the runs start inside the trees
root=$(git rev-parse --show-toplevel)
cleanup() { for n in "${names[@]}"; do rm -rf "$root/ab_$n"; done; }
trap cleanup EXIT
for i in "${!names[@]}"; do
  IFS=, read -r -a patches <<< "${patch_lists[$i]}"
  bash "$root/bench/ab_tree.sh" "ab_${names[$i]}" "${patches[@]}" || exit 1
done
cd "$root"
round=1
# A run takes about 40 s on the H200: none starts after STOP_AT - 45, so the call ends in time
# for its caller to pack the results (run in the nineteenth session, the eighteenth's
# next_call.sh ran past its limit).
last_start=$(( ${STOP_AT:-480} - 45 ))
bench_args=(--quick --budget-s 60) table=e2e_quick.md
rows='^\| calibrated \| (token|dmoe p=0.6) \| 1 ' fields=3,6,13,14
if [ "${FP8:-0}" = 1 ]; then
  bench_args=(--fp8) table=e2e_fp8.md rows='^\| (token|dmoe p=0.6) (bf16|fp8) ' fields=2,3,6,7
  last_start=$(( ${STOP_AT:-480} - 60 ))  # a first FP8 run took 52 s (compiling)
fi
failed=0
while [ "$SECONDS" -lt "$last_start" ]; do
  for t in base "${names[@]}"; do
    [ "$SECONDS" -lt "$last_start" ] || break
    d=.; [ "$t" = base ] || d=ab_$t
    (cd "$d" && PYTHONPATH=$PWD timeout 100 python3 bench/bench_e2e.py "${bench_args[@]}" \
      --policies "token,dmoe p=0.6" --out "$out/$t$round" > "$out/$t$round.log" 2>&1)
    rc=$?
    [ $rc -eq 0 ] || failed=1
    echo "$t$round rc=$rc at ${SECONDS}s" | tee -a "$out/steps.txt"
  done
  round=$((round + 1))
done
shopt -s nullglob
for f in "$out"/*[0-9]; do
  echo "== $f"
  grep -E "$rows" "$f/$table" | cut -d"|" -f"$fields"
done
[ $failed -eq 0 ] || { echo "ab_e2e: some runs failed (rc in $out/steps.txt)"; exit 1; }
