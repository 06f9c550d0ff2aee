"""A hostile process of the same user: ``python intruder.py RUNTIME_DIR IDENTITY``.

It reaches every socket file of a run (the directory is ours, so it can) and tries what the
hardening tests must survive: garbage and a well-formed fake batch to every data inbox, a DEAD
message and HEARTBEATs under a real actor's identity to the control socket, and a connection under
that identity (with ROUTER_HANDOVER it would take the actor's route). It has no run credentials.
Prints one JSON line: how many of its connections completed their handshake and how many failed
authentication (from ZeroMQ's socket monitor).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from chatlearn.transport import Message, MessageKind, encode, encode_message


def main() -> None:
    runtime_dir, identity = sys.argv[1], sys.argv[2].encode()
    ctx = zmq.Context()
    sockets = []
    for name in sorted(os.listdir(runtime_dir)):
        path = os.path.join(runtime_dir, name)
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            continue  # the owner record, the run's shared store, ...
        if name == "control":
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, identity)
            messages = [
                encode_message(Message(kind=MessageKind.DEAD, payload={"type": "Spoofed"})),
                *[encode_message(Message(kind=MessageKind.HEARTBEAT)) for _ in range(100)],
            ]
        else:
            sock = ctx.socket(zmq.PUSH)
            fake = {"positions": [0], "eval": True, "rows": [10**6]}
            messages = [[b"garbage"], encode({"hello": 1}), encode(fake)] * 50
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        monitor = sock.get_monitor_socket()
        sock.connect(f"ipc://{path}")
        for frames in messages:
            try:
                sock.send_multipart(frames, zmq.DONTWAIT)
            except zmq.Again:
                break
        sockets.append((sock, monitor))
    connected = failed = 0
    refused = set()
    # until every socket was refused twice (reconnects are 100 ms apart), at most 5 s
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        len(refused) < len(sockets) or failed < 2 * len(sockets)
    ):
        for index, (_, monitor) in enumerate(sockets):
            while monitor.poll(0):
                event = recv_monitor_message(monitor)["event"]
                connected += event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                if event in (
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                ):
                    failed += 1
                    refused.add(index)
        time.sleep(0.02)
    report = {"sockets": len(sockets), "refused": len(refused), "connected": connected}
    print(json.dumps({**report, "failed": failed}))
    for sock, monitor in sockets:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
    ctx.term()


if __name__ == "__main__":
    main()
