"""Run observability: busy intervals per model, the measured overlap, and the metrics sinks.

Runs in the coordinator.

The coordinator collects, for every actor call it makes on the pipeline's hot path, the interval
(wall-clock seconds, ``time.time()``) during which the actor was computing. From those intervals it
derives per-model busy/idle time and the *overlap*: the fraction of reference busy time that was
hidden behind trainer busy time. Metrics are appended as JSON lines to
``output_dir/exp_name/metrics.jsonl`` and, when enabled and installed, to TensorBoard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from chatlearn.config.errors import storage_error

logger = logging.getLogger("chatlearn.engine")

Interval = tuple[float, float]


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted union of half-open intervals (empty or inverted ones are dropped)."""
    merged: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def total_length(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in merge_intervals(intervals))


def intersection_length(a: Iterable[Interval], b: Iterable[Interval]) -> float:
    """Length of (union of a) ∩ (union of b), by a linear sweep over both merged lists."""
    left, right = merge_intervals(a), merge_intervals(b)
    i = j = 0
    overlap = 0.0
    while i < len(left) and j < len(right):
        start = max(left[i][0], right[j][0])
        end = min(left[i][1], right[j][1])
        if end > start:
            overlap += end - start
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return overlap


class ModelTimer:
    """Busy intervals of one model (all its processes) plus its time spent waiting for data.

    Only the recent intervals are kept (at most about ``2 * Timers.keep`` over all models); the
    older ones are folded into running totals by the owning :class:`Timers`, so a long run costs
    the same per interval and per summary at its end as at its start.
    """

    __slots__ = (
        "name",
        "wait_seconds",
        "num_intervals",
        "first_start",
        "last_end",
        "recent",
        "folded_busy",
        "_process_seconds",
        "_owner",
    )

    def __init__(self, name: str, owner: Timers | None = None) -> None:
        self.name = name
        self.wait_seconds = 0.0
        self.num_intervals = 0  # every interval added, folded or not
        self.first_start = math.inf
        self.last_end = -math.inf
        self.recent: list[Interval] = []  # not folded yet; all start at or after the cutoff
        self.folded_busy = 0.0  # union length of the folded intervals (all before the cutoff)
        self._process_seconds = 0.0
        self._owner = owner

    def add(self, start: float, end: float) -> None:
        self.num_intervals += 1
        if end <= start:
            return
        self._process_seconds += end - start
        self.first_start = min(self.first_start, start)
        self.last_end = max(self.last_end, end)
        cutoff = -math.inf if self._owner is None else self._owner.cutoff
        if end <= cutoff:
            return  # reported after ``keep`` newer intervals began: its union share is lost
        self.recent.append((max(start, cutoff), end))
        if self._owner is not None:
            self._owner._added()

    def busy_seconds(self) -> float:
        """Wall time during which at least one process of the model was computing."""
        return self.folded_busy + total_length(self.recent)

    def process_seconds(self) -> float:
        """Compute time summed over processes (can exceed the wall time with several replicas)."""
        return self._process_seconds


