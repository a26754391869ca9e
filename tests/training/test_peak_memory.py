import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from alpaca_qlora.training.peak_memory import LoadingPeak, peak_memory, per_process
from support import ROOT


def test_the_host_peak_grows_with_memory_the_process_touched():
    # more than the peak so far (imports may already have peaked high), so the peak must rise past it
    script = ("import torch; from alpaca_qlora.training.peak_memory import host_peak_gib; before = host_peak_gib(); "
              "block = torch.ones(int((before + 0.5) * 2**30) // 8, dtype=torch.float64); "
              "print(before, host_peak_gib(), float(block[0]))")
    before, after, _ = map(float, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                                 check=True, cwd=ROOT).stdout.split())
    assert after >= before + 0.25


def test_outside_a_process_group_each_figure_is_this_process_alone():
    assert per_process(1.23456) == [1.235]


def test_in_a_process_group_each_figure_is_gathered_in_rank_order(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert per_process(2.0) == [2.0]
    finally:
        dist.destroy_process_group()


def test_on_cpu_the_peak_is_the_largest_process_rss_and_no_gpu_figure_is_claimed():
    loading = LoadingPeak("cpu")
    loading.on_train_begin(None, None, None)
    figures = peak_memory("cpu", loading)
    assert figures["peak_memory_kind"] == "process_max_rss"
    assert figures["peak_memory_gib"] == max(figures["host_peak_memory_gib_per_process"]) > 0
    assert loading.peak_gib is None
    assert not any(key.startswith(("load_peak", "peak_memory_gib_per")) for key in figures)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the loading peak is a CUDA allocator figure")
def test_on_cuda_the_loading_peak_is_kept_apart_from_training():
    loading = LoadingPeak("cuda")
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    loading.on_train_begin(None, None, None)
    del held
    figures = peak_memory("cuda", loading)
    assert figures["load_peak_memory_gib_per_process"][0] >= 0.25
    assert figures["peak_memory_gib"] < figures["load_peak_memory_gib_per_process"][0]
