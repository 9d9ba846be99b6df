"""Resuming a training run on another process count: ZeRO-1/2 state through DeepSpeed's universal form,
RNG states for every process, ZeRO-3 refused with what to do."""

from types import SimpleNamespace

import pytest

from internvl_sft.reshard import prepare_resume, write_rng_states, zero_partitions


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


def test_zero3_on_another_process_count_is_refused_with_what_to_do(tmp_path):
    checkpoint = zero_checkpoint(tmp_path, 1)
    with pytest.raises(SystemExit, match=r"checkpoint-33: written by 1 DeepSpeed ZeRO-3 process\(es\), but this run "
                                         r"has 2.*GPUS=1"):
        prepare_resume(SimpleNamespace(), checkpoint, processes=2, zero="zero3")


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