class Timers:
    """Per-model timers over a window of the run (an episode, or the whole run).

    Statistics are incremental: once more than ``2 * keep`` intervals are unfolded, every
    interval that starts before the ``keep``-th newest start (the *cutoff*) is folded into each
    model's busy total and each pair's overlap total, and dropped. The figures are exact as
    long as an interval is reported before ``keep`` newer ones have started (on the pipeline's
    path they are reported as their call returns); the part before the cutoff of a later one is
    left out of the busy and overlap totals (not of ``process_seconds``).
    """

    def __init__(self, names: Iterable[str], *, keep: int = 1024) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self.cutoff = -math.inf
        self.models = {name: ModelTimer(name, self) for name in names}
        self.started = time.time()
        self._num_recent = 0
        self._folded_overlap: dict[tuple[str, str], float] = {}

    def __getitem__(self, name: str) -> ModelTimer:
        return self.models[name]

    def _added(self) -> None:
        self._num_recent += 1
        if self._num_recent > 2 * self.keep:
            self._fold()

    def _fold(self) -> None:
        """Fold every interval before the ``keep``-th newest start into the totals."""
        starts = sorted(start for timer in self.models.values() for start, _ in timer.recent)
        cutoff = starts[-self.keep]
        before: dict[str, list[Interval]] = {}
        for name, timer in self.models.items():
            before[name] = merge_intervals((s, min(e, cutoff)) for s, e in timer.recent)
            timer.folded_busy += sum(e - s for s, e in before[name])
            timer.recent = [(max(s, cutoff), e) for s, e in timer.recent if e > cutoff]
        names = list(self.models)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                shared = intersection_length(before[a], before[b])
                self._folded_overlap[a, b] = self._folded_overlap.get((a, b), 0.0) + shared
        self.cutoff = cutoff
        self._num_recent = sum(len(timer.recent) for timer in self.models.values())

    def intersection_seconds(self, a: str, b: str) -> float:
        """Wall time during which both ``a`` and ``b`` were busy."""
        folded = self._folded_overlap.get((a, b), self._folded_overlap.get((b, a), 0.0))
        return folded + intersection_length(self.models[a].recent, self.models[b].recent)

    def overlap(self, hidden: str, behind: str) -> float:
        """Fraction of ``hidden``'s busy time during which ``behind`` was busy too (0 if idle)."""
        total = self.models[hidden].busy_seconds()
        if total <= 0.0:
            return 0.0
        return self.intersection_seconds(hidden, behind) / total

    def span(self) -> tuple[float, float] | None:
        """(first start, last end) over every model's intervals; None before the first one."""
        first = min(timer.first_start for timer in self.models.values())
        last = max(timer.last_end for timer in self.models.values())
        return (first, last) if last > first else None

    def summary(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        span = max(now - self.started, 1e-9)
        out: dict[str, float] = {"span_s": span}
        for name, timer in self.models.items():
            busy = timer.busy_seconds()
            out[f"time/{name}/busy_s"] = busy
            out[f"time/{name}/idle_s"] = max(0.0, span - busy)
            out[f"time/{name}/wait_data_s"] = timer.wait_seconds
        return out


class MetricsSink:
    """Appends metrics to ``metrics.jsonl`` and, optionally, TensorBoard event files."""

    def __init__(
        self, directory: str | Path, *, tensorboard: bool = False, first_step: int = 0
    ) -> None:
        """``first_step``: the first step this run writes. Earlier starts of the run may have
        written TensorBoard events from there on (steps that run again after a resume): they
        are hidden, as metrics.jsonl loses their records (`rewind_tensorboard`)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._flushed = 0.0
        self._tb_flushed = 0.0
        self._tb: Any = None
        if tensorboard:
            self._tb = _open_tensorboard(self.directory / "tensorboard", first_step)

    #: seconds between flushes while records come fast (steps of a few milliseconds)
    flush_interval = 0.2
    #: seconds between flushes of the TensorBoard event file (and at every checkpoint)
    tensorboard_flush_interval = 5.0

    def write(self, kind: str, step: int, values: Mapping[str, Any], **extra: Any) -> None:
        now = time.time()
        record: dict[str, Any] = {"kind": kind, "step": step, "time": now, **extra}
        record.update({key: _plain(value) for key, value in values.items()})
        try:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
        except OSError as exc:
            self._raise_storage_error(exc)
        # Every record of a run of slow steps is on disk at once; fast ones are flushed in
        # batches (a flush per record was a tenth of the coordinator's time per 1-sample step).
        if kind != "train" or now - self._flushed >= self.flush_interval:
            self.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            self._raise_storage_error(exc)
        now = time.time()
        # TensorBoard's own flush comes every two minutes; a flush waits for its writer's
        # queue, so every few seconds rather than at each of these (every 0.2 s)
        if self._tb is not None and now - self._tb_flushed >= self.tensorboard_flush_interval:
            self._tb.flush()
            self._tb_flushed = now
        self._flushed = now
        if os.fstat(self._file.fileno()).st_nlink == 0:
            self._reopen()

    def _raise_storage_error(self, exc: OSError) -> NoReturn:
        """A full disk (or quota, or read-only mount) under metrics.jsonl as one line."""
        error = storage_error(exc, self.path, "writing the run's metrics")
        if error is None:
            raise exc
        raise error from exc

    def _reopen(self) -> None:
        """The file was deleted under the run (its directory removed, say): the records went
        to a file no one can read. Say so, and write a new one from here on."""
        logger.warning(
            "%s was deleted while this run writes it: the records before this one are lost, "
            "the next ones go to a new file",
            self.path,
        )
        self._file.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def sync(self) -> None:
        """Flush, and have the records reach the disk: a checkpoint records how far the file
        goes, and is itself written durably."""
        self.flush()
        if self._tb is not None:
            self._tb.flush()
        os.fsync(self._file.fileno())

    def tensorboard_wait(self) -> float:
        """Seconds to wait before `rewind_tensorboard` (see `_open_tensorboard`)."""
        return _tensorboard_wait(self.directory / "tensorboard") if self._tb is not None else 0.0

    def rewind_tensorboard(self, first_step: int) -> None:
        """The run goes back (a trainer restart): TensorBoard hides the events already written
        for ``first_step`` and later steps, which run again, as metrics.jsonl moves their
        records aside. A new event file starts with a restart marker at that step (the purge
        TensorBoard applies when it reads a run's files in order)."""
        if self._tb is None:
            return
        self._tb.close()
        self._tb = _open_tensorboard(self.directory / "tensorboard", first_step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    item = getattr(value, "item", None)  # torch/numpy scalars
    return item() if callable(item) else str(value)


def _open_tensorboard(directory: Path, first_step: int) -> Any:
    """A writer of a new event file whose first event is a restart marker at ``first_step``:
    TensorBoard, reading the directory's files in name order, drops the events of the files
    before it at that step or later (its purge of orphaned data). The names begin with the
    second of their creation, so a file made in the same second as the newest one could sort
    before it: `_tensorboard_wait` is waited first."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        logger.warning(
            "runtime.tensorboard is true but the tensorboard package is not installed: no "
            "event files are written (pip install tensorboard)"
        )
        return None
    time.sleep(_tensorboard_wait(directory))
    return SummaryWriter(log_dir=str(directory), purge_step=max(0, first_step))


def _tensorboard_wait(directory: Path) -> float:
    """Seconds until the clock's second is past the newest event file's (0 if it is; at most
    one: a file stamped later by a clock ahead of this one, copied here, is not waited for)."""
    newest = -1
    for path in directory.glob("events.out.tfevents.*"):
        stamp = path.name.split(".")[3]
        if stamp.isdigit():
            newest = max(newest, int(stamp))
    now = time.time()
    return min(1.0, max(0.0, newest + 1 - now))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file, a line at a time: a truncated last line after a
    crash, bytes that are not UTF-8, a line that is not a JSON object are skipped (`iter_lines`
    says which), never a traceback."""
    return [record for record in iter_lines(path) if record is not None]


def iter_metrics(path: str | Path, kind: str) -> Iterator[dict[str, Any]]:
    """The records of one ``kind`` in a metrics.jsonl file, a line at a time; the lines of other
    kinds are not parsed (a resume looks for a few ``restart`` records among a long run's
    hundreds of thousands: reading the whole file cost 1.3 GB and 6.5 s for 400k records)."""
    marker = json.dumps({"kind": kind})[1:-1].encode()  # '"kind": "restart"', as written
    with open(path, "rb") as lines:
        for raw in lines:
            if marker in raw:
                record = _record(raw)
                if record is not None and record.get("kind") == kind:
                    yield record


def iter_lines(path: str | Path) -> Iterator[dict[str, Any] | None]:
    """Each non-blank line of a metrics.jsonl file as its record, or None for a line that is
    none (torn, not UTF-8, not a JSON object); a line at a time."""
    with open(path, "rb") as lines:
        for raw in lines:
            if raw.strip():
                yield _record(raw)


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
