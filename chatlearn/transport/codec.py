"""The wire format: Python objects with tensors <-> a list of ZeroMQ frames, without pickle.

A message is a multipart: frame 0 is a msgpack *envelope* ``[version, kind, request_id, body]``
of plain types; every tensor or numpy array whose data is larger than ``inline_threshold``
travels as its own raw frame, referenced from the body by index together with its dtype and
shape; smaller ones are inlined into the body as bytes. Types msgpack has no word for are msgpack
ext types whose payload is itself msgpack:

- ``ext 1``: a tuple (its items, so tuples stay tuples through the round-trip),
- ``ext 2``: a torch tensor ``[dtype name, shape, frame index | inline bytes]``,
- ``ext 3``: a numpy array, same layout.

Encoding makes tensors contiguous and CPU-resident (CUDA through pinned host memory) and hands
their memory to ZeroMQ as memoryviews, so sending with ``copy=False`` does not copy. Decoding is
zero-copy: a tensor decoded from a writable buffer (a received ``zmq.Frame``) *is* that frame's
memory. Read-only buffers (``bytes``) are copied once, because torch has no read-only tensors and
writing into an immutable ``bytes`` would corrupt it. A frame whose address is not aligned for
its dtype (libzmq packs small frames back to back in its receive buffer) is copied as well.

Decoding is strict and bounded: every check raises a subclass of `DecodeError`, the msgpack
unpacker is limited by the header's own length (a hostile header cannot make it allocate more
than a small multiple of its size), the numbers of values, containers and tensors and the
nesting are capped (`Limits`: a header within the size limits cannot make decoding take
seconds), unknown ext types (including msgpack's built-in timestamp) are refused, and every
data frame must be referenced exactly once.

torch and numpy are imported only when a message actually contains a tensor or an array, so a
process can speak this protocol (e.g. an actor's start-up handshake) before it imports torch.
"""

from __future__ import annotations

import functools
import gc
import itertools
import re
import sys
import threading
from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import zmq

from chatlearn.transport.errors import (
    DecodeError,
    EncodeError,
    FrameIndexError,
    FrameSizeError,
    HeaderTooLargeError,
    MessageTooLargeError,
    NestingTooDeepError,
    ProtocolVersionError,
    TooManyFramesError,
    TooManyObjectsError,
    TransportError,
    UnknownDtypeError,
    UnknownKindError,
)

PROTOCOL_VERSION: Final = 1
# The kind of a plain `encode()` message; equal to `MessageKind.DATA` (messages.py checks it).
DATA_KIND: Final = 10

# Below 8 KiB a separate frame costs more than the copy it saves: each frame is a zmq message
# plus a Python `zmq.Frame` on both sides (a few µs), pyzmq copies frames under 64 KiB on send
# anyway, and libzmq lands small frames unaligned in its shared receive buffer, where we would
# copy them again. 8 KiB inline costs two memcpys of < 1 µs each. See BENCHMARKS.md.
DEFAULT_INLINE_THRESHOLD: Final = 8 * 1024

# torch's own limit on the number of dimensions.
MAX_DIMS: Final = 64

_EXT_TUPLE: Final = 1
_EXT_TENSOR: Final = 2
_EXT_NDARRAY: Final = 3

# msgpack's built-in timestamp (ext -1) is decoded by msgpack itself, bypassing ext_hook. Its
# three encodings start with these bytes; only if one occurs do we pay for a type check of every
# decoded value (in the list and map hooks).
# The pattern starts with the literal 0xff, which `re` looks for with a tight loop (~3.7 GB/s
# here, 1.1 µs for a 4 KiB inline tensor); written as the alternation of the three prefixes it
# matched at every byte, ~70 µs. See `_may_hold_timestamp` for the memchr pre-check.
_TIMESTAMP_BYTES = re.compile(rb"\xff(?:(?<=[\xd6\xd7]\xff)|(?<=\xc7\x0c\xff))")
# Headers up to this size are copied to `bytes` for that pre-check (a copy of 16 KiB costs less
# than `re` scanning 2 KiB).
_MEMCHR_MAX: Final = 16 * 1024
# The bytes that start an ext (fixext 1-16, ext 8/16/32): a header without any of them holds
# no tuple, tensor, array or timestamp, and small ones of that sort decode without hooks.
_EXT_BYTES = re.compile(rb"[\xc7-\xc9\xd4-\xd8]")
_PLAIN_MAX_BYTES: Final = 4096
# Received headers up to this size with tuples, tensors or arrays in them (small micro-batches
# inline, larger ones referencing their data frames, control payloads with tuples) take
# `_decode_small`; the limit keeps the work it may repeat (see there) small, and is where the
# collector starts being paused (_PAUSE_GC_ABOVE).
_SMALL_MAX_BYTES: Final = 16 * 1024
# What the channels receive (``copy=False``): a frame whose buffer is a 1-D byte view.
_FRAME: Final = zmq.Frame

# What msgpack, torch and numpy raise on input they reject (torch raises RuntimeError for e.g.
# sizes it cannot allocate); inside `decode` each of these means a malformed message.
_MALFORMED = (
    ValueError,
    TypeError,
    OverflowError,
    RecursionError,
    RuntimeError,
    MemoryError,
    msgpack.UnpackException,
)

