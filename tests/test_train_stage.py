"""Units of the train stage: the training-only throughput (evaluations, saves and warm-up steps left out), the
settings refused together, when data-loader workers live through the run, the FLOP estimate's parameter count."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer

from internvl_sft.deferred_logs import PendingLog
from internvl_sft.model.load import load_model
from internvl_sft.profiling import profile_window
from internvl_sft.stages import train


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(value=0.0)
    monkeypatch.setattr(train.time, "perf_counter", lambda: now.value)
    return now


def end_step(timer, clock, step: int, seconds: float) -> None:
    clock.value += seconds
    timer.on_step_end(None, SimpleNamespace(global_step=step), None)


def test_intervals_with_an_evaluation_or_a_save_are_left_out(clock):
    timer = train.StepTimer(warmup_steps=1)
    end_step(timer, clock, 1, 30.0)  # warm-up
    end_step(timer, clock, 2, 2.0)
    timer.on_evaluate(None, None, None)
    end_step(timer, clock, 3, 50.0)  # held the evaluation
    end_step(timer, clock, 4, 2.0)
    timer.on_save(None, None, None)
    end_step(timer, clock, 5, 20.0)  # held the save
    end_step(timer, clock, 6, 4.0)
    assert timer.steps == 3
    assert timer.seconds == pytest.approx(8.0)
    assert timer.samples_per_second(global_batch=16) == pytest.approx(6.0)


def test_the_median_step_throughput_ignores_a_single_stalled_step(clock):
    timer = train.StepTimer(warmup_steps=0)
    end_step(timer, clock, 1, 1.0)  # starts the clock
    for step, seconds in enumerate([0.5, 0.5, 12.0, 0.5, 0.4], start=2):
        end_step(timer, clock, step, seconds)
    assert timer.samples_per_second(global_batch=16) == pytest.approx(16 * 5 / 13.9, abs=1e-3)  # rounded
    assert timer.median_samples_per_second(global_batch=16) == pytest.approx(32.0)


def test_no_timed_step_gives_no_throughput(clock):
    timer = train.StepTimer(warmup_steps=2)
    end_step(timer, clock, 1, 1.0)
    end_step(timer, clock, 2, 1.0)
    assert timer.samples_per_second(global_batch=16) is None
    assert timer.median_samples_per_second(global_batch=16) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_times_and_deferred_logs_make_the_host_wait_for_nothing():
    """On a GPU the step timer marks a step's end and a step's log is queued without a synchronisation (CUDA's
    sync debug mode raises on any); both read their values later."""
    timer = train.StepTimer(warmup_steps=0)
    loss, grad_norm = torch.full((), 3.0, device="cuda"), torch.full((), 0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2):
            torch.cuda._sleep(1_000_000)
            timer.on_step_end(None, SimpleNamespace(global_step=step), None)
        pending = PendingLog.queued(2, 0.5, 1, loss, grad_norm, 1e-3)
        loss -= loss  # the Trainer resets its running loss right after
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert timer.steps == 1 and timer.seconds > 0
    assert pending.logs() == (3.0, {"loss": 3.0, "grad_norm": 0.5, "learning_rate": 1e-3})


def test_the_step_profiler_writes_tables_and_a_trace_of_its_window(tmp_path):
    profiler = train.StepProfiler(after=1, count=2, folder=tmp_path / "profile")
    for step in (1, 2, 3):
        if step > 1:
            torch.ones(64, 64) @ torch.ones(64, 64)
        profiler.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert profiler.profiler is None
    written = sorted(path.name for path in (tmp_path / "profile").iterdir())
    assert written == ["steps_2-3_rank0_device.txt", "steps_2-3_rank0_host.txt", "steps_2-3_rank0_trace.json"]
    assert "aten::mm" in (tmp_path / "profile" / "steps_2-3_rank0_host.txt").read_text()
    profiler = train.StepProfiler(after=1, count=5, folder=tmp_path / "cut")
    profiler.on_step_end(None, SimpleNamespace(global_step=1), None)
    profiler.on_train_end(None, SimpleNamespace(global_step=2), None)  # the run ended inside the window
    assert (tmp_path / "cut" / "steps_2-2_rank0_trace.json").exists()


@pytest.mark.parametrize("text", ["60", "a:3", "60:0", "-1:2", "60:3:1"])
def test_a_profile_window_is_two_whole_numbers(text):
    with pytest.raises(SystemExit):
        train.parse_args(["--train-meta", "t", "--val-meta", "v", "--model", "m", "--adapter-dir", "a",
                          "--checkpoint-dir", "c", "--log-dir", "l", "--curves-dir", "k", "--profile-steps", text])
    assert profile_window("60:3") == (60, 3)


def test_compiled_blocks_and_zero3_are_refused_together():
    cfg = train.load_params(Path(__file__).resolve().parents[1] / "params.yaml").train
    compiled = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, compile=True))
    train.check_combination(compiled)
    with pytest.raises(SystemExit, match="compile is not supported with deepspeed: zero3"):
        train.check_combination(dataclasses.replace(compiled, deepspeed="zero3"))


def test_a_negative_epoch_stop_is_refused_with_its_name():
    cfg = train.load_params(Path(__file__).resolve().parents[1] / "params.yaml").train
    train.check_combination(dataclasses.replace(cfg, stop_after_epochs=2))
    with pytest.raises(SystemExit, match="train: stop_after_epochs must be >= 0 .0: train every epoch., got -1"):
        train.check_combination(dataclasses.replace(cfg, stop_after_epochs=-1))


def datasets_with(*augment: bool) -> tuple:
    return (SimpleNamespace(samples=[SimpleNamespace(data_augment=flag) for flag in augment]),)


def test_workers_live_through_the_run_unless_a_sample_is_augmented():
    cfg = train.TrainConfig(dataloader_num_workers=2)
    assert train.keeps_workers(cfg, datasets_with(False, False))
    assert not train.keeps_workers(cfg, datasets_with(False, True))
    assert not train.keeps_workers(dataclasses.replace(cfg, dataloader_persistent_workers=False), datasets_with(False))
    assert not train.keeps_workers(dataclasses.replace(cfg, dataloader_num_workers=0), datasets_with(False))


def test_the_length_grouped_order_depends_on_the_seed_and_epoch_only():
    lengths = [10, 50, 20, 40, 30, 60, 70, 80]
    sampler = train.EpochSeededLengthSampler(2, lengths, seed=3)
    first = list(sampler)
    assert list(sampler) == first and sorted(first) == list(range(len(lengths)))
    orders = set()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.add(tuple(sampler))
    assert len(orders) > 1, "every epoch trained the same order"
    again = train.EpochSeededLengthSampler(2, lengths, seed=3)
    again.set_epoch(2)
    sampler.set_epoch(2)
    torch.manual_seed(123)  # the process's generator plays no part
    assert list(again) == list(sampler)
    assert list(train.EpochSeededLengthSampler(2, lengths, seed=4)) != first


def test_cuda_graphs_are_refused_with_every_unmet_need_named(monkeypatch):
    cfg = train.load_params(Path(__file__).resolve().parents[1] / "params.yaml").train
    graphs = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, compile=True, cuda_graphs=True),
                                 global_batch_size=16, per_device_batch_size=16, deepspeed="none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train.check_combination(graphs)
    uncompiled = dataclasses.replace(graphs, fast=dataclasses.replace(graphs.fast, compile=False,
                                                                      answer_logits_only=False),
                                     per_device_batch_size=8, grad_checkpoint=True)
    with pytest.raises(SystemExit, match=r"cuda_graphs needs compile: true; answer_logits_only: true; grad_checkpoint: "
                                         r"false; no gradient accumulation \(per_device_batch_size = "
                                         r"global_batch_size\)$"):
        train.check_combination(uncompiled)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="cuda_graphs needs deepspeed: none; one process; no gradient accumulation"):
        train.check_combination(dataclasses.replace(graphs, per_device_batch_size=4, deepspeed="zero1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="cuda_graphs needs a CUDA GPU$"):
        train.check_combination(graphs)


def test_the_flop_estimate_is_transformers_one_with_the_parameters_counted_once(tiny_native, monkeypatch):
    model = load_model(tiny_native)
    inputs = {"input_ids": torch.zeros(3, 40, dtype=torch.long)}
    trainer = SimpleNamespace(model=model, parameter_count=None)
    expected = Trainer.floating_point_ops(trainer, inputs)
    assert train.InternVLTrainer.floating_point_ops(trainer, inputs) == expected > 0
    monkeypatch.setattr(model, "num_parameters", lambda **kwargs: pytest.fail("counted again"))
    assert train.InternVLTrainer.floating_point_ops(trainer, inputs) == expected
    assert train.InternVLTrainer.floating_point_ops(trainer, {"pixel_values": torch.zeros(1)}) == 0
