"""Typed envelopes for the control plane: a kind, a request id and a payload.

A `Message` is what `ControlServer` and `ControlClient` exchange. On the wire it is a codec
envelope (see codec.py) whose header carries the kind and the request id next to the payload, so
a receiver knows what it got before it looks at the payload, and a decoder rejects kinds it does
not know. Request ids are allocated by the side that asks (the coordinator's `ControlServer`);
the side that answers copies the id into its REPLY / READY / ERROR.

The conversation (docs/architecture.md, "The wire"): an actor says HELLO; the coordinator requests
CONFIG and the actor answers READY; then CALLs are answered by REPLY or ERROR; the actor sends
HEARTBEATs, and DEAD with a traceback before it exits on a fatal error; SHUTDOWN asks it to stop;
an actor sends STOP when a SIGTERM from outside the run asks the run to stop (a scheduler's);
PING is a cheap request for latency checks. DATA is the kind of data-plane messages
(`codec.encode`).
"""

from __future__ import annotations

import enum
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from chatlearn.transport.codec import (
    DATA_KIND,
    DEFAULT_INLINE_THRESHOLD,
    DEFAULT_LIMITS,
    Limits,
    decode_envelope,
    decode_envelope_steps,
    encode_envelope,
)
from chatlearn.transport.errors import RemoteError


class MessageKind(enum.IntEnum):
    """Every kind of message the protocol knows (values are fixed: they are on the wire)."""

    HELLO = 1
    CONFIG = 2
    READY = 3
    CALL = 4
    REPLY = 5
    ERROR = 6
    HEARTBEAT = 7
    SHUTDOWN = 8
    DEAD = 9
    DATA = DATA_KIND
    PING = 11
    # an actor received SIGTERM from outside the run: the coordinator stops the run gracefully
    STOP = 12


# Kinds that answer a request (carry the request's id back).
REPLY_KINDS = frozenset({MessageKind.REPLY, MessageKind.READY, MessageKind.ERROR})

# Indexed by wire value; the codec has already checked the value is one of these.
_KIND_BY_VALUE: dict[int, MessageKind] = {int(kind): kind for kind in MessageKind}


@dataclass(slots=True, kw_only=True)
class Message:
    """One control message. ``payload`` is anything the codec can encode."""

    kind: MessageKind
    request_id: int = 0
    payload: Any = None


def encode_message(
    msg: Message, *, inline_threshold: int = DEFAULT_INLINE_THRESHOLD
) -> list[bytes | memoryview]:
    """Frames for ``msg`` (send them with ``copy=False``)."""
    return encode_envelope(
        int(msg.kind), msg.request_id, msg.payload, inline_threshold=inline_threshold
    )


def decode_message(frames: Sequence[Any], *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode and check a message; every failure is a `DecodeError` subclass."""
    kind, request_id, payload = decode_envelope(frames, limits=limits, kinds=_KIND_BY_VALUE)
    return Message(kind=_KIND_BY_VALUE[kind], request_id=request_id, payload=payload)


def decode_message_steps(
    frames: Sequence[Any], *, limits: Limits = DEFAULT_LIMITS
) -> Generator[None, None, Message]:
    """`decode_message` in steps, for large headers (see `codec.decode_envelope_steps`)."""
    steps = decode_envelope_steps(frames, limits=limits, kinds=_KIND_BY_VALUE)
    kind, request_id, payload = yield from steps
    return Message(kind=_KIND_BY_VALUE[kind], request_id=request_id, payload=payload)


def error_message(
    request_id: int, exc: BaseException, context: dict[str, Any] | None = None
) -> Message:
    """The ERROR answer to request ``request_id`` reporting ``exc`` (with its traceback).

    The receiving `ControlServer.request` raises it as a `RemoteError`; ``context`` says where it
    happened, e.g. ``{"model": ..., "rank": ..., "host": ..., "method": ...}``.
    """
    payload = RemoteError.from_exception(exc, context).to_payload()
    return Message(kind=MessageKind.ERROR, request_id=request_id, payload=payload)
