"""The embedded-default base model: a tiny random-init InternVL2 checkpoint in the upstream layout.

The folder looks like a download of OpenGVLab/InternVL2-1B (InternViT + MLP projector + Qwen2, config.json of
InternVLChatModel, `model.safetensors` with upstream key names, Qwen2 tokenizer files) shrunk to toy sizes, so
the `pretrained` stage converts it with exactly the code that converts the real checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from internvl_sft.data.template import get_template
from internvl_sft.model.templates import chat_template_for
from internvl_sft.model.tokenizer import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, save_tokenizer, train_tokenizer

# A random model only behaves like a pretrained one if signals keep their scale through the layers: linear
# weights are LeCun-normal (std 1/sqrt(fan_in)), token embeddings unit-variance, the output head large enough
# to produce confident logits (with the 0.02 used before pre-training, a frozen head caps every logit near 1),
# and the vision position embeddings smooth in 2-D, as pre-trained ViTs learn them, so that where a patch lies
# is readable by a small adapter.
INIT_STD = 0.02
HEAD_STD = 0.25
LAYER_SCALE = 0.1
PROJECTOR_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny model; the architecture and every other setting are InternVL2-1B's."""

    vocab_size: int = 1200  # learned BPE tokens; the LLM vocabulary adds the special tokens
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
    template: str = "Hermes-2"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 4

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
        get_template(self.template)


def vision_config(sizes: TinySizes) -> dict:
    """InternVisionModel fields as InternVL2-1B writes them."""
    return {
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
        "torch_dtype": "float32",
        "use_flash_attn": False,
    }


def llm_config(sizes: TinySizes, vocab: int, special_ids: dict[str, int]) -> dict:
    """Qwen2ForCausalLM fields as InternVL2-1B writes them (untied lm_head)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": special_ids[PAD_TOKEN],
        "eos_token_id": special_ids[EOS_TOKEN],
        "hidden_act": "silu",
        "hidden_size": sizes.llm_hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": sizes.llm_mlp,
        "max_position_embeddings": sizes.max_position_embeddings,
        "max_window_layers": sizes.llm_layers,
        "model_type": "qwen2",
        "num_attention_heads": sizes.llm_heads,
        "num_hidden_layers": sizes.llm_layers,
        "num_key_value_heads": sizes.llm_kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": sizes.max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def chat_config(sizes: TinySizes, vocab: int, special_ids: dict[str, int]) -> dict:
    """config.json of InternVLChatModel."""
    return {
        "architectures": ["InternVLChatModel"],
        "downsample_ratio": sizes.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": sizes.image_size,
        "llm_config": llm_config(sizes, vocab, special_ids),
        "max_dynamic_patch": sizes.max_dynamic_patch,
        "min_dynamic_patch": sizes.min_dynamic_patch,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": sizes.template,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
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


def qwen2_params(sizes: TinySizes, vocab: int) -> dict[str, Param]:
    """Qwen2ForCausalLM weights under `language_model.` (q/k/v with bias, untied lm_head)."""
    h = sizes.llm_hidden
    kv = sizes.llm_kv_heads * (h // sizes.llm_heads)
    params = {"language_model.model.embed_tokens.weight": Param((vocab, h), std=1.0)}
    for n in range(sizes.llm_layers):
        layer = f"language_model.model.layers.{n}"
        params |= linear(f"{layer}.self_attn.q_proj", h, h)
        params |= linear(f"{layer}.self_attn.k_proj", kv, h)
        params |= linear(f"{layer}.self_attn.v_proj", kv, h)
        params |= linear(f"{layer}.self_attn.o_proj", h, h, bias=False)
        params |= linear(f"{layer}.mlp.gate_proj", sizes.llm_mlp, h, bias=False)
        params |= linear(f"{layer}.mlp.up_proj", sizes.llm_mlp, h, bias=False)
        params |= linear(f"{layer}.mlp.down_proj", h, sizes.llm_mlp, bias=False)
        params |= norm(f"{layer}.input_layernorm", h, bias=False)
        params |= norm(f"{layer}.post_attention_layernorm", h, bias=False)
    params |= norm("language_model.model.norm", h, bias=False)
    params |= {"language_model.lm_head.weight": Param((vocab, h), std=HEAD_STD)}
    return params


def upstream_params(sizes: TinySizes, vocab: int) -> dict[str, Param]:
    """Every weight of the upstream InternVLChatModel."""
    return vision_params(sizes) | projector_params(sizes) | qwen2_params(sizes, vocab)


def random_state_dict(params: dict[str, Param], seed: int) -> dict[str, torch.Tensor]:
    """fp32 tensors drawn in key order from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return {key: param.tensor(generator) for key, param in params.items()}


def generation_config(special_ids: dict[str, int], stop_token: str) -> dict:
    return {
        "bos_token_id": special_ids[PAD_TOKEN],
        "eos_token_id": special_ids[stop_token],
        "pad_token_id": special_ids[PAD_TOKEN],
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_checkpoint(out_dir: Path, *, corpus: Iterable[str], seed: int, sizes: TinySizes) -> None:
    """Write a tiny InternVL2-1B-architecture checkpoint (upstream layout) into `out_dir`.

    The same corpus, seed and sizes give byte-identical files. The template's system prompt joins the corpus:
    it opens every conversation, and spelled out in byte tokens it would triple the length of short samples.
    """
    sizes.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([*corpus, get_template(sizes.template).system_prompt], sizes.vocab_size)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    special_ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    stop_token = get_template(sizes.template).stop_token
    if stop_token not in special_ids:
        raise ValueError(f"pretrained.tiny: template {sizes.template!r} stops on {stop_token}, not in the tokenizer")
    save_tokenizer(tokenizer, out_dir, chat_template_for(sizes.template))
    write_json(out_dir / "config.json", chat_config(sizes, vocab, special_ids))
    write_json(out_dir / "generation_config.json", generation_config(special_ids, stop_token))
    weights = random_state_dict(upstream_params(sizes, vocab), seed)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
