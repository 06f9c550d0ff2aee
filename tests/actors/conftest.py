"""Actor tests: their helper modules are importable by name (here and inside actor processes),
and coroutines run on the loop production uses (uvloop where available)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from chatlearn.transport import new_event_loop

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    # Actors inherit the coordinator's sys.path, so they find `actors_testlib` the same way.
    sys.path.insert(0, HERE)


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": new_event_loop}
