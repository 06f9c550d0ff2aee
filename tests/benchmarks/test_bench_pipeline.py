"""`chatlearn bench pipeline --soak --json` runs end to end and reports every figure.

A smoke test of the program with a small count, not of the machine's speed: the soak's targets
(issue 17) are checked by running the benchmark itself (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chatlearn.benchmarks.pipeline import RssSampler, Sample, soak_figures


@pytest.mark.timeout(60)
def test_bench_pipeline_soak_json_has_every_figure() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "chatlearn.cli", "bench", "pipeline", "--soak", "--json"]
        + ["--micro-batches", "600", "--soak-episode", "200", "--soak-window", "64"],
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout)
    assert result["micro_batches"] == 600 and result["episodes"] == 3
    for key in (
        "first_window_per_s",
        "last_window_per_s",
        "total_per_s",
        "last_vs_first",
        "rss_start_mib",
        "rss_end_mib",
        "episode_stats_ms_first",
        "episode_stats_ms_last",
        "episode_stats_ms_max",
        "final_stats_ms",
    ):
        assert result[key] > 0, key
    # a run this short may fall between two samples of the CPU times
    for key in ("rss_growth_pct", "coordinator_cpu_us", "actors_cpu_us"):
        assert key in result, key
    # no-op steps are cheap: they travel several to a call
    assert 0 < result["train_calls"] < 600 and 0 < result["forward_orders"] < 600
    assert result["window_s"] == pytest.approx(result["duration_s"] / 10)


def test_soak_figures_take_the_first_and_last_windows() -> None:
    # 10 per second for 100 s, then 5 per second for the last 100 s
    times = [i / 10 for i in range(1000)] + [100 + i / 5 for i in range(500)]
    rss = RssSampler()
    rss.samples = [Sample(t, 100 + t, t / 100, t / 50) for t in range(0, 201, 10)]
    figures = soak_figures(times, rss, window=15)
    assert figures["window_s"] == 15
    assert figures["first_window_per_s"] == pytest.approx(10, rel=0.02)
    assert figures["last_window_per_s"] == pytest.approx(5, rel=0.02)
    assert figures["total_per_s"] == pytest.approx(1499 / 199.8)
    assert figures["last_vs_first"] == pytest.approx(0.5, rel=0.03)
    # RSS after the first window (the sample at 10 s) and at the last micro-batch (190 s)
    assert figures["rss_start_mib"] * 2**20 == 110
    assert figures["rss_end_mib"] * 2**20 == 290
    assert figures["rss_growth_pct"] == pytest.approx(100 * 180 / 110)
    # a run shorter than 10 windows: the first and last tenth
    assert soak_figures(times, window=60)["window_s"] == pytest.approx(19.98)
    with pytest.raises(ValueError, match="at least 2"):
        soak_figures([1.0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("forward_cost", "train_cost"), [(0, 0), (0.002, 0)])
def test_bench_pipeline_compares_the_schedules(forward_cost: float, train_cost: float) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "chatlearn.cli", "bench", "pipeline", "--json"]
        + ["--forward-cost", str(forward_cost), "--train-cost", str(train_cost)]
        + ["--episodes", "1", "--sample-per-episode", "16"],
        capture_output=True,
        text=True,
        timeout=55,
    )
    # both costs 0 ended in a ZeroDivisionError after both runs
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout)
    assert result["ours_samples_per_s"] > 0 and result["chatlearn_schedule_samples_per_s"] > 0
    if forward_cost == train_cost == 0:  # the runtime's overhead alone: no ideal figure
        assert result["ideal_samples_per_s"] is None and result["ratio_vs_ideal"] is None
    else:
        assert result["ideal_samples_per_s"] == pytest.approx(4 / forward_cost)
        assert result["ratio_vs_ideal"] > 0
    # its own settings are not unknown keys of the config, and each run has its own output
    # directory (the second one moved the first one's metrics aside as an earlier start's)
    assert "not a known key" not in completed.stderr
    assert "superseded" not in completed.stderr and "earlier start" not in completed.stderr
