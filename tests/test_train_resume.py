"""Resuming a training run on another process count: ZeRO state through DeepSpeed's universal form, RNG states
for every process, the corrections ZeRO-3's universal load needs."""

from types import SimpleNamespace

import pytest

import torch

from internvl_sft.reshard import prepare_resume, restore_groups, write_rng_states, zero_partitions


def zero_checkpoint(root, ranks: int):
    step = root / "checkpoint-33" / "global_step33"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    for rank in range(ranks):
        (step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    return step.parent


def test_partitions_are_counted_from_the_optimizer_state_files(tmp_path):
    assert zero_partitions(zero_checkpoint(tmp_path, 2)) == 2


def test_a_zero_checkpoint_on_the_same_process_count_needs_nothing(tmp_path):
    assert not prepare_resume(SimpleNamespace(), zero_checkpoint(tmp_path, 2), processes=2, zero="zero3")


def test_a_plain_checkpoint_resumes_on_any_process_count(tmp_path):
    plain = tmp_path / "checkpoint-8"
    plain.mkdir()
    assert not prepare_resume(SimpleNamespace(), plain, processes=4, zero="none")


def test_zero3_groups_get_their_own_settings_and_step_counters_back():
    shared = torch.tensor(3.0)  # DeepSpeed's ZeRO-3 universal load: one counter, the first group's settings
    first, second = torch.zeros(2), torch.zeros(2)
    inner = SimpleNamespace(state={first: {"step": shared}, second: {"step": shared}})
    optimizer = SimpleNamespace(optimizer=inner, param_groups=[{"params": [], "weight_decay": 0.01, "lr": 1.0},
                                                               {"params": [], "weight_decay": 0.01, "lr": 1.0}])
    restore_groups(optimizer, [{"weight_decay": 0.01, "lr": 0.5}, {"weight_decay": 0.0, "lr": 0.5}], "checkpoint-3")
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    assert all(group["lr"] == 0.5 and group["params"] == [] for group in optimizer.param_groups)
    steps = [state["step"] for state in inner.state.values()]
    assert steps[0] is not steps[1] and all(float(step) == 3.0 for step in steps)
    steps[0].add_(1)
    assert float(steps[1]) == 3.0


def test_a_different_number_of_groups_is_an_error():
    optimizer = SimpleNamespace(optimizer=SimpleNamespace(state={}), param_groups=[{"params": []}])
    with pytest.raises(RuntimeError, match="checkpoint-3: 2 optimizer parameter groups saved, 1 in this run"):
        restore_groups(optimizer, [{}, {}], "checkpoint-3")


@pytest.mark.parametrize(("saved", "processes", "expected"), [
    (["rng_state_0.pth", "rng_state_1.pth"], 1, {"rng_state.pth": "rank 0"}),
    (["rng_state.pth"], 3, {"rng_state_0.pth": "rank 0", "rng_state_1.pth": "rank 0", "rng_state_2.pth": "rank 0"}),
    (["rng_state_0.pth", "rng_state_1.pth"], 2, {}),
])
def test_every_process_finds_an_rng_state_and_saved_ones_are_kept(tmp_path, saved, processes, expected):
    for rank, name in enumerate(saved):
        (tmp_path / name).write_text(f"rank {rank}")
    write_rng_states(tmp_path, processes)
    for name, text in expected.items():
        assert (tmp_path / name).read_text() == text
    for rank, name in enumerate(saved):
        assert (tmp_path / name).read_text() == f"rank {rank}"
