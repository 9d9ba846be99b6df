"""The scaling benchmark: the same recipe on one and two processes through dvc.yaml's train command on a miniature
project, and the comparison of the runs (throughput ratios, step losses within epochs and at epochs' ends)."""

import json
import subprocess
import sys

import pytest
from tiny_project import ROOT, train_environment, two_step_batch_project

from internvl_sft.bench_gpus import comparison, epoch_ends, main


def run_result(step_rate: float, median_rate: float, losses: list[float], epochs: list[float],
               eval_losses: list[float]) -> dict:
    return {"summary": {"step_samples_per_second": step_rate, "median_step_samples_per_second": median_rate},
            "train_loss": losses, "train_epoch": epochs, "eval_loss": eval_losses}


def test_an_epochs_last_step_is_the_one_logged_at_a_whole_epoch():
    assert epoch_ends([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]) == {3, 7}
    assert epoch_ends([0.4, 0.8]) == set()


def test_runs_are_compared_with_the_first_and_epoch_ends_apart():
    epochs = [0.5, 1.0, 1.5, 2.0]
    runs = {1: run_result(10.0, 11.0, [4.0, 3.0, 2.0, 1.0], epochs, [3.0, 1.0]),
            2: run_result(17.0, 20.9, [4.04, 3.3, 2.0, 1.0], epochs, [3.0, 1.1])}
    compared = comparison(runs)
    assert compared[1]["speedup"] == compared[1]["median_step_speedup"] == 1.0
    assert compared[2]["speedup"] == pytest.approx(1.7)
    assert compared[2]["median_step_speedup"] == pytest.approx(1.9)
    assert compared[2]["train_loss_max_rel_diff_within_epochs"] == pytest.approx(0.01)  # step 1; step 2 ends epoch 1
    assert compared[2]["train_loss_max_rel_diff_epoch_ends"] == pytest.approx(0.1)
    assert compared[2]["eval_loss_max_rel_diff"] == pytest.approx(0.1)


def test_a_run_without_timed_steps_has_no_speedup():
    runs = {1: run_result(10.0, 10.0, [1.0], [1.0], [1.0]), 2: run_result(None, None, [1.0], [1.0], [1.0])}
    assert comparison(runs)[2]["speedup"] is None and comparison(runs)[2]["median_step_speedup"] is None


def test_a_process_count_the_global_batch_does_not_split_over_is_refused_before_training(tmp_path):
    with pytest.raises(SystemExit, match="GPUS=3: params: train: global_batch_size 16 is not a multiple"):
        main(["--params", str(ROOT / "params.yaml"), "--set", "train.per_device_batch_size=4", "--gpus", "1", "3",
              "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_repeated_or_zero_counts_are_refused(capsys):
    for counts in (["1", "1"], ["0", "2"]):
        with pytest.raises(SystemExit):
            main(["--gpus", *counts])
        assert "--gpus takes distinct counts >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_steps_and_agree_without_dropout(tmp_path):
    project = two_step_batch_project(tmp_path / "project", epochs=2)
    out = project.root / "scaling"
    result = subprocess.run(
        [sys.executable, "-m", "internvl_sft.bench_gpus", "--dvc-yaml", str(ROOT / "dvc.yaml"), "--gpus", "1", "2",
         "--out", str(out)],
        cwd=project.root, env=train_environment(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "bench_gpus.json").read_text())
    one, two = report["runs"]["1"], report["runs"]["2"]
    assert one["summary"]["world_size"] == 1 and two["summary"]["world_size"] == 2
    assert len(one["train_loss"]) == len(two["train_loss"]) >= 4
    compared = report["comparison"]["2"]
    assert compared["train_loss_max_rel_diff_within_epochs"] < 1e-4
    assert compared["speedup"] > 0 and compared["median_step_speedup"] > 0
    assert "samples/s by the median step" in result.stdout
