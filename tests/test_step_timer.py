"""The training-only throughput of the train stage: evaluations, saves and warm-up steps are left out."""

from types import SimpleNamespace

import pytest

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


def test_no_timed_step_gives_no_throughput(clock):
    timer = train.StepTimer(warmup_steps=2)
    end_step(timer, clock, 1, 1.0)
    end_step(timer, clock, 2, 1.0)
    assert timer.samples_per_second(global_batch=16) is None
