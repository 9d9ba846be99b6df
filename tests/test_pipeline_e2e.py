"""The whole pipeline on the embedded default, for real: `dvc repro` in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import page_in_chromium

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def copy_project(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files, i.e. what a fresh clone of the working tree would hold."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dest = tmp_path_factory.mktemp("project")
    copy_project(dest)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "GPUS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "snapshot"]):
        run(cmd, dest, env)
    run(["dvc", "repro"], dest, env)
    return dest, env


def test_repro_produces_merged_model_and_metrics(project):
    dest, env = project
    metrics = json.loads((dest / "work_dirs/eval/metrics.json").read_text())
    assert {"finetuned", "base", "mean_point_baseline"} <= set(metrics)
    assert (dest / "work_dirs/merged/config.json").exists()
    assert (dest / "work_dirs/merged_upstream/model.safetensors").exists()
    predictions = (dest / "work_dirs/eval/predictions.jsonl").read_text().splitlines()
    assert len(predictions) == metrics["finetuned"]["all.n"] + metrics["base"]["all.n"]
    report = (dest / "work_dirs/eval/report.html").read_text(encoding="utf-8")
    assert 'id="headline"' in report and report.count('<figure class="card') == metrics["finetuned"]["all.n"]


def test_report_shows_the_metrics_and_annotated_screenshots_in_a_browser(project, tmp_path):
    from selenium.webdriver.common.by import By

    dest, _ = project
    metrics = load_metrics(dest)
    with page_in_chromium(dest / "work_dirs/eval/report.html", tmp_path / "profile") as page:
        cell = page.find_element(By.CSS_SELECTOR, '#headline td[data-key="finetuned.all.action_acc"]')
        assert cell.is_displayed() and cell.text == f"{100 * metrics['finetuned']['all.action_acc']:.1f}%"
        widths = page.execute_script("return [...document.querySelectorAll('img.shot')].map(i => i.naturalWidth)")
        assert len(widths) == metrics["finetuned"]["all.n"] and all(width > 0 for width in widths)


def load_metrics(dest: Path) -> dict:
    return json.loads((dest / "work_dirs/eval/metrics.json").read_text())


def test_finetuned_model_learned_the_actions(project):
    dest, _ = project
    metrics = load_metrics(dest)
    assert metrics["finetuned"]["all.action_acc"] >= 0.9
    assert metrics["base"]["all.action_acc"] <= 0.1
    assert metrics["finetuned"]["eval_loss"] < 0.5 * metrics["base"]["eval_loss"]


def test_finetuned_model_localises_targets(project):
    dest, _ = project
    metrics = load_metrics(dest)
    assert metrics["finetuned"]["all.point_error"] <= 0.5 * metrics["mean_point_baseline"]["all.point_error"]


def test_second_repro_does_nothing(project):
    dest, env = project
    result = run(["dvc", "repro"], dest, env)
    out = result.stdout + result.stderr
    for stage in ("data", "pretrained", "train", "merge", "export", "eval"):
        assert f"Stage '{stage}' didn't change, skipping" in out


@pytest.fixture(scope="module")
def experiment(project):
    """The repro result committed as the baseline, then a one-epoch variant run as the experiment `short`."""
    dest, env = project
    run(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qam", "baseline"], dest, env)
    run(["dvc", "exp", "run", "-n", "short", "-S", "train.num_train_epochs=1"], dest, env)
    return dest, env


def test_experiment_variant_gets_its_own_metrics(experiment):
    dest, env = experiment
    text = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], dest, env).stdout))
    assert '"short"' in text and "all.action_acc" in text


def test_metrics_diff_compares_the_task_metrics_of_both_revisions(experiment):
    dest, env = experiment
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "short", "--all", "--json"], dest, env).stdout)
    rows = diff["work_dirs/eval/metrics.json"]
    for key in ("finetuned.eval_loss", "finetuned.all.action_acc", "finetuned.actor.invalid_param",
                "finetuned.grounding.mean_iou", "base.all.n", "mean_point_baseline.all.point_error"):
        assert isinstance(rows[key]["old"], (int, float)) and isinstance(rows[key]["new"], (int, float)), key
    assert rows["finetuned.eval_loss"]["old"] != rows["finetuned.eval_loss"]["new"]


def test_plots_diff_draws_the_train_loss_of_both_revisions(experiment):
    dest, env = experiment
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", "short", "--json"], dest, env).stdout)
    assert not plots.get("errors")
    (train_loss,) = plots["data"]["train loss"]
    assert set(train_loss["revisions"]) == {"HEAD", "short"}
    points = train_loss["content"]["data"]["values"]
    assert {p["rev"] for p in points} == {"HEAD", "short"}
    assert all(float(p["loss"]) > 0 for p in points)
