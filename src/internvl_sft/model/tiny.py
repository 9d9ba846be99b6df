"""The embedded-default base model: a tiny random-init InternVL2 checkpoint in the upstream layout.

The folder looks like a download of OpenGVLab/InternVL2-1B (InternViT + MLP projector + Qwen2, config.json of
InternVLChatModel, `model.safetensors` with upstream key names, Qwen2 tokenizer files) shrunk to toy sizes, so
the `pretrained` stage converts it with exactly the code that converts the real checkpoint. `TinySizes.llm`
selects the LLM family of another size instead: `internlm2` (InternVL2-2B/8B: fused grouped-query `wqkv`)
or `phi3` (InternVL2-4B: fused `qkv_proj` / `gate_up_proj`), each with the config fields its real
config.json has. The tokenizer is always a small byte-level BPE carrying that family's special tokens.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from internvl_sft.data.template import get_template
from internvl_sft.model.templates import chat_template_for
from internvl_sft.model.tokenizer import (
    INTERNLM2_TOKENIZER,
    PHI3_TOKENIZER,
    QWEN2_TOKENIZER,
    TokenizerSpec,
    save_tokenizer,
    train_tokenizer,
)

# A random model only behaves like a pretrained one if signals keep their scale through the layers: linear
# weights are LeCun-normal (std 1/sqrt(fan_in)), token embeddings unit-variance, the output head large enough
# to produce confident logits (with the 0.02 used before pre-training, a frozen head caps every logit near 1),
# and the vision position embeddings smooth in 2-D, as pre-trained ViTs learn them, so that where a patch lies
# is readable by a small adapter.
INIT_STD = 0.02
HEAD_STD = 0.25
LAYER_SCALE = 0.1
PROJECTOR_LN_EPS = 1e-5
LlmName = Literal["qwen2", "internlm2", "phi3"]


@dataclasses.dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny model; `llm` picks the LLM family, every other setting is that InternVL2 size's."""

    vocab_size: int = 1200  # learned BPE tokens; the LLM vocabulary adds the special tokens
    llm_vocab_size: int = 0  # rows of the embedding and head; 0: the tokenizer's size (larger pads, as real models do)
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 128
    image_size: int = 112
    patch_size: int = 14
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_mlp: int = 128
    max_position_embeddings: int = 32768
    downsample_ratio: float = 0.5
    llm: LlmName = "qwen2"
    template: str | None = None  # None: the family's template
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 4

    @property
    def family(self) -> TinyLlm:
        return TINY_LLMS[self.llm]

    @property
    def template_name(self) -> str:
        return self.template or self.family.template

    @property
    def head_dim(self) -> int:
        return self.llm_hidden // self.llm_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def projector_in(self) -> int:
        """Width of a pixel-shuffled vision feature: hidden x (1/ratio)^2."""
        return self.vision_hidden * int(1 / self.downsample_ratio) ** 2

    def check(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"pretrained.tiny: image_size {self.image_size} is not a multiple of {self.patch_size}")
        if self.vision_hidden % self.vision_heads or self.llm_hidden % self.llm_heads:
            raise ValueError("pretrained.tiny: hidden sizes must be multiples of the head counts")
        if self.llm_heads % self.llm_kv_heads:
            raise ValueError("pretrained.tiny: llm_heads must be a multiple of llm_kv_heads")
        if (self.patches_per_side * self.downsample_ratio) % 1:
            raise ValueError("pretrained.tiny: patches per side times downsample_ratio must be an integer")
        if self.llm_vocab_size < 0:
            raise ValueError("pretrained.tiny: llm_vocab_size must be 0 (the tokenizer's size) or a row count")
        if self.llm not in TINY_LLMS:
            raise ValueError(f"pretrained.tiny: llm {self.llm!r} is not one of {', '.join(TINY_LLMS)}")
        get_template(self.template_name)


