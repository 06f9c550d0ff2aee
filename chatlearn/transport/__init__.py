"""chatlearn's wire: a pickle-free, zero-copy codec and async ZeroMQ channels.

`codec` turns nested Python objects with tensors into ZeroMQ frames and back; `messages` wraps
payloads in typed control envelopes; `channels` carries them (ROUTER/DEALER for control,
PUSH/PULL for data); `endpoints` says where sockets live; `loop` gives the uvloop event loop;
`allocator` keeps received messages out of fresh pages (glibc's malloc thresholds);
`contexts.process_context` is the process's ZeroMQ context, `contexts.sending_context` the data
senders' (its I/O thread batched).
Importing this package does not import torch (see codec.py).

Layer 0 (docs/architecture.md, "Layers"): imports no other chatlearn package.
"""

from __future__ import annotations

from chatlearn.transport.allocator import keep_receive_buffers
from chatlearn.transport.channels import (
    DEFAULT_DATA_HWM,
    DEFAULT_LINGER_MS,
    ControlClient,
    ControlServer,
    DataReceiver,
    DataSender,
)
from chatlearn.transport.codec import (
    DEFAULT_INLINE_THRESHOLD,
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Limits,
    decode,
    encode,
)
from chatlearn.transport.contexts import (
    existing_sending_context,
    process_context,
    sending_context,
)
from chatlearn.transport.endpoints import RuntimeDir, tcp_endpoint
from chatlearn.transport.errors import (
    ChannelClosedError,
    DecodeError,
    EncodeError,
    FrameIndexError,
    FrameSizeError,
    HeaderTooLargeError,
    MessageTooLargeError,
    NestingTooDeepError,
    PeerUnreachableError,
    ProtocolVersionError,
    RemoteError,
    RequestTimeoutError,
    TooManyFramesError,
    TooManyObjectsError,
    TransportError,
    UnknownDtypeError,
    UnknownKindError,
)
from chatlearn.transport.loop import new_event_loop, run, uvloop_available
from chatlearn.transport.messages import (
    REPLY_KINDS,
    Message,
    MessageKind,
    decode_message,
    encode_message,
    error_message,
)

__all__ = [
    "DEFAULT_DATA_HWM",
    "DEFAULT_INLINE_THRESHOLD",
    "DEFAULT_LIMITS",
    "DEFAULT_LINGER_MS",
    "PROTOCOL_VERSION",
    "REPLY_KINDS",
    "ChannelClosedError",
    "ControlClient",
    "ControlServer",
    "DataReceiver",
    "DataSender",
    "DecodeError",
    "EncodeError",
    "FrameIndexError",
    "FrameSizeError",
    "HeaderTooLargeError",
    "Limits",
    "Message",
    "MessageKind",
    "MessageTooLargeError",
    "NestingTooDeepError",
    "PeerUnreachableError",
    "ProtocolVersionError",
    "RemoteError",
    "RequestTimeoutError",
    "RuntimeDir",
    "TooManyFramesError",
    "TooManyObjectsError",
    "TransportError",
    "UnknownDtypeError",
    "UnknownKindError",
    "decode",
    "decode_message",
    "encode",
    "encode_message",
    "error_message",
    "existing_sending_context",
    "keep_receive_buffers",
    "new_event_loop",
    "process_context",
    "run",
    "sending_context",
    "tcp_endpoint",
    "uvloop_available",
]
