"""The whole-run benchmark: both runs through dvc.yaml's train command on a miniature project, and their
comparison; the parameters of each mode."""

import json
import subprocess
import sys

import pytest
import yaml
from tiny_project import ROOT, tiny_project, train_environment

from internvl_sft.bench_train import main, mode_params, parse_args, train_command
from internvl_sft.config import ConfigError


def test_reference_is_stock_and_fast_trains_the_global_batch_at_once(tmp_path):
    args = parse_args(["--params", str(ROOT / "params.yaml"), "--preset", str(ROOT / "presets/internvl2-1b-ui.yaml"),
                       "--epochs", "2", "--processes", "2", "--fast-set", "train.fast.logit_chunk_tokens=64"])
    modes = mode_params(args)
    reference, fast = modes["reference"]["train"], modes["fast"]["train"]
    assert reference["per_device_batch_size"] == 4 and fast["per_device_batch_size"] == 8  # 16 over 2 processes
    assert reference["num_train_epochs"] == fast["num_train_epochs"] == 2
    assert not reference["fast"]["answer_logits_only"] and not reference["fast"]["frozen_vision_no_grad"]
    assert fast["fast"]["answer_logits_only"] and fast["fast"]["logit_chunk_tokens"] == 64
    assert not fast["fast"]["compile"]  # --fast-set replaces the default settings
    assert reference["learning_rate"] == fast["learning_rate"] == 4e-5


def test_a_global_batch_that_does_not_split_is_refused():
    args = parse_args(["--params", str(ROOT / "params.yaml"), "--processes", "3"])
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        mode_params(args)


def test_an_unknown_fast_parameter_stops_with_its_name():
    with pytest.raises(SystemExit, match="fast run of bench_train: train: fast: unknown key.s. bogus"):
        main(["--params", str(ROOT / "params.yaml"), "--fast-set", "train.fast.bogus=1"])


def test_the_train_command_is_dvc_yamls_with_the_runs_folders(tmp_path):
    command = train_command(ROOT / "dvc.yaml", tmp_path / "p.yaml", tmp_path / "run")
    assert command[:2] == ["bash", "shell/train.sh"]
    for option, value in (("--params", "p.yaml"), ("--adapter-dir", "run/adapter"),
                          ("--checkpoint-dir", "run/checkpoint"), ("--curves-dir", "run/curves")):
        assert command[command.index(option) + 1] == str(tmp_path / value)
    assert command[command.index("--model") + 1] == "pretrained/native"


@pytest.mark.slow
def test_both_runs_train_the_same_steps_and_agree_without_dropout(tmp_path):
    project = tiny_project(tmp_path / "project", {"train": {"num_train_epochs": 1, "global_batch_size": 4,
                                                            "per_device_batch_size": 2,
                                                            "llm_lora": {"dropout": 0.0}}})
    (project.root / "shell").symlink_to(ROOT / "shell")
    out = project.root / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "internvl_sft.bench_train", "--dvc-yaml", str(ROOT / "dvc.yaml"),
         "--fast-set", "train.fast.vision_cache_mib=64", "--out", str(out)],
        cwd=project.root, env=train_environment(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "bench_train.json").read_text())
    reference, fast = report["runs"]["reference"], report["runs"]["fast"]
    assert len(reference["train_loss"]) == len(fast["train_loss"]) >= 2
    assert report["comparison"]["train_loss_max_rel_diff"] < 1e-4
    assert report["comparison"]["eval_loss_max_rel_diff"] < 1e-4
    assert report["comparison"]["wall_speedup"] > 0
    assert yaml_value(out / "fast/params.yaml", "per_device_batch_size") == 4
    assert yaml_value(out / "reference/params.yaml", "per_device_batch_size") == 2
    assert "wall-time speed-up" in result.stdout


def yaml_value(path, key):
    return yaml.safe_load(path.read_text())["train"][key]