# Keys transformers 4.37 writes into every nested config of the published InternVL2 config.json files
# (PretrainedConfig attributes at their defaults); the model-specific fields are added per family below.
SAVED_CONFIG_DEFAULTS = {
    "add_cross_attention": False,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None,
    "decoder_start_token_id": None,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None,
    "finetuning_task": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False,
    "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "prefix": None,
    "problem_type": None,
    "pruned_heads": {},
    "remove_invalid_values": False,
    "repetition_penalty": 1.0,
    "return_dict": True,
    "return_dict_in_generate": False,
    "sep_token_id": None,
    "suppress_tokens": None,
    "task_specific_params": None,
    "temperature": 1.0,
    "tf_legacy_loss": False,
    "tie_encoder_decoder": False,
    "tokenizer_class": None,
    "top_k": 50,
    "top_p": 1.0,
    "torchscript": False,
    "transformers_version": "4.37.2",
    "typical_p": 1.0,
    "use_bfloat16": False,
}
VISION_SAVED_KEYS = ("output_attentions", "output_hidden_states", "return_dict", "transformers_version", "use_bfloat16")
TORCH_DTYPE = "float32"  # the published checkpoints say bfloat16; the tiny one is stored in fp32


def vision_config(sizes: TinySizes) -> dict:
    """InternVisionModel fields as the InternVL2 checkpoints (all with InternViT-300M) write them."""
    return {key: SAVED_CONFIG_DEFAULTS[key] for key in VISION_SAVED_KEYS} | {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": sizes.vision_hidden,
        "image_size": sizes.image_size,
        "initializer_factor": 1.0,
        "initializer_range": INIT_STD,
        "intermediate_size": sizes.vision_mlp,
        "layer_norm_eps": 1e-6,
        "model_type": "intern_vit_6b",
        "norm_type": "layer_norm",
        "num_attention_heads": sizes.vision_heads,
        "num_channels": 3,
        "num_hidden_layers": sizes.vision_layers,
        "patch_size": sizes.patch_size,
        "qk_normalization": False,
        "qkv_bias": True,
        "torch_dtype": TORCH_DTYPE,
        "use_flash_attn": False,
    }


def shared_llm_fields(sizes: TinySizes, vocab: int, ids: SpecialIds) -> dict:
    """Fields every InternVL2 LLM config has, at tiny sizes (untied lm_head)."""
    return SAVED_CONFIG_DEFAULTS | {
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "hidden_act": "silu",
        "hidden_size": sizes.llm_hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": sizes.llm_mlp,
        "num_attention_heads": sizes.llm_heads,
        "num_hidden_layers": sizes.llm_layers,
        "num_key_value_heads": sizes.llm_kv_heads,
        "tie_word_embeddings": False,
        "torch_dtype": TORCH_DTYPE,
        "use_cache": True,
        "vocab_size": vocab,
    }


def qwen2_config(sizes: TinySizes, vocab: int, ids: SpecialIds) -> dict:
    """Qwen2ForCausalLM fields as InternVL2-1B writes them (Qwen2-0.5B-Instruct)."""
    return shared_llm_fields(sizes, vocab, ids) | {
        "_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": ids.pad,
        "max_position_embeddings": sizes.max_position_embeddings,
        "max_window_layers": sizes.llm_layers,
        "model_type": "qwen2",
        "pad_token_id": None,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": sizes.max_position_embeddings,
        "use_sliding_window": False,
    }


def internlm2_config(sizes: TinySizes, vocab: int, ids: SpecialIds) -> dict:
    """InternLM2ForCausalLM fields as InternVL2-2B / -8B write them (remote-code config class)."""
    return shared_llm_fields(sizes, vocab, ids) | {
        "_name_or_path": "internlm/internlm2-chat-1_8b",
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "max_position_embeddings": sizes.max_position_embeddings,
        "model_type": "internlm2",
        "pad_token_id": ids.pad,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"factor": 2.0, "type": "dynamic"},
        "rope_theta": 1000000,
    }


def phi3_config(sizes: TinySizes, vocab: int, ids: SpecialIds) -> dict:
    """Phi3ForCausalLM fields as InternVL2-4B writes them (Phi-3-mini-128k: "su" scaled RoPE, one factor
    per rotary frequency, i.e. head_dim / 2 of them)."""
    frequencies = sizes.head_dim // 2
    return shared_llm_fields(sizes, vocab, ids) | {
        "_name_or_path": "microsoft/Phi-3-mini-128k-instruct",
        "architectures": ["Phi3ForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi3.Phi3Config",
            "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
        },
        "embd_pdrop": 0.0,
        "max_position_embeddings": 131072,
        "model_type": "phi3",
        "original_max_position_embeddings": 4096,
        "pad_token_id": ids.pad,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "long_factor": [1.0 + index / frequencies for index in range(frequencies)],
            "short_factor": [1.0] * frequencies,
            "type": "su",
        },
        "rope_theta": 10000.0,
        "sliding_window": 262144,
    }


