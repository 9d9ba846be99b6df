"""The export stage writes the merged model in the upstream layout, with the base's config and code files."""

import json

import pytest
import torch
from safetensors.torch import load_file

from internvl_sft.config import LoraConfig, TrainConfig
from internvl_sft.model.convert import native_to_upstream_state_dict, read_weights, upstream_to_native
from internvl_sft.model.load import load_model, prepare_for_training
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint
from internvl_sft.stages import export, merge

CORPUS = ("操作：点击\n参数：[481, 472]", "请根据屏幕截图，执行任务：点击微信app图标") * 4
RECIPE = TrainConfig(
    llm_lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    grad_checkpoint=False,
)
# Upstream checkpoints ship remote code; a file that fails when imported shows it is only ever copied.
REMOTE_CODE = "raise RuntimeError('modeling code must never be imported')\n"
TOUCHED = "language_model.model.layers.0."  # an LLM layer that LoRA changes
UNTOUCHED = "vision_model.encoder.layers.0.attn.qkv.weight"


def merged_model(root, llm: str, randomize_lora_b):
    """Base upstream folder (with a remote-code file), its native conversion, and a merged random adapter."""
    sizes = TinySizes(vocab_size=300, llm=llm, llm_heads=8, llm_kv_heads=2, vision_hidden=32, vision_heads=2,
                      vision_mlp=64, image_size=56)
    build_tiny_checkpoint(root / "upstream", corpus=CORPUS, seed=2, sizes=sizes)
    (root / "upstream" / "modeling_internvl_chat.py").write_text(REMOTE_CODE, encoding="utf-8")
    upstream_to_native(root / "upstream", root / "native")
    model = prepare_for_training(load_model(root / "native"), RECIPE)
    randomize_lora_b(model)
    model.save_pretrained(root / "adapter")
    (root / "params.yaml").write_text("merge:\n  dtype: auto\n", encoding="utf-8")
    merge.main(["--params", str(root / "params.yaml"), "--model", str(root / "native"),
                "--adapter-dir", str(root / "adapter"), "--out", str(root / "merged")])
    export.main(["--merged", str(root / "merged"), "--upstream", str(root / "upstream"),
                 "--out", str(root / "merged_upstream")])
    return root


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def exported(request, tmp_path_factory, random_lora_b):
    return merged_model(tmp_path_factory.mktemp(request.param), request.param, random_lora_b)


def test_exported_weights_are_the_merged_weights_in_upstream_layout(exported):
    llm = json.loads((exported / "upstream/config.json").read_text(encoding="utf-8"))["llm_config"]
    expected = native_to_upstream_state_dict(load_model(exported / "merged").state_dict(), llm)
    written = read_weights(exported / "merged_upstream")
    assert written.keys() == expected.keys()
    for key, tensor in expected.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key


def test_lora_changed_the_llm_and_left_the_vision_tower(exported):
    base = load_file(str(exported / "upstream/model.safetensors"))
    written = read_weights(exported / "merged_upstream")
    assert written.keys() == base.keys()
    touched = [key for key in base if key.startswith(TOUCHED) and not torch.equal(base[key], written[key])]
    assert touched
    assert torch.equal(written[UNTOUCHED], base[UNTOUCHED])


def test_config_and_code_files_are_copied_as_they_are(exported):
    for name in ("config.json", "generation_config.json", "modeling_internvl_chat.py", "tokenizer_config.json"):
        assert (exported / "merged_upstream" / name).read_bytes() == (exported / "upstream" / name).read_bytes()


def test_export_converts_back_to_the_merged_model(exported, tmp_path):
    upstream_to_native(exported / "merged_upstream", tmp_path / "native")
    again = load_model(tmp_path / "native").state_dict()
    merged = load_model(exported / "merged").state_dict()
    assert again.keys() == merged.keys()
    assert all(torch.equal(again[key], merged[key]) for key in merged)
