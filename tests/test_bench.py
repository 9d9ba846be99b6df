"""The training-step benchmark: its batches, its two modes, its accounting and one real run on the CPU."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from internvl_sft.bench import (
    BatchShape,
    ClippedAdamW,
    FlopCounts,
    grouped,
    loss_check,
    merge_batches,
    mode_configs,
    model_folder,
    parse_args,
    run,
    synthetic_batch,
    tokens_per_tile,
)
from internvl_sft.data.template import IGNORE_INDEX
from internvl_sft.config import STOCK_FAST
from internvl_sft.preset import resolve

ROOT = Path(__file__).resolve().parents[1]
SHAPE = BatchShape(batch_size=3, tiles=2, prompt_tokens=5, answer_tokens=16)


@pytest.fixture(scope="module")
def recipe():
    return resolve(ROOT / "presets/internvl2-1b-random.yaml", ROOT / "params.yaml")[0]


def test_reference_is_the_seed_recipe_and_fast_its_fast_path(recipe):
    configs = mode_configs(parse_args([]), recipe.train)
    reference, fast = configs["reference"], configs["fast"]
    assert reference.fast == STOCK_FAST and reference.grad_checkpoint
    assert (reference.llm_lora.r, reference.llm_lora.alpha) == (64, 128)
    assert reference.freeze_llm and reference.freeze_mlp and reference.freeze_backbone
    assert fast.fast.answer_logits_only and fast.fast.frozen_vision_no_grad and fast.grad_checkpoint
    assert fast.llm_lora == reference.llm_lora
    off = mode_configs(parse_args(["--fast-grad-checkpoint", "off", "--logit-chunk-tokens", "64", "--compile", "on",
                                   "--cuda-graphs", "on"]), recipe.train)
    assert not off["fast"].grad_checkpoint and off["fast"].fast.logit_chunk_tokens == 64
    assert off["fast"].fast.compile and off["fast"].fast.cuda_graphs
    with pytest.raises(SystemExit, match="CUDA graphs need --compile on, --fast-grad-checkpoint off and"):
        mode_configs(parse_args(["--compile", "on", "--cuda-graphs", "on"]), recipe.train)  # the recipe recomputes
    full_logits = dataclasses.replace(recipe.train, fast=dataclasses.replace(recipe.train.fast,
                                                                              answer_logits_only=False))
    with pytest.raises(SystemExit, match="answer_logits_only: true"):
        mode_configs(parse_args(["--fast-grad-checkpoint", "off", "--compile", "on", "--cuda-graphs", "on"]),
                     full_logits)
    assert off["reference"].grad_checkpoint


def test_synthetic_batch_is_padded_with_loss_on_answers_only(tiny_native):
    config = AutoConfig.from_pretrained(tiny_native)
    batch = synthetic_batch(config, SHAPE, torch.Generator().manual_seed(0))
    again = synthetic_batch(config, SHAPE, torch.Generator().manual_seed(0))
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    image_tokens = SHAPE.tiles * tokens_per_tile(config)
    assert tokens_per_tile(config) == 16 and batch["pixel_values"].shape == (6, 3, 112, 112)
    lengths = batch["attention_mask"].sum(dim=1)
    answers = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
    assert torch.equal(lengths, SHAPE.prompt_tokens + image_tokens + answers)
    assert len(set(lengths.tolist())) > 1, "lengths vary, so the batch is padded"
    assert ((answers >= 14) & (answers <= 18)).all()
    assert ((batch["input_ids"] == config.image_token_id).sum(dim=1) == image_tokens).all()
    labelled = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][labelled], batch["input_ids"][labelled])
    assert (batch["attention_mask"][labelled] == 1).all()


def test_merged_batches_hold_every_sample_right_padded(tiny_native):
    config = AutoConfig.from_pretrained(tiny_native)
    generator = torch.Generator().manual_seed(1)
    parts = [synthetic_batch(config, SHAPE, generator) for _ in range(2)]
    merged = merge_batches(parts, config.image_token_id)
    longest = max(part["input_ids"].shape[1] for part in parts)
    assert merged["input_ids"].shape == (6, longest)
    assert merged["pixel_values"].shape[0] == 6 * SHAPE.tiles
    for index, part in enumerate(parts):
        rows, width = slice(3 * index, 3 * index + 3), part["input_ids"].shape[1]
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(merged[key][rows, :width], part[key])
        assert (merged["attention_mask"][rows, width:] == 0).all()
        assert (merged["labels"][rows, width:] == IGNORE_INDEX).all()
    rows, columns = merged["answer_positions"]  # the positions of the merged batch, not of its parts
    assert (merged["labels"][rows, columns + 1] != IGNORE_INDEX).all()
    assert len(rows) == (merged["labels"][:, 1:] != IGNORE_INDEX).sum()
    steps = grouped(parts, 2, config.image_token_id)  # as many steps as batches given, cycling through them
    assert len(steps) == 2 and all(torch.equal(step["input_ids"], merged["input_ids"]) for step in steps)


def test_useful_flops_follow_the_documented_accounting():
    counts = FlopCounts(vision_params=10, llm_params=7, patches_per_tile=4)
    batch = {"pixel_values": torch.zeros(3, 3, 8, 8), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    assert counts.useful_flops(batch) == 2 * 10 * 3 * 4 + 4 * 7 * 7


def test_loss_check_uses_a_tolerance_of_the_dtype():
    assert loss_check(2.0, 2.0 + 1e-6, torch.float32)["equal"]
    assert not loss_check(2.0, 2.001, torch.float32)["equal"]
    assert loss_check(2.0, 2.01, torch.bfloat16)["equal"]
    assert not loss_check(2.0, 2.1, torch.bfloat16)["equal"]


def test_bench_runs_both_modes_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "internvl_sft.bench", "--size", "tiny", "--steps", "2", "--warmup", "1",
         "--profile-steps", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"reference", "fast"}
    for mode in report["modes"].values():
        assert mode["samples_per_s"] > 0 and mode["tokens_per_s"] > mode["samples_per_s"]
        assert mode["mfu"] is None and mode["peak_memory_bytes"] is None  # no GPU, no peak FLOP/s given
    assert report["modes"]["reference"]["fast"]["answer_logits_only"] is False
    assert report["modes"]["fast"]["fast"]["answer_logits_only"] is True
    check = report["first_batch_loss"]
    assert check["equal"] and check["reference"] == pytest.approx(check["fast"], rel=1e-5)
    assert report["shape"] == {"batch_size": 4, "tiles": 7, "prompt_tokens": 16, "answer_tokens": 128}
    assert report["ratios"]["samples_per_s"] > 0
    assert report["step_losses"]["steps"] == 3 and report["step_losses"]["fast_vs_reference"] < 1e-4  # fp32
    assert "first-batch loss" in result.stdout and "fast/reference" in result.stdout
    for mode in ("reference", "fast"):
        assert "aten::mm" in (tmp_path / f"bench_{mode}_profile.txt").read_text()


def test_cache_of_the_fast_mode_hits_when_batches_repeat(tmp_path):
    args = parse_args(["--size", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--tiles", "3",
                       "--vision-cache-mib", "8", "--distinct-batches", "1", "--params", str(ROOT / "params.yaml"),
                       "--preset", str(ROOT / "presets/internvl2-1b-random.yaml"), "--build-dir", str(tmp_path)])
    report = run(args)
    assert "vision_cache" not in report["modes"]["reference"]
    assert report["modes"]["fast"]["vision_cache"]["misses"] == 2 * 3
    assert report["modes"]["fast"]["vision_cache"]["hits"] == 2 * (2 * 3)
    assert report["first_batch_loss"]["equal"] and report["distinct_batches"] == 1
    assert report["modes"]["reference"]["batch_size"] == report["modes"]["fast"]["batch_size"] == 2
    assert random_checkpoint_reused(tmp_path)


def test_fast_mode_trains_several_reference_batches_a_step(tmp_path):
    args = parse_args(["--size", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--tiles", "3",
                       "--fast-batch-size", "4", "--params", str(ROOT / "params.yaml"),
                       "--preset", str(ROOT / "presets/internvl2-1b-random.yaml"), "--build-dir", str(tmp_path)])
    report = run(args)
    assert report["modes"]["reference"]["batch_size"] == 2 and report["modes"]["fast"]["batch_size"] == 4
    assert report["first_batch_loss"]["equal"]
    assert report["step_losses"] is None  # a fast step trains two reference steps' batches: no step to compare


def test_master_weights_add_up_updates_below_the_dtypes_precision():
    """At 1.0 bf16 steps by 2**-8 or more: AdamW's 1e-3 steps vanish in the parameter itself, not in fp32 copies."""
    def trained(master_weights: bool) -> tuple[torch.Tensor, ClippedAdamW]:
        param = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        optimizer = ClippedAdamW([param], max_grad_norm=1.0, master_weights=master_weights, lr=1e-3,
                                 weight_decay=0.0)
        for _ in range(20):
            param.grad = torch.full_like(param, 0.5)
            optimizer.step()
        return param, optimizer

    plain, _ = trained(master_weights=False)
    assert torch.equal(plain, torch.ones(4, dtype=torch.bfloat16))
    param, optimizer = trained(master_weights=True)
    master = optimizer.targets[0]
    assert master.dtype == torch.float32 and master == pytest.approx(torch.full((4,), 0.98), abs=1e-4)
    assert torch.equal(param.detach(), master.to(torch.bfloat16)) and param.grad is None
    assert master.grad.dtype == torch.float32 and master.grad == pytest.approx(torch.full((4,), 0.5))  # last, clipped


