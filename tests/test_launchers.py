"""The seed-compatible launchers turn GPUS / PER_DEVICE_BATCH_SIZE / BATCH_SIZE into DVC experiment overrides."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_sft.config import ConfigError
from internvl_sft.preset import load_preset, set_arguments

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = {"GPUS", "BATCH_SIZE", "PER_DEVICE_BATCH_SIZE"}
LAUNCHERS = ROOT / "shell/internvl2.0/2nd_finetune"
SIZES = {  # launcher name stem -> (preset, hub repo, template)
    "internvl2_1b_qwen2_0_5b": ("internvl2-1b-ui", "OpenGVLab/InternVL2-1B", "Hermes-2"),
    "internvl2_2b_internlm2_1_8b": ("internvl2-2b-ui", "OpenGVLab/InternVL2-2B", "internlm2-chat"),
    "internvl2_4b_phi3_3_8b": ("internvl2-4b-ui", "OpenGVLab/InternVL2-4B", "phi3-chat"),
    "internvl2_8b_internlm2_7b": ("internvl2-8b-ui", "OpenGVLab/InternVL2-8B", "internlm2-chat"),
}


def launch(stem: str, **variables: str) -> subprocess.CompletedProcess:
    """Run a launcher with DRY_RUN=1 from another folder, as `bash shell/...sh` would."""
    env = {key: value for key, value in os.environ.items() if key not in VARIABLES}
    env |= {"DRY_RUN": "1", "PYTHONPATH": str(ROOT / "src"), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    script = LAUNCHERS / f"{stem}_dynamic_res_2nd_finetune_lora_ui.sh"
    return subprocess.run(["bash", str(script)], env=env | variables, cwd="/", capture_output=True, text=True)


def parsed(stdout: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(environment assignments, -S overrides, the rest of the command) of the printed command line."""
    words = shlex.split(stdout)
    env = dict(word.split("=", 1) for word in words if word.startswith("GPUS="))
    sets = dict(value.split("=", 1) for flag, value in zip(words, words[1:], strict=False) if flag == "-S")
    return env, sets, [word for word in words if not word.startswith("GPUS=")]


@pytest.mark.parametrize("stem", sorted(SIZES))
def test_launcher_maps_the_variables_to_overrides(stem):
    result = launch(stem, GPUS="4", PER_DEVICE_BATCH_SIZE="2", BATCH_SIZE="32")
    assert result.returncode == 0, result.stderr
    env, sets, command = parsed(result.stdout)
    preset, repo, template = SIZES[stem]
    assert env == {"GPUS": "4"}
    assert sets["train.per_device_batch_size"] == "2" and sets["train.global_batch_size"] == "32"
    assert sets["pretrained.repo_id"] == f'"{repo}"' and sets["inputs.template"] == f'"{template}"'
    assert command[:5] == ["dvc", "exp", "run", "-n", preset]
    assert sum(word.startswith("train.global_batch_size=") for word in command) == 1


@pytest.mark.parametrize("stem", sorted(SIZES))
def test_launcher_defaults_are_the_original_ones(stem):
    result = launch(stem)
    assert result.returncode == 0, result.stderr
    env, sets, _ = parsed(result.stdout)
    assert env == {"GPUS": "2"}
    assert (sets["train.per_device_batch_size"], sets["train.global_batch_size"]) == ("4", "16")


def test_launcher_refuses_a_global_batch_that_does_not_split():
    result = launch("internvl2_8b_internlm2_7b", GPUS="3")
    assert result.returncode != 0
    assert "global_batch_size 16 is not a multiple of per_device_batch_size 4 x 3 process(es)" in result.stderr
    assert "dvc exp run" not in result.stdout


def test_presets_extend_the_seed_recipe():
    seed = load_preset(ROOT / "presets/internvl2-1b-ui.yaml")
    phi3 = load_preset(ROOT / "presets/internvl2-4b-ui.yaml")
    assert phi3["train"]["learning_rate"] == seed["train"]["learning_rate"]
    assert phi3["train"]["llm_lora"]["r"] == 64
    assert phi3["train"]["llm_lora"]["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert "extends" not in phi3


def test_a_preset_extending_itself_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        set_arguments(tmp_path / "a.yaml", ROOT / "params.yaml")


def test_extra_override_is_validated():
    extra = {"train.per_device_batch_size": "x"}
    with pytest.raises(ConfigError, match="per_device_batch_size: expected int"):
        set_arguments(ROOT / "presets/internvl2-1b-ui.yaml", ROOT / "params.yaml", extra)
