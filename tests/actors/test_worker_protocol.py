"""The worker process at the protocol level, driven by hand through a real ControlServer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from chatlearn.actors.bootstrap import Bootstrap
from chatlearn.transport import ControlServer, MessageKind, RuntimeDir

pytestmark = pytest.mark.timeout(60)


async def test_worker_hello_ping_and_dead_report_on_a_fatal_error():
    """A worker that never gets its CONFIG fails fatally: it reports DEAD with the traceback."""
    with RuntimeDir() as runtime_dir:
        server = ControlServer(runtime_dir.ipc_endpoint("control"))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatlearn.actors.worker",
                "--endpoint",
                server.endpoint,
                "--coordinator-pid",
                str(os.getpid()),
                "--heartbeat-interval",
                "0.1",
                "--startup-timeout",
                "1.5",
            ],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write(Bootstrap(identity="probe.0.0").to_line())
        proc.stdin.flush()
        try:
            identity, hello = await asyncio.wait_for(server.recv_unsolicited(), 30)
            assert (identity, hello.kind) == (b"probe.0.0", MessageKind.HELLO)
            assert hello.payload["pid"] == proc.pid and hello.payload["ppid"] == os.getpid()
            assert await server.request(identity, MessageKind.PING, timeout=10) is None
            kinds = []
            while True:  # heartbeats, then DEAD when the startup timeout expires
                _, msg = await asyncio.wait_for(server.recv_unsolicited(), 30)
                kinds.append(msg.kind)
                if msg.kind == MessageKind.DEAD:
                    break
            assert MessageKind.HEARTBEAT in kinds
            assert msg.payload["type"] == "TimeoutError"
            assert "Traceback" in msg.payload["traceback"]
            assert msg.payload["context"]["identity"] == "probe.0.0"
            assert await asyncio.to_thread(proc.wait, 30) == 1  # EXIT_FATAL
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            assert proc.stderr is not None
            proc.stderr.close()
            proc.stdin.close()
            await server.aclose(0)


def test_worker_exits_at_once_when_started_by_someone_else():
    # --coordinator-pid must be our parent: a worker whose coordinator already died never runs.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatlearn.actors.worker",
            "--endpoint",
            "ipc:///nonexistent/control",
            "--coordinator-pid",
            "1",
        ],
        input=Bootstrap(identity="x.0.0").to_line(),
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 4  # EXIT_ORPHANED


def test_importing_the_runtime_does_not_import_torch():
    code = (
        "import sys, chatlearn.actors, chatlearn.actors.worker, chatlearn.actors.runtime;"
        "from chatlearn.actors import BaseModule, TorchModule, ActorSystem;"
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
