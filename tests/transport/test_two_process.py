"""The channels across a real process boundary, over ipc and over tcp."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chatlearn.transport import (
    ControlServer,
    DataReceiver,
    Message,
    MessageKind,
    RemoteError,
    RuntimeDir,
    tcp_endpoint,
)

PEER = Path(__file__).with_name("echo_peer.py")


@pytest.fixture(params=["ipc", "tcp"])
def endpoint_factory(request: pytest.FixtureRequest) -> Iterator[object]:
    with RuntimeDir() as runtime_dir:
        if request.param == "ipc":
            yield runtime_dir.ipc_endpoint
        else:
            yield lambda name: tcp_endpoint()


async def test_actor_process_roundtrip(endpoint_factory) -> None:
    server = ControlServer(endpoint_factory("control"))
    receiver = DataReceiver(endpoint_factory("data"))
    proc = subprocess.Popen([sys.executable, str(PEER), server.endpoint, "actor-0"])
    try:
        identity, hello = await asyncio.wait_for(server.recv_unsolicited(), 60)
        assert identity == b"actor-0" and hello.kind is MessageKind.HELLO
        assert hello.payload["pid"] == proc.pid

        batch = {"x": torch.randn(256, 1024), "ids": torch.arange(10), "meta": ("a", 1)}
        echoed = await server.request(identity, MessageKind.CALL, {"op": "echo", "value": batch})
        assert torch.equal(echoed["x"], batch["x"]) and echoed["meta"] == ("a", 1)

        # Many requests in flight at once; each gets its own answer.
        answers = await asyncio.gather(
            *(server.request(identity, MessageKind.PING, i, timeout=60) for i in range(50))
        )
        assert answers == list(range(50))

        with pytest.raises(RemoteError) as info:
            await server.request(identity, MessageKind.CALL, {"op": "fail"}, timeout=60)
        assert info.value.type_name == "ValueError" and info.value.context["pid"] == proc.pid
        assert "Traceback" in info.value.remote_traceback

        # Data plane: the peer pushes to our receiver while we also await its REPLY.
        push = {"op": "push", "endpoint": receiver.endpoint, "value": batch, "count": 20}
        reply = asyncio.ensure_future(server.request(identity, MessageKind.CALL, push))
        for _ in range(20):
            got = await asyncio.wait_for(receiver.recv(), 60)
            assert torch.equal(got["x"], batch["x"])
        assert await asyncio.wait_for(reply, 60) == 20

        await server.send(identity, Message(kind=MessageKind.SHUTDOWN))
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        receiver.close()
        await server.aclose()
