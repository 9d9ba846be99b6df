#!/usr/bin/env bash
# LoRA fine-tuning of InternVL2-8B (InternLM2.5-7B LLM) on the UI dataset, started like the original script:
#   GPUS=1 PER_DEVICE_BATCH_SIZE=4 bash shell/internvl2.0/2nd_finetune/internvl2_8b_internlm2_7b_dynamic_res_2nd_finetune_lora_ui.sh
# It runs presets/internvl2-8b-ui.yaml as a DVC experiment through shell/run_preset.sh (which documents the variables).
exec bash "$(dirname "$0")/../../run_preset.sh" presets/internvl2-8b-ui.yaml "$@"
