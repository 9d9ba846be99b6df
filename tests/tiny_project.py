"""A miniature embedded-default project for tests that run stages: a params file with small sizes, then the
data and pretrained stages run in-process on absolute paths (no working-directory change needed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from internvl_sft.preset import overlay
from internvl_sft.stages import data as data_stage
from internvl_sft.stages import pretrained as pretrained_stage

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "data": {"synthetic": {"train_screens": 4, "val_screens": 1}},
    "pretrained": {"tiny": {"weights": "", "vision_hidden": 64, "vision_mlp": 128, "llm_hidden": 64, "llm_layers": 2,
                            "llm_mlp": 128}},
    "inputs": {"max_dynamic_patch": 1},
    "train": {"num_train_epochs": 3, "global_batch_size": 4, "per_device_batch_size": 4},
}


def train_environment(**extra: str) -> dict[str, str]:
    """The environment of a CPU training launch from the tests: this interpreter's tools first, no GPU."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT / "src"), "GPUS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


class TinyProject:
    """The files of a miniature project under `root`, laid out as dvc.yaml lays them out."""

    def __init__(self, root: Path):
        self.root = root
        self.params = root / "params.yaml"
        self.dataset = root / "data/ui-dataset"
        self.report = root / "data/validation-report.json"
        self.upstream = root / "pretrained/upstream"
        self.native = root / "pretrained/native"

    def write_params(self, override: dict) -> None:
        base = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.params.write_text(yaml.safe_dump(overlay(base, overlay(SMALL, override))), encoding="utf-8")

    def run_data(self) -> None:
        data_stage.main(["--params", str(self.params), "--out", str(self.dataset), "--report", str(self.report)])

    def train_command(self, run: Path, params: Path | None = None) -> list[str]:
        """The train stage's command line of dvc.yaml, with this run's output folders under `run`."""
        meta = self.dataset / "meta"
        return [
            "bash", str(ROOT / "shell/train.sh"), "--params", str(params or self.params),
            "--train-meta", str(meta / "ui_dataset.json"), "--val-meta", str(meta / "ui_dataset_eval.json"),
            "--model", str(self.native), "--adapter-dir", str(run / "adapter"),
            "--checkpoint-dir", str(run / "checkpoints"), "--log-dir", str(run / "tensorboard"),
            "--curves-dir", str(run / "curves"),
        ]

    def run_pretrained(self) -> None:
        pretrained_stage.main(["--params", str(self.params), "--upstream", str(self.upstream),
                               "--native", str(self.native)])


def tiny_project(root: Path, override: dict | None = None) -> TinyProject:
    """Params, dataset and base model of a miniature embedded default under `root`."""
    project = TinyProject(root)
    project.write_params(override or {})
    project.run_data()
    project.run_pretrained()
    return project


def two_step_batch_project(root: Path, epochs: int) -> TinyProject:
    """A miniature project whose global batch of 4 is two micro-batches of 2 on one process (one on each of two),
    without LoRA dropout, so runs that differ in process count or training path agree up to rounding; the
    repository's shell/ is linked in, for dvc.yaml's train command."""
    project = tiny_project(root, {"train": {"num_train_epochs": epochs, "global_batch_size": 4,
                                            "per_device_batch_size": 2, "llm_lora": {"dropout": 0.0}}})
    (project.root / "shell").symlink_to(ROOT / "shell")
    return project
