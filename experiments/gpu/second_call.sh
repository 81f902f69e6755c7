#!/usr/bin/env bash
# Second GPU call of 2026-11-27 (issues 3, 4, 5): PGD-50 speed on 10k (fp32 vs bf16) with the trained FReP model,
# the step bench (ResNet-18), and AutoAttack on the FReP and Ori 99% models of the first call.
# Repo root, .gpu/ carried with snap/ (a frozen copy of src, conf, experiments), site/, data/, runs/.
# Each part has its own timeout and writes into $OUT as it goes. Usage: bash experiments/gpu/second_call.sh [N_AA] [SCALE]
source experiments/gpu/env.sh
N_AA=${1:-500}; S=${2:-1}
export PYTHONPATH="$PWD/.gpu/snap/src:$PWD/.gpu/site:${PYTHONPATH:-}"
SNAP=.gpu/snap
python3 - <<'PY' || exit 1
import sys, numpy as np, torch
sys.path.insert(0, "experiments/gpu")
from pack_results import expand
from pathlib import Path
for npz in Path(".gpu/runs").glob("*/model.npz"):
    with np.load(npz) as z:
        torch.save(expand(dict(z)), npz.with_suffix(".pt"))
    print("expanded", npz)
PY
t0=$(date +%s)
echo "== eval_speed $(date -u +%FT%TZ)" | tee "$OUT/eval_speed.log"
timeout $((60*S)) python3 $SNAP/experiments/eval_speed.py --n ${N_SPEED:-10000} --batch-size 1000 --ckpt .gpu/runs/frep_factors \
  ${SPEED_EXTRA:-} 2>&1 | grep -v Warning | tee -a "$OUT/eval_speed.log"
echo "== bench $(date -u +%FT%TZ) after $(( $(date +%s) - t0 ))s" | tee "$OUT/bench.log"
timeout $((110*S)) python3 $SNAP/experiments/bench.py --out-dir "$OUT" --models resnet18 --batch-sizes 128,512 \
  --no-compile --budget $((85*S)) ${BENCH_EXTRA:-} 2>&1 | tee -a "$OUT/bench.log"
for run in frep_factors ori_factors; do
  echo "== frep-eval $run $(date -u +%FT%TZ) after $(( $(date +%s) - t0 ))s" | tee "$OUT/eval_$run.log"
  timeout $((45*S)) python3 -m frep_lightning.eval ckpt=.gpu/runs/$run n_test=$N_AA "attacks=[fgsm,pgd50,aa]" \
    logger=none print_layers=false output=$OUT/eval_$run.json hydra.run.dir=/tmp/evalrun_$run ${EVAL_EXTRA:-} \
    2>&1 | tee -a "$OUT/eval_$run.log"
done
echo "== done after $(( $(date +%s) - t0 ))s"
