#!/usr/bin/env bash
# Issue 2 on a lent GPU: the paper recipe (experiment=paper_resnet18_c10) at a reduced epoch budget on the
# offline CIFAR-10 pack, 99% sparsity; FReP with the ensemble averaging factors vs products, and Ori.
# Three runs share the one GPU concurrently (an eager step is launch-bound), so their wall-clocks are
# upper bounds of a solo run. Usage (repo root, .gpu/ carried): bash experiments/gpu/paper_reduced.sh EPOCHS
source experiments/gpu/env.sh
E=${1:-8}; TP=$(( E * 30 / 100 )); M1=$(( (E * 70 + 99) / 100 )); M2=$(( (E * 85 + 99) / 100 ))
[ "$M2" -le "$M1" ] && M2=$(( M1 + 1 ))
COMMON="experiment=paper_resnet18_c10 trainer=${TRAINER:-gpu} logger=csv pruning.sparsity=0.99 trainer.max_epochs=$E
 pruning.epoch=$TP optim.milestones=[$M1,$M2] trainer.enable_progress_bar=false trainer.max_time=00:00:04:40 ${EXTRA:-}"
echo "epochs=$E prune_epoch=$TP milestones=[$M1,$M2]" | tee "$OUT/plan.txt"
python3 -c "from frep_lightning.data.pack import load_pack; [load_pack('$FREP_DATA_DIR/cifar10/'+s+'.npz') for s in ('train','test')]" \
  || { echo 'pack load failed'; exit 1; }
start=$(date +%s)
for spec in "frep_factors method=frep ensemble.average=factors" "frep_product method=frep ensemble.average=product" \
            "ori_factors method=ori ensemble.average=factors"; do
  set -- $spec; name=$1; shift
  ( python3 -m frep_lightning.train $COMMON "$@" hydra.run.dir=/tmp/runs/$name \
      > /tmp/runs_$name.log 2>&1; echo "$name rc=$?" >> "$OUT/plan.txt" ) &
  sleep 2
done
wait
echo "wall_all=$(( $(date +%s) - start ))s" | tee -a "$OUT/plan.txt"
for n in frep_factors frep_product ori_factors; do mkdir -p /tmp/runs/$n; cp /tmp/runs_$n.log /tmp/runs/$n/run.log; \
  echo "== $n"; tail -4 /tmp/runs_$n.log; cat /tmp/runs/$n/summary.json 2>/dev/null; echo; done
python3 experiments/gpu/pack_results.py "$OUT/paper_reduced.tar.gz" /tmp/runs/*
