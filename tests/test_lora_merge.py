"""LoRA attachment follows the recipe's freeze flags, and a merged model generates what base + adapter does."""

import dataclasses

import pytest
import torch
from peft import PeftModel

from internvl_sft.config import LoraConfig, TrainConfig, gradient_accumulation
from internvl_sft.model.load import load_model, load_tokenizer, prepare_for_training
from internvl_sft.stages import merge

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECIPE = TrainConfig(llm_lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=LLM_TARGETS),
                     grad_checkpoint=False)


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_llm_lora_never_touches_the_vision_tower(tiny_native):
    model = prepare_for_training(load_model(tiny_native), RECIPE)
    names = trainable_names(model)
    assert names and all("lora_" in n for n in names)
    assert all("language_model" in n for n in names)
    assert any("self_attn.q_proj.lora_A" in n for n in names)
    assert any("mlp.down_proj.lora_B" in n for n in names)


def test_freeze_flags_select_projector_and_vision_lora(tiny_native):
    cfg = dataclasses.replace(
        RECIPE, freeze_mlp=False,
        backbone_lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "fc1")),
    )
    model = prepare_for_training(load_model(tiny_native), cfg)
    names = trainable_names(model)
    assert any("multi_modal_projector" in n for n in names)
    vision = [n for n in names if "vision_tower" in n]
    assert vision and all("q_proj.lora" in n or "fc1.lora" in n for n in vision)
    ranks = {n: p.shape for n, p in model.named_parameters() if "vision_tower" in n and "lora_A" in n}
    assert all(shape[0] == 4 for shape in ranks.values())


def test_gradient_accumulation_keeps_the_global_batch():
    assert gradient_accumulation(16, 4, 1) == 4
    assert gradient_accumulation(16, 4, 2) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        gradient_accumulation(16, 3, 2)


def prompt_ids(tokenizer) -> torch.Tensor:
    text = "<|im_start|>user\n请根据屏幕截图，执行任务：点击微信app图标<|im_end|><|im_start|>assistant\n"
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_merged_model_generates_like_base_plus_adapter(tiny_native, tmp_path, random_lora_b):
    model = prepare_for_training(load_model(tiny_native), RECIPE)
    random_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("merge:\n  dtype: float32\n")
    merge.main(["--params", str(params_file), "--model", str(tiny_native), "--adapter-dir", str(tmp_path / "adapter"),
                "--out", str(tmp_path / "merged")])

    tokenizer = load_tokenizer(tiny_native)
    ids = prompt_ids(tokenizer)
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with_adapter = PeftModel.from_pretrained(load_model(tiny_native), tmp_path / "adapter").eval()
    merged = load_model(tmp_path / "merged").eval()
    base = load_model(tiny_native).eval()
    expected = with_adapter.generate(input_ids=ids, **settings)
    assert torch.equal(merged.generate(input_ids=ids, **settings), expected)
    assert not torch.equal(base.generate(input_ids=ids, **settings), expected)
    assert (tmp_path / "merged/internvl_sft.json").exists()
    assert load_tokenizer(tmp_path / "merged").chat_template == tokenizer.chat_template
