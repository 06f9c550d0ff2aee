"""The transport's one exception hierarchy.

Everything the wire can do wrong is a `TransportError`: a malformed or hostile message is a
`DecodeError` (with a subclass per check, so tests and callers can tell them apart), a closed
channel is `ChannelClosedError`, a request without a reply in time is `RequestTimeoutError`.
`RemoteError` is different in kind: the wire worked, and the peer reported that its own code
raised. It is not a `TransportError` so that `except TransportError` never swallows a user bug.
"""

from __future__ import annotations

from typing import Any


class TransportError(Exception):
    """Base of every error raised by `chatlearn.transport` about the wire itself."""


class EncodeError(TransportError):
    """An object cannot be put on the wire (unsupported type, int out of 64-bit range, ...)."""


class DecodeError(TransportError):
    """A received message is malformed: bad msgpack, wrong header structure, bad references."""


class ProtocolVersionError(DecodeError):
    """The header's protocol version is not the one this process speaks."""


class UnknownKindError(DecodeError):
    """The header names a message kind this process does not know (or did not expect)."""


class UnknownDtypeError(DecodeError):
    """A tensor or array reference names a dtype this process does not accept."""


class FrameSizeError(DecodeError):
    """A tensor's shape × itemsize does not equal the length of its data frame."""


class FrameIndexError(DecodeError):
    """A tensor references a frame that does not exist, or frames are referenced wrongly."""


class TooManyFramesError(DecodeError):
    """The message has more frames than `Limits.max_frames`."""


class HeaderTooLargeError(DecodeError):
    """Frame 0 (the msgpack header) is longer than `Limits.max_header_bytes`."""


class MessageTooLargeError(DecodeError):
    """All frames together are longer than `Limits.max_message_bytes`."""


class TooManyObjectsError(DecodeError):
    """The header holds more values, containers, tuples or tensors than `Limits` allow."""


class NestingTooDeepError(DecodeError):
    """Tuples or tensors nest deeper than `Limits.max_depth`."""


class ChannelClosedError(TransportError):
    """The channel was closed (locally) while an operation was pending or after it closed."""


class PeerUnreachableError(TransportError):
    """A ROUTER send named an identity that is not (or no longer) connected."""


class RequestTimeoutError(TransportError):
    """A control request got no reply within its timeout."""


class RemoteError(Exception):
    """An error that the peer reported in an ERROR message (its own code raised).

    `context` carries where it happened, e.g. ``{"model": ..., "rank": ..., "host": ...,
    "method": ...}``; the message and the remote traceback are kept verbatim.
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        remote_traceback: str = "",
        context: dict[str, Any] | None = None,
    ) -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.context = dict(context or {})
        super().__init__(type_name, message, remote_traceback, self.context)

    def __str__(self) -> str:
        where = ", ".join(f"{key}={value}" for key, value in self.context.items())
        head = f"{self.type_name}: {self.message}" + (f" [{where}]" if where else "")
        if self.remote_traceback:
            return f"{head}\n--- remote traceback ---\n{self.remote_traceback.rstrip()}"
        return head

    def to_payload(self) -> dict[str, Any]:
        """The plain-typed form carried by an ERROR message."""
        return {
            "type": self.type_name,
            "message": self.message,
            "traceback": self.remote_traceback,
            "context": self.context,
        }

    @classmethod
    def from_payload(cls, payload: Any) -> RemoteError:
        """Rebuild from an ERROR payload; tolerant, since the peer may be buggy or hostile."""
        if not isinstance(payload, dict):
            return cls("RemoteError", repr(payload)[:1000])
        context = payload.get("context")
        return cls(
            str(payload.get("type", "RemoteError")),
            str(payload.get("message", "")),
            str(payload.get("traceback", "")),
            context if isinstance(context, dict) else None,
        )

    @classmethod
    def from_exception(
        cls, exc: BaseException, context: dict[str, Any] | None = None
    ) -> RemoteError:
        """Capture a local exception (with its traceback) to send as an ERROR payload."""
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__qualname__, str(exc), text, context)
