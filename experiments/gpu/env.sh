# Source on a lent GPU machine (no internet): carried packages + offline pack, see experiments/README.md.
# Usage from the repo root: source experiments/gpu/env.sh   (expects .gpu/ carried: site/ + data/)
set -u
export PYTHONPATH="$PWD/src:$PWD/.gpu/site:${PYTHONPATH:-}"
export FREP_DATA_DIR="$PWD/.gpu/data" FREP_CACHE_DIR=/tmp/frep_cache
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
export OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/device.txt"
# Decode the offline pack into FREP_CACHE_DIR once (training processes then read the cached arrays).
decode_pack() {
  python3 -c "from frep_lightning.data.pack import load_pack as l; [l('$FREP_DATA_DIR/cifar10/'+s+'.npz') for s in ('train','test')]"
}
