"""The input-pipeline benchmark: tile-size override and one real run over a miniature dataset."""

import json

import pytest
from tiny_project import ROOT, tiny_project

from internvl_sft.bench_inputs import main, model_settings


def test_another_tile_size_scales_the_image_tokens_with_the_area(tmp_path):
    project = tiny_project(tmp_path / "project")
    own = model_settings(project.native, None)
    assert own["image_size"] == 112
    wider = model_settings(project.native, 448)
    assert wider["image_size"] == 448
    assert wider["num_image_token"] == own["num_image_token"] * 16


@pytest.mark.parametrize("tile_size", [None, 224])
def test_every_worker_count_times_the_requested_samples(tmp_path, tile_size):
    project = tiny_project(tmp_path / "project", {"train": {"per_device_batch_size": 2}})
    out = tmp_path / "inputs.json"
    argv = ["--meta", str(project.dataset / "meta/ui_dataset.json"), "--model", str(project.native),
            "--params", str(project.params), "--preset", str(ROOT / "presets/internvl2-1b-random.yaml"),
            "--workers", "0", "1", "--samples", "10", "--out", str(out)]
    main(argv + (["--tile-size", str(tile_size)] if tile_size else []))
    report = json.loads(out.read_text())
    assert report["tile_size"] == (tile_size or 112)
    assert report["batch_size"] == 4  # the preset's per-device batch, over the params file's 2
    assert set(report["workers"]) == {"0", "1"}
    for row in report["workers"].values():
        assert row["first_batch_samples"] + row["timed_samples"] == 10
        assert row["samples_per_s"] > 0
        assert row["tiles_per_sample"] >= 2  # at least one tile and the thumbnail
