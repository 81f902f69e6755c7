#!/usr/bin/env bash
# How should the temporal ensemble get its BatchNorm statistics? Same seed, same live training
# trajectory (the BN mode only touches the ensemble copy), three modes; prints summary numbers.
# Usage: bash experiments/bn_modes.sh [extra Hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-outputs/bn_modes}
for mode in recompute copy average; do
  .venv/bin/frep-train "hydra.run.dir=$out/$mode" "ensemble.bn=$mode" trainer.enable_progress_bar=false "$@" \
    > "$out-$mode.log" 2>&1 || { echo "run $mode failed, see $out-$mode.log"; exit 1; }
  python3 -c "import json,sys; s=json.load(open('$out/$mode/summary.json')); print('$mode', s['clean_acc'], s['pgd_acc'], s['sparsity'], s['train_seconds'])"
done
