"""ChatLearn's `Timers`: named wall-clock timers that modules (`self.timers`) use.

Runs on both sides: in the modules (actor processes) and as ``engine.timers`` in the
coordinator.

    self.timers("forward").start()
    ...
    self.timers("forward").stop()
    self._logger.info(self.timers.log(["forward"]))   # "forward: 12.34 ms"

A timer adds up the time between its `start()` and `stop()` calls until it is reset;
`elapsed(reset=True)` returns that sum in seconds (a running timer counts up to now).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

__all__ = ["Timer", "Timers"]


class Timer:
    """One named timer; `start()`/`stop()` pairs add up."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._total = 0.0
        self._started_at: float | None = None

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def start(self) -> None:
        if self._started_at is not None:
            raise RuntimeError(f"timer {self.name!r} is already running")
        self._started_at = time.perf_counter()

    def stop(self) -> None:
        if self._started_at is None:
            raise RuntimeError(f"timer {self.name!r} was not started")
        self._total += time.perf_counter() - self._started_at
        self._started_at = None

    def reset(self) -> None:
        self._total = 0.0
        self._started_at = time.perf_counter() if self.running else None

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated (including the current run if started); reset afterwards."""
        total = self._total
        if self._started_at is not None:
            total += time.perf_counter() - self._started_at
        if reset:
            self.reset()
        return total


class Timers:
    """Timers by name, created on first use: `timers(name)` → `Timer`."""

    def __init__(self) -> None:
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        if name not in self._timers:
            self._timers[name] = Timer(name)
        return self._timers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._timers

    def names(self) -> list[str]:
        return list(self._timers)

    def log(
        self,
        names: Iterable[str] | None = None,
        normalizer: float = 1.0,
        reset: bool = True,
        return_dict: bool = False,
    ) -> str | tuple[str, dict[str, float]]:
        """Milliseconds of each timer (all by default) divided by `normalizer`, as
        "name: 1.23 ms | ..."; with `return_dict`, as ChatLearn's, that text and {name: ms}."""
        times = self.log_dict(names, normalizer, reset)
        text = " | ".join(f"{name}: {ms:.2f} ms" for name, ms in times.items())
        return (text, times) if return_dict else text

    def log_dict(
        self, names: Iterable[str] | None = None, normalizer: float = 1.0, reset: bool = True
    ) -> dict[str, float]:
        """{name: milliseconds / normalizer} of each timer (all by default)."""
        if normalizer <= 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        chosen = list(self._timers) if names is None else list(names)
        return {
            name: self._timers[name].elapsed(reset=reset) * 1000.0 / normalizer
            for name in chosen
            if name in self._timers
        }
