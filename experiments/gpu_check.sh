#!/usr/bin/env bash
# Issue 16 (part B) on a GPU machine: prints the `data` bench table, ISIF's images/s on CIFAR-10-shaped
# synthetic data (cifar_resnet18, batch 128 x 2 views, bf16 autocast, channels_last) for the device-resident
# fast path against the DataLoader + PIL path, and the steady-state epoch time extrapolated to a 200-epoch
# CIFAR-10 run. About 2-4 minutes; needs no dataset and no network. Not run in CI (no GPU there).
#   bash experiments/gpu_check.sh            # PYTHON=... to use another interpreter than .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device: run this on a GPU machine'"
timeout 540 "$PYTHON" -m experiments.bench --only data
