"""Stage `export`: write the merged model back in the upstream InternVL2 layout (InternVLChatModel).

The merged native model's weights get their upstream names back (fused tensors joined again) and are saved as
safetensors, sharded like the hub checkpoints when large. As the original workflow did after merging, the base
checkpoint's `config.json`, `generation_config.json`, `*.py` files and tokenizer files are copied beside them,
so the folder loads with the upstream code. The `*.py` files are only copied: nothing here imports or runs them.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

from internvl_sft.model.convert import copy_tokenizer_files, native_to_upstream_state_dict, read_json
from internvl_sft.model.load import load_model, saved_dtype
from internvl_sft.paths import atomic_dir

BASE_FILES = ("config.json", "generation_config.json")
MAX_SHARD_SIZE = "5GB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--merged", required=True, help="merged native model directory (merge stage)")
    parser.add_argument("--upstream", required=True, help="the base checkpoint in the upstream layout")
    parser.add_argument("--out", required=True, help="merged model in the upstream layout")
    return parser.parse_args(argv)


def upstream_weights(merged_dir: Path, llm_config: dict) -> dict[str, torch.Tensor]:
    """The merged weights under upstream names, in the dtype the merged model was saved in."""
    model = load_model(merged_dir, saved_dtype(merged_dir))
    return native_to_upstream_state_dict(model.state_dict(), llm_config)


def copy_base_files(upstream_dir: Path, out_dir: Path) -> None:
    """config.json, generation_config.json, *.py and tokenizer files of the base checkpoint, as they are."""
    names = [name for name in BASE_FILES if (upstream_dir / name).exists()]
    names += sorted(path.name for path in upstream_dir.glob("*.py"))
    for name in names:
        shutil.copy2(upstream_dir / name, out_dir / name)
    copy_tokenizer_files(upstream_dir, out_dir)


def export_upstream(merged_dir: Path, upstream_dir: Path, out_dir: Path) -> None:
    config = read_json(upstream_dir / "config.json")
    weights = upstream_weights(merged_dir, config["llm_config"])
    with atomic_dir(out_dir) as tmp:
        save_torch_state_dict(weights, tmp, max_shard_size=MAX_SHARD_SIZE, metadata={"format": "pt"})
        copy_base_files(upstream_dir, tmp)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    export_upstream(Path(args.merged), Path(args.upstream), Path(args.out))
    print(f"upstream-layout model written to {args.out}")


if __name__ == "__main__":
    main()