_NUMPY_DTYPES: Final = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
    "float16 float32 float64 complex64 complex128".split()
)
_TORCH_DTYPE_NAMES: Final = (
    "bool uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 bfloat16 float32 float64 "
    "complex32 complex64 complex128 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz "
    "float8_e8m0fnu float4_e2m1fn_x2".split()
)


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver enforces before and while decoding a message.

    The sizes are checked before decoding. The counts bound what decoding a header costs, which
    its size alone does not: 16 MiB of one-byte tensors, empty tuples or empty lists took 10 to
    40 s and up to 1.5 GiB to decode. Each count is checked as decoding goes, so a header over a
    limit is refused after at most that much work (tens of milliseconds at the defaults, see
    tests/transport/test_bombs.py):

    - ``max_values``: items of all lists and tuples plus entries (key and value) of all maps;
    - ``max_containers``: lists and maps (each costs a hundred nanoseconds or more);
    - ``max_tuples``: tuples (each is a msgpack document of its own: a microsecond or more);
    - ``max_tensors``: tensors and numpy arrays (each costs microseconds);
    - ``max_depth``: nesting of tuples and tensors in one another (each level is a msgpack
      document of its own; msgpack itself caps the nesting of lists and maps in one document).
    """

    max_frames: int = 1024
    max_header_bytes: int = 16 * 1024 * 1024
    max_message_bytes: int = 2 * 1024 * 1024 * 1024
    max_values: int = 1 << 19
    max_containers: int = 1 << 17
    max_tuples: int = 1 << 15
    max_tensors: int = 4096
    max_depth: int = 64

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


# 1024 frames: a micro-batch dict or a list of per-sample tensors, with room to spare. 16 MiB of
# header: control payloads (e.g. a list of raw prompts) travel in the header. 2 GiB total: a
# 128 MiB tensor and then some; ZeroMQ also enforces it per frame on our receiving sockets
# (ZMQ_MAXMSGSIZE). The counts pass a list of 100k prompts as strings or as dicts of a few
# strings each, tens of thousands of tuples, or a micro-batch of a few thousand tensors.
DEFAULT_LIMITS: Final = Limits()


@functools.cache
def _torch_dtypes() -> tuple[dict[str, Any], dict[Any, str]]:
    import torch

    by_name = {name: getattr(torch, name) for name in _TORCH_DTYPE_NAMES if hasattr(torch, name)}
    return by_name, {dtype: name for name, dtype in by_name.items()}


@functools.cache
def _uint8() -> Any:
    import numpy as np

    return np.dtype(np.uint8)


# --------------------------------------------------------------------------------------------
# encoding


def encode(obj: Any, *, inline_threshold: int = DEFAULT_INLINE_THRESHOLD) -> list[Any]:
    """Encode ``obj`` as a DATA message: ``[header, *tensor frames]`` (bytes / memoryviews).

    The memoryviews alias the tensors' memory: send them with ``copy=False`` and do not modify
    the tensors in place until the send has completed.
    """
    return encode_envelope(DATA_KIND, 0, obj, inline_threshold=inline_threshold)


def encode_envelope(
    kind: int, request_id: int, body: Any, *, inline_threshold: int = DEFAULT_INLINE_THRESHOLD
) -> list[Any]:
    """Encode a full envelope; `encode` and `messages.encode_message` are thin wrappers."""
    if type(request_id) is not int or not 0 <= request_id < 2**63:
        raise EncodeError(f"request_id must be an int in [0, 2**63), got {request_id!r}")
    encoder = getattr(_encoders, "encoder", None)
    if encoder is None:
        encoder = _encoders.encoder = _Encoder()
    elif encoder.frames is not None:
        # Re-entered while packing (a user type's conversion encoded something): its packer's
        # buffer is in use, and packing into it would silently corrupt the outer message.
        encoder = _Encoder()
    frames: list[Any] = [b""]
    encoder.frames, encoder.threshold = frames, inline_threshold
    try:
        frames[0] = encoder.pack([PROTOCOL_VERSION, kind, request_id, body])
    finally:
        encoder.frames = None  # holds the tensors' memory until the next message otherwise
    return frames


class _Encoder:
    """Packs one envelope at a time: a reused msgpack packer (a new one per message costs
    ~0.3 µs) whose `default` turns what msgpack cannot pack itself into our ext types, adding
    large tensors' frames to ``frames``. Each thread has one (`_encoders`); msgpack calls
    `default` mid-pack, so what that packs in turn (tuples, tensor descriptions) goes through
    other packers. Being an object, not a closure that passes itself on, it leaves no reference
    cycle per message for the garbage collector."""

    __slots__ = ("frames", "threshold", "_packer", "_small")

    def __init__(self) -> None:
        self.frames: list[Any] | None = None
        self.threshold = DEFAULT_INLINE_THRESHOLD
        self._packer = msgpack.Packer(
            default=self.default, use_bin_type=True, strict_types=True, autoreset=True
        )
        # for tensors' and arrays' descriptions (`_ext`)
        self._small = msgpack.Packer(use_bin_type=True, autoreset=True)

    def pack(self, obj: Any) -> bytes:
        try:
            return self._packer.pack(obj)  # the packer resets its buffer when it fails
        except TransportError:
            raise
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise EncodeError(f"cannot encode message: {exc}") from exc

    def default(self, obj: Any) -> Any:
        if isinstance(obj, tuple):
            return msgpack.ExtType(_EXT_TUPLE, _pack(list(obj), self.default))
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return self._tensor(obj, torch)
        np = sys.modules.get("numpy")
        if np is not None:
            if isinstance(obj, np.ndarray):
                return self._ndarray(obj, np)
            if isinstance(obj, np.generic):
                return obj.item()  # numpy scalars travel as Python numbers
        return _plain(obj)

    def _tensor(self, t: Any, torch: Any) -> Any:
        name = _torch_dtypes()[1].get(t.dtype)
        if name in _NUMPY_DTYPES and t.layout is torch.strided:
            # The fast path, through numpy (each torch call costs ~0.5 µs, numpy's less):
            # `numpy()` refuses exactly what needs the full path (a tensor that requires grad,
            # has its conjugate or negative bit set, or is not on the CPU).
            try:
                array = t.numpy()
            except (RuntimeError, TypeError):
                pass
            else:
                if array.nbytes <= self.threshold:
                    return self._inline(name, array.shape, array)
                if array.flags.c_contiguous:
                    u8 = array.reshape(-1).view(_uint8())
                    return self._ext(_EXT_TENSOR, name, array.shape, self._data_ref(u8))
        if t.layout != torch.strided:
            raise EncodeError(f"cannot encode a {t.layout} tensor; convert it to dense first")
        if name is None:
            raise EncodeError(f"cannot encode a tensor of dtype {t.dtype}")
        t = t.detach()
        if not t.is_cpu:
            t = _to_host(t, torch)
        t = t.resolve_conj().resolve_neg()
        if name in _NUMPY_DTYPES and t.nbytes <= self.threshold:
            return self._inline(name, t.shape, t.numpy())
        t = t.contiguous()
        # A contiguous tensor's elements are dense, but size-1 and empty dimensions may carry
        # any stride, which view(uint8) refuses: take the dense 1-D view explicitly.
        flat = t.as_strided((t.numel(),), (1,))
        ref = self._data_ref(flat.view(torch.uint8).numpy())
        return self._ext(_EXT_TENSOR, name, t.shape, ref)

    def _inline(self, name: str, shape: Any, array: Any) -> Any:
        """A tensor's ext with its elements inline (numpy's `tobytes` copies them in C order
        whatever the strides)."""
        return self._ext(_EXT_TENSOR, name, shape, array.tobytes())

    def _ext(self, code: int, name: str, shape: Any, ref: int | bytes) -> Any:
        """A tensor's or array's ext ``[dtype name, shape, frame index | inline bytes]``, built
        without msgpack's per-call Packer and ExtType checks (its fields hold only str, ints
        and bytes: the inner packer needs no `default` and is never re-entered)."""
        return _new_tuple(msgpack.ExtType, (code, self._small.pack([name, list(shape), ref])))

    def _ndarray(self, a: Any, np: Any) -> Any:
        if a.dtype.name not in _NUMPY_DTYPES:
            raise EncodeError(f"cannot encode a numpy array of dtype {a.dtype}")
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        if not a.flags.c_contiguous:
            a = a.copy(order="C")
        ref = b"" if a.size == 0 else self._data_ref(a.reshape(-1).view(np.uint8))
        return self._ext(_EXT_NDARRAY, a.dtype.name, a.shape, ref)

    def _data_ref(self, u8: Any) -> int | bytes:
        """Inline small data as bytes; give large data its own (zero-copy) frame; its ref."""
        if u8.nbytes <= self.threshold:
            return u8.tobytes()
        frames = self.frames
        assert frames is not None  # only called while packing
        frames.append(memoryview(u8))
        return len(frames) - 1


_encoders = threading.local()
# msgpack.ExtType validates its fields in Python on every construction; the fast path's fields
# are known to be valid, so it builds the named tuple directly (the packer only checks its type).
_new_tuple = tuple.__new__


def _pack(obj: Any, default: Any) -> bytes:
    try:
        return msgpack.packb(obj, default=default, use_bin_type=True, strict_types=True)
    except TransportError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise EncodeError(f"cannot encode message: {exc}") from exc


def _plain(obj: Any) -> Any:
    # strict_types sends subclasses here: IntEnum, StrEnum, OrderedDict, NamedTuple (handled
    # above as a tuple), ... travel as their base type.
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list):
        return list(obj)
    raise EncodeError(f"cannot encode an object of type {type(obj).__qualname__}")


def _to_host(t: Any, torch: Any) -> Any:
    """Copy a device tensor to CPU; CUDA goes through pinned memory so the DMA is direct."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        # The copy ran on the tensor's device's current stream; wait for it before zmq reads.
        torch.cuda.current_stream(t.device).synchronize()
        return host
    return t.to("cpu")


