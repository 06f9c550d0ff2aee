"""Runs a user's start of a DPO run on each of several configs, in one process, and prints what the
user would see for each: one JSON line `{"case", "line", "type"}` per config.

    python broken_config_driver.py CASE_DIR...

Each CASE_DIR holds `main.yaml` (and the files it names). Per case: `chatlearn.init(main.yaml)`,
two module templates (`reference`, `policy_trainer`) and `Engine.start()` — everything up to the
actors' start (placement included), as `engine.learn()` does. `line` is the one line that
`chatlearn.init()`'s hook would print for the error (None when the error is not a config error,
or "started" if actors were started: the config was not rejected). One interpreter for all cases
keeps the test fast; `test_config_oneline.py` runs a few of them as real scripts too.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import chatlearn
from chatlearn.actors.module import BaseModule
from chatlearn.config import reset_args
from chatlearn.config.report import config_error_line
from chatlearn.engine.engine import Engine


class Module(BaseModule):
    """A module that does nothing: only the config matters here."""


async def start_and_stop(engine: Engine) -> None:
    try:
        await engine.start()
    finally:
        await engine.stop()


def run_case(case: Path) -> dict[str, object]:
    reset_args()
    try:
        chatlearn.init(case / "main.yaml")
        engine = Engine(Module("reference"), Module("policy_trainer"))
        asyncio.run(start_and_stop(engine))
    except Exception as exc:
        return {"case": case.name, "line": config_error_line(exc), "type": type(exc).__name__}
    return {"case": case.name, "line": "started", "type": None}


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(json.dumps(run_case(Path(name))), flush=True)
