#!/bin/bash
# Multi-node training on SLURM: 2 nodes x 4 GPUs. `sbatch experiments/slurm_multinode.sh`, or
# `METHOD=umm DATASET=imagenet sbatch --nodes=4 experiments/slurm_multinode.sh --trainer.max_epochs=200`.
# LAUNCHER=srun (default): one task per GPU; srun starts every process and Lightning's SLURMEnvironment reads the
#   ranks (SLURM_PROCID, SLURM_NODEID, SLURM_LOCALID) and the rendezvous (first host of SLURM_NODELIST, a port from
#   the job id) itself.
# LAUNCHER=torchrun: one task per node (`sbatch --ntasks-per-node=1`), each running torchrun with its node rank
#   and the first node as master: the launch tests/test_multinode.py runs on localhost (2 nodes x 1 process).
#SBATCH --job-name=embedding-suite
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --output=slurm-%j.out
set -euo pipefail
METHOD=${METHOD:-isif}
DATASET=${DATASET:-cifar10}
LAUNCHER=${LAUNCHER:-srun}
CONFIGS=experiments/configs
# One run directory for every rank, on a filesystem all nodes share (checkpoints, logs, final_metrics.json).
RUN_DIR=${RUN_DIR:-runs/$METHOD-$DATASET-slurm-$SLURM_JOB_ID}
CONFIG_ARGS=(--config $CONFIGS/base.yaml --config $CONFIGS/datasets/$DATASET.yaml --config $CONFIGS/$METHOD/$DATASET.yaml)
if [ "$LAUNCHER" = srun ]; then
    srun .venv/bin/python -m experiments.train fit "${CONFIG_ARGS[@]}" --trainer.num_nodes "$SLURM_NNODES" \
        --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.strategy ddp --run.dir "$RUN_DIR" "$@"
elif [ "$LAUNCHER" = torchrun ]; then
    GPUS=${SLURM_GPUS_ON_NODE:-4}
    MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    PORT=$((20000 + SLURM_JOB_ID % 20000))
    # single quotes: SLURM_NODEID is each task's own node rank, expanded on that node
    srun --ntasks-per-node=1 bash -c '.venv/bin/torchrun --nnodes "$0" --nproc-per-node "$1" --node-rank "$SLURM_NODEID" \
        --master-addr "$2" --master-port "$3" -m experiments.train fit "${@:4}"' \
        "$SLURM_NNODES" "$GPUS" "$MASTER" "$PORT" "${CONFIG_ARGS[@]}" --trainer.num_nodes "$SLURM_NNODES" \
        --trainer.devices "$GPUS" --trainer.strategy ddp --run.dir "$RUN_DIR" "$@"
else
    echo "LAUNCHER=$LAUNCHER: use srun or torchrun" >&2
    exit 2
fi
