"""Stage `merge`: fold the LoRA adapter into the base model and save a plain native transformers model.

The result loads with `AutoModelForImageTextToText.from_pretrained(dir)` (no peft, no remote code) and carries the
base model's tokenizer, chat template, image-processor config and tiling settings.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from internvl_sft.config import exit_on_config_error, load_params
from internvl_sft.model.convert import copy_tokenizer_files
from internvl_sft.model.load import DTYPES, SIDECAR, load_model, require_safetensors, saved_dtype
from internvl_sft.paths import atomic_dir

# Files of the base model directory that describe inputs rather than weights.
INPUT_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", SIDECAR)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="native base model directory")
    parser.add_argument("--adapter-dir", required=True, help="adapter written by the train stage")
    parser.add_argument("--out", required=True, help="merged model directory")
    return parser.parse_args(argv)


def merged_dtype(name: str, base_dir: Path) -> torch.dtype:
    """`auto` keeps the dtype the base checkpoint was saved in."""
    return saved_dtype(base_dir) if name == "auto" else DTYPES[name]


def merge_adapter(base_dir: Path, adapter_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Load base + adapter in fp32 (exact merge arithmetic), merge, then cast to the output dtype."""
    require_safetensors(adapter_dir, "adapter")
    base = load_model(base_dir, torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.text_config.use_cache = True
    return merged.to(dtype)


def save_merged(model: torch.nn.Module, base_dir: Path, out: Path) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(base_dir, tmp)
        for name in INPUT_FILES:
            if (base_dir / name).exists():
                shutil.copy2(base_dir / name, tmp / name)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    base_dir = Path(args.model)
    model = merge_adapter(base_dir, Path(args.adapter_dir), merged_dtype(params.merge.dtype, base_dir))
    save_merged(model, base_dir, Path(args.out))
    print(f"merged model written to {args.out}")


if __name__ == "__main__":
    exit_on_config_error(main)
