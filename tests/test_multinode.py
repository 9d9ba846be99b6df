"""Two "nodes" on 127.0.0.1: two torchrun launches of shell/train.sh with NNODES=2 (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMALL = {
    "data": {"synthetic": {"train_screens": 6, "val_screens": 2}},
    "train": {"num_train_epochs": 1, "per_device_batch_size": 2, "global_batch_size": 8, "logging_steps": 1},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run_module(module: str, *args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A small dataset and the tiny base model, written by the data and pretrained stages."""
    work = tmp_path_factory.mktemp("nodes")
    params = merged(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")), SMALL)
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    run_module("internvl_sft.stages.data", "--params", "params.yaml", "--out", str(work / "data"), cwd=work)
    run_module("internvl_sft.stages.pretrained", "--params", "params.yaml", "--upstream", str(work / "upstream"),
               "--native", str(work / "native"), cwd=work)
    return work


def launch_node(work: Path, rank: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "GPUS": "1", "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = work / "out"
    args = ["--params", "params.yaml", "--train-meta", str(work / "data/meta/ui_dataset.json"),
            "--val-meta", str(work / "data/meta/ui_dataset_eval.json"), "--model", str(work / "native"),
            "--adapter-dir", str(out / "adapter"), "--checkpoint-dir", str(out / "checkpoints"),
            "--log-dir", str(out / "tensorboard"), "--curves-dir", str(out / "curves")]
    log = open(work / f"node{rank}.log", "w")
    return subprocess.Popen(["bash", str(ROOT / "shell/train.sh"), *args], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def test_two_nodes_train_together_and_rank_zero_writes_the_adapter(small_run):
    port = free_port()
    nodes = [launch_node(small_run, rank, port) for rank in (0, 1)]
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    logs = [(small_run / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    adapter = small_run / "out/adapter"
    summary = json.loads((adapter / "train_summary.json").read_text())
    resolved = json.loads((adapter / "train_params.json").read_text())
    assert summary["world_size"] == resolved["world_size"] == 2
    assert summary["train_steps"] >= 1
    assert (adapter / "adapter_model.safetensors").exists()
    steps = [line.split(",")[0] for line in (small_run / "out/curves/train.csv").read_text().splitlines()[1:]]
    assert steps == [str(step) for step in range(1, summary["train_steps"] + 1)], "curves written by more than one rank"
    assert not list(small_run.glob("out/adapter.*")), "a staging folder was left behind"


def test_other_nodes_run_exactly_the_train_stage_command_of_dvc_yaml():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["train"]["cmd"]
    result = subprocess.run(["bash", str(ROOT / "shell/node_train.sh")], env={**os.environ, "DRY_RUN": "1"},
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == stage.strip()
