#!/usr/bin/env bash
# Issue 5 on a lent GPU: ResNet-18 on the offline CIFAR-10 pack at 90 % and 99 % for frep, ori, lwm, dense_at
# and fgsm at a reduced epoch budget (paper schedule scaled: prune at 30 %, LR drops at 70 % / 85 %, ensemble
# interval f_e scaled with the epochs so the ensemble sees as many updates per phase as in the 100-epoch
# recipe), all on the fast path (fast.enabled=true, bf16 + channels_last: the same path for every method).
# Issue 4 rides along: `plain_s0.99` is FReP 99 % on the plain path (eager fp32, Lightning automatic
# optimization) with the same seed, for the fast-vs-plain accuracy comparison.
# Each run: train, whose final evaluation also runs FGSM and PGD-50 (eval.attacks) on the 10k test split
# (summary.json: clean, PGD-10, FGSM, PGD-50 and their per-example worst case; one process less per run than a
# separate frep-eval, the same evaluate() and seeds), then for AA_RUNS AutoAttack standard on N_AA test images
# (eval_aa.json). EVAL_SEPARATE=1 restores the separate frep-eval call (eval.json) of the 2026-11-27 runs.
# Jobs run PARALLEL at once in priority order; one deadline (BUDGET_S after start) bounds everything, and every
# finished step is packed into $OUT/baselines.tar.gz (pack_results.py) at once, so a cut run still returns.
# Measured 2026-11-27 (results/2026-11-27-baselines-h100.md): processes on one GPU time-slice, so 4 at once gave
# no throughput over 1 at a time (a fast 6-epoch FReP run trained in 159 s among 4, vs ~25 s of steps alone);
# hence PARALLEL=2 (one hides the other's start-up and CPU work) and one pack decode before any job.
# Usage (repo root, .gpu/ carried: site/ + data/): bash experiments/gpu/baselines_reduced.sh EPOCHS [N_AA]
# Env: PARALLEL (2), BUDGET_S (540), AA_RUNS (set but empty: no AutoAttack), JOBS (names to run, default all), EXTRA (overrides for every run).
source experiments/gpu/env.sh
E=${1:-6}; N_AA=${2:-500}; TP=$(( E * 30 / 100 )); M1=$(( (E * 70 + 99) / 100 )); M2=$(( (E * 85 + 99) / 100 ))
[ "$M2" -le "$M1" ] && M2=$(( M1 + 1 ))
FE=$(( E > 1 ? E : 1 ))   # f_e = 100 at 100 epochs -> E at E epochs
export DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
FAST="fast.enabled=true fast.precision=bf16 fast.channels_last=true"
export COMMON="experiment=paper_resnet18_c10 trainer=${TRAINER:-gpu} logger=csv trainer.max_epochs=$E
 pruning.epoch=$TP optim.milestones=[$M1,$M2] trainer.enable_progress_bar=false ${EXTRA:-}"
EN="ensemble.every_n_steps=$FE"
declare -A JOB=(
  [plain_s0.99]="method=frep ++pruning.sparsity=0.99 $EN fast.enabled=false"
  [lwm_s0.99]="method=lwm ++pruning.sparsity=0.99 $FAST"
  [frep_s0.99]="method=frep ++pruning.sparsity=0.99 $EN $FAST"
  [ori_s0.99]="method=ori ++pruning.sparsity=0.99 $EN $FAST"
  [lwm_s0.9]="method=lwm ++pruning.sparsity=0.9 $FAST"
  [dense_at]="method=dense_at $FAST"
  [frep_s0.9]="method=frep ++pruning.sparsity=0.9 $EN $FAST"
  [ori_s0.9]="method=ori ++pruning.sparsity=0.9 $EN $FAST"
  [fgsm_s0.99]="method=fgsm ++pruning.sparsity=0.99 $FAST"
  [fgsm_s0.9]="method=fgsm ++pruning.sparsity=0.9 $FAST"
)
ORDER=${JOBS:-"plain_s0.99 lwm_s0.99 frep_s0.99 ori_s0.99 lwm_s0.9 dense_at frep_s0.9 ori_s0.9 fgsm_s0.99 fgsm_s0.9"}
export AA_RUNS=${AA_RUNS-"frep_s0.99 ori_s0.99 lwm_s0.99 frep_s0.9 ori_s0.9 lwm_s0.9"} N_AA
echo "epochs=$E prune_epoch=$TP milestones=[$M1,$M2] f_e=$FE n_aa=$N_AA jobs=[$ORDER] budget=${BUDGET_S:-540}s" \
  | tee "$OUT/plan.txt"
left() { echo $(( DEADLINE - $(date +%s) )); }
pack() { flock /tmp/b.lock python3 experiments/gpu/pack_results.py "$OUT/baselines.tar.gz" /tmp/b/*; }
log() { echo "$(date +%T) $*" | tee -a "$OUT/plan.txt"; }
export -f left pack log
run_one() {  # name overrides...
  local name=$1; shift; local d=/tmp/b/$name t=$(date +%s)
  mkdir -p $d; [ "$(left)" -gt 20 ] || { log "$name skipped (deadline)"; return; }
  local final="eval.attacks=[fgsm,pgd50]"; [ -n "${EVAL_SEPARATE:-}" ] && final=""
  timeout $(left) python3 -m frep_lightning.train $COMMON "$@" $final hydra.run.dir=$d > $d/run.log 2>&1
  log "$name train rc=$? wall=$(( $(date +%s) - t ))s $(python3 -c "import json;d=json.load(open('$d/summary.json'));print({k:d.get(k) for k in ('clean_acc','pgd_acc','fgsm_acc','pgd50_acc','sparsity','global_steps','train_seconds','eval_seconds','overfitting_epochs')})" 2>/dev/null)"
  pack; [ -f $d/model.pt ] || return; t=$(date +%s)
  if [ -n "${EVAL_SEPARATE:-}" ]; then
    timeout $(left) python3 -m frep_lightning.eval ckpt=$d "attacks=[fgsm,pgd50]" logger=none print_layers=false \
      hydra.run.dir=/tmp/e_$name > $d/eval.log 2>&1
    log "$name eval fgsm,pgd50 n=10000 rc=$? wall=$(( $(date +%s) - t ))s"; pack; t=$(date +%s)
  fi
  case " $AA_RUNS " in *" $name "*) ;; *) return;; esac; t=$(date +%s)
  timeout $(left) python3 -m frep_lightning.eval ckpt=$d n_test=$N_AA "attacks=[aa]" output=$d/eval_aa.json \
    logger=none print_layers=false hydra.run.dir=/tmp/a_$name > $d/eval_aa.log 2>&1
  log "$name eval aa n=$N_AA rc=$? wall=$(( $(date +%s) - t ))s"; pack
}
export -f run_one
t0=$(date +%s)
decode_pack && log "decode cache ready after $(( $(date +%s) - t0 ))s"
for n in $ORDER; do echo "$n ${JOB[$n]}"; done | xargs -P "${PARALLEL:-2}" -I{} bash -c 'run_one {}'
log "all done after $(( $(date +%s) - t0 ))s"
