"""Guards for every test: no child process and no runtime (ipc) file may outlive its test.

The runtime directories of this pytest session (`RuntimeDir`, which holds the ipc socket files)
are created under a private base directory: `XDG_RUNTIME_DIR` is pointed at it before any test
runs, so other test sessions running at the same time on the machine cannot disturb the check.
After each test, the autouse fixture waits a short grace period for processes to exit and files
to go, then fails the test naming what it left behind (and cleans it up, so that one leak does
not cascade into the following tests).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import psutil
import pytest

# Short: ipc paths must fit in sun_path (about 100 bytes) below this base.
_RUNTIME_BASE = tempfile.mkdtemp(prefix="cl-rt-", dir="/tmp")
os.environ["XDG_RUNTIME_DIR"] = _RUNTIME_BASE

LEAK_GRACE_SECONDS = 5.0


# The longest tests (about a minute for each chaos example, 20-35 s for the others), started
# first: under `make test`'s two workers a long test begun last ran alone at the end, one core
# idle. Files in this order, their tests in their own order; every other test after them.
_STARTED_FIRST = (
    "tests/examples/test_example_chaos.py",
    "tests/benchmarks/test_bench_dpo.py",
    "tests/benchmarks/test_bench_memory.py",
    "tests/hf/test_layouts.py",
    "tests/engine/test_resume.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.partition("::")[0]
        return _STARTED_FIRST.index(path) if path in _STARTED_FIRST else len(_STARTED_FIRST)

    items.sort(key=rank)  # stable: the order within a rank is kept


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_RUNTIME_BASE, ignore_errors=True)


def runtime_base() -> str:
    """Where this session's runtime directories are created."""
    return _RUNTIME_BASE


def _live_children(exclude: set[int]) -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in exclude:
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:  # exited, only not reaped yet
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid}"


@pytest.fixture(autouse=True)
def no_leftover_processes_or_runtime_files() -> Iterator[None]:
    """Fail the test if it leaves a child process or a runtime file behind."""
    before_children = {p.pid for p in psutil.Process().children(recursive=True)}
    before_files = set(os.listdir(_RUNTIME_BASE))
    yield
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    while True:
        procs = _live_children(before_children)
        files = sorted(set(os.listdir(_RUNTIME_BASE)) - before_files)
        if (not procs and not files) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not procs and not files:
        return
    described = [_describe(p) for p in procs]
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)
    for name in files:
        path = os.path.join(_RUNTIME_BASE, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
    lines = [f"the test left behind {len(described)} process(es), {len(files)} runtime file(s):"]
    lines += [f"  process {d}" for d in described]
    lines += [f"  file {os.path.join(_RUNTIME_BASE, f)}" for f in files]
    pytest.fail("\n".join(lines), pytrace=False)