# --------------------------------------------------------------------------------------------
# decoding


def decode(
    frames: Sequence[bytes | memoryview | zmq.Frame], *, limits: Limits = DEFAULT_LIMITS
) -> Any:
    """Decode a DATA message produced by `encode`; any other kind is an `UnknownKindError`."""
    return decode_envelope(frames, limits=limits, kinds=(DATA_KIND,))[2]


def decode_envelope(
    frames: Sequence[Any], *, limits: Limits = DEFAULT_LIMITS, kinds: Collection[int]
) -> tuple[int, int, Any]:
    """Decode and check a whole message; returns ``(kind, request_id, body)``."""
    timestamps: bool | None = None  # whether the header may hold a timestamp, once scanned
    num_frames = len(frames)
    if num_frames and type(frames[0]) is _FRAME and num_frames <= limits.max_frames:
        # The fast paths for messages as received with a small header: at most
        # _SMALL_MAX_BYTES, a 4-array of this version and a known kind. Anything else, errors
        # included, takes the checks below.
        header = frames[0].buffer
        length = header.nbytes
        if (
            4 <= length <= _SMALL_MAX_BYTES
            and length <= limits.max_header_bytes
            and header[0] == 0x94
            and header[1] == PROTOCOL_VERSION
            and header[2] in kinds
            and (
                length <= limits.max_message_bytes
                if num_frames == 1
                else _received_within(frames, limits.max_message_bytes)
            )
        ):
            if num_frames == 1 and length <= _PLAIN_MAX_BYTES and not _EXT_BYTES.search(header):
                # Most control messages: no byte can start an ext, so there is nothing for
                # hooks to rebuild or refuse, and the length bounds everything else.
                try:
                    _, kind, request_id, body = msgpack.unpackb(header, strict_map_key=False)
                except _MALFORMED as exc:
                    raise _malformed(exc) from exc
                if type(request_id) is int and 0 <= request_id < 2**63:
                    return kind, request_id, body
            # Tensors, arrays or tuples (most data messages). As in _BodyDecoder, a header this
            # short cannot exceed the counts of values and containers; a timestamp needs the
            # full checks.
            elif length <= limits.max_values and length <= limits.max_containers:
                timestamps = _may_hold_timestamp(header)
                if not timestamps:
                    envelope = _decode_small(header, limits, frames)
                    if envelope is not None:
                        return envelope
    buffers = _checked_buffers(frames, limits, kinds)
    header = buffers[0]
    if len(buffers) == 1 and header.nbytes <= _PLAIN_MAX_BYTES and not _EXT_BYTES.search(header):
        # The small-message fast path (most control messages): no byte of the header can start
        # an ext, so there is nothing for hooks to rebuild or refuse, and no frame to reference;
        # its length bounds everything else.
        try:
            envelope = msgpack.unpackb(header, strict_map_key=False)
        except _MALFORMED as exc:
            raise _malformed(exc) from exc
        return _checked_envelope(envelope, None, 1)
    body_decoder = _BodyDecoder(buffers, limits, header.nbytes, check_timestamps=timestamps)
    try:
        return _checked_envelope(body_decoder.unpack(header), body_decoder, len(buffers))
    finally:
        body_decoder.release()


