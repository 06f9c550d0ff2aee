"""`chatlearn bench memory`: the JSON of a real run on a tiny model, and the measuring parts.

The 0.49B figures themselves (FSDP2 and LoRA peaks against DDP's) are in BENCHMARKS.md; the run
takes minutes and most of the machine's memory, so it is not a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from chatlearn.benchmarks.memory import (
    LAYOUTS,
    TorchPeak,
    layout_config,
    num_parameters,
    ratios,
    running_peaks,
    summarize,
)

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "vocab_size": 1000,
}


def _options(**overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        **TINY,
        "seq_len": 64,
        "pairs": 2,
        "steps": 1,
        "warmup": 1,
        "lora_rank": 16,
        "mixed_precision": "no",
        "logps_chunk_size": None,
        "device": "cpu",
        "cores": 2,
    }
    return {**options, **overrides}


def test_bench_memory_json_on_a_tiny_model() -> None:
    # FSDP2 alone: the layout with several trainer processes (the others only change model_args)
    command = [sys.executable, "-m", "chatlearn.cli", "bench", "memory", "--json"]
    for key, value in {**TINY, "seq_len": 64, "steps": 1, "warmup": 1}.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(
        [*command, "--layouts", "fsdp2"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["num_parameters"] == num_parameters(_options())
    fsdp2 = result["layouts"]["fsdp2"]
    assert fsdp2["trainer_processes"] == 2 and len(fsdp2["trainer_rss_bytes"]) == 2
    assert fsdp2["trainer_peak_rss_bytes"] == max(fsdp2["trainer_rss_bytes"])
    assert fsdp2["trainer_peak_torch_bytes"] == max(fsdp2["trainer_torch_bytes"])
    for key in ("samples_per_s", "tokens_per_s", "reference_peak_rss_bytes"):
        assert fsdp2[key] > 0, key
    assert fsdp2["tokens_per_s"] == pytest.approx(fsdp2["samples_per_s"] * 2 * 64)
    # every rank's peak holds at least its shard of parameters, gradients and optimizer state
    for torch_bytes, report in zip(
        fsdp2["trainer_torch_bytes"], fsdp2["trainer_memory_report"], strict=True
    ):
        state = report["param_bytes"] + report["grad_bytes"] + report["optimizer_bytes"]
        assert state < torch_bytes < 100 * state
    assert 0 < fsdp2["trainer_step_peak_torch_bytes"] <= fsdp2["trainer_peak_torch_bytes"]
    assert fsdp2["trainer_peak_rss_bytes"] > fsdp2["trainer_peak_torch_bytes"]


def test_torch_peak_sees_allocations_between_start_and_stop() -> None:
    import torch

    peak = TorchPeak()
    peak.start()
    big = torch.empty(8 * 2**20, dtype=torch.uint8)  # before the steps: only the whole peak
    del big
    kept = torch.empty(2**20, dtype=torch.uint8)
    with peak.step():
        step = torch.empty(3 * 2**20, dtype=torch.uint8)
        del step
    peak.stop()
    later = torch.empty(64 * 2**20, dtype=torch.uint8)  # after stop: not counted
    assert 8 * 2**20 <= peak.peak_bytes() < 9 * 2**20
    assert 4 * 2**20 <= peak.step_peak_bytes() < 5 * 2**20  # kept + step
    del kept, later


def test_running_peaks_order_by_time_and_open_the_window_with_what_is_live() -> None:
    deltas = [(3, -5), (1, 10), (2, 4), (4, 2), (5, -8), (6, 1)]
    # totals in time order: 10, 14, 9, 11, 3, 4
    assert running_peaks(deltas, None) == (14, 0)
    assert running_peaks(deltas, 4) == (14, 11)  # 9 live at time 4, then 11
    assert running_peaks(deltas, 9) == (14, 4)  # nothing after 6: what is live
    assert running_peaks([], None) == (0, 0)


def test_the_default_model_is_qwen2_5_0_5b_shaped() -> None:
    defaults = {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_layers": 24,
        "num_heads": 14,
        "num_kv_heads": 2,
        "vocab_size": 151936,
    }
    assert num_parameters(defaults) == 494_032_768  # Qwen2.5-0.5B's count, tied embeddings


def test_layouts_differ_only_in_the_trainer() -> None:
    configs = {name: layout_config(name, _options(), "/tmp/out") for name in LAYOUTS}
    references = [c["models"]["reference"] for c in configs.values()]
    assert all(r == references[0] for r in references)
    fsdp2 = configs["fsdp2"]
    trainer = fsdp2["models"]["policy_trainer"]
    assert (trainer["num_cpu"], trainer["cpu_per_process"]) == (2, 1)
    assert trainer["model_args"]["parallel"] == "fsdp"
    assert fsdp2["runtime"]["train_micro_batch_size"] == 1  # 2 pairs a step over 2 ranks
    lora = configs["lora"]["models"]["policy_trainer"]["model_args"]
    assert lora["lora"]["r"] == 16 and lora["parallel"] == "ddp"
    assert "lora" not in configs["ddp"]["models"]["policy_trainer"]["model_args"]


def _process(rss: int, torch_bytes: int, ends: list[float]) -> dict[str, Any]:
    return {
        "peak_rss_bytes": rss,
        "peak_torch_bytes": torch_bytes,
        "step_peak_torch_bytes": torch_bytes // 2,
        "step_ends": ends,
    }


def test_summary_takes_the_largest_process_and_the_slowest_rank() -> None:
    figures = {
        "reference": [_process(5, 3, [0.5, 1.5, 2.5])],
        "policy_trainer": [_process(10, 4, [1.0, 2.0, 3.0]), _process(12, 2, [1.0, 2.5, 5.0])],
    }
    summary = summarize(figures, _options(warmup=1))
    assert summary["trainer_peak_rss_bytes"] == 12 and summary["trainer_peak_torch_bytes"] == 4
    assert summary["trainer_step_peak_torch_bytes"] == 2
    assert summary["reference_peak_rss_bytes"] == 5
    # step ends 1.0, 2.5, 5.0: 2 timed steps of 2 pairs in 4 s
    assert summary["samples_per_s"] == pytest.approx(1.0)
    assert summary["tokens_per_s"] == pytest.approx(128.0)
    layouts = {
        "ddp": {"trainer_peak_rss_bytes": 10, "trainer_peak_torch_bytes": 8},
        "lora": {"trainer_peak_rss_bytes": 4, "trainer_peak_torch_bytes": 2},
    }
    assert ratios(layouts) == {"lora_vs_ddp_rss": 0.4, "lora_vs_ddp_torch": 0.25}
