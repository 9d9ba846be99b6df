"""Two "nodes" on 127.0.0.1: two torchrun launches of shell/train.sh with NNODES=2 (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import yaml
from tiny_project import ROOT, tiny_project, train_environment

pytestmark = pytest.mark.slow

# Two processes x 2 per device x 2 accumulation steps = the global batch of 8.
SHORT = {"data": {"synthetic": {"train_screens": 6, "val_screens": 2}},
         "train": {"num_train_epochs": 1, "per_device_batch_size": 2, "global_batch_size": 8}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_node(project, rank: int, port: int) -> subprocess.Popen:
    env = train_environment(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            OMP_NUM_THREADS="1")
    log = open(project.root / f"node{rank}.log", "w")
    return subprocess.Popen(project.train_command(project.root / "out"), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def test_two_nodes_train_together_and_rank_zero_writes_the_adapter(tmp_path):
    project = tiny_project(tmp_path / "project", SHORT)
    port = free_port()
    nodes = [launch_node(project, rank, port) for rank in (0, 1)]
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    logs = [(project.root / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    adapter = project.root / "out/adapter"
    summary = json.loads((adapter / "train_summary.json").read_text())
    resolved = json.loads((adapter / "train_params.json").read_text())
    assert summary["world_size"] == resolved["world_size"] == 2
    assert summary["train_steps"] >= 1
    assert (adapter / "adapter_model.safetensors").exists()
    steps = [line.split(",")[0] for line in (project.root / "out/curves/train.csv").read_text().splitlines()[1:]]
    assert steps == [str(step) for step in range(1, summary["train_steps"] + 1)], "curves written by more than one rank"
    assert not list(project.root.glob("out/.adapter*")), "a staging folder was left behind"


def test_other_nodes_run_exactly_the_train_stage_command_of_dvc_yaml():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["train"]["cmd"]
    result = subprocess.run(["bash", str(ROOT / "shell/node_train.sh")], env={**os.environ, "DRY_RUN": "1"},
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == stage.strip()
