"""Codec: exact round-trips, zero-copy aliasing, and one test per strict-decoding check."""

from __future__ import annotations

import subprocess
import sys
import warnings
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq

from chatlearn.transport import (
    DEFAULT_INLINE_THRESHOLD,
    DecodeError,
    EncodeError,
    FrameIndexError,
    FrameSizeError,
    HeaderTooLargeError,
    Limits,
    Message,
    MessageKind,
    MessageTooLargeError,
    ProtocolVersionError,
    TooManyFramesError,
    TooManyObjectsError,
    UnknownDtypeError,
    UnknownKindError,
    decode,
    decode_message,
    encode,
    encode_message,
)

ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]
BIG = DEFAULT_INLINE_THRESHOLD  # elements: above the threshold for every dtype


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape).to(dtype)


def assert_same(a: object, b: object) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(
            a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b
        )
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN


def roundtrip(obj: object, **kwargs: object) -> object:
    return decode(encode(obj, **kwargs))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (4, 7), (BIG,)], ids=str)
def test_tensor_roundtrip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = make_tensor(dtype, shape)
    assert_same(t, roundtrip({"t": t})["t"])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_non_contiguous_tensors_roundtrip(dtype: torch.dtype) -> None:
    base = make_tensor(dtype, (64, 80))
    for view in (base.t(), base[::3, 1::2], base[:, 5], base[:, None].expand(64, 3, 80)):
        assert not view.is_contiguous()
        out = roundtrip(view)
        assert out.is_contiguous()
        assert_same(view.contiguous(), out)


def test_conjugate_and_grad_tensors_are_sent_as_values() -> None:
    z = torch.randn(100, dtype=torch.complex64)
    assert_same(z.conj().resolve_conj(), roundtrip(z.conj()))
    w = torch.randn(10, requires_grad=True)
    out = roundtrip(w * 2)
    assert not out.requires_grad and torch.equal(out, (w * 2).detach())


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_large_tensors_encode_the_same_on_every_path(dtype: torch.dtype) -> None:
    # Contiguous CPU tensors of numpy's dtypes take a fast path through numpy to their frames;
    # views, tensors that require grad and conjugate or negative views take torch's path. The
    # same values must give the same frames, byte for byte.
    base = make_tensor(dtype, (4, BIG))
    expected = encode({"t": base})
    assert len(expected) == 2
    variants = [base.t().contiguous().t(), torch.stack([base, base], -1)[..., 0]]
    if dtype.is_floating_point or dtype.is_complex:
        variants.append(base.clone().requires_grad_())
    if dtype.is_complex:
        variants.append(base.conj_physical().conj())  # the conjugate bit over conjugated data
        assert variants[-1].is_conj()
    for variant in variants:
        assert torch.equal(variant.detach().resolve_conj(), base)
        frames = encode({"t": variant})
        assert [bytes(frame) for frame in frames] == [bytes(frame) for frame in expected]
        assert_same(base, decode(frames)["t"])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_small_tensors_inline_equal_the_frame_path(dtype: torch.dtype) -> None:
    # Small CPU tensors of numpy's dtypes are inlined through numpy's tobytes (the fast path),
    # the others through the torch views large tensors take to their frames: whatever the
    # strides and bits, both must give the same values, and views must travel as values.
    base = make_tensor(dtype, (8, 20))  # 3 × 8 × 20 × 16 bytes still inline for complex128
    views = [base, base.t(), base[::3, 1::2], base[:, 5], base[:, None].expand(8, 3, 20)]
    views += [base[0, 0], base[:0], base.unsqueeze(0)]
    for view in views:
        inline = encode(view)
        framed = encode(view, inline_threshold=0)
        assert len(inline) == 1
        assert len(framed) == (2 if view.numel() else 1)
        assert_same(view.contiguous(), decode(inline))
        assert_same(view.contiguous(), decode(framed))
    if dtype.is_complex:
        # a conjugate view, and a real view with the negative bit set (`conj().imag`)
        for view in (base.conj(), base.conj().imag):
            assert view.is_conj() or view.is_neg()
            assert_same(view.resolve_conj().resolve_neg(), decode(encode(view)))


