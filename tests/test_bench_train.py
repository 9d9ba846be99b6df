"""The whole-run benchmark: both runs through dvc.yaml's train command on a miniature project, and their
comparison; the parameters of each mode."""

import json
import subprocess
import sys

import pytest
import yaml
from tiny_project import ROOT, train_environment, two_step_batch_project

from internvl_sft.bench_train import (
    comparison,
    compile_environment,
    earlier_run,
    main,
    mode_params,
    parse_args,
    table,
    train_command,
)
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
    fp32 = modes["fp32"]["train"]
    assert fp32["precision"] == "fp32" and reference["precision"] == "bf16"
    assert {**fp32, "precision": "bf16"} == reference


def test_set_applies_to_both_runs_before_the_fast_settings():
    args = parse_args(["--params", str(ROOT / "params.yaml"), "--set", "train.llm_lora.dropout=0",
                       "--set", "train.early_stopping_patience=20", "--fast-set", "train.llm_lora.dropout=0.1"])
    modes = mode_params(args)
    assert modes["reference"]["train"]["llm_lora"]["dropout"] == 0
    assert modes["fast"]["train"]["llm_lora"]["dropout"] == 0.1
    assert {modes[mode]["train"]["early_stopping_patience"] for mode in modes} == {20}


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
    """The reference trains two of the three epochs and the fast run all three, in separate calls."""
    project = two_step_batch_project(tmp_path / "project", epochs=3)
    out = project.root / "bench"

    def bench(mode: str, *extra: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "internvl_sft.bench_train", "--dvc-yaml", str(ROOT / "dvc.yaml"),
             "--fast-set", "train.fast.vision_cache_mib=64", "--reference-epochs", "2", "--modes", mode,
             "--out", str(out), *extra],
            cwd=project.root, env=train_environment(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    assert "no fast run" in bench("reference").stdout
    assert not (out / "bench_train.json").exists()
    result = bench("fast", "--profile-steps", "2:1")
    assert (out / "fast/log/profile/steps_3-3_rank0_host.txt").exists() and not (out / "reference/log/profile").exists()
    report = json.loads((out / "bench_train.json").read_text())
    reference, fast = report["runs"]["reference"], report["runs"]["fast"]
    assert len(fast["train_loss"]) == 3 * len(reference["train_loss"]) // 2 >= 3
    assert len(reference["summary"]["epoch_seconds"]) == 2 and len(fast["summary"]["epoch_seconds"]) == 3
    cache = fast["summary"]["vision_cache_rank0"]  # epochs 2 and 3 read every tile from the cache, without pixels
    assert cache["tiles_without_pixels"] > 0 and cache["hits"] >= 2 * cache["misses"]
    compared = report["comparison"]
    assert compared["compared_steps"] == len(reference["train_loss"])
    assert compared["train_loss_max_rel_diff"] < 1e-4
    assert compared["eval_loss_max_rel_diff"] < 1e-4
    assert compared["reference_wall_estimated"] and compared["reference_wall_s"] > reference["wall_s"]
    assert yaml_value(out / "fast/params.yaml", "per_device_batch_size") == 4
    assert yaml_value(out / "reference/params.yaml", "per_device_batch_size") == 2
    assert "wall-time speed-up" in result.stdout and "* estimated" in result.stdout
    assert "checkpoint saves (s)" in result.stdout
    assert "against_fp32" not in compared
    # the CPU trains in fp32 already: the fp32 run repeats the reference
    assert "from the fp32 run" in bench("fp32").stdout
    against = json.loads((out / "bench_train.json").read_text())["comparison"]["against_fp32"]
    assert against["reference"] == {"train_loss_max_rel_diff": 0.0, "eval_loss_max_rel_diff": 0.0}
    assert against["fast"]["train_loss_max_rel_diff"] == pytest.approx(compared["train_loss_max_rel_diff"])


def yaml_value(path, key):
    return yaml.safe_load(path.read_text())["train"][key]


def run_result(stop_after: int, wall_s: float, epoch_seconds: list[float], losses: list[float]) -> dict:
    return {"params": {"train": {"stop_after_epochs": stop_after}}, "wall_s": wall_s,
            "summary": {"epoch_seconds": epoch_seconds}, "train_loss": losses, "eval_loss": losses[-1:]}


def test_a_reference_cut_short_is_extrapolated_from_its_epochs_after_the_first():
    runs = {"reference": run_result(2, wall_s=130.0, epoch_seconds=[70.0, 50.0], losses=[4.0, 3.0]),
            "fast": run_result(0, wall_s=40.0, epoch_seconds=[10.0] * 4, losses=[4.0, 3.3, 2.0, 1.0])}
    compared = comparison(runs, epochs=4)
    assert compared["reference_wall_estimated"]
    assert compared["reference_wall_s"] == pytest.approx(130.0 + 2 * 50.0)
    assert compared["wall_speedup"] == pytest.approx(230.0 / 40.0)
    assert compared["compared_steps"] == 2
    assert compared["train_loss_max_rel_diff"] == pytest.approx(0.1)
    assert compared["eval_loss_max_rel_diff"] == pytest.approx(2.0 / 3.0)


def test_a_reference_of_one_epoch_gives_no_estimate_and_a_whole_one_is_measured():
    fast = run_result(0, wall_s=40.0, epoch_seconds=[10.0] * 4, losses=[1.0])
    assert comparison({"reference": run_result(1, 70.0, [70.0], [1.0]), "fast": fast}, 4)["wall_speedup"] is None
    whole = comparison({"reference": run_result(0, 200.0, [50.0] * 4, [1.0]), "fast": fast}, 4)
    assert not whole["reference_wall_estimated"] and whole["wall_speedup"] == pytest.approx(5.0)


def test_an_fp32_run_gives_both_runs_differences_from_it():
    runs = {"reference": run_result(0, 100.0, [50.0, 50.0], [4.0, 2.0]),
            "fast": run_result(0, 40.0, [20.0, 20.0], [4.4, 2.0]),
            "fp32": run_result(0, 300.0, [150.0, 150.0], [4.0, 2.5])}
    against = comparison(runs, epochs=2)["against_fp32"]
    assert against["reference"] == {"train_loss_max_rel_diff": pytest.approx(0.2),
                                    "eval_loss_max_rel_diff": pytest.approx(0.2)}
    assert against["fast"]["train_loss_max_rel_diff"] == pytest.approx(0.2)
    assert against["fast"]["eval_loss_max_rel_diff"] == pytest.approx(0.2)
    assert "against_fp32" not in comparison({**runs, "fp32": None}, epochs=2)


def test_an_fp32_run_of_other_parameters_is_left_out_with_a_notice(tmp_path, capsys):
    args = parse_args(["--params", str(ROOT / "params.yaml"), "--out", str(tmp_path)])
    params = mode_params(args)["fp32"]
    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32/result.json").write_text(json.dumps({"params": {**params, "seed": 1}, "wall_s": 1.0}))
    assert earlier_run("fp32", params, args, required=False) is None
    assert "left out of this comparison" in capsys.readouterr().out


def test_runs_of_separate_calls_are_compared_only_with_the_same_parameters(tmp_path):
    args = parse_args(["--params", str(ROOT / "params.yaml"), "--out", str(tmp_path)])
    params = mode_params(args)["reference"]
    assert earlier_run("reference", params, args) is None
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference/result.json").write_text(json.dumps({"params": params, "wall_s": 1.0}))
    assert earlier_run("reference", params, args)["wall_s"] == 1.0
    other = {**params, "train": {**params["train"], "learning_rate": 1.0}}
    with pytest.raises(SystemExit, match="trained other parameters; train it again with --modes reference"):
        earlier_run("reference", other, args)


def test_the_fast_run_compiles_into_an_emptied_cache_and_the_warm_run_reuses_it(tmp_path):
    args = parse_args(["--params", str(ROOT / "params.yaml"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no compile cache to warm the fast-warm run"):
        compile_environment("fast-warm", args)
    assert compile_environment("reference", args) is None
    left = tmp_path / "compile-cache" / "left.bin"
    left.parent.mkdir()
    left.write_bytes(b"an earlier run's code")
    cold = compile_environment("fast", args)
    assert cold["TORCHINDUCTOR_CACHE_DIR"] == str(left.parent) and not left.exists()
    left.parent.mkdir()
    left.write_bytes(b"the fast run's code")
    assert compile_environment("fast-warm", args) == cold and left.exists()
    assert mode_params(args)["fast-warm"] == mode_params(args)["fast"]


def test_a_warm_run_is_reported_beside_the_cold_one():
    runs = {"reference": run_result(0, 100.0, [50.0, 50.0], [4.0, 2.0]),
            "fast": run_result(0, 40.0, [30.0, 10.0], [4.1, 2.0]),
            "fast-warm": run_result(0, 20.0, [10.0, 10.0], [4.1, 2.0])}
    for run in runs.values():
        run["summary"].update(phase_seconds={}, peak_gpu_memory_gib_rank0=None)
    compared = comparison(runs, epochs=2)
    assert compared["wall_speedup"] == pytest.approx(2.5) and compared["wall_speedup_warm"] == pytest.approx(5.0)
    text = table({"runs": runs, "comparison": compared})
    assert text.splitlines()[0].split() == ["reference", "fast", "fast-warm"] and "2.50x (5.00x warm)" in text
    assert comparison({**runs, "fast-warm": None}, epochs=2)["wall_speedup_warm"] is None


def test_modes_are_checked():
    assert parse_args(["--modes", "fast"]).modes == ("fast",)
    assert parse_args(["--modes", "fast-warm,fast"]).modes == ("fast", "fast-warm")  # the warm run after the cold
    assert parse_args(["--modes", "fp32"]).modes == ("fp32",)
    with pytest.raises(SystemExit):
        parse_args(["--modes", "fast,quick"])


def test_a_profile_window_is_checked_before_any_run():
    assert parse_args(["--profile-steps", "60:3"]).profile_steps == (60, 3)
    with pytest.raises(SystemExit):
        parse_args(["--profile-steps", "60"])
