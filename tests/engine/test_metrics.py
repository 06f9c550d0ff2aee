from __future__ import annotations

import json
import random

import pytest
from resume_trials import tensorboard_scalars

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


def _arrivals(count: int, seed: int) -> list[tuple[str, float, float]]:
    """Two models' busy intervals in report order: roughly chronological, locally shuffled,
    overlapping each other, some empty (as a pipeline reports them)."""
    rng = random.Random(seed)
    out = []
    clock = 0.0
    for _ in range(count):
        clock += rng.random() * 0.5
        start = clock + rng.choice((0.0, rng.random()))
        end = start + rng.choice((0.0, rng.random() * 2))
        out.append((rng.choice(("reference", "trainer")), start, end))
    for block in range(0, count, 8):  # reported up to 8 out of order
        part = out[block : block + 8]
        rng.shuffle(part)
        out[block : block + 8] = part
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_timers_match_the_exact_statistics(seed: int) -> None:
    arrivals = _arrivals(5000, seed)
    timers = Timers(["reference", "trainer"], keep=32)
    for name, start, end in arrivals:
        timers[name].add(start, end)
    exact = {n: [(s, e) for m, s, e in arrivals if m == n] for n in ("reference", "trainer")}
    assert timers.cutoff > 0  # it did fold
    for name, intervals in exact.items():
        assert timers[name].busy_seconds() == pytest.approx(total_length(intervals))
        assert timers[name].process_seconds() == pytest.approx(sum(e - s for s, e in intervals))
        assert timers[name].num_intervals == len(intervals)
    both = intersection_length(exact["reference"], exact["trainer"])
    assert timers.intersection_seconds("trainer", "reference") == pytest.approx(both)
    assert timers.overlap("reference", "trainer") == pytest.approx(
        both / total_length(exact["reference"])
    )
    starts = [s for _, s, e in arrivals if e > s]
    ends = [e for _, s, e in arrivals if e > s]
    assert timers.span() == (min(starts), max(ends))


def test_timers_keep_a_bounded_number_of_intervals() -> None:
    """The work of a summary is over the unfolded intervals only, and they stay below
    ``2 * keep + 1`` however many were added: the cost per episode end does not grow."""
    timers = Timers(["reference", "trainer"], keep=16)
    most = 0
    for name, start, end in _arrivals(20_000, seed=3):
        timers[name].add(start, end)
        most = max(most, sum(len(t.recent) for t in timers.models.values()))
    assert most <= 2 * 16 + 1
    assert timers["reference"].num_intervals + timers["trainer"].num_intervals == 20_000


def test_a_late_interval_counts_only_after_the_cutoff() -> None:
    timers = Timers(["a", "b"], keep=1)
    for t in range(4):
        timers["a"].add(10.0 * t, 10.0 * t + 1)
    cutoff = timers.cutoff
    assert cutoff == 20.0
    timers["a"].add(5.0, 25.0)  # started before the cutoff: [5, 20) is left out of the union
    assert timers["a"].busy_seconds() == pytest.approx(1 + 1 + 5 + 1)
    assert timers["a"].process_seconds() == pytest.approx(4 + 20)


