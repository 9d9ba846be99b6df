"""Typed view of params.yaml: one frozen dataclass per section, unknown keys are errors.

Every hyper-parameter of the pipeline lives in params.yaml; stages receive the file path and read
only their own section. Paths are not parameters: dvc.yaml passes them on the command line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A params file that does not match the expected schema; `keys` is the path to the offending entry."""

    def __init__(self, message: str, keys: tuple[str | int, ...] = ()):
        super().__init__(message)
        self.keys = keys


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    seed: int = 0
    train_screens: int = 160
    val_screens: int = 20


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """What the data stage does with bad samples, and the image sizes it accepts."""

    on_bad_sample: Literal["error", "skip"] = "error"
    min_image_side: int = 10
    max_image_pixels: int = 89_478_485


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the dataset comes from. `synthetic` needs no network."""

    source: Literal["synthetic", "url", "local"] = "synthetic"
    url: str = ""
    sha256: str = ""
    local_path: str = ""
    synthetic: SyntheticData = SyntheticData()
    validation: ValidationConfig = ValidationConfig()


@dataclasses.dataclass(frozen=True)
class TinyModel:
    seed: int = 0
    weights: str = ""  # pre-trained weights (safetensors, upstream names); "" = random init from `seed`
    llm: Literal["qwen2", "internlm2", "phi3"] = "qwen2"
    vocab_size: int = 1200
    llm_vocab_size: int = 0
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 128
    image_size: int = 112
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_mlp: int = 128


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """Which base checkpoint (upstream layout) the pipeline starts from."""

    source: Literal["tiny", "hub", "local"] = "tiny"
    repo_id: str = "OpenGVLab/InternVL2-1B"
    revision: str = "main"
    local_path: str = ""
    allow_pickle_weights: bool = False
    tiny: TinyModel = TinyModel()


@dataclasses.dataclass(frozen=True)
class InputsConfig:
    """How a sample becomes tensors; shared by training and evaluation."""

    template: str = "Hermes-2"
    dynamic_image_size: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_thumbnail: bool = True
    max_seq_length: int = 4096
    too_long: Literal["truncate", "drop"] = "truncate"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 0
    alpha: int = 0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FastConfig:
    """Speed-ups of the training step (internvl_sft.fast); the first three give the stock loss and gradients."""

    answer_logits_only: bool = True
    logit_chunk_tokens: int = 0
    frozen_vision_no_grad: bool = True
    vision_cache_mib: int = 0
    compile: bool = False
    cuda_graphs: bool = False
    pad_to_multiple_of: int = 8
    sdpa_without_cudnn: bool = True
    drop_padding_mask: bool = True
    skip_lora_input_cast: bool = True
    vision_kernels: bool = True
    background_saves: bool = True
    deferred_logs: bool = True

    def __post_init__(self):
        least = {"logit_chunk_tokens": 0, "vision_cache_mib": 0, "pad_to_multiple_of": 1}
        for key, lowest in least.items():
            if getattr(self, key) < lowest:
                raise ConfigError(f"{key}: must be >= {lowest}, got {getattr(self, key)}", (key,))


STOCK_FAST = FastConfig(  # every switch off: transformers' forward, attention kernels as PyTorch picks them
    answer_logits_only=False, frozen_vision_no_grad=False, sdpa_without_cudnn=False, drop_padding_mask=False,
    skip_lora_input_cast=False, vision_kernels=False, background_saves=False, deferred_logs=False,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 42
    num_train_epochs: float = 20
    stop_after_epochs: int = 0
    global_batch_size: int = 16
    per_device_batch_size: int = 4
    learning_rate: float = 4e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    early_stopping_patience: int = 3
    save_total_limit: int = 1
    grad_checkpoint: bool = True
    group_by_length: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    deepspeed: Literal["none", "zero1", "zero2", "zero3"] = "none"
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_prefetch_factor: int = 2
    dataloader_persistent_workers: bool = True
    freeze_llm: bool = True
    freeze_mlp: bool = True
    freeze_backbone: bool = True
    llm_lora: LoraConfig = LoraConfig()
    backbone_lora: LoraConfig = LoraConfig()
    fast: FastConfig = FastConfig()


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = 48
    batch_size: int = 8
    max_samples: int = 0
    eval_base: bool = True


@dataclasses.dataclass(frozen=True)
class Params:
    data: DataConfig = DataConfig()
    pretrained: PretrainedConfig = PretrainedConfig()
    inputs: InputsConfig = InputsConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    eval: EvalConfig = EvalConfig()


def gradient_accumulation(global_batch: int, per_device: int, processes: int) -> int:
    """Keep the global batch fixed whatever the GPU count, as the upstream launcher does."""
    per_step = per_device * processes
    if global_batch % per_step:
        raise ValueError(
            f"params: train: global_batch_size {global_batch} is not a multiple of "
            f"per_device_batch_size {per_device} x {processes} process(es)"
        )
    return global_batch // per_step


def exit_on_config_error(main: Callable[[], None]) -> None:
    """Run a command's `main`; a params error ends it with its message (file, key path, line) and status 1
    instead of a traceback."""
    try:
        main()
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None


def load_params(path: str | Path) -> Params:
    """Read params.yaml into `Params`; every key must be known and well-typed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    try:
        return build(Params, raw, where=str(path))
    except ConfigError as err:
        line = yaml_line(text, err.keys)
        if line is None:
            raise
        raise ConfigError(f"{err} (line {line})", err.keys) from None


def yaml_line(text: str, keys: tuple[str | int, ...]) -> int | None:
    """The 1-based line of the entry at `keys` in a YAML document (the deepest one found); None: not found."""
    node, line = yaml.compose(text), None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            found = [(k, v) for k, v in node.value if k.value == key]
            if not found:
                break
            key_node, node = found[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def build(cls: type, raw: Any, where: str, keys: tuple[str | int, ...] = ()) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking key names and value types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}", keys)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}",
                          (*keys, unknown[0]))
    values = {key: coerce(hints[key], value, f"{where}: {key}", (*keys, key)) for key, value in raw.items()}
    try:
        return cls(**values)
    except ConfigError as err:  # a value out of its range, found by the dataclass itself
        raise ConfigError(f"{where}: {err}", (*keys, *err.keys)) from None


def coerce(hint: Any, value: Any, where: str, keys: tuple[str | int, ...] = ()) -> Any:
    """Check `value` against a type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, keys)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}", keys)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}", keys)
        item = typing.get_args(hint)[0]
        return tuple(coerce(item, v, f"{where}[{i}]", (*keys, i)) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return coerce(option, value, where, keys)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {hint}", keys)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint is type(None) and value is None:
        return None
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}", keys)


def to_dict(params: Any) -> Any:
    """Plain JSON/YAML-friendly form (tuples as lists) for writing beside outputs."""
    if dataclasses.is_dataclass(params):
        return {f.name: to_dict(getattr(params, f.name)) for f in dataclasses.fields(params)}
    if isinstance(params, (list, tuple)):
        return [to_dict(v) for v in params]
    return params
