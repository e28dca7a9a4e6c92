#!/usr/bin/env bash
# One prepared run on a lent GPU (under eight minutes on an H100-class device): SD v1.5's
# architecture with random weights at 512 px, nothing downloaded. Training steps/s and peak VRAM
# with the paper preset (fp16, 8-bit AdamW), and generation images/s at 25 steps, CFG 7, batches of
# 8, eager and compiled. `bash bench/gpu.sh --dry-run` checks the same code on the CPU in a minute.
# Needs the CUDA build of torch in the venv (see the Makefile) and bitsandbytes for 8-bit AdamW.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 MLFLOW_TRACKING_URI="sqlite:///$(mktemp -d)/mlflow.db"
if [[ "${1:-}" != "--dry-run" ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import bitsandbytes" 2>/dev/null || echo "bitsandbytes missing: training falls back to torch AdamW"
fi
exec timeout 470 "$PY" bench/gpu.py "$@"
