"""One process against two at the same global batch, seed and data: the same training steps and the same
adapter, for DeepSpeed ZeRO-1 on one process and ZeRO-3 (weights partitioned from loading on) on two."""

from __future__ import annotations

import csv
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from tiny_project import ROOT, tiny_project, train_environment

pytestmark = pytest.mark.slow

# LoRA dropout draws its masks per process, so only without it are the runs equal step by step; 12 training
# samples make whole global batches (a last, partial one is split over the processes differently).
EXACT = {"data": {"synthetic": {"train_screens": 4, "val_screens": 2}},
         "train": {"num_train_epochs": 2, "per_device_batch_size": 2, "global_batch_size": 4,
                   "llm_lora": {"dropout": 0.0}}}


def train(project, name: str, processes: int, zero: str):
    params = project.root / f"params_{name}.yaml"
    params.write_text(project.params.read_text().replace("deepspeed: none", f"deepspeed: {zero}"))
    command = project.train_command(project.root / name)
    command[command.index("--params") + 1] = str(params)
    result = subprocess.run(command, cwd=ROOT, env=train_environment(GPUS=str(processes), OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project.root / name


def step_losses(run) -> list[float]:
    with open(run / "curves/train.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_zero3_on_two_processes_trains_like_zero1_on_one(tmp_path):
    project = tiny_project(tmp_path / "project", EXACT)
    assert "deepspeed: none" in project.params.read_text()
    one = train(project, "one", 1, "zero1")
    two = train(project, "two", 2, "zero3")
    assert len(step_losses(one)) == 6
    assert step_losses(two) == pytest.approx(step_losses(one), rel=1e-4)
    adapter_one = load_file(one / "adapter/adapter_model.safetensors")
    adapter_two = load_file(two / "adapter/adapter_model.safetensors")
    assert adapter_two.keys() == adapter_one.keys()
    for name, weight in adapter_one.items():
        assert weight.abs().sum() > 0, f"{name}: nothing gathered from the partitions"
        torch.testing.assert_close(adapter_two[name], weight, rtol=1e-3, atol=1e-5, msg=name)
