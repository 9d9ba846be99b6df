"""Every InternVL2 size's upstream layout (1B Qwen2, 2B/8B InternLM2, 4B Phi-3) converts to native and back."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from internvl_sft.model.convert import native_to_upstream_state_dict, upstream_to_native
from internvl_sft.model.tiny import SAVED_CONFIG_DEFAULTS, TinySizes, build_tiny_checkpoint

CORPUS = ("What is this? A cat.", "操作：点击\n参数：[481, 472]", "请根据屏幕截图，执行任务") * 4
TILE, TOKENS_PER_TILE = 56, 4  # (56 / 14)^2 x 0.5^2
VISION = dict(vocab_size=300, vision_hidden=32, vision_heads=2, vision_mlp=64, image_size=TILE)
# Tiny stand-ins with each size's LLM family and grouped-query ratio (query heads per key-value head):
# 1B Qwen2 7:1 -> 2, 2B InternLM2 16:8 -> 2, 4B Phi-3 32:32 -> 1, 8B InternLM2 32:8 -> 4.
SIZES = {
    "1B": TinySizes(llm="qwen2", llm_heads=4, llm_kv_heads=2, **VISION),
    "2B": TinySizes(llm="internlm2", llm_heads=4, llm_kv_heads=2, **VISION),
    "4B": TinySizes(llm="phi3", llm_heads=4, llm_kv_heads=4, **VISION),
    "8B": TinySizes(llm="internlm2", llm_heads=8, llm_kv_heads=2, **VISION),
}
# Model-specific llm_config keys of each family's published config.json (besides SAVED_CONFIG_DEFAULTS).
SHARED_LLM_KEYS = {
    "_name_or_path", "architectures", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "max_position_embeddings", "model_type", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "pad_token_id", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
    "torch_dtype", "use_cache", "vocab_size",
}
LLM_KEYS = {
    "qwen2": SHARED_LLM_KEYS | {"attention_dropout", "max_window_layers", "sliding_window", "use_sliding_window"},
    "internlm2": SHARED_LLM_KEYS | {"attn_implementation", "auto_map", "bias", "pretraining_tp", "rope_scaling"},
    "phi3": SHARED_LLM_KEYS | {
        "attention_dropout", "auto_map", "embd_pdrop", "original_max_position_embeddings", "resid_pdrop",
        "rope_scaling", "sliding_window",
    },
}
NATIVE_TEXT = {"qwen2": "Qwen2Config", "internlm2": "LlamaConfig", "phi3": "Phi3Config"}
TEMPLATES = {"qwen2": "Hermes-2", "internlm2": "internlm2-chat", "phi3": "phi3-chat"}


@pytest.fixture(scope="module")
def convert_size(tmp_path_factory):
    """Builds, converts and loads each size once: (sizes, upstream config, upstream weights, model, native)."""
    done = {}

    def convert(name: str):
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            build_tiny_checkpoint(root / "upstream", corpus=CORPUS, seed=5, sizes=SIZES[name])
            upstream_to_native(root / "upstream", root / "native")
            config = json.loads((root / "upstream" / "config.json").read_text(encoding="utf-8"))
            model = AutoModelForImageTextToText.from_pretrained(root / "native").eval()
            weights = load_file(str(root / "upstream" / "model.safetensors"))
            done[name] = SIZES[name], config, weights, model, root / "native"
        return done[name]

    return convert


@pytest.fixture(params=sorted(SIZES))
def converted(request, convert_size):
    return convert_size(request.param)


def test_upstream_config_has_the_published_fields(converted):
    sizes, config, _, _, _ = converted
    llm = config["llm_config"]
    assert set(llm) == LLM_KEYS[sizes.llm] | set(SAVED_CONFIG_DEFAULTS)
    assert config["template"] == TEMPLATES[sizes.llm]
    assert (llm["num_attention_heads"], llm["num_key_value_heads"]) == (sizes.llm_heads, sizes.llm_kv_heads)


def test_native_text_model_has_the_expected_class_and_shapes(converted):
    sizes, config, _, model, _ = converted
    text = model.config.text_config
    assert type(text).__name__ == NATIVE_TEXT[sizes.llm]
    assert (text.num_attention_heads, text.num_key_value_heads) == (sizes.llm_heads, sizes.llm_kv_heads)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    h, d, mlp, vocab = sizes.llm_hidden, sizes.head_dim, sizes.llm_mlp, config["llm_config"]["vocab_size"]
    layer = "model.language_model.layers.1."
    if sizes.llm == "phi3":
        assert shapes[layer + "self_attn.qkv_proj.weight"] == ((sizes.llm_heads + 2 * sizes.llm_kv_heads) * d, h)
        assert shapes[layer + "mlp.gate_up_proj.weight"] == (2 * mlp, h)
    else:
        assert shapes[layer + "self_attn.q_proj.weight"] == (sizes.llm_heads * d, h)
        assert shapes[layer + "self_attn.k_proj.weight"] == (sizes.llm_kv_heads * d, h)
        assert shapes[layer + "mlp.gate_proj.weight"] == (mlp, h)
    assert shapes["lm_head.weight"] == (vocab, h)
    assert not any("wqkv" in name or "feed_forward" in name for name in shapes)


def test_rope_settings_are_carried_over(converted):
    sizes, config, _, model, _ = converted
    rope = model.config.text_config.rope_parameters
    assert rope["rope_theta"] == config["llm_config"]["rope_theta"]
    expected = {"qwen2": "default", "internlm2": "dynamic", "phi3": "longrope"}[sizes.llm]
    assert rope["rope_type"] == expected
    if sizes.llm == "phi3":
        assert rope["long_factor"] == config["llm_config"]["rope_scaling"]["long_factor"]


def test_forward_pass_with_an_image(converted):
    sizes, _, _, model, native = converted
    tokenizer = AutoTokenizer.from_pretrained(native)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is this?"}], tokenize=False, add_generation_prompt=True
    )
    image = "<img>" + "<IMG_CONTEXT>" * TOKENS_PER_TILE + "</img>"
    ids = torch.tensor([tokenizer(text.replace("<image>", image), add_special_tokens=False)["input_ids"]])
    pixels = torch.randn(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        other = model(input_ids=ids, pixel_values=-pixels).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0, -1], other[0, -1])


def test_converting_back_gives_the_identical_state_dict(converted):
    _, config, upstream, model, _ = converted
    back = native_to_upstream_state_dict(model.state_dict(), config["llm_config"])
    assert back.keys() == upstream.keys()
    for key, tensor in upstream.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_stop_token_and_template_follow_the_family(converted):
    sizes, _, _, model, native = converted
    tokenizer = AutoTokenizer.from_pretrained(native)
    stop = {"qwen2": "<|im_end|>", "internlm2": "<|im_end|>", "phi3": "<|end|>"}[sizes.llm]
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(stop)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.endswith("hi" + stop)
    assert prompt.startswith("<s>") == (sizes.llm != "qwen2")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on [heads, seq, dim] with InternLM2's rotate-half convention."""
    dim, seq = x.shape[-1], x.shape[-2]
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), theta ** (-torch.arange(0, dim, 2) / dim))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
    return x * cos + half * sin