def chat_config(sizes: TinySizes, llm: dict) -> dict:
    """config.json of InternVLChatModel."""
    return {
        "_commit_hash": None,
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": sizes.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": sizes.image_size,
        "llm_config": llm,
        "max_dynamic_patch": sizes.max_dynamic_patch,
        "min_dynamic_patch": sizes.min_dynamic_patch,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": sizes.template_name,
        "tie_word_embeddings": False,
        "torch_dtype": TORCH_DTYPE,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": vision_config(sizes),
    }


@dataclasses.dataclass(frozen=True)
class Param:
    """Shape and initial value of one weight: normal(0, std), ones, zeros or the layer-scale constant."""

    shape: tuple[int, ...]
    init: Literal["normal", "ones", "zeros", "layer_scale", "sincos_2d"] = "normal"
    std: float = INIT_STD

    def tensor(self, generator: torch.Generator) -> torch.Tensor:
        if self.init == "ones":
            return torch.ones(self.shape)
        if self.init == "zeros":
            return torch.zeros(self.shape)
        if self.init == "layer_scale":
            return torch.full(self.shape, LAYER_SCALE)
        if self.init == "sincos_2d":
            return sincos_position_table(self.shape)
        return torch.randn(self.shape, generator=generator) * self.std


def sincos_position_table(shape: tuple[int, ...]) -> torch.Tensor:
    """(1, 1 + side*side, width): a zero row for the class token, then sin/cos of row and column per patch."""
    _, count, width = shape
    side = int(round((count - 1) ** 0.5))
    quarter = width // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    angles_r = rows.reshape(-1, 1) * frequencies
    angles_c = cols.reshape(-1, 1) * frequencies
    grid = torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1)
    table = torch.zeros(count, width)
    table[1:, : grid.shape[1]] = grid
    return table.unsqueeze(0)


def linear(prefix: str, out_features: int, in_features: int, bias: bool = True) -> dict[str, Param]:
    params = {f"{prefix}.weight": Param((out_features, in_features), std=in_features**-0.5)}
    if bias:
        params[f"{prefix}.bias"] = Param((out_features,))
    return params


def norm(prefix: str, width: int, bias: bool = True) -> dict[str, Param]:
    params = {f"{prefix}.weight": Param((width,), "ones")}
    if bias:
        params[f"{prefix}.bias"] = Param((width,), "zeros")
    return params


def vision_params(sizes: TinySizes) -> dict[str, Param]:
    """InternViT weights under `vision_model.`."""
    c, p = sizes.vision_hidden, sizes.patch_size
    params = {
        "vision_model.embeddings.class_embedding": Param((1, 1, c)),
        "vision_model.embeddings.patch_embedding.weight": Param((c, 3, p, p), std=(3 * p * p) ** -0.5),
        "vision_model.embeddings.patch_embedding.bias": Param((c,)),
        "vision_model.embeddings.position_embedding": Param((1, sizes.patches_per_side**2 + 1, c), "sincos_2d"),
    }
    for n in range(sizes.vision_layers):
        layer = f"vision_model.encoder.layers.{n}"
        params |= linear(f"{layer}.attn.qkv", 3 * c, c)
        params |= linear(f"{layer}.attn.proj", c, c)
        params |= norm(f"{layer}.norm1", c) | norm(f"{layer}.norm2", c)
        params |= {f"{layer}.ls1": Param((c,), "layer_scale"), f"{layer}.ls2": Param((c,), "layer_scale")}
        params |= linear(f"{layer}.mlp.fc1", sizes.vision_mlp, c)
        params |= linear(f"{layer}.mlp.fc2", c, sizes.vision_mlp)
    return params


def projector_params(sizes: TinySizes) -> dict[str, Param]:
    """mlp1 = LayerNorm -> Linear -> GELU -> Linear (index 2 is the parameter-free GELU)."""
    return (
        norm("mlp1.0", sizes.projector_in)
        | linear("mlp1.1", sizes.llm_hidden, sizes.projector_in)
        | linear("mlp1.3", sizes.llm_hidden, sizes.llm_hidden)
    )


def llm_params(
    sizes: TinySizes, vocab: int, embedding: str, head: str, layer: Callable[[TinySizes, str], dict[str, Param]]
) -> dict[str, Param]:
    """An LLM's weights under `language_model.`: embedding, `layer` per decoder layer, final norm, untied head."""
    h = sizes.llm_hidden
    params = {f"language_model.model.{embedding}.weight": Param((vocab, h), std=1.0)}
    for n in range(sizes.llm_layers):
        params |= layer(sizes, f"language_model.model.layers.{n}")
    params |= norm("language_model.model.norm", h, bias=False)
    params |= {f"language_model.{head}.weight": Param((vocab, h), std=HEAD_STD)}
    return params


