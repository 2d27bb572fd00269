#!/usr/bin/env bash
# On a GPU machine, one call, under 5 minutes on one H100-class GPU (experiments/gpu_check.py says what it
# prints): ISIF's images/s on CIFAR-10-shaped data (bare step, bf16 vs fp32, channels_last; resident data path
# vs DataLoader + PIL), Recall@K at SOP size vs the GEMM floor, faiss GPU k-means 60,000 x 512 with K = 10,000,
# host syncs of the device augmentation. Exits non-zero if any path ran on the CPU. Needs no dataset and no
# network; not run in CI (no GPU there).
#   bash experiments/gpu_check.sh            # PYTHON=... to use another interpreter than .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 290 "$PYTHON" -m experiments.gpu_check
