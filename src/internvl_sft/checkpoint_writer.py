"""Checkpoint files written in a background thread (`train.fast.background_saves`).

A checkpoint of the 1B recipe is about 420 MB (the adapters and their optimizer state), and writing it from the
training process took about half a second an epoch, the GPU idle meanwhile. Here the state is copied to the host
first (for GPU tensors, copies queued on the GPU into page-locked memory: the GPU's own order keeps them ahead of
the next step's updates), and a thread of this process serialises and writes the copies while training goes on.
The files are those the Trainer writes itself, byte for byte.

A checkpoint folder holds a marker file while its files are being written; the thread deletes it last, and only
then deletes older checkpoints. A process killed meanwhile leaves the marker, so the folder counts as incomplete
(the run resumes from the checkpoint before it, which is still there).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from transformers.trainer_utils import rotate_checkpoints

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
        ready = None
        if torch.cuda.is_available():
            ready = torch.cuda.Event()
            ready.record()
        self.pending.append(self.executor.submit(self.run, ready, write, args))

    @staticmethod
    def run(ready: torch.cuda.Event | None, write: Callable[..., Any], args: tuple) -> None:
        if ready is not None:
            ready.synchronize()
        write(*args)

    def wait(self) -> None:
        while self.pending:
            self.pending.pop(0).result()
