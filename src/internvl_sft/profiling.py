"""torch.profiler, set up and summarised one way for the step benchmark (`bench.py`) and the train stage
(`--profile-steps`)."""

from __future__ import annotations

import argparse

import torch

TABLE_ROWS = 80
NAME_WIDTH = 90


def step_profiler(on_gpu: bool) -> torch.profiler.profile:
    """A profiler of host activity, and of the GPU's when the work runs on one."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def operator_table(profiler: torch.profiler.profile, by: str, on_gpu: bool) -> str:
    """The profiled operators sorted `by` "device" (their own GPU time; own CPU time without a GPU) or "host"
    (CPU time, what they called included)."""
    device = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    sort_by = {"device": device, "host": "cpu_time_total"}[by]
    return profiler.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=NAME_WIDTH)


def profile_window(text: str) -> tuple[int, int]:
    """`AFTER:COUNT` of --profile-steps: COUNT optimizer steps after step AFTER."""
    after, _, count = text.partition(":")
    if not (after.isdigit() and count.isdigit() and int(count) > 0):
        raise argparse.ArgumentTypeError(f"expected AFTER:COUNT, two whole numbers, COUNT above 0 (e.g. 60:3); "
                                         f"got {text!r}")
    return int(after), int(count)
