#!/usr/bin/env bash
# Launch the train stage with torchrun: GPUS processes on this node (on a machine without GPUs they train on
# the CPU). Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on each, as upstream does.
# Every argument is passed on to `python -m internvl_sft.stages.train`; hyper-parameters live in params.yaml.
set -euo pipefail

GPUS=${GPUS:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-34229}
export TF_CPP_MIN_LOG_LEVEL=3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / GPUS > 0 ? $(nproc) / GPUS : 1 ))}

exec torchrun \
  --nnodes="${NNODES}" \
  --node_rank="${NODE_RANK}" \
  --master_addr="${MASTER_ADDR}" \
  --master_port="${MASTER_PORT}" \
  --nproc_per_node="${GPUS}" \
  -m internvl_sft.stages.train "$@"