def decode_envelope_steps(
    frames: Sequence[Any],
    *,
    limits: Limits = DEFAULT_LIMITS,
    kinds: Collection[int],
    step_bytes: int = 32 * 1024,
) -> Generator[None, None, tuple[int, int, Any]]:
    """`decode_envelope` in steps, for large headers on an event loop: a generator that unpacks
    at most ``step_bytes`` of header per step (msgpack's streaming unpacker keeps its state in
    between) and returns ``(kind, request_id, body)``. Drive it with ``next()`` and let other
    work run between steps; the result is the same as `decode_envelope`'s, errors too."""
    buffers = _checked_buffers(frames, limits, kinds)
    header = buffers[0]
    length = header.nbytes
    body_decoder = _BodyDecoder(buffers, limits, length, count=True)
    unpacker = body_decoder.streaming_unpacker()
    # The collector stays paused between steps too: resumed in between, it would rescan the
    # partial result again and again (a full collection over 100k decoded dicts takes tens of
    # milliseconds, longer than the steps it would run between).
    _pause_gc()
    try:
        for offset in range(0, length, step_bytes):
            unpacker.feed(header[offset : offset + step_bytes])
            envelope = body_decoder.unpack_next(unpacker)
            if envelope is not _INCOMPLETE:
                if offset + step_bytes < length or unpacker.tell() != length:
                    raise DecodeError("malformed header: extra data after the envelope")
                return _checked_envelope(envelope, body_decoder, len(buffers))
            yield
        raise DecodeError("malformed header: incomplete input")
    finally:
        body_decoder.release()
        _resume_gc()


def decode_steps(
    frames: Sequence[Any], *, limits: Limits = DEFAULT_LIMITS, step_bytes: int = 32 * 1024
) -> Generator[None, None, Any]:
    """`decode` in steps (see `decode_envelope_steps`)."""
    steps = decode_envelope_steps(frames, limits=limits, kinds=(DATA_KIND,), step_bytes=step_bytes)
    return (yield from steps)[2]


_INCOMPLETE: Final = object()
# Ext payloads unpacked with `unpackb` at each nesting level before an Unpacker is made for it.
_UNPACKB_FIRST: Final = 8