def test_numpy_arrays_roundtrip() -> None:
    for dtype in [
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]:
        for shape in [(), (0,), (7, 3), (3000,)]:
            a = np.asarray(np.random.random_sample(shape) * 50).astype(dtype)
            assert_same(a, roundtrip(a))
    big_endian = np.arange(5000, dtype=">i4")
    assert np.array_equal(roundtrip(big_endian), big_endian)
    strided = np.arange(10000, dtype=np.float64).reshape(100, 100)[::2, ::3]
    assert_same(strided.copy(), roundtrip(strided))
    assert roundtrip(np.float32(1.5)) == 1.5  # numpy scalars travel as Python numbers


def test_plain_values_and_nesting_roundtrip() -> None:
    obj = {
        "ints": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1],
        "floats": [0.0, -1.5, float("inf"), 1e-300],
        "bools": (True, False),
        "str": "héllo ✓",
        "bytes": b"\x00\xff" * 10,
        "none": None,
        "tuple": (1, (2, (3, [4, (5,)])), ()),
        "empty": {"l": [], "t": (), "d": {}},
        3: "int key",
        (1, "a"): "tuple key",
        "tensors": [torch.ones(2), {"deep": (torch.zeros(BIG),)}],
    }
    assert_same(obj, roundtrip(obj))
    for scalar in [None, 1, "x", b"y", 2.5, True, ()]:
        assert_same(scalar, roundtrip(scalar))


def test_subclasses_travel_as_their_base_type() -> None:
    from collections import OrderedDict, namedtuple

    point = namedtuple("point", "x y")
    out = roundtrip([MessageKind.CALL, OrderedDict(a=1), point(1, 2), bytearray(b"ab")])
    assert_same([4, {"a": 1}, (1, 2), b"ab"], out)


def test_unsupported_objects_raise_encode_error() -> None:
    for bad in [object(), {1, 2}, 2**64, torch.ones(3).to_sparse(), np.array(["a"])]:
        with pytest.raises(EncodeError):
            encode({"x": bad})
    with pytest.raises(EncodeError):
        encode_message(Message(kind=MessageKind.CALL, request_id=-1))


def test_the_reused_packer_is_left_clean_by_failures_and_never_reentered() -> None:
    """Each thread packs its envelopes with one reused packer: a message that fails to encode
    must not leave bytes in it for the next, and a conversion of a user type that encodes a
    message of its own while the outer one is half packed must get a packer of its own."""
    good = {"x": torch.arange(4.0), "big": torch.ones(BIG), "t": (1, "a")}
    expected = encode(good)
    for bad in [{"ok": 1, "bad": object()}, [1, 2**64], {"x": torch.ones(3).to_sparse()}]:
        with pytest.raises(EncodeError):
            encode(bad)
        frames = encode(good)
        assert frames[0] == expected[0] and len(frames) == 2
        assert_same(good, decode(frames))

    inner: list[list[Any]] = []

    class Sneaky(int):
        def __int__(self) -> int:  # runs while the outer message is being packed
            inner.append(encode({"inner": torch.arange(3), "big": torch.zeros(BIG)}))
            return 7

    outer = encode([Sneaky(5), {"x": torch.ones(BIG)}])
    assert_same([7, {"x": torch.ones(BIG)}], decode(outer))
    assert_same({"inner": torch.arange(3), "big": torch.zeros(BIG)}, decode(inner[0]))


def test_threads_encoding_at_once_get_their_own_messages() -> None:
    # Each thread packs with a packer of its own (the compute thread and the event loop both
    # encode): concurrent encodes never mix their bytes or frames.
    from concurrent.futures import ThreadPoolExecutor

    def encode_many(worker: int) -> None:
        for i in range(300):
            payload = {"w": worker, "i": i, "x": torch.full((5,), float(i)), "big": torch.ones(BIG)}
            assert_same(payload, decode(encode(payload)))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, in the middle of packing too
    try:
        with ThreadPoolExecutor(4) as pool:
            for done in [pool.submit(encode_many, worker) for worker in range(4)]:
                done.result(timeout=60)
    finally:
        sys.setswitchinterval(interval)


