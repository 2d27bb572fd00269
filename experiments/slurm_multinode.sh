#!/bin/bash
# Multi-node training on SLURM: 2 nodes x 4 GPUs, one task per GPU. srun starts every process and Lightning's
# SLURMEnvironment reads the ranks (SLURM_PROCID, SLURM_NODEID, SLURM_LOCALID) and the rendezvous (first host of
# SLURM_NODELIST, a port from the job id) itself: no torchrun. `sbatch experiments/slurm_multinode.sh`, or
# `METHOD=umm DATASET=imagenet sbatch --nodes=4 experiments/slurm_multinode.sh --trainer.max_epochs=200`.
#SBATCH --job-name=embedding-suite
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --output=slurm-%j.out
set -euo pipefail
METHOD=${METHOD:-isif}
DATASET=${DATASET:-cifar10}
CONFIGS=experiments/configs
# One run directory for every rank, on a filesystem all nodes share (checkpoints, logs, final_metrics.json).
RUN_DIR=${RUN_DIR:-runs/$METHOD-$DATASET-slurm-$SLURM_JOB_ID}
srun .venv/bin/python -m experiments.train fit --config $CONFIGS/base.yaml --config $CONFIGS/datasets/$DATASET.yaml \
    --config $CONFIGS/$METHOD/$DATASET.yaml --trainer.num_nodes "$SLURM_NNODES" \
    --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.strategy ddp --run.dir "$RUN_DIR" "$@"
