"""`flexmoe bench gpu`: without CUDA it measures nothing and its result file says so; its
measuring code (step time, counted FLOPs, MFU, peak memory, selection, swap, round) runs on the
CPU at a tiny shape."""

from __future__ import annotations

import pytest
import torch

import benchmarks.bench_gpu as bench_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_skips_and_says_no_gpu_was_available(tmp_path, capsys):
    bench_gpu.main(tmp_path)
    assert capsys.readouterr().out.startswith("bench gpu: skipped: no CUDA device")
    (result,) = tmp_path.glob("gpu-*.md")
    text = result.read_text()
    assert "**No GPU was available**" in text and "TFLOP/s" not in text.split("What it measures")[0]


@pytest.mark.slow
def test_cpu_smoke_measures_every_method():
    rows = dict(bench_gpu.cpu_smoke())
    assert set(rows) == {label for label, _ in bench_gpu.METHODS}
    for label, m in rows.items():
        assert m.tokens_per_second > 0 and m.flops_per_step > 0 and 0 < m.mfu < 1
        assert m.peak_bytes > 0 and m.swap_seconds > 0 and m.round_seconds > m.clients * m.swap_seconds
        assert (m.selection_seconds is not None) == (label == "FLEx")
    # LoRA on the experts trains more, so a step counts more FLOPs than attention LoRA alone
    assert rows["FedAvg, LoRA attention+experts"].flops_per_step > rows["FedAvg, LoRA attention"].flops_per_step
