"""Benchmark of the input pipeline: how many training samples a second reading, tiling, tokenisation and
collation deliver, in this process and with data-loader workers.

    python -m internvl_sft.bench_inputs [--meta META] [--model DIR] [--tile-size 448] [--workers 0 2 4]

The samples of --meta go through the training Dataset with the recipe's `inputs` section (by default the seed
recipe of presets/internvl2-1b-random.yaml over params.yaml: up to 6 tiles + thumbnail) and the tokenizer and
tile size of --model (--tile-size overrides the latter, e.g. InternVL2's 448 px with the embedded default's
tokenizer; image tokens per tile scale with the tile's area), in per-device batches, as the train stage's data loader builds them (pinned memory and prefetch as
`train` sets them, pinning only with a GPU). --samples samples are timed per worker count, the dataset repeated
when it is smaller; the time to the first batch (worker start-up included) is reported apart. A training step
that consumes S samples a second needs a pipeline that delivers more than S.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader

from internvl_sft.data.dataset import build_dataset, collate, loader_options
from internvl_sft.model.load import load_tokenizer, read_sidecar
from internvl_sft.paths import write_report
from internvl_sft.preset import resolve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta", type=Path, default=Path("data/ui-dataset/meta/ui_dataset.json"))
    parser.add_argument("--model", type=Path, default=Path("pretrained/native"), help="its tokenizer is used")
    parser.add_argument("--tile-size", type=int, help="tile side in pixels (default: the model's)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--preset", type=Path, default=Path("presets/internvl2-1b-random.yaml"),
                        help="the recipe whose inputs and train sections apply")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="data-loader worker counts")
    parser.add_argument("--samples", type=int, default=256, help="timed samples per worker count")
    parser.add_argument("--out", type=Path, default=Path("work_dirs/bench/inputs.json"))
    return parser.parse_args(argv)


def loader(dataset, workers: int, batch_size: int, samples: int, pad_token_id: int, train_cfg) -> DataLoader:
    """Batches of `samples` samples, cycling through the dataset, built as the training data loader builds them."""
    order = [index % len(dataset) for index in range(samples)]
    return DataLoader(
        dataset, batch_size=batch_size, sampler=order, num_workers=workers,
        collate_fn=partial(collate, pad_token_id=pad_token_id), **loader_options(train_cfg, workers),
    )


def measure(batches: DataLoader) -> dict:
    """Samples a second after the first batch, and the wait for that first batch."""
    start = time.perf_counter()
    iterator = iter(batches)
    first = next(iterator)
    first_batch_s = time.perf_counter() - start
    counted, tiles, start = 0, 0, time.perf_counter()
    for batch in iterator:
        counted += batch["input_ids"].shape[0]
        tiles += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    seconds = time.perf_counter() - start
    return {"first_batch_s": first_batch_s, "first_batch_samples": first["input_ids"].shape[0],
            "timed_samples": counted, "timed_seconds": seconds, "samples_per_s": counted / seconds if seconds else None,
            "tiles_per_sample": tiles / counted if counted else None}


def model_settings(model: Path, tile_size: int | None) -> dict:
    """The model's tiling settings, with another tile size if asked."""
    sidecar = read_sidecar(model)
    if tile_size is None:
        return sidecar
    tokens = sidecar["num_image_token"] * tile_size * tile_size // (sidecar["image_size"] * sidecar["image_size"])
    return {**sidecar, "image_size": tile_size, "num_image_token": tokens}


def run(args: argparse.Namespace) -> dict:
    recipe = resolve(args.preset, args.params)[0]
    tokenizer = load_tokenizer(args.model)
    settings = model_settings(args.model, args.tile_size)
    dataset = build_dataset(args.meta, tokenizer, settings, recipe.inputs, recipe.train.seed)
    batch_size = recipe.train.per_device_batch_size
    if args.samples < 2 * batch_size:
        raise SystemExit(f"--samples {args.samples}: time at least two batches of {batch_size}")
    rows = {}
    for workers in args.workers:
        result = measure(loader(dataset, workers, batch_size, args.samples, tokenizer.pad_token_id, recipe.train))
        result["samples_per_s_per_worker"] = (result["samples_per_s"] / max(workers, 1)
                                              if result["samples_per_s"] else None)
        rows[str(workers)] = result
    return {"meta": str(args.meta), "recipe": {"preset": str(args.preset), "params": str(args.params)},
            "dataset_samples": len(dataset), "batch_size": batch_size, "tile_size": settings["image_size"],
            "max_dynamic_patch": recipe.inputs.max_dynamic_patch, "workers": rows}


def table(report: dict) -> str:
    lines = [f"{'workers':>8} {'samples/s':>10} {'per worker':>11} {'tiles/sample':>13} {'first batch (s)':>16}"]
    for workers, row in report["workers"].items():
        lines.append(f"{workers:>8} {row['samples_per_s']:>10.1f} {row['samples_per_s_per_worker']:>11.1f} "
                     f"{row['tiles_per_sample']:>13.2f} {row['first_batch_s']:>16.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    write_report(report, table(report), args.out)


if __name__ == "__main__":
    main()
