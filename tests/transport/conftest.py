"""Transport tests run their coroutines on the loop production uses (uvloop where available)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from chatlearn.transport import new_event_loop


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": new_event_loop}
