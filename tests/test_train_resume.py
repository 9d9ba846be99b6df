"""Resuming a training run: DeepSpeed ZeRO checkpoints need the process count that wrote them."""

import pytest

from internvl_sft.stages.train import check_zero_partitions, zero_partitions


def zero_checkpoint(root, ranks: int):
    step = root / "checkpoint-33" / "global_step33"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    for rank in range(ranks):
        (step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    return step.parent


def test_partitions_are_counted_from_the_optimizer_state_files(tmp_path):
    assert zero_partitions(zero_checkpoint(tmp_path, 2)) == 2


def test_a_zero_checkpoint_resumes_on_the_same_process_count(tmp_path):
    check_zero_partitions(zero_checkpoint(tmp_path, 2), processes=2)


def test_a_plain_checkpoint_resumes_on_any_process_count(tmp_path):
    plain = tmp_path / "checkpoint-8"
    plain.mkdir()
    check_zero_partitions(plain, processes=4)


def test_another_process_count_is_refused_with_what_to_do(tmp_path):
    checkpoint = zero_checkpoint(tmp_path, 1)
    with pytest.raises(SystemExit, match=r"checkpoint-33: written by 1 DeepSpeed ZeRO process\(es\), but this run has 2"
                                         r".*GPUS=1"):
        check_zero_partitions(checkpoint, processes=2)
