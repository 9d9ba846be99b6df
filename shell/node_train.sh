#!/usr/bin/env bash
# The train stage's command from dvc.yaml, run without DVC: for the other nodes of a multi-node run, while node 0
# runs `dvc repro train` (which records the result). Each node sets NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
# and GPUS (processes on that node); see the README's multi-node example. DRY_RUN=1 prints the command.
set -euo pipefail
cd "$(dirname "$0")/.."

COMMAND=$(python -c 'import yaml; print(yaml.safe_load(open("dvc.yaml"))["stages"]["train"]["cmd"])')
if [[ -n ${DRY_RUN:-} ]]; then
  echo "${COMMAND}"
else
  eval "${COMMAND}"
fi
