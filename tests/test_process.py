"""Process-group teardown at the end of a training process."""

from __future__ import annotations

import torch
import torch.distributed as dist

from internvl_sft.process import leave_process_group


def test_leave_process_group_destroys_the_group_after_its_work(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    total = torch.ones(3)
    dist.all_reduce(total)
    leave_process_group()
    assert not dist.is_initialized()
    assert total.tolist() == [1.0, 1.0, 1.0]


def test_leave_process_group_outside_a_group_does_nothing():
    assert not dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
