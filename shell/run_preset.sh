#!/usr/bin/env bash
# Run a preset as a DVC experiment with the original launchers' variables (used by shell/internvl2.0/ and
# `make real`). As upstream: GPUS (processes, default 2), BATCH_SIZE (global batch) and PER_DEVICE_BATCH_SIZE;
# the two batch sizes become `-S train.global_batch_size / train.per_device_batch_size` on top of the preset
# (unset: the preset's values, 16 and 4 like upstream), GPUS reaches shell/train.sh (torchrun processes) and
# the train stage derives gradient accumulation = global / (per-device x GPUS). Training is the `train` stage of
# dvc.yaml, as for every other run. DRY_RUN=1 prints the command instead of running it.
# Usage: shell/run_preset.sh PRESET [more `dvc exp run` options, e.g. --force]
set -euo pipefail

PRESET=${1:?usage: shell/run_preset.sh PRESET [dvc exp run options]}
shift
cd "$(dirname "$0")/.."

GPUS=${GPUS:-2}
SETS=()
if [[ -n ${BATCH_SIZE:-} ]]; then SETS+=(--set "train.global_batch_size=${BATCH_SIZE}"); fi
if [[ -n ${PER_DEVICE_BATCH_SIZE:-} ]]; then SETS+=(--set "train.per_device_batch_size=${PER_DEVICE_BATCH_SIZE}"); fi
OVERRIDES=$(python -m internvl_sft.preset "$PRESET" --processes "$GPUS" "${SETS[@]}")
NAME=$(basename "$PRESET" .yaml)
COMMAND="dvc exp run -n $(printf '%q' "$NAME") ${OVERRIDES}"
if (($#)); then COMMAND+=$(printf ' %q' "$@"); fi

if [[ -n ${DRY_RUN:-} ]]; then
  echo "GPUS=${GPUS} ${COMMAND}"
else
  export GPUS
  eval "${COMMAND}"
fi