def test_deepspeed_recipe_trains_bf16_weights_without_autocast(tmp_path):
    args = parse_args(["--size", "tiny", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--tiles", "2",
                       "--precision", "bf16", "--params", str(ROOT / "params.yaml"),
                       "--preset", str(ROOT / "presets/internvl2-1b-random.yaml"), "--build-dir", str(tmp_path)])
    report = run(args)
    assert {mode["precision"] for mode in report["modes"].values()} == {"fp32 master weights"}
    assert report["first_batch_loss"]["equal"] and report["environment"]["dtype"] == "bfloat16"


def test_fp32_reference_measures_each_modes_distance_from_fp32(tmp_path):
    args = parse_args(["--size", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--tiles", "2",
                       "--precision", "bf16", "--fp32-reference", "--params", str(ROOT / "params.yaml"),
                       "--preset", str(ROOT / "presets/internvl2-1b-random.yaml"), "--build-dir", str(tmp_path)])
    report = run(args)
    modes = report["modes"]
    assert modes["fp32"]["precision"] == "fp32" and modes["reference"]["precision"] == "fp32 master weights"
    assert all(len(mode["step_losses"]) == 3 for mode in modes.values())
    # the same weights: bf16 and fp32 agree on the first batch up to bf16's rounding, and are not identical
    assert modes["fp32"]["step_losses"][0] == pytest.approx(modes["reference"]["step_losses"][0], rel=1e-2)
    assert modes["fp32"]["step_losses"] != modes["reference"]["step_losses"]
    steps = report["step_losses"]
    assert steps["steps"] == 3 and 0 < steps["reference_vs_fp32"] < 1e-2 and 0 < steps["fast_vs_fp32"] < 1e-2
    assert steps["fast_vs_reference"] == max(abs(f - r) / abs(r) for f, r in
                                             zip(modes["fast"]["step_losses"], modes["reference"]["step_losses"]))


@pytest.mark.parametrize(("options", "message"), [(["--precision", "fp32"], "in fp32 already"),
                                                   (["--precision", "bf16", "--fast-batch-size", "4"], "batches")])
def test_fp32_reference_refuses_what_it_cannot_compare(tmp_path, options, message):
    args = parse_args(["--size", "tiny", "--batch-size", "2", "--fp32-reference", "--build-dir", str(tmp_path),
                       *options])
    with pytest.raises(SystemExit, match=message):
        run(args)


def test_fast_batch_size_must_be_a_multiple_of_the_batch_size(tmp_path):
    args = parse_args(["--size", "tiny", "--batch-size", "2", "--fast-batch-size", "3", "--build-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a multiple"):
        run(args)


def random_checkpoint_reused(folder: Path) -> bool:
    """A second build in the same folder finds the checkpoint and leaves it untouched."""
    stamp = (folder / "native/model.safetensors").stat().st_mtime_ns
    args = parse_args(["--size", "tiny", "--params", str(ROOT / "params.yaml"), "--build-dir", str(folder)])
    with model_folder(args) as native:
        return native == folder / "native" and (native / "model.safetensors").stat().st_mtime_ns == stamp
