#!/usr/bin/env bash
# One prepared run on a lent GPU: first the rehearsal of the paper preset on CUDA (python -m
# dermt2im.rehearsal --device cuda: SD v1.5's full architecture with random weights, fp16, 8-bit
# AdamW, torch.compile with inductor, a training killed after its first checkpoint and resumed,
# generation with the three samplers, validation with ViT-B/16 and MobileNetV2), so that a paper
# run's code paths are known to work on the card before anything is measured; then the figures:
# training steps/s and peak VRAM with the paper preset (fp16, 8-bit AdamW), and generation images/s
# at 512 px, 25 steps, CFG 7, batches of 8, eager and compiled. Nothing is downloaded.
# `bash bench/gpu.sh --dry-run` runs both on the CPU (the rehearsal at narrow widths, the measurements
# on the tiny model). Needs the CUDA build of torch in the venv (see the Makefile) and bitsandbytes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
SCRATCH="$(mktemp -d)"
export HF_HUB_OFFLINE=1 MLFLOW_TRACKING_URI="sqlite:///$SCRATCH/mlflow.db" DERMT2IM_CACHE_DIR="$SCRATCH/models"
DEVICE=cuda LIMIT=900
if [[ "${1:-}" == "--dry-run" ]]; then
  DEVICE=cpu LIMIT=2400
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import bitsandbytes" 2>/dev/null || { echo "bitsandbytes missing: pip install -c constraints.txt -e '.[cuda]'" >&2; exit 1; }
fi
echo "==> rehearsal of the paper preset on $DEVICE ($SCRATCH/rehearsal)"
start=$(date +%s)
timeout "$LIMIT" "$PY" -m dermt2im.rehearsal "$SCRATCH/rehearsal" --device "$DEVICE"
echo "==> rehearsal passed in $(( $(date +%s) - start )) s; measuring"
exec timeout 470 "$PY" bench/gpu.py "$@"
