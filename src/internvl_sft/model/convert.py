"""Convert between the upstream InternVL2 layout (InternVLChatModel) and transformers' native InternVL.

The upstream folder holds `config.json` of InternVLChatConfig, safetensors weights with upstream names and
the tokenizer. The native folder loads with `AutoModelForImageTextToText.from_pretrained` and no remote code;
`internvl_sft.json` beside it keeps the upstream settings the native config has no field for.

Weight names are mapped by rules: a rule pairs one upstream name pattern with one native pattern (a rename)
or several (one upstream tensor is the native tensors concatenated along dim 0, e.g. InternViT's fused qkv,
or interleaved per key-value head, as InternLM2's grouped-query `wqkv`). Each LLM family has its own rule
table and config fields: Qwen2 (InternVL2-1B) stays Qwen2, InternLM2 (InternVL2-2B/8B) becomes a native Llama,
Phi-3 (InternVL2-4B) stays Phi-3 with its fused projections.

The tokenizer files are copied as they are; the chat template goes beside them as `chat_template.jinja` and
token ids are read from the JSON files, so no tokenizer (and no remote code) is loaded to convert.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

from internvl_sft.data.tiling import IMAGENET_MEAN, IMAGENET_STD
from internvl_sft.data.template import get_template
from internvl_sft.model.load import PICKLE_SUFFIXES, SIDECAR
from internvl_sft.model.templates import chat_template_for
from internvl_sft.paths import atomic_dir

IMG_CONTEXT = "<IMG_CONTEXT>"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt",
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # read by transformers before tokenizer_config's chat_template
LEGACY_ROPE_TYPES = {"su": "longrope"}  # Phi-3's first name for LongRoPE
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
PLACEHOLDERS = {"n": r"\d+", "param": r"weight|bias", "rest": r".+"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or key and the reason."""


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """`upstream` names one tensor that is the `natives` tensors concatenated along dim 0.

    Patterns use the placeholders {n} (layer index), {param} (weight or bias) and {rest} (any suffix).
    """

    upstream: str
    natives: tuple[str, ...]

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if len(self.natives) == 1:
            return [tensor]
        return [part.clone() for part in torch.chunk(tensor, len(self.natives), dim=0)]

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


@dataclasses.dataclass(frozen=True)
class GroupedQkvRule(KeyRule):
    """InternLM2's `wqkv`: rows grouped per key-value head as [its `groups` query heads, its key, its value].

    Query head j then belongs to KV head j // groups, which is how native attention repeats keys and values.
    """

    kv_heads: int = 1
    groups: int = 1

    def blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """[kv_heads, groups + 2, head_dim, ...]."""
        per_head = self.kv_heads * (self.groups + 2)
        if tensor.shape[0] % per_head:
            raise CheckpointError(
                f"{self.upstream}: {tensor.shape[0]} rows do not split into {self.kv_heads} key-value heads "
                f"of {self.groups} query heads + key + value"
            )
        return tensor.reshape(self.kv_heads, self.groups + 2, -1, *tensor.shape[1:])

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        blocks, rest = self.blocks(tensor), tensor.shape[1:]
        query = blocks[:, : self.groups].reshape(-1, *rest)
        key, value = (blocks[:, index].reshape(-1, *rest) for index in (self.groups, self.groups + 1))
        return [query.clone(), key.clone(), value.clone()]

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        query, key, value = parts
        rest = query.shape[1:]
        grouped = [
            query.reshape(self.kv_heads, self.groups, -1, *rest),
            key.reshape(self.kv_heads, 1, -1, *rest),
            value.reshape(self.kv_heads, 1, -1, *rest),
        ]
        return torch.cat(grouped, dim=1).reshape(-1, *rest)


def rename(upstream: str, native: str) -> KeyRule:
    return KeyRule(upstream, (native,))


