#!/usr/bin/env bash
# Rebuild the embedded default's pre-trained base (src/internvl_sft/model/assets/tiny_grounded.safetensors) the
# way it was made: seven runs of `python -m internvl_sft.model.pretrain_tiny`, each going on from the last one's
# weights (32 scenes a step, fp32). About 50 minutes on one H200 GPU (12-20 steps a second); the CPU runs 1 step
# in about 0.9 s. GPU kernels are not bit-exact, so a rebuild matches the committed file in its metrics, not bytes.
# Usage: shell/pretrain_tiny_base.sh [OUT_DIR]   (default work_dirs/pretrain_tiny; the last file is base.safetensors)
# DRY_RUN=1 prints the seven commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-work_dirs/pretrain_tiny}
[[ -n ${DRY_RUN:-} ]] || mkdir -p "$OUT"

step() {  # name, init ("" for a random start), options
  local name=$1 init=$2; shift 2
  local command=(python -m internvl_sft.model.pretrain_tiny --out "$OUT/$name.safetensors"
                 ${init:+--init "$OUT/$init.safetensors"} --batch-size 32 --workers 4 --eval-every 1000
                 --eval-scenes 64 "$@")
  if [[ -n ${DRY_RUN:-} ]]; then
    echo "${command[*]}"
  else
    "${command[@]}" 2>&1 | tee "$OUT/$name.log"
  fi
}

# where a thing is: one thing alone on a plain background, then half the scenes crowded
step alone "" --seed 0 --steps 8000 --learning-rate 1e-3 --alone-share 1.0
step mixed alone --seed 1 --steps 6000 --learning-rate 1e-3 --alone-share 0.5
# which thing is which: two, then three named things
step two mixed --seed 2 --steps 3000 --alone-share 0.25 --max-things 2 --distractors 0
step three two --seed 4 --steps 2500 --alone-share 0.2 --max-things 3 --distractors 2
# whole UI screens of the `pretrain` split (the first of these runs was stopped at step 5500 of 7000)
step screens three --seed 6 --steps 7000 --stop-after 5500 --screen-share 1.0 --learning-rate 5e-4
step screens_more screens --seed 7 --steps 5000 --screen-share 1.0 --learning-rate 5e-4
# the name asked for bare among other words half the time, not only inside <ref></ref>
step base screens_more --seed 8 --steps 4500 --screen-share 1.0 --plain-share 0.5 --learning-rate 5e-4
