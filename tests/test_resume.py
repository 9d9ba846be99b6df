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
import yaml
from safetensors.torch import load_file
from tiny_project import ROOT, tiny_project, train_environment

from internvl_sft.checkpoint_writer import WRITING_MARKER
from internvl_sft.stages.train import checkpoint_to_resume, is_complete_checkpoint

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 300


def train(project, run: Path, params: Path | None = None) -> str:
    result = subprocess.run(project.train_command(run, params), cwd=ROOT, env=train_environment(), capture_output=True,
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


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter/adapter_model.safetensors")


def assert_same_adapter(run: Path, reference: Path) -> None:
    expected, got = adapter_tensors(reference), adapter_tensors(run)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Batches come from a data-loader worker that lives through the run (persistent workers)."""
    return tiny_project(tmp_path_factory.mktemp("resume"), {"train": {"dataloader_num_workers": 1}})


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory):
    """An uninterrupted run of the project's 3 epochs."""
    run = tmp_path_factory.mktemp("reference")
    (run / "train.log").write_text(train(project, run), encoding="utf-8")
    return run


def test_killed_training_resumes_to_the_same_adapter(project, reference, tmp_path):
    interrupted = tmp_path / "interrupted"
    kill_after_first_checkpoint(project, interrupted)
    log = train(project, interrupted)
    assert "resuming from" in log
    assert_same_adapter(interrupted, reference)
    assert eval_losses(interrupted) == eval_losses(reference)


def test_a_run_stopped_after_an_epoch_follows_the_whole_schedule_and_resumes_to_its_end(project, reference, tmp_path):
    sliced = tmp_path / "sliced"
    params = yaml.safe_load(project.params.read_text(encoding="utf-8"))
    params["train"]["stop_after_epochs"] = 1
    stopped_params = tmp_path / "params_stop1.yaml"
    stopped_params.write_text(yaml.safe_dump(params), encoding="utf-8")
    train(project, sliced, stopped_params)
    first_epoch = (sliced / "curves/train.csv").read_text().splitlines()
    whole = (reference / "curves/train.csv").read_text().splitlines()
    assert len(whole) > len(first_epoch) > 1
    assert first_epoch == whole[:len(first_epoch)], "the slice must train with the whole run's learning rates"
    summary = json.loads((sliced / "adapter/train_summary.json").read_text(encoding="utf-8"))
    assert len(summary["epoch_seconds"]) == 1 and summary["epoch_seconds"][0] > 0
    phases = summary["phase_seconds"]
    assert set(phases) == {"imports", "setup", "eval", "save", "load_best"} and min(phases.values()) > 0
    assert phases["eval"] + phases["save"] < summary["epoch_seconds"][0]
    log = train(project, sliced)
    assert "resuming from" in log
    assert_same_adapter(sliced, reference)
    assert eval_losses(sliced) == eval_losses(reference)


def logged_history(run: Path) -> list[dict]:
    """The log history of the run's newest checkpoint, without wall-clock values."""
    newest = max((run / "checkpoints").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    return [{key: value for key, value in entry.items() if "runtime" not in key and "per_second" not in key}
            for entry in history]


def test_the_trainers_own_logging_and_saving_train_the_same_run(project, reference, tmp_path):
    """`deferred_logs` and `background_saves` (on in the reference) change when values are read and files are
    written, not what: the Trainer's own logging and saving give the same curves, log history and adapter."""
    params = yaml.safe_load(project.params.read_text(encoding="utf-8"))
    params["train"]["fast"].update(deferred_logs=False, background_saves=False)
    own_params = tmp_path / "params_own.yaml"
    own_params.write_text(yaml.safe_dump(params), encoding="utf-8")
    own = tmp_path / "own"
    log = train(project, own, own_params)
    assert "read at the next step" not in log and "read at the next step" in (reference / "train.log").read_text()
    for curve in ("train.csv", "eval.csv"):
        assert (own / "curves" / curve).read_text() == (reference / "curves" / curve).read_text()
    history = logged_history(own)
    assert sum("grad_norm" in entry for entry in history) > 3 and logged_history(reference) == history
    assert_same_adapter(own, reference)


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
    write_checkpoint(checkpoints / "checkpoint-8", json.dumps({"global_step": 8}))
    (checkpoints / "checkpoint-8" / WRITING_MARKER).touch()  # its files were still being written in the background
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
