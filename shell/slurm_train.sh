#!/usr/bin/env bash
# Multi-node training under Slurm: one task per node; node 0 runs the train stage through DVC, the others run the
# same command with shell/node_train.sh, and torchrun joins them (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT).
# Submit from the repository root on a filesystem every node sees, after `dvc repro pretrained`:
#   sbatch shell/slurm_train.sh            (edit the #SBATCH lines for your cluster)
#SBATCH --job-name=internvl-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail

export NNODES=${SLURM_NNODES:?run me with sbatch or srun}
export MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-34229}
export GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-8}}

srun --kill-on-bad-exit=1 bash -c '
  export NODE_RANK=${SLURM_NODEID}
  if [[ ${NODE_RANK} == 0 ]]; then dvc repro train; else bash shell/node_train.sh; fi'
