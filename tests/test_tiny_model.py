"""The embedded-default checkpoint: upstream InternVL2-1B layout at toy sizes, Qwen2-style tokenizer."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from internvl_sft.model.templates import chat_template_for
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint
from internvl_sft.model.tokenizer import SPECIAL_TOKENS, train_tokenizer

CORPUS = (
    "请根据屏幕截图，执行任务：点击底部导航栏的“发现”选项",
    "操作：点击\n参数：[481, 472]",
    "操作：滑动\n参数：[704, 130] -> [83, 130]",
    "操作：输入\n参数：金融科技",
    "Settings Wi-Fi Bluetooth Display Sound Battery Search",
    "<image>\nWhat is this? A cat. [[120, 45, 880, 990]]",
) * 8
SIZES = TinySizes(vocab_size=400)
FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "upstream"
    build_tiny_checkpoint(folder, corpus=CORPUS, seed=0, sizes=SIZES)
    return folder


@pytest.fixture(scope="module")
def tensors(checkpoint):
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.fixture(scope="module")
def config(checkpoint):
    return json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


def expected_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    """InternVL2-1B's parameter names at the default toy sizes (C=64, 8x8 patches, MLP 128, LLM 64 / 2 KV heads)."""
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, 64),
        "vision_model.embeddings.patch_embedding.weight": (64, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (64,),
        "vision_model.embeddings.position_embedding": (1, 65, 64),
        "mlp1.0.weight": (256,),
        "mlp1.0.bias": (256,),
        "mlp1.1.weight": (64, 256),
        "mlp1.1.bias": (64,),
        "mlp1.3.weight": (64, 64),
        "mlp1.3.bias": (64,),
        "language_model.model.embed_tokens.weight": (vocab, 64),
        "language_model.model.norm.weight": (64,),
        "language_model.lm_head.weight": (vocab, 64),
    }
    for n in range(2):
        v = f"vision_model.encoder.layers.{n}."
        shapes |= {
            v + "attn.qkv.weight": (192, 64), v + "attn.qkv.bias": (192,),
            v + "attn.proj.weight": (64, 64), v + "attn.proj.bias": (64,),
            v + "norm1.weight": (64,), v + "norm1.bias": (64,), v + "norm2.weight": (64,), v + "norm2.bias": (64,),
            v + "ls1": (64,), v + "ls2": (64,),
            v + "mlp.fc1.weight": (128, 64), v + "mlp.fc1.bias": (128,),
            v + "mlp.fc2.weight": (64, 128), v + "mlp.fc2.bias": (64,),
        }
        q = f"language_model.model.layers.{n}."
        shapes |= {
            q + "self_attn.q_proj.weight": (64, 64), q + "self_attn.q_proj.bias": (64,),
            q + "self_attn.k_proj.weight": (32, 64), q + "self_attn.k_proj.bias": (32,),
            q + "self_attn.v_proj.weight": (32, 64), q + "self_attn.v_proj.bias": (32,),
            q + "self_attn.o_proj.weight": (64, 64),
            q + "mlp.gate_proj.weight": (128, 64), q + "mlp.up_proj.weight": (128, 64),
            q + "mlp.down_proj.weight": (64, 128),
            q + "input_layernorm.weight": (64,), q + "post_attention_layernorm.weight": (64,),
        }
    return shapes


def test_writes_exactly_the_upstream_files(checkpoint):
    assert {path.name for path in checkpoint.iterdir()} == FILES


