#!/usr/bin/env bash
# Launch the train stage with torchrun: GPUS processes on this node (on a machine without GPUs they train on
# the CPU). Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on each, as upstream does.
# On one node without MASTER_PORT, torchrun picks a free port (--standalone), so runs can share a machine.
# Every argument is passed on to `python -m internvl_sft.stages.train`; hyper-parameters live in params.yaml.
set -euo pipefail

GPUS=${GPUS:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export TF_CPP_MIN_LOG_LEVEL=3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / GPUS > 0 ? $(nproc) / GPUS : 1 ))}

if [[ "${NNODES}" == 1 && -z "${MASTER_PORT:-}" ]]; then
  rendezvous=(--standalone)
else
  rendezvous=(--nnodes="${NNODES}" --node_rank="${NODE_RANK}" --master_addr="${MASTER_ADDR}"
              --master_port="${MASTER_PORT:-34229}")
fi

exec torchrun "${rendezvous[@]}" --nproc_per_node="${GPUS}" -m internvl_sft.stages.train "$@"
