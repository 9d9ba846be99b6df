"""Checkpoint files written in a background thread (`train.fast.background_saves`).

A checkpoint of the 1B recipe is about 420 MB (the adapters and their optimizer state), and writing it from the
training process took about half a second an epoch, the GPU idle meanwhile. Here the state is copied to the host
first (for GPU tensors, copies queued on the GPU into page-locked memory: the GPU's own order keeps them ahead of
the next step's updates), and a thread of this process serialises and writes the copies while training goes on.
The files hold what the Trainer's own files hold (the optimizer's tensors saved from host memory, as the Trainer
loads them anyway: to the CPU first).

A checkpoint folder holds a marker file while its files are being written; the thread deletes it last, and only
then deletes older checkpoints. A process killed meanwhile leaves the marker, so the folder counts as incomplete
(the run resumes from the checkpoint before it, which is still there).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

WRITING_MARKER = "writing.partial"  # present while the background thread still writes the folder's files


def host_copies(value: Any) -> Any:
    """`value` (nested dicts, lists and tuples) with each tensor replaced by a copy on the host; copies of GPU
    tensors are queued asynchronously into page-locked memory (complete once the GPU gets there)."""
    if torch.is_tensor(value):
        copy = torch.empty_like(value, device="cpu", pin_memory=value.is_cuda)
        return copy.copy_(value.detach(), non_blocking=True)
    if isinstance(value, dict):
        return {key: host_copies(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copies(item) for item in value)
    return value


def queued_event(timing: bool = False) -> torch.cuda.Event | None:
    """On a GPU, an event recorded behind the work queued so far (it completes when the GPU gets there); None
    without one."""
    if not torch.cuda.is_available():
        return None
    event = torch.cuda.Event(enable_timing=timing)
    event.record()
    return event


def mark_writing(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WRITING_MARKER).touch()


def is_being_written(folder: Path) -> bool:
    return (folder / WRITING_MARKER).exists()


def finish_checkpoint(folder: Path, save_total_limit: int | None, best_checkpoint: str | None) -> None:
    """Declare `folder` complete, then delete the checkpoints beyond `save_total_limit` as the Trainer would have
    (the best one and the newest kept)."""
    (folder / WRITING_MARKER).unlink()
    rotate_checkpoints(output_dir=str(folder.parent), save_total_limit=save_total_limit,
                       best_model_checkpoint=best_checkpoint)


class BackgroundWriter:
    """Runs writes one after another in a thread. Each write waits for the host copies queued before it was
    submitted; `wait` returns when every write has finished, and raises the first one's error."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.pending: list[Future] = []

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        self.pending.append(self.executor.submit(self.run, queued_event(), write, args))

    @staticmethod
    def run(ready: torch.cuda.Event | None, write: Callable[..., Any], args: tuple) -> None:
        if ready is not None:
            ready.synchronize()
        write(*args)

    def wait(self) -> None:
        while self.pending:
            self.pending.pop(0).result()


class SavesInBackground:
    """Trainer mixin: with a `writer`, a checkpoint's adapter and optimizer files are written by it from host
    copies, the rest (scheduler, RNG state, trainer state) by the Trainer as usual; older checkpoints are deleted
    once the new one is complete. Without one (or under DeepSpeed, which saves its own way), the Trainer's save."""

    writer: BackgroundWriter | None = None
    writing_checkpoint = False

    def _save_checkpoint(self, model, trial):
        if self.writer is None or not self.args.should_save:
            return super()._save_checkpoint(model, trial)
        self.writer.wait()  # one checkpoint in flight at a time
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        mark_writing(folder)
        limit = self.args.save_total_limit
        self.args.save_total_limit, self.writing_checkpoint = None, True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit, self.writing_checkpoint = limit, False
        self.writer.submit(finish_checkpoint, folder, limit, self.state.best_model_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.writing_checkpoint:
            return super()._save(output_dir, state_dict)
        trained = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.writer.submit(super()._save, output_dir, host_copies(trained if state_dict is None else state_dict))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.writing_checkpoint:
            return super()._save_optimizer_and_scheduler(output_dir)
        optimizer = host_copies(self.optimizer.state_dict())
        self.writer.submit(torch.save, optimizer, os.path.join(output_dir, OPTIMIZER_NAME))
        torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def finish_writes(self) -> None:
        """Wait until the writer has written every checkpoint submitted so far."""
        if self.writer is not None:
            self.writer.wait()
