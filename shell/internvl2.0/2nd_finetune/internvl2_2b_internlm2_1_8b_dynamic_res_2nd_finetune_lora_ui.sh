#!/usr/bin/env bash
# LoRA fine-tuning of InternVL2-2B (InternLM2-1.8B LLM) on the UI dataset, started like the original script:
#   GPUS=1 PER_DEVICE_BATCH_SIZE=4 bash shell/internvl2.0/2nd_finetune/internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora_ui.sh
# It runs presets/internvl2-2b-ui.yaml as a DVC experiment through shell/run_preset.sh (which documents the variables).
exec bash "$(dirname "$0")/../../run_preset.sh" presets/internvl2-2b-ui.yaml "$@"
