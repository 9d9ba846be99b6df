"""Resuming a DeepSpeed ZeRO checkpoint on another number of processes.

ZeRO saves the optimizer state cut into one partition per process, and DeepSpeed loads it only into as many
processes. Its *universal* checkpoint form keeps the state per parameter instead, re-partitioned at load time;
`deepspeed.checkpoint.ds_to_universal` writes it next to the partitions. The Trainer also saves one RNG state per
process, and only the files of the processes that exist at resume time are read: ranks the checkpoint lacks
start from rank 0's state. DeepSpeed's ZeRO-3 universal load needs two corrections (see `UniversalLoads`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
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


def saved_group_settings(universal: Path) -> list[dict]:
    """The hyper-parameters of each optimizer parameter group as the universal state holds them."""
    state = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    return [{key: value for key, value in group.items() if key != "params"}
            for group in state["optimizer_state_dict"]["param_groups"]]


def restore_groups(optimizer, groups: list[dict], where: str) -> None:
    """Each parameter group's saved settings, and a step counter of its own for each parameter state."""
    if len(optimizer.param_groups) != len(groups):
        raise RuntimeError(f"{where}: {len(groups)} optimizer parameter groups saved, "
                           f"{len(optimizer.param_groups)} in this run")
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(saved)
    for parameter_state in optimizer.optimizer.state.values():
        if torch.is_tensor(parameter_state.get("step")):
            parameter_state["step"] = parameter_state["step"].clone()


class UniversalLoads(TrainerCallback):
    """DeepSpeed reads universal state for every load while its engine is configured so. The resume is the
    first load; after each save, universal loading stays on only while the best checkpoint (loaded at the end
    of training) is the resharded one, since checkpoints saved after the resume have the ordinary form.

    DeepSpeed's ZeRO-3 universal load gives every parameter group the first group's hyper-parameters (the group
    without weight decay would be decayed) and one shared step counter, which each group's update then advances
    (the counter would run ahead and change Adam's bias correction). Given the saved `groups` (ZeRO-3), each
    group gets its own settings back and each state its own counter before the first step."""

    def __init__(self, trainer: Trainer, resharded: Path, groups: list[dict] | None):
        self.trainer = trainer
        self.resharded = str(resharded)
        self.groups = groups

    def on_train_begin(self, args, state, control, **kwargs):
        if self.groups is not None:
            restore_groups(self.trainer.model_wrapped.optimizer, self.groups, self.resharded)

    def on_save(self, args, state, control, **kwargs):
        engine_config = self.trainer.model_wrapped._config
        engine_config.load_universal_checkpoint = state.best_model_checkpoint == self.resharded


def prepare_resume(trainer: Trainer, checkpoint: Path, processes: int, zero: str) -> bool:
    """Make `checkpoint` resumable by this run's `processes` when ZeRO saved it on another count; True if so."""
    saved = zero_partitions(checkpoint)
    if not saved or saved == processes:
        return False
    with trainer.args.main_process_first(local=False, desc="universal checkpoint"):
        if trainer.is_world_process_zero():
            print(f"{checkpoint}: ZeRO state of {saved} process(es), resuming on {processes}: "
                  "converting it to DeepSpeed's universal form", flush=True)
            write_universal_state(checkpoint)
            write_rng_states(checkpoint, processes)
    trainer.accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}
    universal = checkpoint / (checkpoint / "latest_universal").read_text(encoding="utf-8").strip()
    groups = saved_group_settings(universal) if zero == "zero3" else None
    trainer.add_callback(UniversalLoads(trainer, checkpoint, groups))
    return True
