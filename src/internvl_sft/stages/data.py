"""Stage `data`: produce the dataset folder (images, JSONL annotations, InternVL meta files) and check it.

`synthetic` (the embedded default) generates mobile-UI screens offline; `url` downloads the real
ui-dataset archive (checksum from params.yaml); `local` takes a zip or folder already on disk.

Before the folder is published every annotation line and image is checked once (data/validate.py). With
`data.validation.on_bad_sample: error` all problems are listed and nothing is published; with `skip` the
bad samples are left out. The report lists skipped samples and images converted to RGB.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from internvl_sft.config import DataConfig, ValidationConfig, exit_on_config_error, load_params
from internvl_sft.data.fetch import copy_local, download, extract_zip
from internvl_sft.data.images import ImageLimits
from internvl_sft.data.meta import DataError
from internvl_sft.data.synthetic import generate_dataset
from internvl_sft.data.validate import dataset_specs, drop_bad_lines, validate
from internvl_sft.paths import atomic_dir, atomic_write_text

TRAIN_META = "meta/ui_dataset.json"
VAL_META = "meta/ui_dataset_eval.json"
SPLIT_ANNOTATIONS = {TRAIN_META: "annotations/ui_dataset_train.jsonl", VAL_META: "annotations/ui_dataset_val.jsonl"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="dataset folder, e.g. data/ui-dataset")
    parser.add_argument("--report", required=True, help="validation report (JSON) to write")
    parser.add_argument("--cache", default="data/downloads", help="where downloaded archives are kept")
    return parser.parse_args(argv)


def write_meta_files(folder: Path, meta_root: str) -> None:
    """Upstream-format meta files for a dataset that ships only images and annotations."""
    for meta, annotation in SPLIT_ANNOTATIONS.items():
        path = folder / annotation
        if not path.exists():
            raise FileNotFoundError(f"{path}: the dataset has no {annotation}")
        with path.open("rb") as handle:
            length = sum(1 for line in handle if line.strip())
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


def check(folder: Path, published: Path, cfg: ValidationConfig) -> dict:
    """Validate the dataset built in `folder`, to be published as `published`; returns the report.

    Messages name files as they will be published. Raises DataError under the `error` policy, or when an
    annotation file has no usable sample.
    """
    staging = str(folder.absolute())

    def published_name(text: object) -> str:
        return str(text).replace(staging, str(published))

    specs = {folder / meta: dataset_specs(folder / meta, published.absolute(), folder.absolute())
             for meta in SPLIT_ANNOTATIONS}
    limits = ImageLimits(cfg.min_image_side, cfg.max_image_pixels)
    found = validate([spec for split in specs.values() for spec in split], limits)
    empty = [f"{published_name(annotation)}: no usable sample"
             for annotation, count in sorted(found.usable.items()) if not count]
    if found.problems and cfg.on_bad_sample == "error":
        raise DataError([published_name(problem) for problem in found.problems] + empty)
    if empty:
        raise DataError(empty)
    if found.problems:
        drop_bad_lines(specs, found.problems)
    return {
        "policy": cfg.on_bad_sample,
        "samples_checked": found.samples,
        "images_checked": len(found.images),
        "samples_skipped": found.bad_samples,
        "skipped": [published_name(problem) for problem in found.problems],
        "images_converted": {published_name(path): notes for path, notes in sorted(found.notes.items())},
    }


def summary(report: dict, report_path: Path) -> str:
    return (
        f"checked {report['samples_checked']} samples and {report['images_checked']} images: "
        f"{report['samples_skipped']} bad sample(s) skipped, {len(report['images_converted'])} image(s) "
        f"converted to upright RGB (details in {report_path})"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params).data
    out = Path(args.out)
    try:
        with atomic_dir(out) as tmp:
            fill(tmp, cfg, args.out, Path(args.cache))
            report = check(tmp, out, cfg.validation)
    except DataError as err:
        listed = "\n".join(f"  {problem}" for problem in err.problems)
        raise SystemExit(
            f"data: {len(err.problems)} problem(s) found; nothing was published to {out} "
            f"(params: data.validation.on_bad_sample: {cfg.validation.on_bad_sample}; skip leaves bad samples "
            f"out):\n{listed}"
        ) from None
    atomic_write_text(Path(args.report), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(summary(report, Path(args.report)))
    print(f"dataset written to {out}")


if __name__ == "__main__":
    exit_on_config_error(main)
