"""Stage `data`: produce the dataset folder (images, JSONL annotations, InternVL meta files).

`synthetic` (the embedded default) generates mobile-UI screens offline; `url` downloads the real
ui-dataset archive (checksum from params.yaml); `local` takes a zip or folder already on disk.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from internvl_sft.config import DataConfig, load_params
from internvl_sft.data.fetch import copy_local, download, extract_zip
from internvl_sft.data.synthetic import generate_dataset
from internvl_sft.paths import atomic_dir

TRAIN_META = "meta/ui_dataset.json"
VAL_META = "meta/ui_dataset_eval.json"
SPLIT_ANNOTATIONS = {TRAIN_META: "annotations/ui_dataset_train.jsonl", VAL_META: "annotations/ui_dataset_val.jsonl"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="dataset folder, e.g. data/ui-dataset")
    parser.add_argument("--cache", default="data/downloads", help="where downloaded archives are kept")
    return parser.parse_args(argv)


def write_meta_files(folder: Path, meta_root: str) -> None:
    """Upstream-format meta files for a dataset that ships only images and annotations."""
    for meta, annotation in SPLIT_ANNOTATIONS.items():
        path = folder / annotation
        if not path.exists():
            raise FileNotFoundError(f"{path}: the dataset has no {annotation}")
        length = sum(1 for line in path.open(encoding="utf-8") if line.strip())
        entry = {"root": meta_root, "annotation": f"{meta_root}/{annotation}", "data_augment": False,
                 "repeat_time": 1, "length": length}
        (folder / meta).parent.mkdir(parents=True, exist_ok=True)
        (folder / meta).write_text(json.dumps({"ui-dataset": entry}, indent=2) + "\n", encoding="utf-8")


def fill(folder: Path, cfg: DataConfig, meta_root: str, cache: Path) -> None:
    if cfg.source == "synthetic":
        s = cfg.synthetic
        counts = generate_dataset(folder, meta_root, seed=s.seed, train_screens=s.train_screens,
                                  val_screens=s.val_screens)
        print(f"synthetic dataset: {counts}")
        return
    if cfg.source == "url":
        archive = download(cfg.url, cache / Path(cfg.url).name, cfg.sha256)
        extract_zip(archive, folder)
    else:
        copy_local(Path(cfg.local_path), folder)
    write_meta_files(folder, meta_root)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params).data
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        fill(tmp, cfg, args.out, Path(args.cache))
    print(f"dataset written to {out}")


if __name__ == "__main__":
    main()
