"""One process against two at the same global batch, seed and data: the same training steps and the same
adapter, for DeepSpeed ZeRO-1 on one process and ZeRO-3 (weights partitioned from loading on) on two, and for
ZeRO-2 and ZeRO-3 runs interrupted on two processes and resumed on one."""

from __future__ import annotations

import csv
import shutil
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


def train(project, name: str, processes: int, zero: str) -> subprocess.CompletedProcess:
    params = project.root / f"params_{name}.yaml"
    params.write_text(project.params.read_text().replace("deepspeed: none", f"deepspeed: {zero}"))
    command = project.train_command(project.root / name)
    command[command.index("--params") + 1] = str(params)
    result = subprocess.run(command, cwd=ROOT, env=train_environment(GPUS=str(processes), OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def step_losses(run) -> list[float]:
    with open(run / "curves/train.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_zero3_on_two_processes_trains_like_zero1_on_one(tmp_path):
    project = tiny_project(tmp_path / "project", EXACT)
    assert "deepspeed: none" in project.params.read_text()
    train(project, "one", 1, "zero1")
    train(project, "two", 2, "zero3")
    one, two = project.root / "one", project.root / "two"
    assert len(step_losses(one)) == 6
    assert step_losses(two) == pytest.approx(step_losses(one), rel=1e-4)
    for name, weight in load_file(two / "adapter/adapter_model.safetensors").items():
        assert weight.abs().sum() > 0, f"{name}: nothing gathered from the partitions"
    adapters_equal(one, two)


def adapters_equal(run, other) -> None:
    expected = load_file(run / "adapter/adapter_model.safetensors")
    actual = load_file(other / "adapter/adapter_model.safetensors")
    assert actual.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(actual[name], weight, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_interrupted_on_two_processes_resumes_on_one_as_if_never_stopped(tmp_path, zero):
    project = tiny_project(tmp_path / "project", {**EXACT, "train": {**EXACT["train"], "save_total_limit": 3}})
    train(project, "uninterrupted", 1, zero)
    train(project, "moved", 2, zero)
    moved = project.root / "moved"
    shutil.rmtree(moved / "checkpoints/checkpoint-6")  # as if stopped after the first epoch's checkpoint
    shutil.rmtree(moved / "adapter")
    log = train(project, "moved", 1, zero).stdout
    assert "checkpoint-3: ZeRO state of 2 process(es), resuming on 1" in log
    assert step_losses(moved) == pytest.approx(step_losses(project.root / "uninterrupted"), rel=1e-5)
    adapters_equal(project.root / "uninterrupted", moved)
