"""Whole-run benchmark: the train stage with the stock training step (reference) and with the fast settings, one
after the other on the same data, base model and seed; wall time (evaluations and checkpoint saves included),
throughput, and how close the two runs' loss curves are.

    python -m internvl_sft.bench_train [--preset FILE] [--set KEY=VALUE ...] [--fast-set KEY=VALUE ...]
        [--epochs N] [--reference-epochs N] [--modes reference,fast] [--out DIR]

Both runs train the recipe of --preset over --params, then each --set, with the train stage's command of
dvc.yaml (so GPUS, NNODES and the other launcher variables apply), their outputs under --out/<mode>. The
reference has every `train.fast` switch off: transformers' forward, as the upstream recipe trains. The fast run
trains the whole global batch in one pass per process (`train.per_device_batch_size` = global batch / processes,
no gradient accumulation) with the fast path as params set it, then each --fast-set (default: compiled blocks
and the vision feature cache) on top. The data and base model are the ones in data/ and pretrained/: run the
data and pretrained stages for the same recipe first.

Same global batch and seed give the same samples at every step; LoRA dropout draws its masks per micro-batch, so
with dropout the curves agree statistically, without it up to the training dtype. How far "up to the training
dtype" goes shows a third, optional run: `--modes fp32` trains the reference in fp32 (`train.precision: fp32`),
and once it exists the report gives each run's loss differences from it.

The fast run compiles into a compile cache of its own, emptied first (--out/compile-cache: the fast run pays the
whole compilation, as the first run on a machine does); `--modes reference,fast,fast-warm` trains the fast
settings once more on the cache that run left, as every later run of a sweep on the same machine finds it, and
reports both.

A long reference can be cut short: with --reference-epochs N it trains the first N epochs of the same schedule
(`train.stop_after_epochs`), and its whole-run wall time is estimated as the measured one plus the remaining
epochs at the mean duration of its epochs after the first (evaluation and save included); the report marks the
estimate. The losses are compared over the steps both runs trained. Each finished run keeps its result in
--out/<mode>/result.json, so the two runs can be made by separate calls (--modes) and compared once both exist.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from internvl_sft.config import STOCK_FAST, ConfigError, Params, build
from internvl_sft.paths import write_report
from internvl_sft.preset import overlay, params_with, parse_assignment, recipe_overrides, unflatten
from internvl_sft.profiling import profile_window

MODES = ("reference", "fast")
FP32_MODE = "fp32"
WARM_MODE = "fast-warm"
OPTIONAL_MODES = (WARM_MODE, FP32_MODE)
COMPILE_CACHE = "compile-cache"
DEFAULT_FAST_SET = ("train.fast.compile=true", "train.fast.vision_cache_mib=16384")
RUN_OPTIONS = ("--adapter-dir", "--checkpoint-dir", "--log-dir", "--curves-dir")


def launched_nodes() -> int:
    return int(os.environ.get("NNODES", "1"))


def launched_processes() -> int:
    return int(os.environ.get("GPUS", "1")) * launched_nodes()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--preset", type=Path, help="a recipe over --params (default: --params as it is)")
    parser.add_argument("--epochs", type=float, help="train.num_train_epochs of both runs (default: the recipe's)")
    parser.add_argument("--reference-epochs", type=int, default=0,
                        help="train only this many epochs of the reference's schedule and estimate the rest (0: all)")
    parser.add_argument("--modes", type=parse_modes, default=MODES,
                        help="comma-separated runs to train now (default: both); a missing one is read from --out; "
                             "fast-warm adds the fast run again on the compile cache the fast run left, fp32 the "
                             "reference trained in fp32")
    parser.add_argument("--processes", type=int, default=launched_processes(),
                        help="training processes of a run, GPUS x NNODES as the launcher reads them (default: "
                             "from the environment): the fast run's per-device batch is the global batch over it")
    parser.add_argument("--set", type=parse_assignment, action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of both runs, repeatable (e.g. train.llm_lora.dropout=0)")
    parser.add_argument("--fast-set", type=parse_assignment, action="append", metavar="KEY=VALUE",
                        help=f"a parameter of the fast run, repeatable (default: {' '.join(DEFAULT_FAST_SET)})")
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help="where the train command is read")
    parser.add_argument("--out", type=Path, default=Path("work_dirs/bench_train"))
    parser.add_argument("--profile-steps", type=profile_window, metavar="AFTER:COUNT",
                        help="passed to each run's train stage: torch.profiler over COUNT steps after step AFTER, "
                             "tables and trace in <out>/<mode>/log/profile (those steps run slower)")
    args = parser.parse_args(argv)
    if args.fast_set is None:
        args.fast_set = [parse_assignment(text) for text in DEFAULT_FAST_SET]
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    if args.reference_epochs < 0:
        parser.error("--reference-epochs must be >= 0")
    return args


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in text.split(",") if mode.strip())
    unknown = sorted(set(modes) - {*MODES, *OPTIONAL_MODES})
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes are {', '.join((*MODES, *OPTIONAL_MODES))}; got {text!r}")
    return tuple(mode for mode in (*MODES, *OPTIONAL_MODES) if mode in modes)  # the warm run after the fast one


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """--params, then --preset, then --epochs and each --set (a later one wins)."""
    epochs = {} if args.epochs is None else {"train.num_train_epochs": args.epochs}
    return params_with(args.params, recipe_overrides(args.preset, {**epochs, **dict(args.set)}))


def mode_params(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The parameters of each run, validated against the schema."""
    base = recipe(args)
    global_batch = base["train"]["global_batch_size"]
    if global_batch % args.processes:
        raise ConfigError(f"train.global_batch_size {global_batch} does not split over {args.processes} processes")
    fast = overlay(base, {"train": {"per_device_batch_size": global_batch // args.processes}})
    fast = overlay(fast, unflatten(dict(args.fast_set)))
    reference = overlay(base, {"train": {"fast": dataclasses.asdict(STOCK_FAST),
                                         "stop_after_epochs": args.reference_epochs}})
    modes = {"reference": reference, "fast": fast, WARM_MODE: fast,
             FP32_MODE: overlay(reference, {"train": {"precision": "fp32"}})}
    for mode, params in modes.items():
        build(Params, params, where=f"{mode} run of bench_train")
    return modes


def train_command(dvc_yaml: Path, params_file: Path, run_dir: Path) -> list[str]:
    """dvc.yaml's train command with this run's params file and output folders."""
    command = shlex.split(yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]["train"]["cmd"])
    replacements = {"--params": str(params_file)}
    replacements.update({option: str(run_dir / option.removeprefix("--").removesuffix("-dir"))
                         for option in RUN_OPTIONS})
    for option, value in replacements.items():
        if option not in command:
            raise SystemExit(f"{dvc_yaml}: the train command has no {option}")
        command[command.index(option) + 1] = value
    return command


def train_once(run_dir: Path, params: dict[str, Any], dvc_yaml: Path, label: str,
               env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train `params` from scratch into `run_dir` with dvc.yaml's train command and `extra` arguments (in `env`,
    default: this process's); its wall time, the train stage's run summary and loss curves."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    params_file = run_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    log = run_dir / "train.log"
    print(f"training {label} (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        code = subprocess.run([*train_command(dvc_yaml, params_file, run_dir), *extra], stdout=handle,
                              stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(f"the {label} run failed (exit status {code}); see {log}")
    summary = json.loads((run_dir / "adapter" / "train_summary.json").read_text(encoding="utf-8"))
    return {"params": params, "wall_s": wall, "summary": summary, **loss_curves(run_dir / "curves")}


def compile_environment(mode: str, args: argparse.Namespace) -> dict[str, str] | None:
    """The fast runs' environment: PyTorch's compile cache in --out/compile-cache, emptied for the fast run and
    kept for the warm one; the other runs compile nothing."""
    if mode not in ("fast", WARM_MODE):
        return None
    cache = args.out / COMPILE_CACHE
    if mode == "fast":
        shutil.rmtree(cache, ignore_errors=True)
    elif not cache.is_dir():
        raise SystemExit(f"{cache}: no compile cache to warm the {WARM_MODE} run; train --modes fast,{WARM_MODE}")
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache.resolve())}


def run_training(mode: str, params: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train one mode from scratch (`train_once`), its result also kept in the run's result.json."""
    extra = ("--profile-steps", "{}:{}".format(*args.profile_steps)) if args.profile_steps else ()
    result = train_once(args.out / mode, params, args.dvc_yaml, mode, compile_environment(mode, args), extra)
    result_path(args, mode).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def result_path(args: argparse.Namespace, mode: str) -> Path:
    return args.out / mode / "result.json"


def earlier_run(mode: str, params: dict[str, Any], args: argparse.Namespace,
                required: bool = True) -> dict[str, Any] | None:
    """The result an earlier call left for this mode (None: there is none); it must have trained the same
    parameters, or, for a run the report can do without, it is left out with a notice."""
    path = result_path(args, mode)
    if not path.exists():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("params") != params:
        message = f"{path}: the {mode} run there trained other parameters; train it again with --modes {mode}"
        if required:
            raise SystemExit(message)
        print(f"{message} (left out of this comparison)")
        return None
    return result


def estimated_full_wall(run: dict[str, Any], epochs: float) -> float | None:
    """Wall time of the whole schedule for a run stopped early: the measured time plus the epochs it did not
    train at the mean duration of its epochs after the first (the first pays warm-up). None: not enough epochs."""
    trained = run["summary"].get("epoch_seconds") or []
    if len(trained) < 2:
        return None
    later = trained[1:]
    return run["wall_s"] + (epochs - len(trained)) * sum(later) / len(later)


def loss_curves(curves_dir: Path) -> dict[str, list[float]]:
    def column(name: str, key: str) -> list[float]:
        with (curves_dir / name).open(newline="", encoding="utf-8") as handle:
            return [float(row[key]) for row in csv.DictReader(handle)]

    return {"train_loss": column("train.csv", "loss"), "train_epoch": column("train.csv", "epoch"),
            "eval_loss": column("eval.csv", "eval_loss")}


def largest_relative_difference(values: list[float], reference: list[float]) -> float | None:
    """Over the points both curves have (a reference cut short has fewer)."""
    if not values or not reference:
        return None
    return max(abs(value - ref) / abs(ref) for value, ref in zip(values, reference))


def loss_differences(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    return {"train_loss_max_rel_diff": largest_relative_difference(run["train_loss"], reference["train_loss"]),
            "eval_loss_max_rel_diff": largest_relative_difference(run["eval_loss"], reference["eval_loss"])}


def comparison(runs: dict[str, dict], epochs: float) -> dict[str, Any]:
    """Wall-time speed-up and loss differences of the fast run against the reference, and of both against the
    fp32 run where there is one."""
    reference, fast = runs["reference"], runs["fast"]
    cut_short = bool(reference["params"]["train"]["stop_after_epochs"])
    reference_wall = estimated_full_wall(reference, epochs) if cut_short else reference["wall_s"]
    compared = {
        "reference_wall_s": reference_wall,
        "reference_wall_estimated": cut_short,
        "wall_speedup": None if reference_wall is None else reference_wall / fast["wall_s"],
        "wall_speedup_warm": (None if reference_wall is None or not runs.get(WARM_MODE)
                              else reference_wall / runs[WARM_MODE]["wall_s"]),
        "compared_steps": min(len(fast["train_loss"]), len(reference["train_loss"])),
        **loss_differences(fast, reference),
    }
    if runs.get(FP32_MODE):
        compared["against_fp32"] = {mode: loss_differences(runs[mode], runs[FP32_MODE]) for mode in MODES}
    return compared


def number(value: float | None, spec: str) -> str:
    """A report's number in `spec`, or n/a where there is none."""
    return "n/a" if value is None else format(value, spec)


PHASE_ROWS = (("imports", "process start and imports (s)"), ("setup", "setup before training (s)"),
              ("eval", "evaluations (s)"), ("save", "checkpoint saves (s)"),
              ("load_best", "best checkpoint's reload (s)"))


def table(report: dict) -> str:
    runs, compared = report["runs"], report["comparison"]
    shown = [mode for mode in (*MODES, WARM_MODE) if mode in runs]

    def row(label: str, values: list[str]) -> str:
        return f"{label:34}" + "".join(f"{value:>14}" for value in values)

    estimated = compared["reference_wall_estimated"]
    warm = f" ({number(compared['wall_speedup_warm'], '.2f')}x warm)" if WARM_MODE in runs else ""
    lines = [row("", shown),
             row("wall time (s)", [number(runs[m]["wall_s"], ",.1f") for m in shown]),
             row("whole-schedule wall time (s)",
                 [number(compared["reference_wall_s"], ",.1f") + ("*" if estimated else ""),
                  *[number(runs[m]["wall_s"], ",.1f") for m in shown[1:]]]),
             row("training samples/s", [number(runs[m]["summary"].get("step_samples_per_second"), ",.2f")
                                        for m in shown]),
             row("training samples/s, median step",
                 [number(runs[m]["summary"].get("median_step_samples_per_second"), ",.2f") for m in shown]),
             *[row(label, [number(runs[m]["summary"].get("phase_seconds", {}).get(phase), ",.1f") for m in shown])
               for phase, label in PHASE_ROWS],
             row("peak GPU memory (GiB, rank 0)", [number(runs[m]["summary"].get("peak_gpu_memory_gib_rank0"), ".2f")
                                                   for m in shown]),
             row("steps", [str(len(runs[m]["train_loss"])) for m in shown]),
             row("last eval loss", [number(runs[m]["eval_loss"][-1] if runs[m]["eval_loss"] else None, ".5f")
                                    for m in shown]),
             f"wall-time speed-up: {number(compared['wall_speedup'], '.2f')}x{warm}; largest relative difference of "
             f"the fast run's step losses {number(compared['train_loss_max_rel_diff'], '.2e')} (first "
             f"{compared['compared_steps']} steps), of its eval losses "
             f"{number(compared['eval_loss_max_rel_diff'], '.2e')}"]
    against = compared.get("against_fp32")
    if against:
        lines.append("largest relative difference from the fp32 run: " + "; ".join(
            f"{mode} step losses {number(against[mode]['train_loss_max_rel_diff'], '.2e')}, eval losses "
            f"{number(against[mode]['eval_loss_max_rel_diff'], '.2e')}" for mode in MODES))
    if estimated:
        lines.append("* estimated: the reference trained the first "
                     f"{runs['reference']['params']['train']['stop_after_epochs']} epochs of the schedule")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        params = mode_params(args)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    runs = {mode: run_training(mode, params[mode], args) for mode in args.modes}
    runs.update({mode: earlier_run(mode, params[mode], args) for mode in MODES if mode not in runs})
    for mode in OPTIONAL_MODES:
        if mode not in runs:
            runs[mode] = earlier_run(mode, params[mode], args, required=False)
    missing = [mode for mode in MODES if runs[mode] is None]
    if missing:
        print(f"no {' or '.join(missing)} run in {args.out} yet; the comparison is made once both exist "
              f"(--modes {','.join(missing)})")
        return
    runs = {mode: run for mode, run in runs.items() if run is not None}
    epochs = params["fast"]["train"]["num_train_epochs"]
    report = {"recipe": {"params": str(args.params), "preset": str(args.preset) if args.preset else None,
                         "epochs": epochs, "reference_epochs": args.reference_epochs or None,
                         "set": dict(args.set), "fast_set": dict(args.fast_set)},
              "runs": runs, "comparison": comparison(runs, epochs)}
    write_report(report, table(report), args.out / "bench_train.json")


if __name__ == "__main__":
    main()
