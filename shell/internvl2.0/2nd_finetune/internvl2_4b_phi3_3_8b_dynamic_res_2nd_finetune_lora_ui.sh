#!/usr/bin/env bash
# LoRA fine-tuning of InternVL2-4B (Phi-3-mini LLM) on the UI dataset, started like the original script:
#   GPUS=1 PER_DEVICE_BATCH_SIZE=4 bash shell/internvl2.0/2nd_finetune/internvl2_4b_phi3_3_8b_dynamic_res_2nd_finetune_lora_ui.sh
# It runs presets/internvl2-4b-ui.yaml as a DVC experiment through shell/run_preset.sh (which documents the variables).
exec bash "$(dirname "$0")/../../run_preset.sh" presets/internvl2-4b-ui.yaml "$@"
