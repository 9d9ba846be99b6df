"""Load a native InternVL checkpoint, freeze it as the recipe says and attach LoRA adapters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from internvl_sft.config import LoraConfig, TrainConfig

# Module-name prefixes of the three parts of transformers' native InternVL.
LLM_PREFIX = "model.language_model"
VISION_PREFIX = "model.vision_tower"
PROJECTOR_NAME = "multi_modal_projector"
SIDECAR = "internvl_sft.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_dtype(precision: str) -> torch.dtype:
    """`auto` means bf16 on a GPU that supports it and fp32 elsewhere (CPU training)."""
    if precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def attention_implementation() -> str:
    """flash-attn when it is installed and a GPU is present, else PyTorch sdpa."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def require_safetensors(folder: str | Path, what: str) -> None:
    """Refuse weights that are not safetensors: unpickling a .bin / .pt file can run arbitrary code."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(path.name for path in folder.glob("*") if path.suffix in PICKLE_SUFFIXES)
    refused = f"; pickle weights ({', '.join(pickles)}) are refused" if pickles else ""
    raise FileNotFoundError(f"{folder}: no safetensors file for the {what}{refused}")


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a native InternVL model (safetensors only; no code from the checkpoint is run)."""
    require_safetensors(model_dir, "model")
    return AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attention_implementation(), use_safetensors=True,
        trust_remote_code=False,
    )


def saved_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a native model folder was saved in (fp32 when its config does not say)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return DTYPES.get(config.get("dtype", "float32"), torch.float32)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder, from transformers' own classes only (no code from the folder)."""
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def read_sidecar(model_dir: str | Path) -> dict:
    """Settings of the upstream checkpoint that the native config has no field for (template, tiling)."""
    path = Path(model_dir) / SIDECAR
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; convert the checkpoint with the `pretrained` stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def lora_regex(prefix: str, targets: tuple[str, ...]) -> str:
    """peft regex matching `targets` inside one part of the model only.

    A plain list such as ["q_proj"] would also hit the vision tower's q/k/v projections.
    """
    names = "|".join(sorted(set(targets)))
    return re.escape(prefix) + r"\..*\.(" + names + ")"


def build_lora_config(cfg: TrainConfig) -> PeftLoraConfig | None:
    """One peft config covering the LLM and/or vision LoRA; per-part ranks via rank/alpha patterns."""
    parts: list[tuple[str, LoraConfig]] = []
    if cfg.llm_lora.r > 0:
        parts.append((lora_regex(LLM_PREFIX, cfg.llm_lora.target_modules), cfg.llm_lora))
    if cfg.backbone_lora.r > 0:
        parts.append((lora_regex(VISION_PREFIX, cfg.backbone_lora.target_modules), cfg.backbone_lora))
    if not parts:
        return None
    first = parts[0][1]
    return PeftLoraConfig(
        r=first.r,
        lora_alpha=first.alpha,
        lora_dropout=first.dropout,
        target_modules="|".join(f"(?:{regex})" for regex, _ in parts),
        rank_pattern={regex: lora.r for regex, lora in parts},
        alpha_pattern={regex: lora.alpha for regex, lora in parts},
        modules_to_save=modules_to_save(cfg) or None,
        task_type=None,
    )


def modules_to_save(cfg: TrainConfig) -> list[str]:
    """Parts trained in full (saved with the adapter) according to the recipe's freeze flags."""
    names = []
    if not cfg.freeze_mlp:
        names.append(PROJECTOR_NAME)
    if not cfg.freeze_backbone and cfg.backbone_lora.r == 0:
        names.append("vision_tower")
    if not cfg.freeze_llm and cfg.llm_lora.r == 0:
        names.append("language_model")
    return names


def prepare_for_training(model: PreTrainedModel, cfg: TrainConfig) -> PeftModel:
    """Freeze everything, then attach LoRA / unfreeze the parts the config trains."""
    model.requires_grad_(False)
    model.config.text_config.use_cache = False
    lora = build_lora_config(cfg)
    if lora is None:
        raise ValueError("params: train: nothing to train; set llm_lora.r/backbone_lora.r > 0 or unfreeze a part")
    if cfg.grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora)


def trainable_summary(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
