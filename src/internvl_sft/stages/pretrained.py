"""Stage `pretrained`: obtain a base checkpoint in the upstream InternVL layout and convert it to native.

`tiny` builds the embedded-default model offline: random weights, or the pre-trained ones that
`pretrained.tiny.weights` names (written by `python -m internvl_sft.model.pretrain_tiny`); `hub` downloads a
pinned revision with huggingface_hub; `local` uses an upstream-layout folder on disk. The upstream copy is kept
(merged models can be exported back to that layout); the native copy is what training loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from internvl_sft.config import PretrainedConfig, exit_on_config_error, load_params
from internvl_sft.data.synthetic import GROUNDED_LEXICON, LEXICON
from internvl_sft.model.convert import upstream_to_native
from internvl_sft.model.load import PICKLE_SUFFIXES
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint
from internvl_sft.paths import atomic_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--upstream", required=True, help="upstream-layout checkpoint folder")
    parser.add_argument("--native", required=True, help="converted native transformers folder")
    return parser.parse_args(argv)


def tiny_sizes(cfg: PretrainedConfig) -> TinySizes:
    """Every `pretrained.tiny` key but the seed and the weights is a size of the same name."""
    sizes = dataclasses.asdict(cfg.tiny)
    del sizes["seed"], sizes["weights"]
    return TinySizes(**sizes)


def download_from_hub(cfg: PretrainedConfig, folder: Path) -> None:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken"]
    if cfg.allow_pickle_weights:
        patterns += [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    snapshot_download(repo_id=cfg.repo_id, revision=cfg.revision, local_dir=folder, allow_patterns=patterns)


def fill_upstream(folder: Path, cfg: PretrainedConfig) -> None:
    if cfg.source == "tiny":
        weights = Path(cfg.tiny.weights) if cfg.tiny.weights else None
        build_tiny_checkpoint(folder, corpus=LEXICON if weights is None else GROUNDED_LEXICON, seed=cfg.tiny.seed,
                              sizes=tiny_sizes(cfg), weights=weights)
    elif cfg.source == "hub":
        download_from_hub(cfg, folder)
    else:
        shutil.copytree(Path(cfg.local_path), folder, dirs_exist_ok=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params).pretrained
    with atomic_dir(Path(args.upstream)) as tmp:
        fill_upstream(tmp, cfg)
    upstream_to_native(Path(args.upstream), Path(args.native), allow_pickle=cfg.allow_pickle_weights)
    print(f"native model written to {args.native}")


if __name__ == "__main__":
    exit_on_config_error(main)
