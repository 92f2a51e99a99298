import json

import pytest
import torch

from diffusers_uncertainty.training.performance import ThroughputMeter, adamw_fused_kwargs


def test_throughput_meter_counts_only_steps_after_warmup(tmp_path):
    meter = ThroughputMeter("cpu", samples_per_step=8, warmup_steps=3)
    for _ in range(3):
        meter.step()
    assert meter.result() is None  # warm-up only
    for _ in range(5):
        meter.step()
    result = meter.result()
    assert result["measured_steps"] == 5 and result["warmup_steps"] == 3
    assert result["samples_per_second"] == pytest.approx(8 * result["steps_per_second"])
    line = meter.write(tmp_path, stage="unit")
    record = json.loads((tmp_path / "throughput.json").read_text())
    assert record["stage"] == "unit" and record["measured_steps"] == 5
    assert line.startswith("Steady-state throughput: ") and "5 steps after 3 warm-up steps" in line


def test_throughput_meter_without_enough_steps_writes_null(tmp_path):
    meter = ThroughputMeter("cpu", samples_per_step=2, warmup_steps=10)
    meter.step()
    assert "not measured" in meter.write(tmp_path)
    assert json.loads((tmp_path / "throughput.json").read_text())["steps_per_second"] is None


def test_throughput_meter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`samples_per_step` must be a positive integer, but got 0"):
        ThroughputMeter("cpu", samples_per_step=0)
    with pytest.raises(ValueError, match="`warmup_steps` must be >= 0, but got -1"):
        ThroughputMeter("cpu", samples_per_step=1, warmup_steps=-1)


def test_fused_adamw_only_for_cuda_parameters():
    assert adamw_fused_kwargs([torch.nn.Parameter(torch.zeros(2))]) == {}
    assert adamw_fused_kwargs([]) == {}
