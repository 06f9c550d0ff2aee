"""Launch tests: the actor and engine test modules are importable by name (here and in actors),
coroutines run on uvloop, and `make_cluster` builds a multi-"host" cluster on this machine's
loopback addresses 127.0.0.2 and 127.0.0.3."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from chatlearn.transport import new_event_loop

TESTS = Path(__file__).resolve().parents[1]
for sub in ("actors", "engine", "launch"):
    if str(TESTS / sub) not in sys.path:
        sys.path.insert(0, str(TESTS / sub))


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": new_event_loop}


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A throwaway sshd on 127.0.0.2/127.0.0.3 (tests/launch/sshd.py), or a skip saying why."""
    from sshd import start_sshd

    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    if isinstance(server, str):
        pytest.skip(f"no test sshd: {server}")
    try:
        yield server
    finally:
        server.stop()
