"""Resuming a DeepSpeed ZeRO checkpoint on another number of processes.

ZeRO saves the optimizer state cut into one partition per process, and DeepSpeed loads it only into as many
processes. Its *universal* checkpoint form keeps the state per parameter instead, re-partitioned at load time;
`deepspeed.checkpoint.ds_to_universal` writes it next to the partitions. The Trainer also saves one RNG state per
process, and only the files of the processes that exist at resume time are read: ranks the checkpoint lacks
start from rank 0's state.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from transformers import Trainer, TrainerCallback

from internvl_sft.paths import atomic_write_text

UNIVERSAL_SUFFIX = "_universal"


def zero_partitions(checkpoint: Path) -> int:
    """Processes whose ZeRO optimizer state the checkpoint holds (0: not a DeepSpeed ZeRO checkpoint)."""
    return len(list(checkpoint.glob("global_step*/*zero_pp_rank_*_optim_states.pt")))


def write_universal_state(checkpoint: Path) -> Path:
    """The universal form of the checkpoint's optimizer state, written once (a staging folder, then a rename),
    and named in `latest_universal` as DeepSpeed expects."""
    tag = (checkpoint / "latest").read_text(encoding="utf-8").strip()
    universal = checkpoint / f"{tag}{UNIVERSAL_SUFFIX}"
    if not universal.is_dir():
        staging = checkpoint / f".{universal.name}"
        shutil.rmtree(staging, ignore_errors=True)
        # The Trainer does not record the layout metadata that Megatron-style clients save; the converter
        # derives it from the partitions themselves with --inject_missing_state.
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(checkpoint / tag), "--output_folder", str(staging), "--inject_missing_state"],
                       check=True, stdout=subprocess.DEVNULL)
        staging.rename(universal)
    atomic_write_text(checkpoint / "latest_universal", universal.name)
    return universal


def write_rng_states(checkpoint: Path, processes: int) -> None:
    """An RNG state file under the name each of `processes` processes reads, rank 0's where one is missing."""
    saved = checkpoint / "rng_state_0.pth"
    source = saved if saved.exists() else checkpoint / "rng_state.pth"
    names = ["rng_state.pth"] if processes == 1 else [f"rng_state_{rank}.pth" for rank in range(processes)]
    for name in names:
        if not (checkpoint / name).exists():
            shutil.copyfile(source, checkpoint / name)


class UniversalLoads(TrainerCallback):
    """DeepSpeed reads universal state for every load while its engine is configured so. The resume is the
    first load; after each save, universal loading stays on only while the best checkpoint (loaded at the end
    of training) is the resharded one, since checkpoints saved after the resume have the ordinary form."""

    def __init__(self, trainer: Trainer, resharded: Path):
        self.trainer = trainer
        self.resharded = str(resharded)

    def on_save(self, args, state, control, **kwargs):
        engine_config = self.trainer.model_wrapped._config
        engine_config.load_universal_checkpoint = state.best_model_checkpoint == self.resharded


def prepare_resume(trainer: Trainer, checkpoint: Path, processes: int, zero: str) -> bool:
    """Make `checkpoint` resumable by this run's `processes` when ZeRO saved it on another count; True if so.
    ZeRO-3 is refused: its universal reload did not give the uninterrupted run's steps back."""
    saved = zero_partitions(checkpoint)
    if not saved or saved == processes:
        return False
    if zero == "zero3":
        raise SystemExit(
            f"{checkpoint}: written by {saved} DeepSpeed ZeRO-3 process(es), but this run has {processes}. ZeRO-3 "
            f"state is resumed on the same process count only: resume with GPUS={saved} (x nodes), or delete "
            f"{checkpoint.parent} to start afresh. ZeRO-1 and ZeRO-2 checkpoints resume on any process count."
        )
    with trainer.args.main_process_first(local=False, desc="universal checkpoint"):
        if trainer.is_world_process_zero():
            print(f"{checkpoint}: ZeRO state of {saved} process(es), resuming on {processes}: "
                  "converting it to DeepSpeed's universal form", flush=True)
            write_universal_state(checkpoint)
            write_rng_states(checkpoint, processes)
    trainer.accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}
    trainer.add_callback(UniversalLoads(trainer, checkpoint))
    return True
