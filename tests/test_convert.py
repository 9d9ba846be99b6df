"""Upstream InternVL2 layout <-> transformers-native InternVL, checked against the upstream block math.

Checkpoints are untrusted input: weights come from safetensors (pickle only when allowed, and then tensors only)
and no code found in a checkpoint folder is ever imported."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from internvl_sft.model.convert import (
    CheckpointError,
    native_to_upstream_state_dict,
    upstream_to_native,
    upstream_to_native_state_dict,
)
from internvl_sft.model.load import load_model, load_tokenizer
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint
from internvl_sft.stages.merge import merge_adapter

CORPUS = ("What is this? A cat.", "操作：点击\n参数：[481, 472]", "请根据屏幕截图，执行任务") * 6
FACTS_EXAMPLE = (
    "<|im_start|>system\n你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
    "<|im_start|>assistant\nA cat.<|im_end|>"
)
TILE = 112
TOKENS_PER_TILE = 16  # (112 / 14)^2 x 0.5^2


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert") / "upstream"
    build_tiny_checkpoint(folder, corpus=CORPUS, seed=3, sizes=TinySizes(vocab_size=300))
    return folder


@pytest.fixture(scope="module")
def native(upstream):
    folder = upstream.parent / "native"
    upstream_to_native(upstream, folder)
    return folder


@pytest.fixture(scope="module")
def model(native):
    return AutoModelForImageTextToText.from_pretrained(native).eval()


@pytest.fixture(scope="module")
def tokenizer(native):
    return AutoTokenizer.from_pretrained(native)


@pytest.fixture(scope="module")
def upstream_weights(upstream):
    return load_file(str(upstream / "model.safetensors"))


@pytest.fixture(scope="module")
def upstream_config(upstream):
    return json.loads((upstream / "config.json").read_text(encoding="utf-8"))


def test_converted_folder_loads_natively(model):
    assert type(model).__name__ == "InternVLForConditionalGeneration"


def test_lm_head_is_not_tied(model):
    assert model.config.tie_word_embeddings is False
    head, embed = model.lm_head.weight, model.get_input_embeddings().weight
    assert head.data_ptr() != embed.data_ptr()
    assert not torch.equal(head, embed)


def test_image_token_and_sequence_length(model, tokenizer):
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.config.image_seq_length == TOKENS_PER_TILE
    assert model.config.vision_feature_layer == -1
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_sidecar_keeps_the_upstream_settings(native):
    sidecar = json.loads((native / "internvl_sft.json").read_text(encoding="utf-8"))
    assert sidecar == {
        "template": "Hermes-2", "image_size": TILE, "downsample_ratio": 0.5, "min_dynamic_patch": 1,
        "max_dynamic_patch": 4, "use_thumbnail": True, "dynamic_image_size": True,
        "num_image_token": TOKENS_PER_TILE,
    }


def test_image_processor_tiles_like_internvl(native):
    processor = AutoImageProcessor.from_pretrained(native)
    out = processor(Image.new("RGB", (330, 110), "white"), return_tensors="pt")
    assert out["pixel_values"].shape == (4, 3, TILE, TILE)  # 3x1 grid + thumbnail
    assert out["pixel_values"][0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)


def image_prompt_ids(tokenizer, tiles: int) -> torch.Tensor:
    image = "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is this?"}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([tokenizer(text.replace("<image>", image))["input_ids"]])


def test_forward_with_two_tiles(model, tokenizer):
    input_ids = image_prompt_ids(tokenizer, tiles=2)
    pixels = torch.randn(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
        other = model(input_ids=input_ids, pixel_values=pixels.flip(-1)).logits
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0, -1], other[0, -1])


def test_native_state_dict_maps_back_exactly(model, upstream_weights, upstream_config):
    back = native_to_upstream_state_dict(model.state_dict(), upstream_config["llm_config"])
    assert back.keys() == upstream_weights.keys()
    for key, tensor in upstream_weights.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def pixel_unshuffle(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, rows, cols, C] -> [B, rows*ratio, cols*ratio, C/ratio^2]; channels ordered (row offset, col offset, C)."""
    b, rows, cols, c = features.shape
    s = int(1 / ratio)
    blocks = features.reshape(b, rows // s, s, cols // s, s, c).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(b, rows // s, cols // s, s * s * c)


def reference_image_features(w: dict, config: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternViT + pixel shuffle v2 + mlp1, written from the upstream block definitions (fused qkv)."""
    vision = config["vision_config"]
    c, heads, eps = vision["hidden_size"], vision["num_attention_heads"], vision["layer_norm_eps"]
    head_dim = c // heads
    e = "vision_model.embeddings."
    x = F.conv2d(pixels, w[e + "patch_embedding.weight"], w[e + "patch_embedding.bias"], stride=vision["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w[e + "class_embedding"].expand(x.shape[0], 1, c), x], dim=1) + w[e + "position_embedding"]
    batch, tokens = x.shape[:2]
    for n in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{n}."
        h = F.layer_norm(x, (c,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        qkv = F.linear(h, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attention = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, tokens, c)
        x = x + F.linear(h, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"]) * w[p + "ls1"]
        h = F.layer_norm(x, (c,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
                     w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        x = x + h * w[p + "ls2"]
    side = int((tokens - 1) ** 0.5)
    x = pixel_unshuffle(x[:, 1:].reshape(batch, side, side, c), config["downsample_ratio"])
    x = x.reshape(batch, -1, x.shape[-1])
    x = F.layer_norm(x, x.shape[-1:], w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
    x = F.gelu(F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"]))
    return F.linear(x, w["mlp1.3.weight"], w["mlp1.3.bias"])


def test_vision_tower_matches_upstream_math(model, upstream_weights, upstream_config):
    pixels = torch.randn(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels)
    features = getattr(out, "pooler_output", out)
    expected = reference_image_features(upstream_weights, upstream_config, pixels)
    assert features.shape == expected.shape == (1, TOKENS_PER_TILE, 64)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


def test_chat_template_renders_the_upstream_prompt(tokenizer):
    messages = [
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A cat."},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == FACTS_EXAMPLE
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == FACTS_EXAMPLE[: FACTS_EXAMPLE.index("A cat.")]
    custom = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages], tokenize=False)
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n")


def test_sharded_checkpoint_converts_the_same(upstream, upstream_weights, model, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(upstream, sharded)
    (sharded / "model.safetensors").unlink()
    keys = sorted(upstream_weights)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({key: upstream_weights[key] for key in part}, str(sharded / name))
    weight_map = {key: name for name, part in shards.items() for key in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    upstream_to_native(sharded, tmp_path / "native")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "native").state_dict()
    assert all(torch.equal(reloaded[key], tensor) for key, tensor in model.state_dict().items())


def test_unmapped_upstream_key_is_named(upstream_weights, upstream_config):
    weights = dict(upstream_weights) | {"vision_model.encoder.layers.0.attn.rope.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.0\.attn\.rope\.weight"):
        upstream_to_native_state_dict(weights, upstream_config["llm_config"])


def test_missing_weight_is_named_and_nothing_is_written(upstream, upstream_weights, tmp_path):
    folder = tmp_path / "incomplete"
    shutil.copytree(upstream, folder)
    weights = {k: v for k, v in upstream_weights.items() if k != "vision_model.encoder.layers.1.norm2.bias"}
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.vision_tower\.encoder\.layer\.1\.layernorm_after\.bias"):
        upstream_to_native(folder, tmp_path / "native")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["incomplete"]


def test_missing_part_of_a_fused_tensor_is_named(model, upstream_config):
    weights = dict(model.state_dict())
    del weights["model.vision_tower.encoder.layer.0.attention.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layer\.0\.attention\.k_proj\.weight missing"):
        native_to_upstream_state_dict(weights, upstream_config["llm_config"])


def test_pixel_shuffle_v1_is_refused(upstream, tmp_path):
    folder = tmp_path / "v1"
    shutil.copytree(upstream, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps(config | {"ps_version": "v1"}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"config\.json: ps_version 'v1'"):
        upstream_to_native(folder, tmp_path / "native")


class RunsCode:
    """A pickled object that, once unpickled, would create a file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def pickled_copy(upstream, folder, weights) -> None:
    shutil.copytree(upstream, folder)
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")


def test_pickle_weights_convert_only_when_allowed(upstream, native, tmp_path):
    pickled_copy(upstream, tmp_path / "pickled", load_file(str(upstream / "model.safetensors")))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle weights are refused.*allow_pickle_weights"):
        upstream_to_native(tmp_path / "pickled", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    upstream_to_native(tmp_path / "pickled", tmp_path / "native", allow_pickle=True)
    assert load_file(str(tmp_path / "native/model.safetensors")).keys() == load_file(
        str(native / "model.safetensors")).keys()


def test_pickle_that_runs_code_is_refused_even_when_allowed(upstream, tmp_path):
    marker = tmp_path / "code-ran"
    weights = dict(load_file(str(upstream / "model.safetensors"))) | {"payload": RunsCode(marker)}
    pickled_copy(upstream, tmp_path / "evil", weights)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused, it holds more than tensors"):
        upstream_to_native(tmp_path / "evil", tmp_path / "native", allow_pickle=True)
    assert not marker.exists() and not (tmp_path / "native").exists()


def test_code_shipped_in_a_checkpoint_folder_is_never_imported(native, tmp_path):
    folder = tmp_path / "with-code"
    shutil.copytree(native, folder)
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    auto_maps = {"config.json": {"AutoModelForImageTextToText": "modeling_evil.Evil"},
                 "tokenizer_config.json": {"AutoTokenizer": ["modeling_evil.Evil", "modeling_evil.Evil"]}}
    for name, auto_map in auto_maps.items():
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(config | {"auto_map": auto_map}))
    assert type(load_model(folder)).__name__ == "InternVLForConditionalGeneration"
    load_tokenizer(folder)
    assert not marker.exists()


def test_native_model_and_adapter_need_safetensors(native, tmp_path):
    folder = tmp_path / "pickled-native"
    shutil.copytree(native, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no safetensors file for the model; pickle weights "
                                                r"\(pytorch_model\.bin\) are refused"):
        load_model(folder)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"no safetensors file for the adapter; pickle weights "
                                                r"\(adapter_model\.bin\) are refused"):
        merge_adapter(native, adapter, torch.float32)
