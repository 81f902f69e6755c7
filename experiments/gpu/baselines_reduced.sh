#!/usr/bin/env bash
# Issue 5 on a lent GPU: ResNet-18 on the offline CIFAR-10 pack at 90 % and 99 % for frep, ori, lwm, dense_at
# and fgsm at a reduced epoch budget (paper schedule scaled: prune at 30 %, LR drops at 70 % / 85 %), run one
# after another on the fast path (fast.enabled=true, bf16 + channels_last: the same path for every method),
# then AutoAttack (+ FGSM, PGD-50) with frep-eval on N_AA test images of every run. Each run is capped by
# trainer.max_time; everything lands in $OUT/baselines.tar.gz (pack_results.py) as it goes.
# Usage (repo root, .gpu/ carried: site/ + data/): bash experiments/gpu/baselines_reduced.sh EPOCHS [N_AA]
# Env: METHODS (default "frep ori fgsm lwm dense_at"), SPARSITIES ("0.99 0.9"), RUN_CAP (00:00:01:30),
#      PARALLEL (training jobs at once, 1), FAST (fast.* overrides), EXTRA (overrides for every run),
#      AA_RUNS (runs that also get AutoAttack: "frep_s0.99 ori_s0.99 lwm_s0.99"; the others FGSM + PGD-50),
#      EVAL_EXTRA, EVAL_CAP (seconds per evaluation, 150).
source experiments/gpu/env.sh
E=${1:-10}; N_AA=${2:-500}; TP=$(( E * 30 / 100 )); M1=$(( (E * 70 + 99) / 100 )); M2=$(( (E * 85 + 99) / 100 ))
[ "$M2" -le "$M1" ] && M2=$(( M1 + 1 ))
METHODS=${METHODS:-"frep ori fgsm lwm dense_at"}; SPARSITIES=${SPARSITIES:-"0.99 0.9"}
FAST=${FAST:-"fast.enabled=true fast.precision=bf16 fast.channels_last=true"}
COMMON="experiment=paper_resnet18_c10 trainer=${TRAINER:-gpu} logger=csv trainer.max_epochs=$E pruning.epoch=$TP
 optim.milestones=[$M1,$M2] trainer.enable_progress_bar=false trainer.max_time=${RUN_CAP:-00:00:01:30} $FAST ${EXTRA:-}"
echo "epochs=$E prune_epoch=$TP milestones=[$M1,$M2] methods=[$METHODS] sparsities=[$SPARSITIES]" | tee "$OUT/plan.txt"
pack() { flock /tmp/b.lock python3 experiments/gpu/pack_results.py "$OUT/baselines.tar.gz" /tmp/b/*; }
export -f pack; export COMMON OUT
train_one() {  # name overrides...
  local name=$1; shift; local start=$(date +%s)
  python3 -m frep_lightning.train $COMMON "$@" hydra.run.dir=/tmp/b/$name > /tmp/b_$name.log 2>&1
  local rc=$?; mkdir -p /tmp/b/$name; cp /tmp/b_$name.log /tmp/b/$name/run.log
  echo "$name rc=$rc wall=$(( $(date +%s) - start ))s $(python3 -c "import json;d=json.load(open('/tmp/b/$name/summary.json'));print({k:d.get(k) for k in ('clean_acc','pgd_acc','sparsity','global_steps','train_seconds','overfitting_epochs')})" 2>/dev/null)" | tee -a "$OUT/plan.txt"
  pack
}
export -f train_one
mkdir -p /tmp/b; t0=$(date +%s); jobs=()
for m in $METHODS; do
  sps=$SPARSITIES; [ "$m" = dense_at ] && sps=dense
  for s in $sps; do
    if [ "$s" = dense ]; then jobs+=("${m}_s$s method=$m"); else jobs+=("${m}_s$s method=$m ++pruning.sparsity=$s"); fi
  done
done
# PARALLEL jobs share the GPU (bs 128 does not fill an H100; their wall-clocks are then upper bounds)
printf '%s\n' "${jobs[@]}" | xargs -P "${PARALLEL:-1}" -I{} bash -c 'train_one {}'
echo "training done after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/plan.txt"
AA_RUNS=${AA_RUNS:-"frep_s0.99 ori_s0.99 lwm_s0.99"}
for d in /tmp/b/*/; do
  name=$(basename $d); [ -f "$d/model.pt" ] || continue; start=$(date +%s)
  attacks="[fgsm,pgd50]"; case " $AA_RUNS " in *" $name "*) attacks="[fgsm,pgd50,aa]";; esac
  timeout ${EVAL_CAP:-150} python3 -m frep_lightning.eval ckpt=$d n_test=$N_AA "attacks=$attacks" logger=none \
    print_layers=false hydra.run.dir=/tmp/evalrun_$name ${EVAL_EXTRA:-} > $d/eval.log 2>&1
  echo "eval $name $attacks rc=$? wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/plan.txt"; pack
done
echo "all done after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/plan.txt"