def test_decoded_tensor_aliases_the_frame_memory() -> None:
    t = torch.arange(100_000, dtype=torch.float32)
    frames = encode({"t": t})
    assert len(frames) == 2
    # Sender side: the frame is the tensor's own memory (zero-copy send).
    assert np.frombuffer(frames[1], np.uint8).ctypes.data == t.data_ptr()
    # Receiver side, through a real socket: the decoded tensor's memory is the zmq.Frame.
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        pull.bind("tcp://127.0.0.1:*")
        push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
        push.send_multipart(frames, copy=False)
        received = pull.recv_multipart(copy=False)
        out = decode(received)["t"]
        address = np.frombuffer(received[1].buffer, np.uint8).ctypes.data
        assert out.data_ptr() == address
        assert torch.equal(out, t)
        out[0] = 42.0  # writable, and writes land in the frame (it is the same memory)
        assert np.frombuffer(received[1].buffer, np.float32)[0] == 42.0
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def test_small_tensors_are_inlined_and_writable() -> None:
    frames = encode({"t": torch.ones(10)})
    assert len(frames) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode(frames)["t"]
    out += 1  # a private writable copy, not the header's bytes
    assert torch.equal(out, torch.full((10,), 2.0))


def test_read_only_and_unaligned_buffers_are_copied_not_aliased() -> None:
    t = torch.arange(10_000, dtype=torch.float64)
    header, data = encode(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when aliasing read-only memory
        out = decode([header, bytes(data)])
    assert torch.equal(out, t)
    shifted = bytearray(len(data) + 1)
    shifted[1:] = data
    unaligned = memoryview(shifted)[1:]
    out = decode([header, unaligned])
    assert out.data_ptr() % 8 == 0 and torch.equal(out, t)


def test_messages_roundtrip_and_kinds_are_checked() -> None:
    for kind in MessageKind:
        msg = Message(kind=kind, request_id=12345, payload={"x": torch.ones(BIG)})
        out = decode_message(encode_message(msg))
        assert out.kind is kind and out.request_id == 12345
        assert torch.equal(out.payload["x"], msg.payload["x"])
    with pytest.raises(UnknownKindError):
        decode(encode_message(Message(kind=MessageKind.CALL)))
    with pytest.raises(UnknownKindError):
        decode_message([msgpack.packb([1, 99, 0, None])])


# --- strict decoding: one test per typed error -----------------------------------------------


def tensor_header(ref: object, dtype: str = "float32", shape: object = (4,)) -> bytes:
    ext = msgpack.ExtType(2, msgpack.packb([dtype, list(shape), ref]))
    return msgpack.packb([1, 10, 0, {"t": ext}])


def test_bad_msgpack_and_bad_structure_are_decode_errors() -> None:
    good = encode({"a": 1})[0]
    for header in [b"", b"\x94", good[:-1], good + b"\x00", b"\x94\x01\x0a\x00\xc1", b"\x93\x01"]:
        with pytest.raises(DecodeError):
            decode([header])
    with pytest.raises(DecodeError):
        decode([])
    with pytest.raises(DecodeError):
        decode([object()])
    with pytest.raises(DecodeError):
        decode([msgpack.packb([1, 10, -1, None])])  # negative request id
    with pytest.raises(DecodeError):  # unknown ext type
        decode([msgpack.packb([1, 10, 0, msgpack.ExtType(9, b"")])])
    # msgpack's timestamp ext is not ours either, in each of its three encodings
    # (timestamp 32, 64 and 96 bits), after bytes that resemble them
    for stamp in (msgpack.Timestamp(1, 0), msgpack.Timestamp(1, 5), msgpack.Timestamp(2**40, 0)):
        body = {"pad": b"\xff\x0c\xff\xd6", "t": [stamp]}
        with pytest.raises(DecodeError):
            decode([msgpack.packb([1, 10, 0, body])])
    with pytest.raises(DecodeError):  # bool tensors hold only 0 and 1
        decode([tensor_header(b"\x02", "bool", (1,))])
    nested = msgpack.packb([])
    for _ in range(100):
        nested = msgpack.packb(msgpack.ExtType(1, nested))
    with pytest.raises(DecodeError):
        decode([msgpack.packb([1, 10, 0, msgpack.ExtType(1, nested)])])


def test_received_frames_decode_like_bytes() -> None:
    # Single received frames (zmq.Frame) of small plain messages take a fast path: every
    # message, good or bad, must decode to the same value or fail with the same error as bytes.
    good = encode_message(Message(kind=MessageKind.CALL, request_id=7, payload={"m": [1, "a"]}))
    headers = [
        good[0],
        encode({"t": torch.ones(4)})[0],  # an ext: the full decoder
        encode_message(Message(kind=MessageKind.PING, payload="x" * 5000))[0],  # > 4 KiB
        b"",
        b"\x94\x01",
        good[0][:-1],
        good[0] + b"\x00",
        msgpack.packb([1, 4, -1, None]),
        msgpack.packb([1, 4, 2**64 - 1, None]),
        msgpack.packb([1, 4, "7", None]),
        msgpack.packb([2, 4, 0, None]),
        msgpack.packb([1, 99, 0, None]),
        msgpack.packb([1, 4, 0, None, 1]),
        b"\x94\x01\x04\x00\xc1",
    ]
    for header in headers:
        results = []
        for frame in (header, zmq.Frame(header)):
            try:
                msg = decode_message([frame])
                results.append((msg.kind, msg.request_id, repr(msg.payload)))
            except DecodeError as exc:
                results.append((type(exc), str(exc)))
        assert results[0] == results[1], header
    tiny = Limits(max_header_bytes=8)
    for frame in (good[0], zmq.Frame(good[0])):
        with pytest.raises(HeaderTooLargeError):
            decode_message([frame], limits=tiny)


def test_protocol_version_and_kind() -> None:
    with pytest.raises(ProtocolVersionError):
        decode([msgpack.packb([2, 10, 0, None])])
    with pytest.raises(UnknownKindError):
        decode_message([msgpack.packb([1, 0, 0, None])])


def test_unknown_dtype() -> None:
    with pytest.raises(UnknownDtypeError):
        decode([tensor_header(b"\x00" * 16, dtype="float128")])
    with pytest.raises(UnknownDtypeError):
        decode([tensor_header(b"\x00" * 16, dtype=7)])  # type: ignore[arg-type]


def _as_sent(frames: list[Any]) -> list[Any]:
    return frames


def _as_received(frames: list[Any]) -> list[zmq.Frame]:
    # what a channel hands to the decoder: writable zmq.Frames (they take its fast paths)
    return [zmq.Frame(bytes(frame)) for frame in frames]


FRAMES_AS = pytest.mark.parametrize("frames_as", [_as_sent, _as_received], ids=["sent", "received"])


@FRAMES_AS
def test_frame_size_mismatch(frames_as: Any) -> None:
    with pytest.raises(FrameSizeError):
        decode(frames_as([tensor_header(1), b"\x00" * 15]))
    with pytest.raises(FrameSizeError):
        decode(frames_as([tensor_header(b"\x00" * 17)]))


@FRAMES_AS
def test_frame_index_errors(frames_as: Any) -> None:
    for ref in (0, 2, -1, 2**40):
        with pytest.raises(FrameIndexError):
            decode(frames_as([tensor_header(ref), b"\x00" * 16]))
    with pytest.raises(FrameIndexError):  # an unreferenced extra frame
        decode(frames_as([encode({"a": 1})[0], b"\x00" * 16]))
    twice = msgpack.packb([1, 10, 0, [msgpack.ExtType(2, msgpack.packb(["uint8", [4], 1]))] * 2])
    with pytest.raises(FrameIndexError, match="referenced twice"):
        decode(frames_as([twice, b"\x00" * 4]))
    assert decode(frames_as([tensor_header(1), b"\x00" * 16]))["t"].tolist() == [0.0] * 4


@FRAMES_AS
def test_limits(frames_as: Any) -> None:
    frames = encode([torch.ones(BIG) for _ in range(5)])
    assert len(frames) == 6
    with pytest.raises(TooManyFramesError):
        decode(frames_as(frames), limits=Limits(max_frames=5))
    assert len(decode(frames_as(frames), limits=Limits(max_frames=6))) == 5
    header = encode({"s": "x" * 1000})
    with pytest.raises(HeaderTooLargeError):
        decode(frames_as(header), limits=Limits(max_header_bytes=1000))
    with pytest.raises(MessageTooLargeError):
        decode(frames_as(frames), limits=Limits(max_message_bytes=5 * BIG * 4))
    with pytest.raises(TooManyObjectsError):
        decode(frames_as(frames), limits=Limits(max_tensors=4))
    with pytest.raises(ValueError):
        Limits(max_frames=0)


def test_hostile_lengths_cannot_allocate() -> None:
    # An array header claiming 2**32-1 elements in a 10-byte message: refused, not allocated.
    claim = b"\x94\x01\x0a\x00\xdd\xff\xff\xff\xff\xc0"
    with pytest.raises(DecodeError):
        decode([claim])
    with pytest.raises(DecodeError):
        decode([tensor_header(b"", shape=(2**62, 2**62))])


def test_import_transport_does_not_import_torch_or_numpy() -> None:
    code = (
        "import sys, chatlearn.transport as t\n"
        "m = t.decode_message(t.encode_message(t.Message(kind=t.MessageKind.HELLO, payload=[1])))\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules, m.payload)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "[1]"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_copied_to_host() -> None:
    t = torch.arange(BIG * 2, dtype=torch.float32, device="cuda")
    out = roundtrip({"t": t[::2]})["t"]
    assert out.device.type == "cpu" and torch.equal(out, t[::2].cpu())


def test_decoding_keeps_no_reference_to_the_frames() -> None:
    """A received frame lives as long as what was decoded from it, not until the cyclic
    collector runs: holding 16 MiB frames longer halved the 16 MiB throughput once."""
    import gc
    import weakref

    class Frame(bytearray):  # a buffer that can be watched
        pass

    header, data = encode({"x": torch.ones(1 << 16)})
    frame = Frame(bytes(data))
    watch = weakref.ref(frame)
    enabled = gc.isenabled()
    gc.disable()
    try:
        decoded = decode([header, frame])
        assert decoded["x"].sum().item() == 1 << 16
        del decoded, frame
        assert watch() is None
    finally:
        if enabled:
            gc.enable()


def test_encoding_and_decoding_leave_no_garbage_for_the_cyclic_collector() -> None:
    """Every encoding and decoding path frees what it built by reference counting: a reference
    cycle per message is work for the collector on every small message (the encoder's closure
    made one: a collection every ~150 messages, 5-7% of a sender's time) and can hold frames."""
    import gc

    payloads = [
        {"x": torch.ones(1024), "t": (1, (2, 3)), "a": np.arange(5)},  # inline: one frame
        {"big": torch.ones(100_000), "t": (1,)},  # a data frame
        {"m": [1, "a"]},  # plain
    ]
    enabled = gc.isenabled()
    # What the session holds already (torch, and transformers once another test imported it)
    # is set aside: each collection below then goes through this test's objects only (seconds
    # less late in a session), which is where a cycle of the codec's would be
    gc.collect()
    gc.freeze()
    try:
        for payload in payloads:
            msg = Message(kind=MessageKind.CALL, request_id=3, payload=payload)
            frames = encode_message(msg)
            gc.disable()
            gc.collect()
            for _ in range(5):
                encode_message(msg)
                encode(payload)
            assert gc.collect() == 0, payload
            gc.enable()
            # received frames (the fast paths) and bytes (the full decoder)
            for variant in ([zmq.Frame(bytes(f)) for f in frames], [bytes(f) for f in frames]):
                decode_message(variant)  # warm caches
                gc.disable()
                gc.collect()
                for _ in range(5):
                    decode_message(variant)
                assert gc.collect() == 0, (payload, type(variant[0]))
                gc.enable()
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