def fused_qkv_rows(sizes: TinySizes) -> int:
    """Rows of a fused q/k/v projection: all query heads plus one key and one value per KV head."""
    return (sizes.llm_heads + 2 * sizes.llm_kv_heads) * sizes.head_dim


def qwen2_layer(sizes: TinySizes, layer: str) -> dict[str, Param]:
    """Qwen2 decoder layer: q/k/v with bias, SwiGLU gate/up/down."""
    h, kv = sizes.llm_hidden, sizes.llm_kv_heads * sizes.head_dim
    return (
        linear(f"{layer}.self_attn.q_proj", h, h)
        | linear(f"{layer}.self_attn.k_proj", kv, h)
        | linear(f"{layer}.self_attn.v_proj", kv, h)
        | linear(f"{layer}.self_attn.o_proj", h, h, bias=False)
        | linear(f"{layer}.mlp.gate_proj", sizes.llm_mlp, h, bias=False)
        | linear(f"{layer}.mlp.up_proj", sizes.llm_mlp, h, bias=False)
        | linear(f"{layer}.mlp.down_proj", h, sizes.llm_mlp, bias=False)
        | norm(f"{layer}.input_layernorm", h, bias=False)
        | norm(f"{layer}.post_attention_layernorm", h, bias=False)
    )


def internlm2_layer(sizes: TinySizes, layer: str) -> dict[str, Param]:
    """InternLM2 decoder layer: fused grouped-query `wqkv`, `wo`, SwiGLU `w1/w3/w2`, no biases."""
    h = sizes.llm_hidden
    return (
        linear(f"{layer}.attention.wqkv", fused_qkv_rows(sizes), h, bias=False)
        | linear(f"{layer}.attention.wo", h, h, bias=False)
        | linear(f"{layer}.feed_forward.w1", sizes.llm_mlp, h, bias=False)
        | linear(f"{layer}.feed_forward.w3", sizes.llm_mlp, h, bias=False)
        | linear(f"{layer}.feed_forward.w2", h, sizes.llm_mlp, bias=False)
        | norm(f"{layer}.attention_norm", h, bias=False)
        | norm(f"{layer}.ffn_norm", h, bias=False)
    )


def phi3_layer(sizes: TinySizes, layer: str) -> dict[str, Param]:
    """Phi-3 decoder layer: fused `qkv_proj` and `gate_up_proj`, no biases."""
    h = sizes.llm_hidden
    return (
        linear(f"{layer}.self_attn.qkv_proj", fused_qkv_rows(sizes), h, bias=False)
        | linear(f"{layer}.self_attn.o_proj", h, h, bias=False)
        | linear(f"{layer}.mlp.gate_up_proj", 2 * sizes.llm_mlp, h, bias=False)
        | linear(f"{layer}.mlp.down_proj", h, sizes.llm_mlp, bias=False)
        | norm(f"{layer}.input_layernorm", h, bias=False)
        | norm(f"{layer}.post_attention_layernorm", h, bias=False)
    )


def qwen2_params(sizes: TinySizes, vocab: int) -> dict[str, Param]:
    return llm_params(sizes, vocab, "embed_tokens", "lm_head", qwen2_layer)


def internlm2_params(sizes: TinySizes, vocab: int) -> dict[str, Param]:
    return llm_params(sizes, vocab, "tok_embeddings", "output", internlm2_layer)


def phi3_params(sizes: TinySizes, vocab: int) -> dict[str, Param]:
    return llm_params(sizes, vocab, "embed_tokens", "lm_head", phi3_layer)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokenizer's BOS (None when it has none), EOS, pad and of the template's stop token."""

    bos: int | None
    eos: int
    pad: int
    stop: int


@dataclasses.dataclass(frozen=True)
class TinyLlm:
    """One LLM family of InternVL2: its template, tokenizer tokens, config fields and weights."""

    template: str
    tokenizer: TokenizerSpec
    config: Callable[[TinySizes, int, SpecialIds], dict]
    params: Callable[[TinySizes, int], dict[str, Param]]


TINY_LLMS: dict[str, TinyLlm] = {
    "qwen2": TinyLlm("Hermes-2", QWEN2_TOKENIZER, qwen2_config, qwen2_params),
    "internlm2": TinyLlm("internlm2-chat", INTERNLM2_TOKENIZER, internlm2_config, internlm2_params),
    "phi3": TinyLlm("phi3-chat", PHI3_TOKENIZER, phi3_config, phi3_params),
}


def upstream_params(sizes: TinySizes, vocab: int) -> dict[str, Param]:
    """Every weight of the upstream InternVLChatModel."""
    return vision_params(sizes) | projector_params(sizes) | sizes.family.params(sizes, vocab)


def random_state_dict(params: dict[str, Param], seed: int) -> dict[str, torch.Tensor]:
    """fp32 tensors drawn in key order from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return {key: param.tensor(generator) for key, param in params.items()}