def _checked_buffers(
    frames: Sequence[Any], limits: Limits, kinds: Collection[int]
) -> list[memoryview]:
    """The frames as byte buffers, after every check that needs no decoding."""
    num_frames = len(frames)
    if num_frames == 0:
        raise DecodeError("empty message: no header frame")
    if num_frames > limits.max_frames:
        raise TooManyFramesError(f"{num_frames} frames > limit {limits.max_frames}")
    if num_frames == 1:  # most control messages and small data: no list building, no sum
        header = _as_buffer(frames[0], 0)
        buffers = [header]
        total = header_len = header.nbytes
    else:
        buffers = [_as_buffer(frame, index) for index, frame in enumerate(frames)]
        header = buffers[0]
        header_len = header.nbytes
        total = sum(buffer.nbytes for buffer in buffers)
    if header_len > limits.max_header_bytes:
        raise HeaderTooLargeError(f"header {header_len} bytes > limit {limits.max_header_bytes}")
    if total > limits.max_message_bytes:
        raise MessageTooLargeError(f"message {total} bytes > limit {limits.max_message_bytes}")
    # Check the envelope's fixed prefix before interpreting the body: a fixarray of 4, then the
    # version and the kind as positive fixints (what our encoder always writes).
    if header_len < 4 or header[0] != 0x94:
        raise DecodeError("header is not a chatlearn envelope (expected a msgpack 4-array)")
    if header[1] != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"protocol version byte {header[1]:#x}, this process speaks {PROTOCOL_VERSION}"
        )
    if header[2] not in kinds:
        raise UnknownKindError(f"message kind {header[2]} is not one of {list(kinds)}")
    return buffers


def _checked_envelope(
    envelope: Any, body_decoder: _BodyDecoder | None, num_frames: int
) -> tuple[int, int, Any]:
    _, kind, request_id, body = envelope
    if type(request_id) is not int or not 0 <= request_id < 2**63:
        raise DecodeError(f"request id must be an int in [0, 2**63), got {request_id!r}")
    if num_frames > 1:
        used = body_decoder.used if body_decoder is not None else set()
        if len(used) != num_frames - 1:
            unused = sorted(set(range(1, num_frames)) - used)
            raise FrameIndexError(f"frames {unused} are not referenced by the header")
    return kind, request_id, body


def _as_buffer(frame: Any, index: int) -> memoryview:
    if type(frame) is _FRAME:  # nothing to check
        return frame.buffer
    if isinstance(frame, zmq.Frame):
        buffer = frame.buffer
    elif isinstance(frame, (bytes, bytearray, memoryview)):
        buffer = memoryview(frame)
    else:
        raise DecodeError(f"frame {index} is a {type(frame).__qualname__}, not a buffer")
    if buffer.ndim != 1 or buffer.format != "B":
        try:
            buffer = buffer.cast("B")
        except TypeError as exc:
            raise DecodeError(f"frame {index} is not a contiguous buffer") from exc
    return buffer


# Decoding allocates one tracked object per list, map and tuple; with the cyclic collector on,
# a header of n containers triggers collections that rescan all of them (measured: 1M empty lists
# take 600 ms with it, 105 ms without). Large headers are decoded with it paused: the objects are
# scanned once, when it resumes. Pauses may overlap (decoding in several threads): the first one
# records whether it was enabled, the last one restores that.
_PAUSE_GC_ABOVE: Final = 16 * 1024
_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


def _pause_gc() -> bool:
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    return True


def _resume_gc() -> None:
    global _gc_pauses
    with _gc_lock:
        _gc_pauses -= 1
        if _gc_pauses == 0 and _gc_was_enabled:
            gc.enable()


