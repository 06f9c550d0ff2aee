"""ChatLearn's `chatlearn.utils.logger`: the `logger` its modules log with, and the rank-0
helpers. Records go to the "ChatLearn" logger, which the runtime's logging shows."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("ChatLearn")


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def log_rank_0(msg: str, custom_logger: logging.Logger | None = None) -> None:
    """`msg` at INFO, from the process of rank 0 only."""
    if _rank() == 0:
        (custom_logger or logger).info(msg)


def debug_rank_0(msg: str, custom_logger: logging.Logger | None = None) -> None:
    """`msg` at DEBUG, from the process of rank 0 only."""
    if _rank() == 0:
        (custom_logger or logger).debug(msg)


__all__ = ["logger", "log_rank_0", "debug_rank_0"]