UPSTREAM_LAYER = "vision_model.encoder.layers.{n}."
NATIVE_LAYER = "model.vision_tower.encoder.layer.{n}."
VISION_RULES = (
    rename("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    rename(
        "vision_model.embeddings.patch_embedding.{param}",
        "model.vision_tower.embeddings.patch_embeddings.projection.{param}",
    ),
    rename("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    KeyRule(
        UPSTREAM_LAYER + "attn.qkv.{param}",
        tuple(NATIVE_LAYER + f"attention.{x}_proj.{{param}}" for x in "qkv"),
    ),
    rename(UPSTREAM_LAYER + "attn.proj.{param}", NATIVE_LAYER + "attention.projection_layer.{param}"),
    rename(UPSTREAM_LAYER + "attn.q_norm.weight", NATIVE_LAYER + "attention.q_norm.weight"),
    rename(UPSTREAM_LAYER + "attn.k_norm.weight", NATIVE_LAYER + "attention.k_norm.weight"),
    rename(UPSTREAM_LAYER + "norm1.{param}", NATIVE_LAYER + "layernorm_before.{param}"),
    rename(UPSTREAM_LAYER + "norm2.{param}", NATIVE_LAYER + "layernorm_after.{param}"),
    rename(UPSTREAM_LAYER + "ls1", NATIVE_LAYER + "lambda_1"),
    rename(UPSTREAM_LAYER + "ls2", NATIVE_LAYER + "lambda_2"),
    rename(UPSTREAM_LAYER + "mlp.fc1.{param}", NATIVE_LAYER + "mlp.fc1.{param}"),
    rename(UPSTREAM_LAYER + "mlp.fc2.{param}", NATIVE_LAYER + "mlp.fc2.{param}"),
)

PROJECTOR_RULES = (
    rename("mlp1.0.{param}", "model.multi_modal_projector.layer_norm.{param}"),
    rename("mlp1.1.{param}", "model.multi_modal_projector.linear_1.{param}"),
    rename("mlp1.3.{param}", "model.multi_modal_projector.linear_2.{param}"),
)

# Qwen2 and Phi-3 keep their upstream names under a new prefix (Phi-3's fused qkv_proj / gate_up_proj are
# native Phi-3 weights too).
PREFIX_RULES = (
    rename("language_model.model.{rest}", "model.language_model.{rest}"),
    rename("language_model.lm_head.weight", "lm_head.weight"),
)


def prefix_rules(llm: dict) -> tuple[KeyRule, ...]:
    return PREFIX_RULES


def internlm2_rules(llm: dict) -> tuple[KeyRule, ...]:
    """InternLM2 -> Llama names; `wqkv` is split by its grouped-query layout (needs the head counts)."""
    heads = llm["num_attention_heads"]
    kv_heads = llm.get("num_key_value_heads") or heads
    up, native = "language_model.model.layers.{n}.", "model.language_model.layers.{n}."
    qkv = tuple(native + f"self_attn.{x}_proj.{{param}}" for x in "qkv")
    return (
        rename("language_model.model.tok_embeddings.weight", "model.language_model.embed_tokens.weight"),
        GroupedQkvRule(up + "attention.wqkv.{param}", qkv, kv_heads=kv_heads, groups=heads // kv_heads),
        rename(up + "attention.wo.{param}", native + "self_attn.o_proj.{param}"),
        rename(up + "feed_forward.w1.weight", native + "mlp.gate_proj.weight"),
        rename(up + "feed_forward.w3.weight", native + "mlp.up_proj.weight"),
        rename(up + "feed_forward.w2.weight", native + "mlp.down_proj.weight"),
        rename(up + "attention_norm.weight", native + "input_layernorm.weight"),
        rename(up + "ffn_norm.weight", native + "post_attention_layernorm.weight"),
        rename("language_model.model.norm.weight", "model.language_model.norm.weight"),
        rename("language_model.output.weight", "lm_head.weight"),
    )


@dataclasses.dataclass(frozen=True)
class LlmFamily:
    """How one upstream LLM becomes the native text model.

    `config_fields` are copied as they are, `renamed_fields` maps upstream field names to native ones,
    `defaults` are native values for fields the upstream config may leave to its own class defaults.
    RoPE settings are translated separately (`rope_parameters`).
    """

    model_type: str
    config_fields: tuple[str, ...]
    rules: Callable[[dict], tuple[KeyRule, ...]]
    renamed_fields: tuple[tuple[str, str], ...] = ()
    defaults: tuple[tuple[str, object], ...] = ()


COMMON_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
)
QWEN2 = LlmFamily(
    model_type="qwen2",
    config_fields=COMMON_FIELDS + ("use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout"),
    rules=prefix_rules,
)
INTERNLM2 = LlmFamily(
    model_type="llama",
    config_fields=COMMON_FIELDS,
    rules=internlm2_rules,
    renamed_fields=(("bias", "attention_bias"),),
    defaults=(("attention_bias", True), ("mlp_bias", False)),  # InternLM2Config's bias defaults to True
)
PHI3 = LlmFamily(
    model_type="phi3",
    config_fields=COMMON_FIELDS + (
        "original_max_position_embeddings", "sliding_window", "attention_dropout", "resid_pdrop", "embd_pdrop",
    ),
    rules=prefix_rules,
)
LLM_FAMILIES = {"Qwen2ForCausalLM": QWEN2, "InternLM2ForCausalLM": INTERNLM2, "Phi3ForCausalLM": PHI3}


def llm_architecture(llm: dict) -> str:
    return (llm.get("architectures") or [""])[0]


def llm_family(architecture: str) -> LlmFamily:
    try:
        return LLM_FAMILIES[architecture]
    except KeyError:
        known = ", ".join(sorted(LLM_FAMILIES))
        raise CheckpointError(f"LLM architecture {architecture!r} is not supported; supported: {known}") from None


def key_rules(llm: dict) -> tuple[KeyRule, ...]:
    """Every weight rule of a checkpoint whose `llm_config` is `llm`."""
    return VISION_RULES + PROJECTOR_RULES + llm_family(llm_architecture(llm)).rules(llm)


@functools.lru_cache(maxsize=None)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    pieces = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(
        re.escape(piece) if index % 2 == 0 else f"(?P<{piece}>{PLACEHOLDERS[piece]})"
        for index, piece in enumerate(pieces)
    )
    return re.compile(regex)


def match_rule(key: str, rules: tuple[KeyRule, ...], source: str) -> tuple[KeyRule, int, dict[str, str]] | None:
    """The rule, pattern index and placeholder values matching `key` on the `source` side (upstream/native)."""
    for rule in rules:
        patterns = (rule.upstream,) if source == "upstream" else rule.natives
        for index, pattern in enumerate(patterns):
            found = compile_pattern(pattern).fullmatch(key)
            if found:
                return rule, index, found.groupdict()
    return None


def unmapped_error(keys: list[str], side: str) -> CheckpointError:
    shown = ", ".join(keys[:10]) + (f" (and {len(keys) - 10} more)" if len(keys) > 10 else "")
    return CheckpointError(f"no mapping for {side} weight(s): {shown}")


def upstream_to_native_state_dict(state_dict: dict[str, torch.Tensor], llm: dict) -> dict[str, torch.Tensor]:
    """Rename upstream weights to native names, splitting fused tensors. Unknown keys are an error.

    `llm` is the checkpoint's `llm_config` (architecture and head counts).
    """
    rules = key_rules(llm)
    native: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        found = match_rule(key, rules, "upstream")
        if found is None:
            unmapped.append(key)
            continue
        rule, _, fields = found
        for pattern, part in zip(rule.natives, rule.split(tensor), strict=True):
            native[pattern.format(**fields)] = part
    if unmapped:
        raise unmapped_error(unmapped, "upstream")
    return native


def native_to_upstream_state_dict(state_dict: dict[str, torch.Tensor], llm: dict) -> dict[str, torch.Tensor]:
    """The exact inverse of `upstream_to_native_state_dict` (fused tensors are joined back)."""
    rules = key_rules(llm)
    groups: dict[str, tuple[KeyRule, dict[str, str], dict[int, torch.Tensor]]] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        found = match_rule(key, rules, "native")
        if found is None:
            unmapped.append(key)
            continue
        rule, index, fields = found
        groups.setdefault(rule.upstream.format(**fields), (rule, fields, {}))[2][index] = tensor
    if unmapped:
        raise unmapped_error(unmapped, "native")
    return {target: join_group(rule, fields, parts) for target, (rule, fields, parts) in groups.items()}


def join_group(rule: KeyRule, fields: dict[str, str], parts: dict[int, torch.Tensor]) -> torch.Tensor:
    names = [pattern.format(**fields) for pattern in rule.natives]
    missing = [name for index, name in enumerate(names) if index not in parts]
    if missing:
        raise CheckpointError(f"native weight(s) {', '.join(missing)} missing; they are fused with {names}")
    return rule.join([parts[index] for index in range(len(names))])


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None


def weight_files(src_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint: safetensors (one file or shards listed by an index), or pickle files
    when `allow_pickle` says so."""
    index = src_dir / SAFETENSORS_INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        return [src_dir / name for name in sorted(set(weight_map.values()))]
    if (src_dir / SAFETENSORS_FILE).exists():
        return [src_dir / SAFETENSORS_FILE]
    pickles = sorted(path for path in src_dir.glob("*") if path.suffix in PICKLE_SUFFIXES)
    if pickles and allow_pickle:
        return pickles
    if pickles:
        raise CheckpointError(
            f"{pickles[0]}: pickle weights are refused (loading them can run arbitrary code); "
            "provide the checkpoint as safetensors, or set pretrained.allow_pickle_weights"
        )
    raise CheckpointError(f"{src_dir}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one weight file; a pickle file is read with torch's tensors-only unpickler."""
    if path.suffix != ".safetensors":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"{path}: refused, it holds more than tensors ({error})") from None
    return load_file(str(path))


def read_weights(src_dir: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for path in weight_files(src_dir, allow_pickle):
        if not path.exists():
            raise CheckpointError(f"{path}: missing (listed in {SAFETENSORS_INDEX})")
        shard = load_weight_file(path)
        repeated = sorted(state_dict.keys() & shard.keys())
        if repeated:
            raise CheckpointError(f"{path}: weight {repeated[0]} is also in another shard")
        state_dict.update(shard)
    return state_dict


@dataclasses.dataclass(frozen=True)
class UpstreamSettings:
    """The InternVLChatConfig fields conversion and later stages need (defaults as upstream's)."""

    template: str
    llm_architecture: str
    image_size: int
    patch_size: int
    downsample_ratio: float
    select_layer: int
    min_dynamic_patch: int
    max_dynamic_patch: int
    use_thumbnail: bool
    dynamic_image_size: bool

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (image_size / patch)^2 x ratio^2 (256 for InternVL2)."""
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    def sidecar(self) -> dict:
        return {
            "template": self.template,
            "image_size": self.image_size,
            "downsample_ratio": self.downsample_ratio,
            "min_dynamic_patch": self.min_dynamic_patch,
            "max_dynamic_patch": self.max_dynamic_patch,
            "use_thumbnail": self.use_thumbnail,
            "dynamic_image_size": self.dynamic_image_size,
            "num_image_token": self.num_image_token,
        }


def upstream_settings(config: dict, where: Path) -> UpstreamSettings:
    """Validate the parts of an upstream config.json that native InternVL can represent."""
    vision, llm = config.get("vision_config"), config.get("llm_config")
    if not isinstance(vision, dict) or not isinstance(llm, dict):
        raise CheckpointError(f"{where}: needs vision_config and llm_config objects (InternVLChatConfig)")
    if config.get("ps_version", "v1") != "v2":
        raise CheckpointError(f"{where}: ps_version {config.get('ps_version', 'v1')!r} unsupported; native is v2")
    try:
        get_template(config.get("template") or "")
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None
    image_size = vision.get("image_size")
    forced = config.get("force_image_size") or image_size
    if forced != image_size:
        raise CheckpointError(f"{where}: force_image_size {forced} differs from vision image_size {image_size}")
    architecture = llm_architecture(llm)
    llm_family(architecture)
    return UpstreamSettings(
        template=config["template"],
        llm_architecture=architecture,
        image_size=image_size,
        patch_size=vision["patch_size"],
        downsample_ratio=config.get("downsample_ratio", 0.5),
        select_layer=config.get("select_layer", -1),
        min_dynamic_patch=config.get("min_dynamic_patch", 1),
        max_dynamic_patch=config.get("max_dynamic_patch", 6),
        use_thumbnail=config.get("use_thumbnail", False),
        dynamic_image_size=config.get("dynamic_image_size", False),
    )


def native_vision_config(vision: dict) -> dict:
    """InternVisionConfig fields -> InternVLVisionConfig (defaults as InternVisionConfig's)."""
    return {
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "attention_bias": vision.get("qkv_bias", False),
        "use_qk_norm": vision.get("qk_normalization", True),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "norm_type": vision.get("norm_type", "rms_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "num_channels": vision.get("num_channels", 3),
        "attention_dropout": vision.get("attention_dropout", 0.0),
        "projection_dropout": vision.get("dropout", 0.0),
        "hidden_dropout_prob": 0.0,
        "initializer_range": vision.get("initializer_range", 0.02),
        # InternViT has no final norm: the native model skips its final LayerNorm only with mean pooling
        # on; the class token is still dropped by vision_feature_select_strategy "default".
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
    }


def rope_parameters(llm: dict) -> dict:
    """Upstream `rope_theta` + `rope_scaling` as one native `rope_parameters` dict."""
    scaling = dict(llm.get("rope_scaling") or {})
    kind = scaling.pop("type", None) or scaling.pop("rope_type", None) or "default"
    kind = LEGACY_ROPE_TYPES.get(kind, kind)
    parameters = {"rope_type": kind, "rope_theta": llm.get("rope_theta", 10000.0)} | scaling
    if kind == "longrope" and "original_max_position_embeddings" in llm:
        parameters.setdefault("original_max_position_embeddings", llm["original_max_position_embeddings"])
    return parameters


def native_text_config(llm: dict, family: LlmFamily) -> dict:
    copied = {field: llm[field] for field in family.config_fields if field in llm}
    renamed = {native: llm[field] for field, native in family.renamed_fields if field in llm}
    return dict(family.defaults) | copied | renamed | {
        "model_type": family.model_type,
        "rope_parameters": rope_parameters(llm),
        "tie_word_embeddings": False,
    }


def native_config(config: dict, settings: UpstreamSettings, image_token_id: int) -> InternVLConfig:
    return InternVLConfig(
        vision_config=native_vision_config(config["vision_config"]),
        text_config=native_text_config(config["llm_config"], llm_family(settings.llm_architecture)),
        image_token_id=image_token_id,
        image_seq_length=settings.num_image_token,
        downsample_ratio=settings.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=settings.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def image_processor_config(settings: UpstreamSettings) -> dict:
    """preprocessor_config.json for transformers' GotOcr2 image processor, tiling as InternVL2 does."""
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "do_resize": True,
        "size": {"height": settings.image_size, "width": settings.image_size},
        "resample": BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
        "crop_to_patches": settings.dynamic_image_size,
        "min_patches": settings.min_dynamic_patch,
        "max_patches": settings.max_dynamic_patch,
    }


def token_content(token: str | dict | None) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def added_token_ids(src_dir: Path) -> dict[str, int]:
    """Ids of the added (special) tokens, from tokenizer_config.json or else tokenizer.json, without loading
    the tokenizer (InternLM2's needs remote code)."""
    config = read_json(src_dir / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder")
    if decoder:
        return {token_content(token): int(index) for index, token in decoder.items()}
    if not (src_dir / "tokenizer.json").exists():
        return {}
    return {token["content"]: token["id"] for token in read_json(src_dir / "tokenizer.json").get("added_tokens", [])}


def token_id(ids: dict[str, int], token: str, src_dir: Path) -> int:
    if token not in ids:
        raise CheckpointError(f"{src_dir / 'tokenizer_config.json'}: the tokenizer has no {token} token")
    return ids[token]


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> None:
    """Copy the tokenizer files (and a chat_template.jinja) as they are; code files never are."""
    for name in (*TOKENIZER_FILES, CHAT_TEMPLATE_FILE):
        if (src_dir / name).exists():
            shutil.copy2(src_dir / name, dst_dir / name)


def build_native_model(
    config: InternVLConfig, native_weights: dict[str, torch.Tensor], src_dir: Path
) -> InternVLForConditionalGeneration:
    """A native model holding exactly `native_weights`; missing or extra weights are an error."""
    model = InternVLForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - native_weights.keys()), sorted(native_weights.keys() - expected)
    if missing:
        raise CheckpointError(f"{src_dir}: weights missing for native {', '.join(missing[:10])}")
    if extra:
        raise CheckpointError(f"{src_dir}: converted weights the native model lacks: {', '.join(extra[:10])}")
    model.load_state_dict(native_weights, strict=True)
    return model


def checkpoint_dtype(weights: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype the checkpoint is stored in (kept by the conversion)."""
    return next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)


def pad_token_id(src_dir: Path, ids: dict[str, int]) -> int | None:
    return ids.get(token_content(read_json(src_dir / "tokenizer_config.json").get("pad_token")))


def set_generation_tokens(model: InternVLForConditionalGeneration, stop_id: int, pad_id: int | None) -> None:
    """Generation stops on the template's turn end and pads with the tokenizer's pad token."""
    model.generation_config.eos_token_id = stop_id
    model.generation_config.pad_token_id = stop_id if pad_id is None else pad_id


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def upstream_to_native(src_dir: Path, dst_dir: Path, allow_pickle: bool = False) -> None:
    """Convert the upstream-layout checkpoint in `src_dir` into a complete native model folder `dst_dir`.

    `dst_dir` is written through a temporary folder beside it and appears only when complete. Weights are read
    from safetensors only unless `allow_pickle`; no code of `src_dir` is imported.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config_path = src_dir / "config.json"
    config = read_json(config_path)
    settings = upstream_settings(config, config_path)
    weights = read_weights(src_dir, allow_pickle)
    try:
        native_weights = upstream_to_native_state_dict(weights, config["llm_config"])
    except CheckpointError as error:
        raise CheckpointError(f"{src_dir}: {error}") from None
    ids = added_token_ids(src_dir)
    native = native_config(config, settings, token_id(ids, IMG_CONTEXT, src_dir))
    model = build_native_model(native, native_weights, src_dir)
    model.to(checkpoint_dtype(weights))
    stop_id = token_id(ids, get_template(settings.template).stop_token, src_dir)
    set_generation_tokens(model, stop_id, pad_token_id(src_dir, ids))
    with atomic_dir(dst_dir) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(src_dir, tmp)
        (tmp / CHAT_TEMPLATE_FILE).write_text(chat_template_for(settings.template), encoding="utf-8")
        write_json(tmp / "preprocessor_config.json", image_processor_config(settings))
        write_json(tmp / SIDECAR, settings.sidecar())