class _BodyDecoder:
    """The hooks for one message: rebuild tuples, tensors and arrays from their frames, and
    count what the header holds against the `Limits`.

    Tensors and arrays are counted always (each costs microseconds). Lists, maps and their
    items are counted only when the header is long enough to exceed a limit (a header of n
    bytes holds at most n values), so small messages decode without a Python call per
    container; the same hooks refuse msgpack's timestamps (decoded by msgpack itself, bypassing
    ext_hook) when the header holds bytes that may start one.
    """

    __slots__ = (
        "buffers",
        "used",
        "limits",
        "length",
        "depth",
        "options",
        "tensors_left",
        "tuples_left",
        "check_timestamps",
        "_unpackers",
        "_fed",
    )

    def __init__(
        self,
        buffers: list[memoryview],
        limits: Limits,
        length: int,
        *,
        count: bool = False,
        check_timestamps: bool | None = None,
    ) -> None:
        """``check_timestamps``: `_may_hold_timestamp` of the header if already known."""
        self.buffers = buffers
        self.used: set[int] = set()
        self.limits = limits
        self.length = length
        self.depth = 0
        self.tensors_left = limits.max_tensors
        self.tuples_left = limits.max_tuples
        if check_timestamps is None:
            check_timestamps = _may_hold_timestamp(buffers[0])
        self.check_timestamps = check_timestamps
        self.options: dict[str, Any] = {"ext_hook": self.ext_hook, "strict_map_key": False}
        if count or length > min(limits.max_values, limits.max_containers):
            self.options.update(self._bounds())
        if self.check_timestamps or "max_array_len" in self.options:
            list_hook, map_hook = _counting_hooks(limits, check_timestamps=self.check_timestamps)
            self.options["list_hook"] = list_hook
            self.options["object_pairs_hook"] = map_hook
        self._unpackers: list[msgpack.Unpacker | None] = []
        self._fed: list[int] = []

    def release(self) -> None:
        """Drop the references to the frames: `options` holds a bound method of this object (a
        reference cycle), so without this every received frame (megabytes of tensor data, when
        no decoded tensor keeps it) would live until the cyclic collector next runs."""
        self.buffers = []
        self.options = {}
        self._unpackers = []

    def _bounds(self) -> dict[str, int]:
        # unpackb bounds every length field by the document's own length by default: no length
        # can claim more elements than there are bytes, so memory stays proportional to what was
        # received. Nested unpackers (ext payloads) get the same bounds explicitly, and lists
        # and maps are bounded by max_values too, refused before they are allocated.
        length = self.length
        max_items = min(length, self.limits.max_values)
        return {
            "max_str_len": length,
            "max_bin_len": length,
            "max_ext_len": length,
            "max_array_len": max_items,
            "max_map_len": min(length // 2, self.limits.max_values),
        }

    def unpack(self, header: memoryview) -> Any:
        paused = self.length > _PAUSE_GC_ABOVE and _pause_gc()
        try:
            return msgpack.unpackb(header, **self.options)
        except TransportError:
            raise
        except _MALFORMED as exc:
            raise _malformed(exc) from exc
        finally:
            if paused:
                _resume_gc()

    def streaming_unpacker(self) -> msgpack.Unpacker:
        return msgpack.Unpacker(**self.options, max_buffer_size=self.length)

    def unpack_next(self, unpacker: msgpack.Unpacker) -> Any:
        """The next object of a fed streaming unpacker, or _INCOMPLETE if it needs more."""
        try:
            return unpacker.unpack()
        except msgpack.OutOfData:
            return _INCOMPLETE
        except TransportError:
            raise
        except _MALFORMED as exc:
            raise _malformed(exc) from exc

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_TUPLE:
            self.tuples_left -= 1
            if self.tuples_left < 0:
                raise TooManyObjectsError(f"header holds more than {self.limits.max_tuples} tuples")
            value = self._nested(data)
            if type(value) is not list:
                raise DecodeError("tuple ext payload is not a list")
            return tuple(value)
        if code == _EXT_TENSOR or code == _EXT_NDARRAY:
            self.tensors_left -= 1
            if self.tensors_left < 0:
                raise TooManyObjectsError(
                    f"header holds more than {self.limits.max_tensors} tensors and arrays"
                )
            if code == _EXT_TENSOR:
                return self._tensor(*_check_ref(self._nested(data), "tensor"))
            return self._ndarray(*_check_ref(self._nested(data), "array"))
        raise DecodeError(f"unknown msgpack ext type {code}")

    def _nested(self, data: bytes) -> Any:
        """Unpack an ext payload (a msgpack document of its own).

        One `Unpacker` per nesting level serves every payload at that level: feeding a reused
        unpacker costs a third of an `unpackb` call with its keyword options (260 vs 830 ns),
        which is most of what a tuple costs. It is fed exactly one payload at a time and must
        consume it all; any error ends the whole decode, so a broken unpacker is never reused.
        """
        depth = self.depth
        if depth >= self.limits.max_depth:
            raise NestingTooDeepError(f"tuples or tensors nested deeper than {depth} levels")
        if depth == len(self._unpackers):
            self._unpackers.append(None)
            self._fed.append(0)
        unpacker = self._unpackers[depth]
        if unpacker is None:
            # The first payloads at a level: an Unpacker costs as much to create as a few
            # `unpackb` calls, so messages with a few tensors do not pay for one (`_fed` counts
            # these payloads until then, and the bytes fed to the Unpacker after).
            self._fed[depth] += 1
            if self._fed[depth] <= _UNPACKB_FIRST:
                return self._unpack_once(data)
            options = {**self.options, **self._bounds(), "max_buffer_size": self.length}
            unpacker = self._unpackers[depth] = msgpack.Unpacker(**options)
            self._fed[depth] = 0
        unpacker.feed(data)
        self._fed[depth] += len(data)
        self.depth = depth + 1
        try:
            value = unpacker.unpack()
        finally:
            self.depth = depth
        if unpacker.tell() != self._fed[depth]:
            raise DecodeError("trailing bytes after an ext payload")
        return value

    def _unpack_once(self, data: bytes) -> Any:
        # unpackb bounds the lengths in `data` by its own length
        self.depth += 1
        try:
            return msgpack.unpackb(data, **self.options)
        finally:
            self.depth -= 1

    def _data(self, ref: int | bytes, expected_bytes: int) -> memoryview | bytearray:
        if type(ref) is bytes:
            data: memoryview | bytearray = bytearray(ref)  # inline: a writable copy
        else:
            assert type(ref) is int
            if not 1 <= ref < len(self.buffers):
                raise FrameIndexError(f"frame index {ref} out of range 1..{len(self.buffers) - 1}")
            if ref in self.used:
                raise FrameIndexError(f"frame {ref} is referenced twice")
            self.used.add(ref)
            data = self.buffers[ref]
            if data.readonly:
                data = bytearray(data)  # torch cannot alias read-only memory safely
        if len(data) != expected_bytes:
            raise FrameSizeError(f"shape × itemsize = {expected_bytes} bytes, data is {len(data)}")
        return data

    def _tensor(self, dtype_name: str, shape: list[int], ref: int | bytes) -> Any:
        dtype = _torch_dtypes()[0].get(dtype_name)
        if dtype is None:
            raise UnknownDtypeError(f"unknown torch dtype {dtype_name!r}")
        return _tensor_from(self._data(ref, _numel(shape) * dtype.itemsize), dtype, shape)

    def _ndarray(self, dtype_name: str, shape: list[int], ref: int | bytes) -> Any:
        import numpy as np

        if dtype_name not in _NUMPY_DTYPES:
            raise UnknownDtypeError(f"unknown numpy dtype {dtype_name!r}")
        dtype = np.dtype(dtype_name)
        return _ndarray_from(self._data(ref, _numel(shape) * dtype.itemsize), dtype, shape)


def _tensor_from(data: memoryview | bytearray, dtype: Any, shape: list[int]) -> Any:
    """A tensor of ``shape`` viewing ``data`` (writable, of exactly the size the shape needs)."""
    import torch

    if not data:
        return torch.empty(shape, dtype=dtype)
    if dtype is torch.bool:
        u8 = torch.frombuffer(data, dtype=torch.uint8)
        if bool((u8 > 1).any()):
            raise DecodeError("bool tensor data holds bytes other than 0 and 1")
    # Each tensor operation costs microseconds: view the buffer as its dtype at once, and
    # copy only if it is not aligned for it (a small frame in libzmq's receive buffer).
    tensor = torch.frombuffer(data, dtype=dtype)
    if tensor.data_ptr() % dtype.itemsize:
        u8 = torch.frombuffer(data, dtype=torch.uint8).clone()
        tensor = u8.view(dtype)
    if len(shape) == 1:
        return tensor
    # sizes as arguments: torch parses a list argument at twice the cost (1.1 vs 0.7 µs)
    return tensor.view(*shape) if shape else tensor.view(shape)


def _ndarray_from(data: memoryview | bytearray, dtype: Any, shape: list[int]) -> Any:
    """A numpy array of ``shape`` viewing ``data`` (as `_tensor_from`)."""
    import numpy as np

    if not data:
        return np.empty(shape, dtype=dtype)
    u8 = np.frombuffer(data, dtype=np.uint8)
    if u8.ctypes.data % dtype.itemsize:
        u8 = u8.copy()
    if dtype == np.bool_ and bool((u8 > 1).any()):
        raise DecodeError("bool array data holds bytes other than 0 and 1")
    return u8.view(dtype).reshape(shape)


class _Fallback(Exception):
    """`_decode_small` met something it leaves to the full decoder."""


def _decode_small(
    header: memoryview, limits: Limits, frames: Sequence[Any]
) -> tuple[int, int, Any] | None:
    """The envelope of a received message with a small header, or None to let the full decoder
    take it (which then also gives any error).

    It decodes what the full decoder would, with the same checks, but without its per-message
    set-up (a `_BodyDecoder`, an options dict, hooks as bound methods): ~2 µs less for a message
    of one 4 KiB tensor, most of a small micro-batch's decoding, and ~3 µs less for one large
    tensor in a frame of its own (see BENCHMARKS.md). The caller has checked the envelope's
    prefix and the sizes, that the header is short enough that no count of values or
    containers can be exceeded, and that it holds no timestamp candidate; tensors, tuples,
    nesting and frame references are checked here. Anything out of the ordinary (an error of
    any kind, a frame that is not a writable received frame) returns None: the full decoder
    then redoes at most 16 KiB of header work and raises the same typed errors as ever, so the
    two paths cannot disagree on what is refused or why.
    """
    hook = _SmallExtHook(limits, frames)
    try:
        _, kind, request_id, body = _unpackb(header, ext_hook=hook, strict_map_key=False)
    except Exception:  # _Fallback, or anything msgpack, torch or numpy refused
        return None
    if type(request_id) is not int or not 0 <= request_id < 2**63:
        return None
    if len(frames) > 1 and len(hook.used or ()) != len(frames) - 1:
        return None  # a frame no tensor references
    return kind, request_id, body


class _SmallExtHook:
    """`_decode_small`'s ext hook: counts tensors, tuples and nesting and checks frame
    references as `_BodyDecoder` does, and raises `_Fallback` at anything else. An object
    rather than a closure: a closure that passes itself to the nested unpacking refers to
    itself through its cell, a cycle that would leave garbage for the collector after every
    message instead of being freed at once."""

    __slots__ = ("tensors_left", "tuples_left", "depth", "max_depth", "frames", "used")

    def __init__(self, limits: Limits, frames: Sequence[Any]) -> None:
        self.tensors_left = limits.max_tensors
        self.tuples_left = limits.max_tuples
        self.max_depth = limits.max_depth
        self.depth = 0
        self.frames = frames
        self.used: set[int] | None = None  # the data frames referenced (if any)

    def __call__(self, code: int, data: bytes) -> Any:
        if code == _EXT_TENSOR or code == _EXT_NDARRAY:
            self.tensors_left -= 1
            if self.tensors_left < 0:
                raise _Fallback
        elif code == _EXT_TUPLE:
            self.tuples_left -= 1
            if self.tuples_left < 0:
                raise _Fallback
        else:
            raise _Fallback
        if self.depth >= self.max_depth:
            raise _Fallback
        self.depth += 1
        try:
            value = _unpackb(data, ext_hook=self, strict_map_key=False)
        finally:
            self.depth -= 1
        if code == _EXT_TUPLE:
            if type(value) is not list:
                raise _Fallback
            return tuple(value)
        dtype_name, shape, ref = _check_ref(value, "tensor")
        # exactly bytes (inline: a writable copy) or an int (`_check_ref`)
        buffer = bytearray(ref) if isinstance(ref, bytes) else self._frame(ref)
        if code == _EXT_TENSOR:
            dtype = _torch_dtypes()[0].get(dtype_name)
            if dtype is None or len(buffer) != _numel(shape) * dtype.itemsize:
                raise _Fallback
            return _tensor_from(buffer, dtype, shape)
        import numpy as np

        if dtype_name not in _NUMPY_DTYPES:
            raise _Fallback
        np_dtype = np.dtype(dtype_name)
        if len(buffer) != _numel(shape) * np_dtype.itemsize:
            raise _Fallback
        return _ndarray_from(buffer, np_dtype, shape)

    def _frame(self, ref: int) -> memoryview:
        """The writable buffer of the received data frame ``ref``, referenced once."""
        frames, used = self.frames, self.used
        if used is None:
            used = self.used = set()
        # (every frame is a received zmq.Frame: `_received_within`)
        if not 0 < ref < len(frames) or ref in used:
            raise _Fallback
        used.add(ref)
        buffer: memoryview = frames[ref].buffer
        if buffer.readonly:
            raise _Fallback
        return buffer


def _received_within(frames: Sequence[Any], max_bytes: int) -> bool:
    """Whether the data frames after a received header are received frames too and the message
    is at most ``max_bytes``."""
    total = 0
    for frame in frames:
        if type(frame) is not _FRAME:
            return False
        total += len(frame)
    return total <= max_bytes


_unpackb: Final = msgpack.unpackb


def _may_hold_timestamp(header: memoryview) -> bool:
    """Whether ``header`` holds bytes that may start a msgpack timestamp.

    `re` finds the 0xff every timestamp holds byte by byte; `bytes.find` uses memchr, over ten
    times faster. So for headers up to _MEMCHR_MAX, memchr finds the first 0xff and `re` scans
    only from there: data without 0xff bytes (masks, positions, lengths and other small
    non-negative integers; ones and zeros) costs a copy and a memchr, ~0.2 µs for 4 KiB instead
    of 1.1; data with an early 0xff (random floats, -100 labels) costs what it did plus the copy.
    """
    if header.nbytes <= _MEMCHR_MAX:
        first = header.tobytes().find(b"\xff")
        return first >= 0 and _TIMESTAMP_BYTES.search(header, first) is not None
    return _TIMESTAMP_BYTES.search(header) is not None


def _malformed(exc: BaseException) -> DecodeError:
    text = str(exc)
    # msgpack refuses a list or map longer than max_values itself, before allocating it
    if "exceeds max_array_len" in text or "exceeds max_map_len" in text:
        return TooManyObjectsError(f"header holds too many values: {text}")
    return DecodeError(f"malformed header: {text}")


def _counting_hooks(limits: Limits, *, check_timestamps: bool) -> tuple[Any, Any]:
    """The list and map hooks of one decode: count values and containers against ``limits``
    and, if asked, refuse msgpack timestamps. They run once per list or map of a large header,
    so they are closures (a cell is cheaper than an attribute) with the checks inlined."""
    values_left = limits.max_values
    containers_left = limits.max_containers

    def too_many() -> TooManyObjectsError:
        if values_left < 0:
            return TooManyObjectsError(f"header holds more than {limits.max_values} values")
        return TooManyObjectsError(f"header holds more than {limits.max_containers} lists and maps")

    def list_hook(items: list[Any]) -> list[Any]:
        nonlocal values_left, containers_left
        values_left -= len(items)
        containers_left -= 1
        if values_left < 0 or containers_left < 0:
            raise too_many()
        if check_timestamps and msgpack.Timestamp in set(map(type, items)):
            raise DecodeError("msgpack timestamp ext type is not part of the protocol")
        return items

    def map_hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        # msgpack hands the pairs, not the dict: a map of one key repeated a million times is
        # a million values of work, and len(dict) would count one
        nonlocal values_left, containers_left
        values_left -= len(pairs)
        containers_left -= 1
        if values_left < 0 or containers_left < 0:
            raise too_many()
        if check_timestamps and msgpack.Timestamp in set(
            map(type, itertools.chain.from_iterable(pairs))
        ):
            raise DecodeError("msgpack timestamp ext type is not part of the protocol")
        return dict(pairs)

    return list_hook, map_hook


def _check_ref(value: Any, what: str) -> tuple[str, list[int], int | bytes]:
    if type(value) is not list or len(value) != 3:
        raise DecodeError(f"{what} reference must be [dtype, shape, data]")
    dtype_name, shape, ref = value
    if type(dtype_name) is not str:
        raise UnknownDtypeError(f"{what} dtype must be a string, got {dtype_name!r}"[:200])
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise DecodeError(f"{what} shape must be a list of at most {MAX_DIMS} dimensions")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim < 2**63:
            raise DecodeError(f"{what} shape has a bad dimension {dim!r}"[:200])
    if type(ref) is not int and type(ref) is not bytes:
        raise DecodeError(f"{what} data must be a frame index or inline bytes")
    return dtype_name, shape, ref


def _numel(shape: list[int]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel
