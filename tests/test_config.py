import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from internvl_sft.config import ConfigError, Params, build, load_params, to_dict
from internvl_sft.preset import set_arguments

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.pretrained.source == "tiny"
    assert params.train.llm_lora.target_modules[0] == "q_proj"


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"params.yaml: train: unknown key\(s\) lerning_rate"):
        load_params(path)


def test_errors_of_a_params_file_name_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  seed: 1\n  fast:\n    compile: false\n    drop_padding_mask: maybe\n"
                    "  llm_lora:\n    target_modules: [q_proj, 7]\n")
    with pytest.raises(ConfigError, match=r"drop_padding_mask: expected bool, got 'maybe' \(line 5\)$"):
        load_params(path)
    path.write_text("train:\n  llm_lora:\n    target_modules:\n      - q_proj\n      - 7\n")
    with pytest.raises(ConfigError, match=r"target_modules\[1\]: expected str, got 7 \(line 5\)$"):
        load_params(path)
    path.write_text("train:\n  seed: 2\n  fast:\n    compile: true\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) lerning_rate;.* \(line 5\)$"):
        load_params(path)


def test_a_value_out_of_its_range_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  seed: 1\n  fast:\n    compile: true\n    pad_to_multiple_of: 0\n")
    with pytest.raises(ConfigError, match=r"params.yaml: train: fast: pad_to_multiple_of: must be >= 1, got 0 "
                                          r"\(line 5\)$"):
        load_params(path)
    path.write_text("train:\n  fast:\n    vision_cache_mib: -4\n")
    with pytest.raises(ConfigError, match=r"train: fast: vision_cache_mib: must be >= 0, got -4 \(line 3\)$"):
        load_params(path)


def test_a_stage_stops_on_a_bad_params_file_with_its_message_and_no_traceback(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  dataloader_persistent_workers: maybe\n")
    result = subprocess.run(
        [sys.executable, "-m", "internvl_sft.stages.data", "--params", str(path), "--out", str(tmp_path / "data"),
         "--report", str(tmp_path / "report.json")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {path}: train: dataloader_persistent_workers: expected bool, "
                                     "got 'maybe' (line 2)")
    assert not (tmp_path / "data").exists() and not (tmp_path / "report.json").exists()


def test_wrong_type_and_choice_are_named(tmp_path):
    with pytest.raises(ConfigError, match="train: per_device_batch_size: expected int"):
        build(Params, {"train": {"per_device_batch_size": "four"}}, "p")
    with pytest.raises(ConfigError, match="deepspeed: 'zero4' is not one of"):
        build(Params, {"train": {"deepspeed": "zero4"}}, "p")


def test_yaml_scientific_notation_and_ints_become_floats():
    params = build(Params, {"train": {"learning_rate": "4e-5", "num_train_epochs": 3}}, "p")
    assert params.train.learning_rate == pytest.approx(4e-5)
    assert isinstance(params.train.num_train_epochs, float)


def test_to_dict_round_trips():
    params = load_params(ROOT / "params.yaml")
    assert build(Params, yaml.safe_load(yaml.safe_dump(to_dict(params))), "p") == params


def test_seed_recipe_preset_selects_the_recipe_values():
    args = set_arguments(ROOT / "presets/internvl2-1b-ui.yaml", ROOT / "params.yaml")
    flags = dict(a.split("=", 1) for a in args[1::2])
    assert flags["train.learning_rate"] == "4e-05"
    assert flags["train.llm_lora.r"] == "64" and flags["train.llm_lora.alpha"] == "128"
    assert flags["inputs.max_dynamic_patch"] == "6"
    assert flags["train.deepspeed"] == '"zero1"'
    assert flags["pretrained.repo_id"] == '"OpenGVLab/InternVL2-1B"'


def test_bad_preset_is_refused(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("train:\n  learning_rat: 1\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        set_arguments(preset, ROOT / "params.yaml")
