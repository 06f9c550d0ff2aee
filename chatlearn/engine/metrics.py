"""Run observability: busy intervals per model, the measured overlap, and the metrics sinks.

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
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass(slots=True)
class ModelTimer:
    """Busy intervals of one model (all its processes) plus its time spent waiting for data."""

    name: str
    busy: list[Interval] = field(default_factory=list)
    wait_seconds: float = 0.0

    def add(self, start: float, end: float) -> None:
        self.busy.append((start, end))

    def busy_seconds(self) -> float:
        """Wall time during which at least one process of the model was computing."""
        return total_length(self.busy)

    def process_seconds(self) -> float:
        """Compute time summed over processes (can exceed the wall time with several replicas)."""
        return sum(max(0.0, end - start) for start, end in self.busy)


class Timers:
    """Per-model timers over a window of the run (an episode, or the whole run)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.models = {name: ModelTimer(name) for name in names}
        self.started = time.time()

    def __getitem__(self, name: str) -> ModelTimer:
        return self.models[name]

    def overlap(self, hidden: str, behind: str) -> float:
        """Fraction of ``hidden``'s busy time during which ``behind`` was busy too (0 if idle)."""
        busy = self.models[hidden].busy
        total = total_length(busy)
        if total <= 0.0:
            return 0.0
        return intersection_length(busy, self.models[behind].busy) / total

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

    def __init__(self, directory: str | Path, *, tensorboard: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tb: Any = None
        if tensorboard:
            self._tb = _open_tensorboard(self.directory / "tensorboard")

    def write(self, kind: str, step: int, values: Mapping[str, Any], **extra: Any) -> None:
        record: dict[str, Any] = {"kind": kind, "step": step, "time": time.time(), **extra}
        record.update({key: _plain(value) for key, value in values.items()})
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

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


def _open_tensorboard(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        logger.warning("tensorboard is enabled in config but not installed; skipping event files")
        return None
    return SummaryWriter(log_dir=str(directory))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a truncated last line, after a crash, is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