def generation_config(ids: SpecialIds) -> dict:
    return {"bos_token_id": ids.bos if ids.bos is not None else ids.pad, "eos_token_id": ids.stop,
            "pad_token_id": ids.pad}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def special_ids(tokenizer: Tokenizer, spec: TokenizerSpec, template: str) -> SpecialIds:
    stop_token = get_template(template).stop_token
    stop = tokenizer.token_to_id(stop_token)
    if stop is None:
        raise ValueError(f"pretrained.tiny: template {template!r} stops on {stop_token}, not in the tokenizer")
    bos = tokenizer.token_to_id(spec.bos) if spec.bos else None
    return SpecialIds(bos=bos, eos=tokenizer.token_to_id(spec.eos), pad=tokenizer.token_to_id(spec.pad), stop=stop)


def llm_vocab(sizes: TinySizes, tokenizer_size: int) -> int:
    """Embedding rows: the tokenizer's size, or more where `llm_vocab_size` pads the vocabulary."""
    if not sizes.llm_vocab_size:
        return tokenizer_size
    if sizes.llm_vocab_size < tokenizer_size:
        raise ValueError(f"pretrained.tiny: llm_vocab_size {sizes.llm_vocab_size} is below the tokenizer's "
                         f"{tokenizer_size} tokens")
    return sizes.llm_vocab_size


def checked_weights(path: Path, params: dict[str, Param]) -> dict[str, torch.Tensor]:
    """Weights read from a safetensors file, which must hold exactly `params` in their shapes (as fp32)."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained.tiny.weights: {path} does not exist")
    weights = load_file(str(path))
    lists = {
        "missing": sorted(set(params) - set(weights)),
        "unexpected": sorted(set(weights) - set(params)),
        "shape of": [f"{key} {tuple(weights[key].shape)} (expected {param.shape})" for key, param in params.items()
                     if key in weights and tuple(weights[key].shape) != param.shape],
    }
    problems = [f"{what} {', '.join(keys[:5])}" for what, keys in lists.items() if keys]
    if problems:
        raise ValueError(f"pretrained.tiny.weights: {path} does not fit the tiny sizes and tokenizer in params: "
                         + "; ".join(problems))
    return {key: weights[key].to(torch.float32).contiguous() for key in params}


def build_tiny_checkpoint(out_dir: Path, *, corpus: Iterable[str], seed: int, sizes: TinySizes,
                          weights: Path | None = None) -> None:
    """Write a tiny InternVL2 checkpoint (upstream layout, LLM family `sizes.llm`) into `out_dir`.

    The same corpus, seed and sizes give byte-identical files. The template's system prompt joins the corpus:
    it opens every conversation, and spelled out in byte tokens it would triple the length of short samples.
    With `weights` (a safetensors file with upstream key names, e.g. from `model.pretrain_tiny`) the
    checkpoint holds those weights instead of random ones; they must fit the sizes and the tokenizer.
    """
    sizes.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family, template = sizes.family, sizes.template_name
    tokenizer = train_tokenizer([*corpus, get_template(template).system_prompt], sizes.vocab_size, family.tokenizer)
    vocab = llm_vocab(sizes, tokenizer.get_vocab_size(with_added_tokens=True))
    ids = special_ids(tokenizer, family.tokenizer, template)
    save_tokenizer(tokenizer, out_dir, chat_template_for(template), family.tokenizer)
    write_json(out_dir / "config.json", chat_config(sizes, family.config(sizes, vocab, ids)))
    write_json(out_dir / "generation_config.json", generation_config(ids))
    params = upstream_params(sizes, vocab)
    state = random_state_dict(params, seed) if weights is None else checked_weights(Path(weights), params)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