def internlm2_logits(w: dict, llm: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2 forward pass written from the upstream block layout: `wqkv` rows per key-value head h are
    [query heads of h ..., key h, value h]; query head (h, g) attends with key/value head h."""
    heads, kv, eps = llm["num_attention_heads"], llm["num_key_value_heads"], llm["rms_norm_eps"]
    groups, d = heads // kv, llm["hidden_size"] // heads
    x = w["language_model.model.tok_embeddings.weight"][ids]
    seq = ids.shape[0]
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    for n in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{n}."
        qkv = F.linear(rms_norm(x, w[p + "attention_norm.weight"], eps), w[p + "attention.wqkv.weight"])
        blocks = qkv.reshape(seq, kv, groups + 2, d)
        outputs = []
        for h in range(kv):
            key = rotate(blocks[:, h, groups].unsqueeze(0), llm["rope_theta"])[0]
            value = blocks[:, h, groups + 1]
            for g in range(groups):
                query = rotate(blocks[:, h, g].unsqueeze(0), llm["rope_theta"])[0]
                scores = (query @ key.T) / d**0.5 + mask
                outputs.append(scores.softmax(-1) @ value)
        x = x + F.linear(torch.cat(outputs, -1), w[p + "attention.wo.weight"])
        h_in = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate, up = F.linear(h_in, w[p + "feed_forward.w1.weight"]), F.linear(h_in, w[p + "feed_forward.w3.weight"])
        x = x + F.linear(F.silu(gate) * up, w[p + "feed_forward.w2.weight"])
    x = rms_norm(x, w["language_model.model.norm.weight"], eps)
    return F.linear(x, w["language_model.output.weight"])


@pytest.mark.parametrize("size", ["2B", "8B"])
def test_internlm2_text_logits_match_the_upstream_math(convert_size, size):
    _, config, upstream, model, _ = convert_size(size)
    ids = torch.tensor([5, 77, 123, 9, 250, 31, 2])
    with torch.no_grad():
        native = model(input_ids=ids.unsqueeze(0)).logits[0]
    expected = internlm2_logits(upstream, config["llm_config"], ids)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(native, expected, rtol=1e-4, atol=1e-4)
