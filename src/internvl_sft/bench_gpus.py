"""Scaling benchmark: the train stage on several process counts at the same global batch and seed, one run after
the other; each run's throughput against the first's, and how close their loss curves are.

    python -m internvl_sft.bench_gpus [--preset FILE] [--set KEY=VALUE ...] [--gpus 1 2] [--epochs N] [--out DIR]

Each run trains the recipe of --preset over --params, then each --set, with the train stage's command of
dvc.yaml and GPUS set to the run's process count (NNODES and the other launcher variables as in the
environment), into --out/gpus<N>. The global batch stays as params set it: the train stage derives the gradient
accumulation for each count. The data and base model are the ones in data/ and pretrained/: run the data and
pretrained stages for the same recipe first.

Throughput is the train stage's: samples/s over the timed optimizer steps, and the global batch over the median
step (which steps stalled by compilation do not move). Step losses are compared within epochs and at each epoch's
last step apart: that step may hold a partial global batch, which different process counts split differently
(the data loader repeats samples to even them out). LoRA dropout draws its masks per process and micro-batch, so
with dropout the curves agree statistically, without it up to the training dtype.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from internvl_sft.bench_train import largest_relative_difference, launched_nodes, number, recipe, train_once
from internvl_sft.config import ConfigError, Params, build, gradient_accumulation
from internvl_sft.paths import write_report
from internvl_sft.preset import parse_assignment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--preset", type=Path, help="a recipe over --params (default: --params as it is)")
    parser.add_argument("--epochs", type=float, help="train.num_train_epochs of every run (default: the recipe's)")
    parser.add_argument("--set", type=parse_assignment, action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of every run, repeatable (e.g. train.deepspeed=zero2)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], metavar="N",
                        help="process counts (GPUS) to train with, in order; the first is the baseline")
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help="where the train command is read")
    parser.add_argument("--out", type=Path, default=Path("work_dirs/bench_gpus"))
    args = parser.parse_args(argv)
    if min(args.gpus) < 1 or len(set(args.gpus)) != len(args.gpus):
        parser.error(f"--gpus takes distinct counts >= 1; got {args.gpus}")
    return args


def checked_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters every run trains, validated, with a global batch that splits over each process count."""
    params = recipe(args)
    train = build(Params, params, where="bench_gpus recipe").train
    for count in args.gpus:
        try:
            gradient_accumulation(train.global_batch_size, train.per_device_batch_size, count * launched_nodes())
        except ValueError as error:
            raise ConfigError(f"GPUS={count}: {error}") from None
    return params


def epoch_ends(epochs: list[float]) -> set[int]:
    """Indices of the steps that end an epoch (the Trainer logs a whole epoch number at an epoch's last step)."""
    return {index for index, epoch in enumerate(epochs) if abs(epoch - round(epoch)) < 1e-6}


def loss_differences(run: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """Largest relative step-loss differences within epochs and at epochs' last steps, and of the eval losses."""
    ends = epoch_ends(baseline["train_epoch"])
    steps = range(min(len(run["train_loss"]), len(baseline["train_loss"])))

    def largest(indices: list[int]) -> float | None:
        return largest_relative_difference([run["train_loss"][i] for i in indices],
                                           [baseline["train_loss"][i] for i in indices])

    return {"train_loss_max_rel_diff_within_epochs": largest([i for i in steps if i not in ends]),
            "train_loss_max_rel_diff_epoch_ends": largest([i for i in steps if i in ends]),
            "eval_loss_max_rel_diff": largest_relative_difference(run["eval_loss"], baseline["eval_loss"])}


def speedup(run: dict[str, Any], baseline: dict[str, Any], key: str) -> float | None:
    value, base = run["summary"].get(key), baseline["summary"].get(key)
    return None if value is None or not base else value / base


def comparison(runs: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each run against the first: throughput ratios (timed steps, median step) and loss differences."""
    baseline = next(iter(runs.values()))
    return {count: {"speedup": speedup(run, baseline, "step_samples_per_second"),
                    "median_step_speedup": speedup(run, baseline, "median_step_samples_per_second"),
                    **loss_differences(run, baseline)}
            for count, run in runs.items()}


def table(runs: dict[int, dict[str, Any]], compared: dict[int, dict[str, Any]]) -> str:
    counts = list(runs)

    def row(label: str, values: list[str]) -> str:
        return f"{label:40}" + "".join(f"{value:>14}" for value in values)

    def summary(key: str, spec: str) -> list[str]:
        return [number(runs[count]["summary"].get(key), spec) for count in counts]

    def versus(key: str, spec: str) -> list[str]:
        return [number(compared[count][key], spec) for count in counts]

    return "\n".join([
        row("processes (GPUS)", [str(count) for count in counts]),
        row("training samples/s", summary("step_samples_per_second", ",.2f")),
        row("  against the first", [value + "x" for value in versus("speedup", ".2f")]),
        row("samples/s by the median step", summary("median_step_samples_per_second", ",.2f")),
        row("  against the first", [value + "x" for value in versus("median_step_speedup", ".2f")]),
        row("peak GPU memory (GiB, rank 0)", summary("peak_gpu_memory_gib_rank0", ".2f")),
        row("wall time (s)", [number(runs[count]["wall_s"], ",.1f") for count in counts]),
        row("last eval loss", [number(runs[count]["eval_loss"][-1] if runs[count]["eval_loss"] else None, ".5f")
                               for count in counts]),
        row("step loss vs first, within epochs", versus("train_loss_max_rel_diff_within_epochs", ".2e")),
        row("step loss vs first, epochs' last steps", versus("train_loss_max_rel_diff_epoch_ends", ".2e")),
        row("eval loss vs first", versus("eval_loss_max_rel_diff", ".2e")),
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        params = checked_recipe(args)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    runs = {count: train_once(args.out / f"gpus{count}", params, args.dvc_yaml, f"on {count} processes",
                              env={**os.environ, "GPUS": str(count)})
            for count in args.gpus}
    compared = comparison(runs)
    report = {"recipe": {"params": str(args.params), "preset": str(args.preset) if args.preset else None,
                         "epochs": params["train"]["num_train_epochs"], "set": dict(args.set)},
              "runs": {str(count): run for count, run in runs.items()},
              "comparison": {str(count): values for count, values in compared.items()}}
    write_report(report, table(runs, compared), args.out / "bench_gpus.json")


if __name__ == "__main__":
    main()
