from __future__ import annotations

import json

import pytest

from chatlearn.engine.metrics import (
    MetricsSink,
    Timers,
    intersection_length,
    merge_intervals,
    read_metrics,
    total_length,
)


def test_merge_and_lengths() -> None:
    assert merge_intervals([(3, 4), (0, 1), (0.5, 2), (5, 5)]) == [(0, 2), (3, 4)]
    assert total_length([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3.0)
    assert intersection_length([(0, 2), (3, 6)], [(1, 4), (5, 10)]) == pytest.approx(3.0)
    assert intersection_length([], [(0, 1)]) == 0.0


def test_overlap_fraction() -> None:
    timers = Timers(["reference", "trainer"])
    timers["reference"].add(0.0, 1.0)
    timers["reference"].add(2.0, 3.0)
    timers["trainer"].add(0.5, 2.5)
    # reference busy 2 s; hidden behind training: [0.5, 1] and [2, 2.5] = 1 s
    assert timers.overlap("reference", "trainer") == pytest.approx(0.5)
    assert Timers(["a", "b"]).overlap("a", "b") == 0.0


def test_sink_appends_json_lines(tmp_path) -> None:
    sink = MetricsSink(tmp_path / "run")
    sink.write("train", 1, {"loss": 0.5, "n": 3}, episode=0)
    sink.write("train", 2, {"loss": float("nan")})
    sink.close()
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a crash mid-write
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.5 and records[0]["episode"] == 0
    assert json.dumps(records[0])