def test_a_metrics_file_deleted_under_the_run_is_said_and_written_again(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    sink = MetricsSink(tmp_path / "run")
    sink.write("train", 1, {"loss": 1.0})
    shutil.rmtree(tmp_path / "run")  # a careless rm -rf of the output directory mid-run
    with caplog.at_level("WARNING", logger="chatlearn.engine"):
        sink.write("eval", 2, {"loss": 0.5})  # an eval record is flushed at once
        sink.write("train", 3, {"loss": 0.25})
        sink.flush()
    assert "was deleted while this run writes it" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [3]
    sink.close()


def test_tensorboard_hides_the_steps_a_resume_or_a_rewind_runs_again(tmp_path) -> None:
    pytest.importorskip("torch.utils.tensorboard")
    run = tmp_path / "run"
    sink = MetricsSink(run, tensorboard=True)  # a first start, killed after step 5
    for step in range(1, 6):
        sink.write("train", step, {"loss": float(step)})
    sink.flush()  # what a killed coordinator flushed (its records reach the disk as they come)
    # the next start resumes from the checkpoint of step 3: steps 4 and 5 run again
    sink = MetricsSink(run, tensorboard=True, first_step=4)
    for step in range(4, 8):
        sink.write("train", step, {"loss": step + 0.5})
    # a trainer restart in this run goes back to step 6
    sink.rewind_tensorboard(6)
    for step in range(6, 9):
        sink.write("train", step, {"loss": step + 0.25})
    sink.close()
    assert tensorboard_scalars(run / "tensorboard", "train/loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.5),
        (5, 5.5),
        (6, 6.25),
        (7, 7.25),
        (8, 8.25),
    ]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 3


def test_a_new_start_hides_every_event_of_a_start_without_a_checkpoint(tmp_path) -> None:
    pytest.importorskip("torch.utils.tensorboard")
    run = tmp_path / "run"
    sink = MetricsSink(run, tensorboard=True)
    for step in range(0, 4):
        sink.write("eval" if step == 0 else "train", step, {"loss": float(step)})
    sink.close()
    sink = MetricsSink(run, tensorboard=True)  # started over: first_step 0
    sink.write("eval", 0, {"loss": 10.0})
    sink.write("train", 1, {"loss": 11.0})
    sink.close()
    assert tensorboard_scalars(run / "tensorboard", "train/loss") == [(1, 11.0)]
    assert tensorboard_scalars(run / "tensorboard", "eval/loss") == [(0, 10.0)]


def test_a_full_disk_under_metrics_jsonl_is_one_line(tmp_path) -> None:
    import errno

    from chatlearn.config.errors import StorageError

    class FullDisk:
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = write

    sink = MetricsSink(tmp_path / "run")
    sink._file.close()
    sink._file = FullDisk()  # type: ignore[assignment]
    with pytest.raises(StorageError) as raised:
        sink.write("eval", 0, {"loss": 1.0})
    line = raised.value.one_line()
    assert line.startswith(f"{sink.path}: writing the run's metrics failed: No space left on")
    assert "MiB free of" in line and "run the same command again" in line


def test_only_storage_failures_are_storage_problems(tmp_path) -> None:
    import errno

    from chatlearn.config.errors import storage_problem

    assert "Disk quota exceeded" in storage_problem(
        OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path
    )
    wrapped = RuntimeError("PytorchStreamWriter failed writing file data/0")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert storage_problem(wrapped, tmp_path).startswith("Read-only file system (")
    # a module's own bug, with room on the disk, is shown as it is
    assert storage_problem(ValueError("a bug"), tmp_path) is None
    assert storage_problem(OSError(errno.ENOENT, "No such file"), tmp_path) is None


def test_restart_records_are_found_a_line_at_a_time(tmp_path) -> None:
    """A resume counts the run's restarts in a long run's metrics.jsonl without holding the
    file or its records (400k records cost 1.3 GB read whole)."""
    import tracemalloc

    from chatlearn.engine.engine import _restarts_recorded

    path = tmp_path / "metrics.jsonl"
    step = json.dumps({"kind": "train", "step": 1, "loss": 0.5, "note": "x" * 200}) + "\n"
    with path.open("w") as f:
        for i in range(60_000):  # ~15 MB
            f.write(step)
            if i in (10, 30_000):
                f.write(json.dumps({"kind": "restart", "step": i, "restarts": i // 10_000 + 1}))
                f.write("\n")
        f.write('{"kind": "restart", "restarts": 9')  # torn by a crash: not counted
    (tmp_path / "metrics.superseded.jsonl").write_bytes(
        b'\xff\xfe{"kind": "restart"}\n{"kind": "restart", "restarts": 2}\n'
    )
    tracemalloc.start()
    try:
        assert _restarts_recorded(path) == 4
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak


def test_an_event_file_from_a_clock_ahead_is_not_waited_for(tmp_path) -> None:
    from chatlearn.engine.metrics import _tensorboard_wait

    ahead = int(__import__("time").time()) + 3600
    (tmp_path / f"events.out.tfevents.{ahead}.host.1.0").write_bytes(b"")
    assert _tensorboard_wait(tmp_path) == 1.0
    assert _tensorboard_wait(tmp_path / "none") == 0.0
