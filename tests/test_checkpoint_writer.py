"""Checkpoints written in the background (`train.fast.background_saves`): the same files as the Trainer's own
save, older checkpoints deleted only after the new one is complete, and a folder still being written counts as
incomplete. (tests/test_resume.py resumes killed runs of the default params, which save in the background.)"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading

import pytest
import torch
from safetensors.torch import load_file
from test_fast import FAST, LORA, training_model

from internvl_sft.checkpoint_writer import WRITING_MARKER, BackgroundWriter, host_copies
from internvl_sft.config import Params
from internvl_sft.stages.train import InternVLTrainer, is_complete_checkpoint, training_arguments

SAVED_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
               "trainer_state.json", "training_args.bin"}


def trained_one_step(tiny_native, random_lora_b, checkpoint_dir, background: bool) -> InternVLTrainer:
    """A Trainer after one optimizer step of made-up gradients (same for every call)."""
    model = training_model(tiny_native, dataclasses.replace(LORA, freeze_mlp=False), FAST, random_lora_b)
    params = Params(train=dataclasses.replace(LORA, save_total_limit=1))
    args = training_arguments(params, argparse.Namespace(checkpoint_dir=str(checkpoint_dir)), torch.float32)
    trainer = InternVLTrainer(model=model, args=args, eval_dataset=[0], background_saves=background)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    return trainer


def save_at(trainer: InternVLTrainer, step: int) -> None:
    trainer.state.global_step = step
    trainer._save_checkpoint(trainer.model, None)


def test_a_background_save_writes_the_files_of_the_trainers_own(tiny_native, random_lora_b, tmp_path):
    folders = {}
    for background in (False, True):
        trainer = trained_one_step(tiny_native, random_lora_b, tmp_path / str(background), background)
        assert (trainer.writer is not None) == background
        held = threading.Event()
        if background:  # the thread writes nothing before the weights have changed below
            write = trainer.writer.run
            trainer.writer.run = lambda *args: held.wait(timeout=60) and write(*args)
        save_at(trainer, 1)
        for p in trainer.model.parameters():  # training goes on while the thread writes
            if p.requires_grad:
                p.data.add_(1.0)
        held.set()
        trainer.finish_writes()
        folders[background] = tmp_path / str(background) / "checkpoint-1"
    own, background = folders[False], folders[True]
    assert {path.name for path in background.iterdir()} == {path.name for path in own.iterdir()} >= SAVED_FILES
    expected, written = (load_file(folder / "adapter_model.safetensors") for folder in (own, background))
    assert expected.keys() == written.keys() and any("multi_modal_projector" in key for key in written)
    assert all(torch.equal(expected[key], written[key]) for key in expected)
    expected, written = (torch.load(folder / "optimizer.pt", weights_only=True) for folder in (own, background))
    assert expected["param_groups"] == written["param_groups"] and expected["state"].keys() == written["state"].keys()
    for index, state in expected["state"].items():
        assert all(torch.equal(value, written["state"][index][key]) for key, value in state.items())
    assert (own / "adapter_config.json").read_text() == (background / "adapter_config.json").read_text()
    assert is_complete_checkpoint(background)


def test_older_checkpoints_go_only_once_the_new_one_is_written(tiny_native, random_lora_b, tmp_path, monkeypatch):
    trainer = trained_one_step(tiny_native, random_lora_b, tmp_path, background=True)
    save_at(trainer, 1)
    trainer.finish_writes()
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-1")
    release = threading.Event()
    original = torch.save

    def held_save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            assert release.wait(timeout=60)
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", held_save)
    save_at(trainer, 2)
    assert not is_complete_checkpoint(tmp_path / "checkpoint-2")  # its optimizer file is still held back
    assert (tmp_path / "checkpoint-2" / WRITING_MARKER).exists() and (tmp_path / "checkpoint-1").is_dir()
    release.set()
    save_at(trainer, 3)  # waits for checkpoint-2 first
    trainer.finish_writes()
    assert is_complete_checkpoint(tmp_path / "checkpoint-3")
    # save_total_limit 1: the newest and the best are kept
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    assert json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def test_host_copies_are_snapshots_and_leave_other_values_as_they_are():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]}
    copied = host_copies(state)
    state["state"][0]["exp_avg"].add_(1)
    assert copied["state"][0]["exp_avg"].tolist() == [1.0, 1.0] and copied["param_groups"] == [{"lr": 0.1}]


def test_a_failed_background_write_is_raised_when_the_writes_are_awaited(tmp_path):
    writer = BackgroundWriter()
    writer.submit(torch.save, {"x": torch.ones(1)}, tmp_path / "missing" / "folder" / "x.pt")
    with pytest.raises(RuntimeError):
        writer.wait()
