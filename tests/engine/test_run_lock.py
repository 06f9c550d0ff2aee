"""One run at a time in an output directory (engine/run_lock.py): a second run is a one-line
config error naming runtime.output_dir and the holder's pid; a killed holder blocks nothing."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import chatlearn
from chatlearn.actors.module import BaseModule
from chatlearn.config import ConfigError, reset_args
from chatlearn.engine.engine import Engine
from chatlearn.engine.run_lock import LOCK_NAME, RunLock

sys.path.insert(0, str(Path(__file__).parent))
from test_dpo_engine import _learn, _runtime  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def _error(key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(problem, key=key, fix=fix)


@contextlib.contextmanager
def _hold(output: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Another process holding the run lock of ``output`` while the block runs; killed after
    it, whatever happens (its start failing included)."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from chatlearn.engine.run_lock import RunLock
        with RunLock(Path({str(output)!r}), None):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path: Path) -> None:
    with RunLock(tmp_path, _error):
        assert (tmp_path / LOCK_NAME).read_text().strip().isdigit()  # the holder's pid
        with pytest.raises(ConfigError) as info, RunLock(tmp_path, _error):
            pass
        assert info.value.key == "runtime.output_dir"
        assert "is in use by another run (pid" in info.value.problem
    with RunLock(tmp_path, _error):  # released
        pass


async def test_a_run_in_a_directory_another_run_holds_stops_before_starting(
    tmp_path: Path,
) -> None:
    output = tmp_path / "CHATLEARN"  # output_dir/exp_name of the test engine's config
    with _hold(output) as holder:
        with pytest.raises(ConfigError) as info:
            await _learn(tmp_path, _runtime(1, 4, 2, 2, 2))
        assert info.value.key == "runtime.output_dir"
        assert f"(pid {holder.pid})" in info.value.problem
        assert not (output / "metrics.jsonl").exists()  # nothing started
    started = time.monotonic()
    engine, _ = await _learn(tmp_path, _runtime(1, 4, 2, 2, 2))  # a killed holder blocks nothing
    assert engine.state.iteration == 2 and time.monotonic() - started < 50


async def test_an_engine_that_writes_no_output_creates_no_directory(tmp_path: Path) -> None:
    """Only engines that write an output directory (writes_output, DPOEngine's) lock it: a
    plain Engine that only calls its models leaves the file system as it was."""
    output = tmp_path / "never"
    chatlearn.init(
        {
            "models": {"reference": {"num_cpu": 1}},
            "runtime": {"output_dir": str(output)},
        }
    )
    try:
        engine = Engine(BaseModule("reference"))
        try:
            await engine.start()
        finally:
            await engine.stop()
    finally:
        reset_args()
    assert not output.exists()


async def test_a_shared_data_checkpoint_path_is_locked_too(tmp_path: Path) -> None:
    # two runs with their own output_dir but one data_checkpoint_path overwrote each other's
    # checkpoints, and each ended pointing at the other's weights
    shared = tmp_path / "shared-checkpoints"
    with _hold(shared) as holder:
        runtime = _runtime(1, 4, 2, 2, 2, data_checkpoint_path=str(shared))
        with pytest.raises(ConfigError) as info:
            await _learn(tmp_path, runtime)
        assert info.value.key == "runtime.data_checkpoint_path"
        assert f"(pid {holder.pid})" in info.value.problem and "data_checkpoint_path" in str(
            info.value.fix
        )
        output = tmp_path / "CHATLEARN"
        with RunLock(output, _error):  # the output directory's lock was given back
            pass
    engine, _ = await _learn(tmp_path, _runtime(1, 4, 2, 2, 2, data_checkpoint_path=str(shared)))
    assert engine.state.iteration == 2 and (shared / LOCK_NAME).exists()
