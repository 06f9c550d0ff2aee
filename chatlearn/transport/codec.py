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
than a small multiple of its size), unknown ext types (including msgpack's built-in timestamp)
are refused, nesting is capped, and every data frame must be referenced exactly once.

torch and numpy are imported only when a message actually contains a tensor or an array, so a
process can speak this protocol (e.g. an actor's start-up handshake) before it imports torch.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Collection, Sequence
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
    ProtocolVersionError,
    TooManyFramesError,
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

# Nesting of tuples (each one is a nested msgpack document): far above any real payload, far
# below Python's recursion limit.
MAX_TUPLE_DEPTH: Final = 64
# torch's own limit on the number of dimensions.
MAX_DIMS: Final = 64

_EXT_TUPLE: Final = 1
_EXT_TENSOR: Final = 2
_EXT_NDARRAY: Final = 3

# msgpack's built-in timestamp (ext -1) is decoded by msgpack itself, bypassing ext_hook. Its
# three encodings start with these bytes; only if one occurs do we pay for a walk of the result.
# The pattern starts with the literal 0xff, which lets `re` scan with memchr; written as the
# alternation of the three prefixes it scanned byte by byte, ~70 µs for a 4 KiB inline tensor.
_TIMESTAMP_BYTES = re.compile(rb"\xff(?:(?<=[\xd6\xd7]\xff)|(?<=\xc7\x0c\xff))")

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
    """Upper bounds a receiver enforces before and while decoding a message."""

    max_frames: int = 1024
    max_header_bytes: int = 16 * 1024 * 1024
    max_message_bytes: int = 2 * 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_frames", "max_header_bytes", "max_message_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


# 1024 frames: a micro-batch dict or a list of per-sample tensors, with room to spare. 16 MiB of
# header: control payloads (e.g. a list of raw prompts) travel in the header, and the unpacker
# limits keep a hostile 16 MiB header to bounded memory. 2 GiB total: a 128 MiB tensor and then
# some; ZeroMQ also enforces it per frame on our receiving sockets (ZMQ_MAXMSGSIZE).
DEFAULT_LIMITS: Final = Limits()


@functools.cache
def _torch_dtypes() -> tuple[dict[str, Any], dict[Any, str]]:
    import torch

    by_name = {name: getattr(torch, name) for name in _TORCH_DTYPE_NAMES if hasattr(torch, name)}
    return by_name, {dtype: name for name, dtype in by_name.items()}


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
    frames: list[Any] = [b""]

    def default(obj: Any) -> Any:
        if isinstance(obj, tuple):
            return msgpack.ExtType(_EXT_TUPLE, _pack(list(obj), default))
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return _encode_tensor(obj, torch, frames, inline_threshold, default)
        np = sys.modules.get("numpy")
        if np is not None:
            if isinstance(obj, np.ndarray):
                return _encode_ndarray(obj, np, frames, inline_threshold, default)
            if isinstance(obj, np.generic):
                return obj.item()  # numpy scalars travel as Python numbers
        return _plain(obj)

    frames[0] = _pack([PROTOCOL_VERSION, kind, request_id, body], default)
    return frames


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


def _encode_tensor(t: Any, torch: Any, frames: list[Any], threshold: int, default: Any) -> Any:
    if t.layout != torch.strided:
        raise EncodeError(f"cannot encode a {t.layout} tensor; convert it to dense first")
    name = _torch_dtypes()[1].get(t.dtype)
    if name is None:
        raise EncodeError(f"cannot encode a tensor of dtype {t.dtype}")
    t = t.detach()
    if t.device.type != "cpu":
        t = _to_host(t, torch)
    t = t.resolve_conj().resolve_neg().contiguous()
    # A contiguous tensor's elements are dense, but size-1 and empty dimensions may carry any
    # stride, which view(uint8) refuses: take the dense 1-D view explicitly.
    flat = t.as_strided((t.numel(),), (1,))
    ref = _data_ref(flat.view(torch.uint8).numpy(), frames, threshold)
    return msgpack.ExtType(_EXT_TENSOR, _pack([name, list(t.shape), ref], default))


def _to_host(t: Any, torch: Any) -> Any:
    """Copy a device tensor to CPU; CUDA goes through pinned memory so the DMA is direct."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        # The copy ran on the tensor's device's current stream; wait for it before zmq reads.
        torch.cuda.current_stream(t.device).synchronize()
        return host
    return t.to("cpu")


def _encode_ndarray(a: Any, np: Any, frames: list[Any], threshold: int, default: Any) -> Any:
    if a.dtype.name not in _NUMPY_DTYPES:
        raise EncodeError(f"cannot encode a numpy array of dtype {a.dtype}")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    shape = list(a.shape)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    ref = b"" if a.size == 0 else _data_ref(a.reshape(-1).view(np.uint8), frames, threshold)
    return msgpack.ExtType(_EXT_NDARRAY, _pack([a.dtype.name, shape, ref], default))


def _data_ref(u8: Any, frames: list[Any], threshold: int) -> int | bytes:
    """Inline small data as bytes; give large data its own (zero-copy) frame; return the ref."""
    if u8.nbytes <= threshold:
        return u8.tobytes()
    frames.append(memoryview(u8))
    return len(frames) - 1


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
    num_frames = len(frames)
    if num_frames == 0:
        raise DecodeError("empty message: no header frame")
    if num_frames > limits.max_frames:
        raise TooManyFramesError(f"{num_frames} frames > limit {limits.max_frames}")
    buffers = [_as_buffer(frame, index) for index, frame in enumerate(frames)]
    header = buffers[0]
    header_len = header.nbytes
    if header_len > limits.max_header_bytes:
        raise HeaderTooLargeError(f"header {header_len} bytes > limit {limits.max_header_bytes}")
    total = sum(buffer.nbytes for buffer in buffers)
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
    body_decoder = _BodyDecoder(buffers)
    try:
        envelope = msgpack.unpackb(header, **body_decoder.options(header_len))
    except TransportError:
        raise
    except _MALFORMED as exc:
        raise DecodeError(f"malformed header: {exc}") from exc
    _, kind, request_id, body = envelope
    if type(request_id) is not int or not 0 <= request_id < 2**63:
        raise DecodeError(f"request id must be an int in [0, 2**63), got {request_id!r}")
    if len(body_decoder.used) != num_frames - 1:
        unused = sorted(set(range(1, num_frames)) - body_decoder.used)
        raise FrameIndexError(f"frames {unused} are not referenced by the header")
    if _TIMESTAMP_BYTES.search(header) and _contains_timestamp(body):
        raise DecodeError("msgpack timestamp ext type is not part of the protocol")
    return kind, request_id, body


def _as_buffer(frame: Any, index: int) -> memoryview:
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


def _contains_timestamp(obj: Any) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, msgpack.Timestamp):
            return True
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return False


class _BodyDecoder:
    """The ext hook for one message: rebuilds tuples, tensors and arrays from their frames."""

    __slots__ = ("buffers", "used", "depth")

    def __init__(self, buffers: list[memoryview]) -> None:
        self.buffers = buffers
        self.used: set[int] = set()
        self.depth = 0

    def options(self, length: int) -> dict[str, Any]:
        # Every limit is the document's own length: no length field can claim more elements than
        # there are bytes, so memory stays proportional to what was actually received.
        return {
            "ext_hook": self.ext_hook,
            "raw": False,
            "strict_map_key": False,
            "max_str_len": length,
            "max_bin_len": length,
            "max_array_len": length,
            "max_map_len": length // 2,
            "max_ext_len": length,
        }

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_TUPLE:
            return tuple(self._nested(data, list, "tuple"))
        if code == _EXT_TENSOR:
            return self._tensor(*self._nested(data, _check_ref, "tensor"))
        if code == _EXT_NDARRAY:
            return self._ndarray(*self._nested(data, _check_ref, "array"))
        raise DecodeError(f"unknown msgpack ext type {code}")

    def _nested(self, data: bytes, expected: Any, what: str) -> Any:
        if self.depth >= MAX_TUPLE_DEPTH:
            raise DecodeError(f"nesting deeper than {MAX_TUPLE_DEPTH} ext levels")
        self.depth += 1
        try:
            value = msgpack.unpackb(data, **self.options(len(data)))
        finally:
            self.depth -= 1
        if expected is list:
            if type(value) is not list:
                raise DecodeError(f"{what} ext payload is not a list")
            return value
        return expected(value, what)

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
        import torch

        dtype = _torch_dtypes()[0].get(dtype_name)
        if dtype is None:
            raise UnknownDtypeError(f"unknown torch dtype {dtype_name!r}")
        data = self._data(ref, _numel(shape) * dtype.itemsize)
        if not data:
            return torch.empty(shape, dtype=dtype)
        u8 = torch.frombuffer(data, dtype=torch.uint8)
        if u8.data_ptr() % dtype.itemsize:
            u8 = u8.clone()  # unaligned (small frame inside libzmq's receive buffer)
        if dtype == torch.bool and bool((u8 > 1).any()):
            raise DecodeError("bool tensor data holds bytes other than 0 and 1")
        return u8.view(dtype).view(shape)

    def _ndarray(self, dtype_name: str, shape: list[int], ref: int | bytes) -> Any:
        import numpy as np

        if dtype_name not in _NUMPY_DTYPES:
            raise UnknownDtypeError(f"unknown numpy dtype {dtype_name!r}")
        dtype = np.dtype(dtype_name)
        data = self._data(ref, _numel(shape) * dtype.itemsize)
        if not data:
            return np.empty(shape, dtype=dtype)
        u8 = np.frombuffer(data, dtype=np.uint8)
        if u8.ctypes.data % dtype.itemsize:
            u8 = u8.copy()
        if dtype == np.bool_ and bool((u8 > 1).any()):
            raise DecodeError("bool array data holds bytes other than 0 and 1")
        return u8.view(dtype).reshape(shape)


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
