"""Stage `train`: LoRA fine-tuning with the HF Trainer (optionally DeepSpeed ZeRO), launched by shell/train.sh.

Writes the best adapter plus the resolved parameters to --adapter-dir; checkpoints (for resuming), TensorBoard
logs and CSV loss curves go to their own directories so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import psutil
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from internvl_sft.checkpoint_writer import BackgroundWriter, SavesInBackground, is_being_written, queued_event
from internvl_sft.config import Params, TrainConfig, exit_on_config_error, gradient_accumulation, load_params, to_dict
from internvl_sft.data.dataset import build_dataset, collate, loader_options, pins_memory
from internvl_sft.deferred_logs import LogsOneStepLate
from internvl_sft.fast import FastForward, describe, install_fast_path
from internvl_sft.model.load import (
    load_model,
    load_tokenizer,
    prepare_for_training,
    read_sidecar,
    resolve_dtype,
    trainable_summary,
)
from internvl_sft.paths import atomic_write_text, publish, staging_dir
from internvl_sft.process import die_with_launcher
from internvl_sft.profiling import operator_table, profile_window, step_profiler
from internvl_sft.reshard import prepare_resume

DEEPSPEED_CONFIGS = {
    "zero1": "shell/zero_stage1_config.json",
    "zero2": "shell/zero_stage2_config.json",
    "zero3": "shell/zero_stage3_config.json",
}
RESOLVED_PARAMS = "train_params.json"
RUN_SUMMARY = "train_summary.json"  # throughput, wall time, peak GPU memory
RUN_FINGERPRINT = "run_fingerprint.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train-meta", required=True, help="InternVL meta JSON of the training datasets")
    parser.add_argument("--val-meta", required=True, help="InternVL meta JSON of the validation datasets")
    parser.add_argument("--model", required=True, help="native base model directory (pretrained stage)")
    parser.add_argument("--adapter-dir", required=True, help="where the best adapter is written")
    parser.add_argument("--checkpoint-dir", required=True, help="Trainer checkpoints, kept for resuming")
    parser.add_argument("--log-dir", required=True, help="TensorBoard event files")
    parser.add_argument("--curves-dir", required=True, help="CSV loss / learning-rate curves (DVC plots)")
    parser.add_argument("--profile-steps", type=profile_window, metavar="AFTER:COUNT",
                        help="profile COUNT optimizer steps after step AFTER (torch.profiler): operator tables and a "
                             "Chrome trace in <log-dir>/profile")
    return parser.parse_args(argv)


def check_combination(cfg: TrainConfig) -> None:
    """Refuse settings that do not work (together) before any model is loaded."""
    if cfg.stop_after_epochs < 0:
        raise SystemExit(f"params: train: stop_after_epochs must be >= 0 (0: train every epoch), "
                         f"got {cfg.stop_after_epochs}")
    if cfg.fast.compile and cfg.deepspeed == "zero3":
        raise SystemExit("params: train: fast: compile is not supported with deepspeed: zero3 (its per-module "
                         "parameter gathering runs inside the blocks); use zero1 or zero2, or compile: false")
    if cfg.fast.cuda_graphs:
        check_cuda_graphs(cfg)


def check_cuda_graphs(cfg: TrainConfig) -> None:
    """The recorded graphs cover the language model and the answer loss of a single process's step over compiled
    blocks; what they were not built and checked for is refused."""
    accumulation = gradient_accumulation(cfg.global_batch_size, cfg.per_device_batch_size, world_size())
    needs = {
        "a CUDA GPU": torch.cuda.is_available(),
        "compile: true": cfg.fast.compile,
        "answer_logits_only: true": cfg.fast.answer_logits_only,
        "drop_padding_mask: true (batches padded to a few lengths)": cfg.fast.drop_padding_mask,
        "grad_checkpoint: false": not cfg.grad_checkpoint,
        "deepspeed: none": cfg.deepspeed == "none",
        "one process": world_size() == 1,
        "no gradient accumulation (per_device_batch_size = global_batch_size)": accumulation == 1,
    }
    unmet = [need for need, met in needs.items() if not met]
    if unmet:
        raise SystemExit(f"params: train: fast: cuda_graphs needs {'; '.join(unmet)}")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(training_args: TrainingArguments) -> None:
    """Join the process group before the model is loaded. Under ZeRO-3 transformers loads the weights already
    partitioned (deepspeed.zero.Init), which counts the processes through DeepSpeed's communication layer; until
    that layer knows the group it counts one and rejects the batch sizes of any multi-process run."""
    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed  # only runs with a DeepSpeed config pay for its import

        deepspeed.init_distributed()


def keeps_workers(cfg: TrainConfig, datasets: tuple) -> bool:
    """Whether data-loader workers live through the run. Workers that live on carry their random state from
    epoch to epoch, and a resumed run starts them afresh; so with a `data_augment` dataset (random JPEG
    qualities, drawn in the workers) they start anew every epoch, seeded from the training process's generator,
    whose state a resumed run restores."""
    augmented = any(sample.data_augment for dataset in datasets for sample in dataset.samples)
    return cfg.dataloader_persistent_workers and cfg.dataloader_num_workers > 0 and not augmented


def training_arguments(params: Params, args: argparse.Namespace, dtype: torch.dtype,
                       persistent_workers: bool = False) -> TrainingArguments:
    cfg = params.train
    deepspeed = None if cfg.deepspeed == "none" else DEEPSPEED_CONFIGS[cfg.deepspeed]
    return TrainingArguments(
        output_dir=args.checkpoint_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(
            cfg.global_batch_size, cfg.per_device_batch_size, world_size()
        ),
        num_train_epochs=cfg.num_train_epochs,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a fraction of the total steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_persistent_workers=persistent_workers,
        **{f"dataloader_{key}": value for key, value in loader_options(cfg, cfg.dataloader_num_workers).items()},
        # page-locked batches are copied to the GPU without the host waiting for the copy
        accelerator_config={"non_blocking": pins_memory(cfg)},
        logging_nan_inf_filter=False,  # logs a NaN loss as NaN, and spares the host a wait on the GPU every step
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable (LoRA / projector) weight is used in each step
        deepspeed=deepspeed,
        report_to=["tensorboard"],
        disable_tqdm=False,
    )


def global_batch_size(args: TrainingArguments) -> int:
    """Samples per optimizer step over all processes. Length groups of this size make the order of the samples,
    and so every step's batch, the same for any number of processes (the data loader hands each process its
    share of consecutive per-device batches)."""
    return args.train_batch_size * args.gradient_accumulation_steps * args.world_size


class EpochSeededLengthSampler(LengthGroupedSampler):
    """Length-grouped order (batches of similar length, the longest first) drawn from `seed` and the epoch the
    Trainer sets, nothing else: the same for an epoch however often, and after whatever, the loader asks for it
    (a data loader whose workers live on asks once more at its start), in a resumed run as in an uninterrupted
    one."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class InternVLTrainer(LogsOneStepLate, SavesInBackground, Trainer):
    """Trainer whose length grouping reads precomputed sample lengths instead of loading every sample.

    Training and evaluation losses both come from the model's forward: with `train.fast` that forward is
    `internvl_sft.fast.FastForward`, so the Trainer's loss scaling and DDP / DeepSpeed wrapping stay as they are.
    `background_saves` and `deferred_logs` switch on `SavesInBackground` and `LogsOneStepLate`.
    """

    def __init__(self, *args, group_by_length: bool = False, background_saves: bool = False,
                 deferred_logs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_by_length = group_by_length
        self.phases = PhaseClock()
        self.parameter_count: int | None = None
        self.writer = BackgroundWriter() if background_saves and not self.is_deepspeed_enabled else None
        self.deferred_logs = deferred_logs

    def get_train_dataloader(self):
        return self.worker_seeds_apart(super().get_train_dataloader())

    def get_eval_dataloader(self, *args, **kwargs):
        return self.worker_seeds_apart(super().get_eval_dataloader(*args, **kwargs))

    def worker_seeds_apart(self, loader):
        """Workers that live through the run draw their seeds once, where the first epoch or evaluation starts,
        and a resumed run starts them at another point of the run. From a generator of their own, that draw
        stays out of the training process's generator, whose stream (dropout masks, the length-grouped order) a
        resumed run restores and must then continue as the uninterrupted run does. (accelerate's loader wraps the
        torch DataLoader that makes the iterators.)"""
        base = getattr(loader, "base_dataloader", loader)
        if self.args.dataloader_persistent_workers and base.generator is None:
            base.generator = torch.Generator().manual_seed(self.args.seed)
        return loader

    def evaluate(self, *args, **kwargs):
        with self.phases.timed("eval"):
            return super().evaluate(*args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        with self.phases.timed("save"):
            return super()._save_checkpoint(*args, **kwargs)

    def _load_best_model(self, *args, **kwargs):
        with self.phases.timed("load_best"):
            self.finish_writes()
            return super()._load_best_model(*args, **kwargs)

    def floating_point_ops(self, inputs: dict) -> int:
        """transformers' estimate, 6 x input tokens x parameters besides the embeddings, with the parameters counted
        once: counting them walks every module of the model, milliseconds of host time every step."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self.parameter_count is None:
            self.parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self.parameter_count

    def _get_train_sampler(self, train_dataset=None):
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochSeededLengthSampler(global_batch_size(self.args), dataset.lengths, self.args.data_seed)


class PhaseClock:
    """Wall time a run spent in each kind of work besides its training steps, summed over the run: `imports`
    (from the process's start to `main`: the interpreter and its imports), `setup` (from the start of `main` to
    the start of training: data, model, fast path, DeepSpeed engine), `eval` (every evaluation), `save` (every
    checkpoint save), `load_best` (the best checkpoint's reload at the end)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.seconds[phase] += time.perf_counter() - start

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def rounded(self) -> dict[str, float]:
        return {phase: round(seconds, 3) for phase, seconds in self.seconds.items()}


class SetupClock(TrainerCallback):
    """Counts the time from `started` (a `time.perf_counter()` value) to the start of training as `setup`."""

    def __init__(self, phases: PhaseClock, started: float):
        self.phases, self.started = phases, started

    def on_train_begin(self, args, state, control, **kwargs):
        self.phases.add("setup", time.perf_counter() - self.started)


class CurvesCallback(TrainerCallback):
    """Rewrites train/eval CSV curves from the log history at every log, so they survive interruptions."""

    def __init__(self, curves_dir: Path):
        self.curves_dir = curves_dir

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_curves(state.log_history, self.curves_dir)


class StepTimer(TrainerCallback):
    """Wall time of training alone: from the end of one optimizer step to the end of the next (data loading,
    forward, backward, update, logging), leaving out the intervals that held an evaluation or a checkpoint save
    and the first `warmup_steps` of a run (allocator and kernel warm-up). The throughput to compare across
    process counts; its median-step form also leaves out single slow steps (compiling a block's new variant).
    On a GPU a step ends where its queued work ends, on the GPU's clock (`time_mark`): timing makes the host wait
    for nothing."""

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps
        self.last: float | torch.cuda.Event | None = None
        self.interrupted = False
        self.intervals: list[tuple[float | torch.cuda.Event, float | torch.cuda.Event]] = []

    def on_step_end(self, args, state, control, **kwargs):
        now = time_mark()
        if self.last is not None and not self.interrupted and state.global_step > self.warmup_steps:
            self.intervals.append((self.last, now))
        self.last, self.interrupted = now, False

    @property
    def durations(self) -> list[float]:
        return [seconds_between(start, end) for start, end in self.intervals]

    def on_evaluate(self, args, state, control, **kwargs):
        self.interrupted = True

    def on_save(self, args, state, control, **kwargs):
        self.interrupted = True

    @property
    def steps(self) -> int:
        return len(self.intervals)

    @property
    def seconds(self) -> float:
        return sum(self.durations)

    def samples_per_second(self, global_batch: int) -> float | None:
        return round(self.steps * global_batch / self.seconds, 3) if self.steps else None

    def median_samples_per_second(self, global_batch: int) -> float | None:
        return round(global_batch / statistics.median(self.durations), 3) if self.steps else None


class EpochClock(TrainerCallback):
    """Wall time of each epoch this run trained, its evaluation and checkpoint save included (the last epoch also
    holds the best model's reload)."""

    def __init__(self):
        self.starts: list[float] = []
        self.end: float | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    def epoch_seconds(self) -> list[float]:
        bounds = self.starts + ([self.end] if self.end is not None and self.starts else [])
        return [round(later - earlier, 3) for earlier, later in zip(bounds, bounds[1:])]


class StepProfiler(TrainerCallback):
    """torch.profiler over `count` optimizer steps after step `after` (evaluations and saves in between included):
    each process writes its operators sorted by device time (CPU time without a GPU) and by host time, and a Chrome
    trace (chrome://tracing, Perfetto) into `folder`."""

    def __init__(self, after: int, count: int, folder: Path):
        self.after, self.count, self.folder = after, count, folder
        self.profiler: torch.profiler.profile | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.after and self.profiler is None:
            self.profiler = step_profiler(torch.cuda.is_available())
            self.profiler.start()
        elif self.profiler is not None and state.global_step == self.after + self.count:
            self.write(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:  # the run ended inside the window
            self.write(state.global_step)

    def write(self, last_step: int) -> None:
        synchronize()
        self.profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"steps_{self.after + 1}-{last_step}_rank{os.environ.get('RANK', '0')}"
        for by in ("device", "host"):
            table = operator_table(self.profiler, by, torch.cuda.is_available())
            Path(f"{stem}_{by}.txt").write_text(table + "\n", encoding="utf-8")
        self.profiler.export_chrome_trace(f"{stem}_trace.json")
        print(f"profile of steps {self.after + 1}-{last_step} written to {stem}_*", flush=True)
        self.profiler = None


class StopAfterEpochs(TrainerCallback):
    """End training after `epochs` epochs while the learning-rate schedule stays that of the whole run."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch is not None and round(state.epoch) >= self.epochs:
            control.should_training_stop = True


def time_mark() -> float | torch.cuda.Event:
    """Now, without waiting: on a GPU an event queued behind the work queued so far, else the host's clock."""
    event = queued_event(timing=True)
    return time.perf_counter() if event is None else event


def seconds_between(start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_curves(history: list[dict], curves_dir: Path) -> None:
    curves_dir.mkdir(parents=True, exist_ok=True)
    train = [(h["step"], h["epoch"], h["loss"], h.get("learning_rate", "")) for h in history if "loss" in h]
    evals = [(h["step"], h["epoch"], h["eval_loss"]) for h in history if "eval_loss" in h]
    write_csv(curves_dir / "train.csv", ("step", "epoch", "loss", "learning_rate"), train)
    write_csv(curves_dir / "eval.csv", ("step", "epoch", "eval_loss"), evals)


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def run_fingerprint(params: Params, args: argparse.Namespace) -> str:
    """Identity of a training run: its parameters, data files and base model (not the GPU count, nor where the run
    stops: a run stopped after some epochs resumes with a later stop)."""
    train = dataclasses.replace(params.train, stop_after_epochs=0)
    digest = hashlib.sha256(json.dumps(to_dict(params.inputs)).encode() + json.dumps(to_dict(train)).encode())
    for meta in (args.train_meta, args.val_meta):
        digest.update(Path(meta).read_bytes())
        for spec in json.loads(Path(meta).read_text(encoding="utf-8")).values():
            digest.update(Path(spec["annotation"]).read_bytes())
    for path in sorted(Path(args.model).glob("*.json")) + sorted(Path(args.model).glob("*.safetensors")):
        digest.update(path.name.encode() + str(path.stat().st_size).encode())
    digest.update((Path(args.model) / "config.json").read_bytes())
    return digest.hexdigest()


def checkpoint_to_resume(checkpoint_dir: Path, fingerprint: str) -> str | None:
    """The last complete checkpoint of the same run, if any; checkpoints of another run are deleted."""
    stamp = checkpoint_dir / RUN_FINGERPRINT
    if checkpoint_dir.is_dir() and (not stamp.exists() or stamp.read_text().strip() != fingerprint):
        print(f"{checkpoint_dir}: checkpoints of a different run; starting afresh", flush=True)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, fingerprint + "\n")
    remove_incomplete_checkpoints(checkpoint_dir)
    return get_last_checkpoint(str(checkpoint_dir))


def is_complete_checkpoint(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint whose state file parses was fully written, unless
    the background thread was still writing its other files (`train.fast.background_saves`)."""
    if is_being_written(folder):
        return False
    try:
        state = json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def remove_incomplete_checkpoints(checkpoint_dir: Path) -> None:
    """Delete checkpoints a killed process left half-written, so the run resumes from the last whole one."""
    for folder in sorted(checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        if folder.is_dir() and not is_complete_checkpoint(folder):
            print(f"{folder}: incomplete checkpoint (interrupted while saving); removed", flush=True)
            shutil.rmtree(folder)


def peak_gpu_memory_gib() -> float | None:
    """Peak memory allocated by tensors on this process's GPU (None on a CPU)."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def run_summary(metrics: dict, trainer: InternVLTrainer, fast: FastForward | None, timer: StepTimer,
                clock: EpochClock) -> dict:
    """Throughput, wall time and memory of the run (and the vision cache's use), as written next to the adapter.
    `train_samples_per_second` is the Trainer's (evaluations and saves included); `step_samples_per_second` counts
    the timed optimizer steps only, `median_step_samples_per_second` the global batch over their median duration;
    `epoch_seconds` each epoch of this process's run, evaluation and save included; `phase_seconds` the time
    outside the training steps by kind (`PhaseClock`)."""
    summary = {
        "train_runtime_s": metrics.get("train_runtime"),
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "step_samples_per_second": timer.samples_per_second(global_batch_size(trainer.args)),
        "median_step_samples_per_second": timer.median_samples_per_second(global_batch_size(trainer.args)),
        "timed_steps": timer.steps,
        "train_steps": trainer.state.global_step,
        "epoch_seconds": clock.epoch_seconds(),
        "phase_seconds": trainer.phases.rounded(),
        "world_size": world_size(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "peak_gpu_memory_gib_rank0": peak_gpu_memory_gib(),
    }
    if fast is not None and fast.cache is not None:
        summary["vision_cache_rank0"] = fast.cache_stats()
    return summary


def save_adapter(trainer: Trainer, params: Params, args: argparse.Namespace, summary: dict) -> None:
    """Write the (best) adapter, the resolved parameters and the run summary, then publish them in one rename.

    Every rank takes part in `save_model`: under ZeRO-3 that is where the partitioned weights are gathered.
    """
    final = Path(args.adapter_dir)
    staging = staging_dir(final)
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        resolved = {"base_model": str(args.model), "params": to_dict(params), "world_size": world_size()}
        (staging / RESOLVED_PARAMS).write_text(json.dumps(resolved, indent=2, ensure_ascii=False), encoding="utf-8")
        (staging / RUN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        publish(staging, final)


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    imports_s = time.time() - psutil.Process().create_time()
    die_with_launcher()
    args = parse_args(argv)
    params = load_params(args.params)
    check_combination(params.train)
    set_seed(params.train.seed)
    os.environ["TENSORBOARD_LOGGING_DIR"] = args.log_dir
    dtype = resolve_dtype(params.train.precision)
    tokenizer = load_tokenizer(args.model)
    sidecar = read_sidecar(args.model)
    seed, tile_keys = params.train.seed, params.train.fast.vision_cache_mib > 0
    train_set = build_dataset(args.train_meta, tokenizer, sidecar, params.inputs, seed, tile_keys=tile_keys)
    val_set = build_dataset(args.val_meta, tokenizer, sidecar, params.inputs, seed, tile_keys=tile_keys)
    training_args = training_arguments(params, args, dtype, keeps_workers(params.train, (train_set, val_set)))
    join_process_group(training_args)
    model = prepare_for_training(load_model(args.model, dtype), params.train)
    fast = install_fast_path(model, params.train.fast)
    if fast is not None and fast.cache is not None:
        fast.share_cached_samples(train_set, val_set)
    print(trainable_summary(model), describe(params.train.fast), sep="\n", flush=True)
    timer, clock = StepTimer(), EpochClock()
    stop = [StopAfterEpochs(params.train.stop_after_epochs)] if params.train.stop_after_epochs else []
    profile = [StepProfiler(*args.profile_steps, Path(args.log_dir) / "profile")] if args.profile_steps else []
    trainer = InternVLTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id,
                              image_token_id=None if fast is None else model.config.image_token_id),
        callbacks=[
            EarlyStoppingCallback(params.train.early_stopping_patience),
            CurvesCallback(Path(args.curves_dir)),
            timer,
            clock,
            *stop,
            *profile,
        ],
        group_by_length=params.train.group_by_length,
        background_saves=params.train.fast.background_saves,
        deferred_logs=params.train.fast.deferred_logs and world_size() == 1,  # several: losses averaged at once
    )
    trainer.phases.add("imports", imports_s)
    trainer.add_callback(SetupClock(trainer.phases, started))
    with training_args.main_process_first(local=False, desc="checkpoint check"):
        last = checkpoint_to_resume(Path(args.checkpoint_dir), run_fingerprint(params, args))
    if last:
        prepare_resume(trainer, Path(last), world_size(), params.train.deepspeed)
        print(f"resuming from {last}", flush=True)
    result = trainer.train(resume_from_checkpoint=last)
    trainer.finish_writes()
    summary = run_summary(result.metrics, trainer, fast, timer, clock)
    print(json.dumps(summary), flush=True)
    save_adapter(trainer, params, args, summary)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # tears the process group down; gloo left to shutdown can abort a worker


if __name__ == "__main__":
    exit_on_config_error(main)
