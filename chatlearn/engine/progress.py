"""What a person watching a run sees: a tqdm progress bar and the engine's log lines.

Runs in the coordinator.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_FORMAT = "[chatlearn %(asctime)s] %(message)s"
_SHOWN = ("loss", "rewards/accuracies", "rewards/margins")


def setup_logging(level: int = logging.INFO) -> None:
    """Show chatlearn's INFO lines unless the program configured logging itself."""
    root = logging.getLogger("chatlearn")
    if root.handlers or logging.getLogger().handlers:
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never break the run
            self.handleError(record)


class Progress:
    """Trained samples, samples/s and the latest metrics, on one bar."""

    def __init__(self, total_samples: int, *, disable: bool | None = None) -> None:
        from tqdm import tqdm

        self.started = time.time()
        self.samples = 0
        self._bar: Any = tqdm(
            total=total_samples,
            unit="sample",
            dynamic_ncols=True,
            mininterval=0.5,
            disable=disable,
            file=sys.stderr,
        )

    def update(self, samples: int, metrics: dict[str, float]) -> None:
        self.samples += samples
        self._bar.update(samples)
        shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items() if k in _SHOWN}
        if shown:
            self._bar.set_postfix(shown, refresh=False)

    def rewind(self, samples: int) -> None:
        """Training went back ``samples`` (a restart from a checkpoint): they count again."""
        samples = min(samples, self._bar.n)
        self._bar.update(-samples)

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(time.time() - self.started, 1e-9)

    def close(self) -> None:
        self._bar.close()
