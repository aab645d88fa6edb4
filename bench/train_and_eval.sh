#!/usr/bin/env bash
# The issue-6 GPU run in one command: train both stages, pack the checkpoints, evaluate fidelity.
#
#   bash bench/train_and_eval.sh "$OUT"                     # H100: ~5.5 min training + <= 2 min eval
#   DMOE_SMOKE=1 bash bench/train_and_eval.sh /tmp/smoke    # CPU smoke test: micro model, ~1 min
#
# Writes 7 files into OUT: models.tar (arith-token/ and arith-dmoe/, to unpack into models/),
# train_log.json, loss_curve.png, fidelity.md, fidelity.png, fidelity.json and run.log (all that
# was printed). The checkpoints are packed before the evaluation starts, so a failed evaluation
# still brings them home. Exit status: non-zero if training or evaluation failed.
set -uo pipefail

out=${1:?usage: bash bench/train_and_eval.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exec > >(tee "$out/run.log") 2>&1
export PYTHONUNBUFFERED=1

if [ "${DMOE_SMOKE:-0}" = 1 ]; then
  # Every step of the real run at toy size: a wrong path, flag or file name fails here first.
  train_args=(--size micro --pool 4000 --val 16 --batch 16 --stage1-steps 30 --stage2-steps 10)
  eval_args=(--test 48 --batch 16 --check 16 --budget-seconds 1e9)
else
  # train_tiny's defaults: batch 512, stage 1 capped at 210 s, stage 2 at 90 s.
  train_args=()
  # At most 5000 test problems, cut to what fits 80 s of table decodes (calibrated first).
  eval_args=(--test 5000 --batch 1000 --budget-seconds 80)
fi

start=$SECONDS
python3 bench/train_tiny.py --out "$work/models" --results "$out" ${train_args[@]+"${train_args[@]}"}
train_rc=$?
echo "== training: exit $train_rc after $((SECONDS - start)) s"

shipped=()
for name in arith-token arith-dmoe; do
  [ -f "$work/models/$name/model.safetensors" ] && shipped+=("$name")
done
if [ ${#shipped[@]} -gt 0 ]; then
  tar -C "$work/models" -cf "$out/models.tar" "${shipped[@]}"
  du -sh "${shipped[@]/#/$work/models/}" "$out/models.tar"
fi

eval_rc=1
if [ ${#shipped[@]} -eq 2 ]; then
  python3 bench/eval_fidelity.py --models "$work/models" --out "$out" ${eval_args[@]+"${eval_args[@]}"}
  eval_rc=$?
fi
echo "== evaluation: exit $eval_rc, total $((SECONDS - start)) s"

ls -l "$out"
[ -f "$out/fidelity.md" ] && sed -n '/^| policy/,/^$/p' "$out/fidelity.md"
[ "$train_rc" -eq 0 ] && [ "$eval_rc" -eq 0 ]