def test_config_is_internvl_chat_shaped(config, tokenizer):
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["model_type"] == "internvl_chat"
    assert (config["template"], config["ps_version"], config["select_layer"]) == ("Hermes-2", "v2", -1)
    assert (config["force_image_size"], config["downsample_ratio"]) == (112, 0.5)
    assert (config["min_dynamic_patch"], config["max_dynamic_patch"]) == (1, 4)
    assert config["dynamic_image_size"] and config["use_thumbnail"]
    vision = config["vision_config"]
    assert vision["qkv_bias"] and not vision["qk_normalization"] and not vision["use_flash_attn"]
    assert (vision["norm_type"], vision["layer_norm_eps"], vision["drop_path_rate"]) == ("layer_norm", 1e-6, 0.0)
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (64, 2, 4)
    assert (vision["image_size"], vision["patch_size"], vision["intermediate_size"]) == (112, 14, 128)
    llm = config["llm_config"]
    assert llm["architectures"] == ["Qwen2ForCausalLM"]
    assert llm["tie_word_embeddings"] is False
    assert (llm["rope_theta"], llm["rms_norm_eps"]) == (1e6, 1e-6)
    assert (llm["num_attention_heads"], llm["num_key_value_heads"], llm["intermediate_size"]) == (4, 2, 128)
    assert llm["vocab_size"] == len(tokenizer)
    assert llm["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_weights_have_upstream_names_and_shapes(tensors, tokenizer):
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    assert shapes == expected_shapes(len(tokenizer))
    assert all(tensor.dtype == torch.float32 for tensor in tensors.values())


def test_weights_are_initialised_to_keep_signal_scale(tensors):
    assert torch.equal(tensors["vision_model.encoder.layers.1.norm2.weight"], torch.ones(64))
    assert torch.equal(tensors["mlp1.0.bias"], torch.zeros(256))
    assert torch.equal(tensors["language_model.model.norm.weight"], torch.ones(64))
    assert torch.equal(tensors["vision_model.encoder.layers.0.ls1"], torch.full((64,), 0.1))
    embed = tensors["language_model.model.embed_tokens.weight"]
    assert abs(embed.std().item() - 1.0) < 0.05 and abs(embed.mean().item()) < 0.05
    head = tensors["language_model.lm_head.weight"]
    assert abs(head.std().item() - 0.25) < 0.02
    q_proj = tensors["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert abs(q_proj.std().item() - 64**-0.5) < 0.01
    position = tensors["vision_model.embeddings.position_embedding"][0]
    assert torch.equal(position[0], torch.zeros(64))
    origin = torch.cat([torch.zeros(16), torch.ones(16), torch.zeros(16), torch.ones(16)])
    assert torch.allclose(position[1], origin)  # patch (0, 0): sin 0 and cos 0 for rows and columns
    assert not torch.allclose(position[2], position[1 + 8])  # (0, 1) and (1, 0) differ


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_identical_bytes(checkpoint, tmp_path):
    build_tiny_checkpoint(tmp_path / "again", corpus=CORPUS, seed=0, sizes=SIZES)
    build_tiny_checkpoint(tmp_path / "other", corpus=CORPUS, seed=1, sizes=SIZES)
    for name in FILES:
        assert digest(tmp_path / "again" / name) == digest(checkpoint / name), name
    assert digest(tmp_path / "other" / "model.safetensors") != digest(checkpoint / "model.safetensors")


def test_tokenizer_training_is_the_same_in_a_fresh_process():
    code = (
        "import sys, hashlib; from internvl_sft.model.tokenizer import train_tokenizer; "
        "corpus = sys.stdin.read().split('\\x00'); "
        "print(hashlib.sha256(train_tokenizer(corpus, 400).to_str().encode()).hexdigest())"
    )
    here = hashlib.sha256(train_tokenizer(CORPUS, 400).to_str().encode()).hexdigest()
    there = subprocess.run(
        [sys.executable, "-c", code], input="\x00".join(CORPUS), capture_output=True, text=True, check=True
    ).stdout.strip()
    assert there == here


def test_tokenizer_loads_as_fast_qwen2(tokenizer):
    assert type(tokenizer).__name__ in {"Qwen2Tokenizer", "Qwen2TokenizerFast"}
    assert tokenizer.is_fast
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tokenizer.chat_template == chat_template_for("Hermes-2")


def test_special_tokens_follow_the_learned_vocabulary_in_order(tokenizer):
    size = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(size - len(SPECIAL_TOKENS), size))
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == size - 7
    assert tokenizer("<img><IMG_CONTEXT><IMG_CONTEXT></img>")["input_ids"] == [size - 9, size - 7, size - 7, size - 8]


@pytest.mark.parametrize(
    "text",
    [
        "操作：点击\n参数：[481, 472]",
        "没见过的汉字：龘靐齉 2024年12月31日 23:59",
        "Mixed ünïcödé, emoji 😀 and\ttabs\n\n  spaces ",
    ],
)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_each_digit_is_its_own_token(tokenizer):
    tokens = tokenizer.tokenize("坐标 [9081, 472] 2024")
    digits = [token for token in tokens if any(ch.isdigit() for ch in token)]
    assert digits == list("9081472" "2024")


def test_unknown_template_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Hermes-2"):
        build_tiny_checkpoint(tmp_path / "x", corpus=CORPUS, seed=0, sizes=TinySizes(template="vicuna"))


def test_vocab_below_the_byte_alphabet_is_refused():
    with pytest.raises(ValueError, match="256"):
        train_tokenizer(CORPUS, 100)


def test_chat_template_for_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Hermes-2, internlm2-chat, phi3-chat"):
        chat_template_for("vicuna")


def test_llm_vocabulary_pads_beyond_the_tokenizer_as_real_checkpoints_do(tmp_path, tokenizer):
    padded = len(tokenizer) + 37
    folder = tmp_path / "padded"
    build_tiny_checkpoint(folder, corpus=CORPUS, seed=0, sizes=TinySizes(vocab_size=400, llm_vocab_size=padded))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["llm_config"]["vocab_size"] == padded
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("language_model.model.embed_tokens.weight").get_shape()[0] == padded
        assert f.get_slice("language_model.lm_head.weight").get_shape()[0] == padded


def test_llm_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="llm_vocab_size"):
        build_tiny_checkpoint(tmp_path / "small", corpus=CORPUS, seed=0,
                              sizes=TinySizes(vocab_size=400, llm_vocab_size=len(tokenizer) - 1))
