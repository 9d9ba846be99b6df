"""A training process killed with SIGKILL resumes from its last complete checkpoint and ends exactly where an
uninterrupted run ends: same adapter tensors, same evaluation losses (CPU, fixed seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_project import ROOT, tiny_project, train_environment

from internvl_sft.stages.train import checkpoint_to_resume, is_complete_checkpoint

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 300


def train(project, run: Path) -> str:
    result = subprocess.run(project.train_command(run), cwd=ROOT, env=train_environment(), capture_output=True,
                            text=True)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def kill_after_first_checkpoint(project, run: Path) -> None:
    """Start training, wait for a complete checkpoint, then SIGKILL the launcher and all its children."""
    process = subprocess.Popen(project.train_command(run), cwd=ROOT, env=train_environment(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not any(is_complete_checkpoint(path) for path in (run / "checkpoints").glob("checkpoint-*")):
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert wait_until_no_worker_of(run), "a torchrun worker outlived its killed launcher"
    assert not (run / "adapter").exists(), "the run was killed too late to test resuming"


def workers_of(run: Path) -> list[int]:
    """Processes whose command line names this run's folders (torchrun workers run in sessions of their own)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(run).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def wait_until_no_worker_of(run: Path, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while workers_of(run):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def eval_losses(run: Path) -> list[str]:
    return (run / "curves/eval.csv").read_text().splitlines()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("resume"))


def test_killed_training_resumes_to_the_same_adapter(project, tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    train(project, reference)
    kill_after_first_checkpoint(project, interrupted)
    log = train(project, interrupted)
    assert "resuming from" in log
    expected = load_file(reference / "adapter/adapter_model.safetensors")
    resumed = load_file(interrupted / "adapter/adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert eval_losses(interrupted) == eval_losses(reference)


def write_checkpoint(folder: Path, state: str | None) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if state is not None:
        (folder / "trainer_state.json").write_text(state)


def test_checkpoint_cut_while_saving_is_removed_and_the_previous_one_used(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints / "checkpoint-2", json.dumps({"global_step": 2}))
    write_checkpoint(checkpoints / "checkpoint-4", '{"global_st')
    write_checkpoint(checkpoints / "checkpoint-6", None)
    (checkpoints / "run_fingerprint.txt").write_text("abc\n")
    assert checkpoint_to_resume(checkpoints, "abc") == str(checkpoints / "checkpoint-2")
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-2", "run_fingerprint.txt"]


def test_checkpoints_of_another_run_are_not_resumed(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints / "checkpoint-2", json.dumps({"global_step": 2}))
    (checkpoints / "run_fingerprint.txt").write_text("other\n")
    assert checkpoint_to_resume(checkpoints, "abc") is None
    assert (checkpoints / "run_fingerprint.txt").read_text() == "abc\n"
    assert not (checkpoints / "checkpoint-2").exists()
