"""Stage outputs appear only when complete, and the same params give the same files.

A stage killed with SIGKILL in the middle of writing its output leaves only a `.<name>.partial` folder beside
it: the output path keeps the previous complete version, and the next run replaces both. Two runs of the data
and pretrained stages with the same params write byte-identical files.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_project import ROOT, tiny_project

from internvl_sft.config import LoraConfig, TrainConfig
from internvl_sft.model.load import load_model, prepare_for_training
from internvl_sft.paths import staging_dir
from internvl_sft.stages import merge

# Runs a stage's main() after replacing one function it calls mid-write by a SIGKILL of the process itself.
KILL_WHEN_CALLED = """
import importlib, os, signal, sys
module, function, stage = sys.argv[1:4]
setattr(importlib.import_module(module), function, lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
importlib.import_module(stage).main(sys.argv[4:])
"""


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run_killed(module: str, function: str, stage: str, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", KILL_WHEN_CALLED, module, function, stage, *args], env=env,
                            capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = tiny_project(tmp_path_factory.mktemp("outputs"))
    adapter = project.root / "adapter"
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj",))
    prepare_for_training(load_model(project.native), TrainConfig(llm_lora=lora, grad_checkpoint=False)).save_pretrained(adapter)
    merge.main(merge_args(project))
    return project


def merge_args(project) -> list[str]:
    return ["--params", str(project.params), "--model", str(project.native),
            "--adapter-dir", str(project.root / "adapter"), "--out", str(project.root / "merged")]


def data_args(project) -> list[str]:
    return ["--params", str(project.params), "--out", str(project.dataset), "--report", str(project.report)]


def pretrained_args(project) -> list[str]:
    return ["--params", str(project.params), "--upstream", str(project.upstream), "--native", str(project.native)]


# stage, its output folder, its arguments, and a function it calls once part of the output is written
KILLS = {
    "data": (lambda p: p.dataset, data_args, "internvl_sft.stages.data", "check"),
    "pretrained": (lambda p: p.native, pretrained_args, "internvl_sft.model.convert", "write_json"),
    "merge": (lambda p: p.root / "merged", merge_args, "internvl_sft.stages.merge", "copy_tokenizer_files"),
}


@pytest.mark.parametrize("stage", sorted(KILLS))
def test_stage_killed_mid_write_leaves_the_previous_output(project, stage):
    output_of, args_of, module, function = KILLS[stage]
    output, args = output_of(project), args_of(project)
    before = files_of(output)
    run_killed(module, function, f"internvl_sft.stages.{stage}", args)
    assert files_of(output) == before
    assert files_of(staging_dir(output)), "the stage was killed before it wrote anything"
    importlib.import_module(f"internvl_sft.stages.{stage}").main(args)
    assert not staging_dir(output).exists()
    assert files_of(output).keys() == before.keys()


@pytest.mark.parametrize(("stage", "outputs"), [
    ("data", lambda p: [p.dataset, p.report.parent]),
    ("pretrained", lambda p: [p.upstream, p.native]),
])
def test_same_params_give_identical_files(project, stage, outputs):
    before = [files_of(folder) for folder in outputs(project)]
    importlib.import_module(f"internvl_sft.stages.{stage}").main(KILLS[stage][1](project))
    assert [files_of(folder) for folder in outputs(project)] == before
