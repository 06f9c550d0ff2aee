"""A minimal actor for the two-process tests: `python echo_peer.py CONTROL_ENDPOINT IDENTITY`.

Says HELLO (with its pid), then answers the coordinator's requests until SHUTDOWN:
CALL {"op": "echo", "value": x} -> REPLY x; CALL {"op": "push", "endpoint": e, "value": x,
"count": n} -> sends x n times on a DataSender connected to e, then REPLY n; CALL {"op": "fail"}
-> ERROR; PING -> REPLY with the same payload. Exits 0 after SHUTDOWN.
"""

from __future__ import annotations

import os
import sys

from chatlearn.transport import (
    ControlClient,
    DataSender,
    Message,
    MessageKind,
    error_message,
    run,
)


async def serve(endpoint: str, identity: bytes) -> None:
    senders: dict[str, DataSender] = {}
    client = ControlClient(endpoint, identity)
    try:
        await client.send(Message(kind=MessageKind.HELLO, payload={"pid": os.getpid()}))
        while True:
            msg = await client.recv()
            if msg.kind is MessageKind.SHUTDOWN:
                return
            rid = msg.request_id
            try:
                if msg.kind is MessageKind.PING:
                    result = msg.payload
                elif msg.payload["op"] == "echo":
                    result = msg.payload["value"]
                elif msg.payload["op"] == "push":
                    target = msg.payload["endpoint"]
                    sender = senders.get(target) or senders.setdefault(target, DataSender(target))
                    for _ in range(msg.payload["count"]):
                        await sender.send(msg.payload["value"])
                    result = msg.payload["count"]
                else:
                    raise ValueError(f"unknown op {msg.payload['op']!r}")
            except Exception as exc:
                await client.send(error_message(rid, exc, {"pid": os.getpid()}))
                continue
            await client.send(Message(kind=MessageKind.REPLY, request_id=rid, payload=result))
    finally:
        for sender in senders.values():
            sender.close()
        client.close()


if __name__ == "__main__":
    run(serve(sys.argv[1], sys.argv[2].encode()))
