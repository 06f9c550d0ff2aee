"""Property tests: hypothesis round-trips of arbitrary nested payloads, and decoder fuzzing.

The fuzz test feeds the decoder more than 10,000 random and mutated frame lists (seeded, so a
failure reproduces) and requires that each one either decodes or raises one of our typed
errors: no other exception, no hang, no unbounded allocation.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections import Counter
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatlearn.transport import (
    DecodeError,
    Limits,
    Message,
    MessageKind,
    TransportError,
    codec,
    decode,
    decode_message,
    encode,
    encode_message,
)
from chatlearn.transport.codec import decode_envelope, decode_envelope_steps

TORCH_DTYPES = [
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
]
NUMPY_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32",
                "float64", "complex64"]  # fmt: skip
SETTINGS = settings(
    max_examples=150,
    deadline=None,  # the machine is shared: wall-clock deadlines would be flaky
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def random_bytes(seed: int, nbytes: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(st.lists(st.integers(0, 6), max_size=4))
    if draw(st.booleans()):  # sometimes big enough for its own frame
        shape = [*shape, draw(st.integers(2000, 5000))]
    numel = math.prod(shape)
    raw = torch.frombuffer(bytearray(random_bytes(draw(st.integers(0, 2**32)), 1 + numel * 16)),
                           dtype=torch.uint8)  # fmt: skip
    if dtype == torch.bool:
        t = (raw[:numel] & 1).bool().reshape(shape)
    else:
        t = raw[: numel * dtype.itemsize].view(dtype).reshape(shape)  # every bit pattern
    view = draw(st.sampled_from(["plain", "transpose", "stride", "zero-dim"]))
    if view == "transpose" and t.dim() >= 2:
        t = t.transpose(0, -1)
    elif view == "stride" and t.dim() >= 1:
        t = t[::2]
    elif view == "zero-dim" and t.numel() > 0:
        t = t.reshape(-1)[0]
    return t


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    if draw(st.booleans()):
        shape = [*shape, draw(st.integers(1000, 3000))]
    numel = math.prod(shape)
    raw = np.frombuffer(random_bytes(draw(st.integers(0, 2**32)), numel * dtype.itemsize),
                        dtype=np.uint8)  # fmt: skip
    if dtype == np.bool_:
        return (raw & 1).astype(bool).reshape(shape)
    a = raw.view(dtype).reshape(shape)
    view = draw(st.sampled_from(["plain", "transpose", "stride"]))
    if view == "transpose":
        return a.T
    return a[::2] if view == "stride" and a.ndim else a


leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | tensors()
    | arrays()
)
keys = st.text(max_size=8) | st.integers(-5, 5) | st.tuples(st.integers(0, 3), st.text(max_size=3))
payloads = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)


def assert_identical(a: Any, b: Any) -> None:
    """Exact equality: same types (tuples stay tuples), same dtypes and shapes, same bits."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and type(b) is torch.Tensor)
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and b.is_contiguous()
        if a.numel():
            dense = a.clone(memory_format=torch.contiguous_format)  # fresh strides, bit-exact
            assert torch.equal(dense.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert np.ascontiguousarray(a).tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_identical(x, y)
    elif isinstance(a, float):
        assert a == b and math.copysign(1, a) == math.copysign(1, b) or (a != a and b != b)
    else:
        assert a == b


@SETTINGS
@given(payloads)
def test_any_payload_roundtrips_exactly(obj: Any) -> None:
    assert_identical(obj, decode(encode(obj)))


@SETTINGS
@given(payloads, st.sampled_from(list(MessageKind)), st.integers(0, 2**63 - 1))
def test_any_message_roundtrips_exactly(obj: Any, kind: MessageKind, request_id: int) -> None:
    out = decode_message(encode_message(Message(kind=kind, request_id=request_id, payload=obj)))
    assert (out.kind, out.request_id) == (kind, request_id)
    assert_identical(obj, out.payload)


@SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_arbitrary_bytes_decode_or_raise_typed_errors(frames: list[bytes]) -> None:
    for decoder in (decode, decode_message):
        try:
            decoder(frames)
        except TransportError:
            pass


# --- the 10,000-case fuzz --------------------------------------------------------------------

NUM_FUZZ_CASES = 20_000
SMALL_LIMITS = Limits(max_frames=8, max_header_bytes=2048, max_message_bytes=32 * 1024)


def seed_messages() -> list[list[bytes]]:
    """Valid messages to mutate: inline and framed tensors, arrays, tuples, every kind."""
    objects = [
        None,
        {"x": torch.arange(10_000, dtype=torch.float32), "m": torch.ones(3, 4) > 0},
        [torch.zeros(0), torch.tensor(1.5, dtype=torch.bfloat16), np.arange(3000)],
        ((1, 2), {"k": (b"v", "s", 3.5)}, [True, None]),
        {"a": torch.randn(2, 3000).t(), "b": np.ones((5, 2000), dtype=np.float16)},
        {i: torch.full((2100,), i, dtype=torch.int32) for i in range(4)},
    ]
    frame_lists = [[bytes(f) for f in encode(obj)] for obj in objects]
    for kind in MessageKind:
        payload = objects[len(frame_lists) % len(objects)]
        msg = Message(kind=kind, request_id=len(frame_lists), payload=payload)
        frame_lists.append([bytes(f) for f in encode_message(msg)])
    return frame_lists


def random_ref(rng: random.Random) -> list[Any]:
    """A tensor/array reference with each field sometimes wrong."""
    dtype = rng.choice(["float32", "bfloat16", "bool", "int64", "float128", "", "uint8", 3])
    shape = rng.choice([[4], [2, 2], [], [0], [-1], [2**40, 2**40], ["a"], [1] * 70, None])
    ref = rng.choice([1, 2, 0, -1, 99, 2**64 - 1, b"\x00" * 16, b"\x02", b"", "x", None, 1.0])
    return [dtype, shape, ref][: rng.choice([3, 3, 3, 2, 4])]


def random_header(rng: random.Random) -> bytes:
    """A structurally plausible envelope whose contents are random."""

    def value(depth: int) -> Any:
        choice = rng.randrange(9 if depth < 4 else 5)
        if choice == 0:
            return rng.choice([None, True, 1, -7, 2**63, 1.5, "s", b"b"])
        if choice in (1, 2, 3):
            code = rng.choice([1, 2, 3, 2, 3, 0, 4, 127])
            inner = random_ref(rng) if code in (2, 3) else [value(depth + 1)]
            return msgpack.ExtType(code, msgpack.packb(inner))
        if choice == 4:
            return msgpack.ExtType(rng.choice([2, 3, 1]), rng.randbytes(rng.randrange(8)))
        if choice in (5, 6):
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["a", 1, "b"]): value(depth + 1) for _ in range(rng.randrange(3))}

    version = rng.choice([1] * 12 + [2, 0])
    kind = rng.choice([10] * 6 + [4, 5, 11] * 2 + [0, 12, 200])
    request_id = rng.choice([0, 0, 5, 2**63 - 1, -1, 2**64 - 1, "x"])
    return msgpack.packb([version, kind, request_id, value(0)])


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(12)
        index = rng.randrange(len(frames)) if frames else 0
        if not frames:
            frames.append(rng.randbytes(rng.randrange(16)))
        elif op == 0:  # flip bits in the header
            header = bytearray(frames[0])
            for _ in range(rng.randint(1, 4)):
                if header:
                    header[rng.randrange(len(header))] ^= 1 << rng.randrange(8)
            frames[0] = bytes(header)
        elif op == 1:  # overwrite a header byte with an interesting value
            header = bytearray(frames[0])
            if header:
                header[rng.randrange(len(header))] = rng.choice(
                    [0x00, 0x7F, 0xC1, 0xDD, 0xFF, 0x94]
                )
            frames[0] = bytes(header)
        elif op == 2:  # truncate a frame
            frames[index] = frames[index][: rng.randrange(len(frames[index]) + 1)]
        elif op == 3:  # extend a frame
            frames[index] = frames[index] + rng.randbytes(rng.randint(1, 9))
        elif op == 4:  # drop a frame
            del frames[index]
        elif op == 5:  # duplicate a frame
            frames.insert(index, frames[index])
        elif op == 6:  # swap two frames
            other = rng.randrange(len(frames))
            frames[index], frames[other] = frames[other], frames[index]
        elif op == 7:  # splice random bytes into the header
            cut = rng.randrange(len(frames[0]) + 1)
            frames[0] = frames[0][:cut] + rng.randbytes(rng.randint(1, 6)) + frames[0][cut:]
        elif op == 8:  # replace a frame with random bytes
            frames[index] = rng.randbytes(rng.randrange(64))
        elif op == 9:  # many frames
            frames.extend([b""] * rng.choice([1, 10, 2000]))
        elif op == 10:  # a random envelope over the existing data frames
            frames[0] = random_header(rng)
        else:  # a huge header
            frames[0] = frames[0] + b"\xc0" * rng.choice([10, 5000, 20_000])
    return frames


@pytest.mark.timeout(120)
def test_fuzz_every_failure_is_a_typed_error() -> None:
    rng = random.Random(20240601)
    seeds = seed_messages()
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    for case in range(NUM_FUZZ_CASES):
        style = case % 5
        if style == 0:
            frames = [rng.randbytes(rng.randrange(48)) for _ in range(rng.randrange(5))]
        elif style == 4:  # a valid envelope prefix, then garbage for the body
            frames = [b"\x94\x01\x0a" + rng.randbytes(rng.randrange(1, 40)), rng.randbytes(16)]
        elif style == 1:
            frames = [random_header(rng)] + [rng.randbytes(16) for _ in range(rng.randrange(3))]
        else:
            frames = mutate(rng, rng.choice(seeds))
        limits = SMALL_LIMITS if case % 3 == 0 else Limits()
        decoder = decode if case % 4 == 1 else decode_message
        try:
            decoder(frames, limits=limits)
        except TransportError as exc:
            outcomes[type(exc).__name__] += 1
        except BaseException as exc:  # noqa: BLE001 - the point is to catch anything else
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc!r} for frames {frames!r:.500}")
        else:
            outcomes["ok"] += 1
    elapsed = time.monotonic() - started
    print(f"{NUM_FUZZ_CASES} cases in {elapsed:.1f}s: {dict(outcomes)}")
    # The fuzzer reaches every check, not just the first one.
    for name in [
        "ok",
        "DecodeError",
        "ProtocolVersionError",
        "UnknownKindError",
        "UnknownDtypeError",
        "FrameSizeError",
        "FrameIndexError",
        "TooManyFramesError",
        "HeaderTooLargeError",
        "MessageTooLargeError",
    ]:
        assert outcomes[name] > 0, (name, outcomes)
    assert set(outcomes) - {"ok"} <= {cls.__name__ for cls in _subclasses(DecodeError)}


def _subclasses(cls: type) -> set[type]:
    return {cls}.union(*(_subclasses(sub) for sub in cls.__subclasses__()))


def _outcome(decoder: Any) -> tuple[str, Any]:
    try:
        return "ok", decoder()
    except DecodeError as exc:
        return type(exc).__name__, None


def _run_steps(steps: Any) -> Any:
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


@pytest.mark.timeout(120)
def test_stepped_decoding_agrees_with_whole_decoding() -> None:
    """Large headers are decoded in steps on the event loop: same results, same errors."""
    rng = random.Random(20261201)
    seeds = seed_messages()
    kinds = [int(kind) for kind in MessageKind]
    for case in range(3000):
        frames = mutate(rng, rng.choice(seeds)) if case % 2 else rng.choice(seeds)
        limits = SMALL_LIMITS if case % 3 == 0 else Limits()
        step_bytes = rng.choice([1, 7, 64, 4096])
        whole = _outcome(functools.partial(decode_envelope, frames, limits=limits, kinds=kinds))
        steps = decode_envelope_steps(frames, limits=limits, kinds=kinds, step_bytes=step_bytes)
        stepped = _outcome(functools.partial(_run_steps, steps))
        # both decode, or both refuse (the check that fires first may differ on garbage)
        assert (whole[0] == "ok") == (stepped[0] == "ok"), (case, whole, stepped, frames)
        if whole[0] == "ok":
            assert whole[1][:2] == stepped[1][:2]
            assert_identical(whole[1][2], stepped[1][2])


# --- received single frames: the small-message fast path ---------------------------------------


@SETTINGS
@given(payloads)
def test_any_payload_roundtrips_exactly_from_received_frames(obj: Any) -> None:
    # What a channel receives is zmq.Frame objects; small single frames with tensors, arrays or
    # tuples take codec._decode_small, everything else the full decoder.
    frames = [zmq.Frame(bytes(frame)) for frame in encode(obj)]
    assert_identical(obj, decode(frames))


def small_seed_messages() -> list[bytes]:
    """Valid single-frame messages (everything inline) with tensors, arrays and tuples."""
    objects = [
        {"x": torch.ones(1024)},
        {"ids": torch.arange(300), "labels": torch.full((300,), -100), "m": torch.ones(5) > 0},
        (torch.zeros(0), torch.tensor(2.5, dtype=torch.bfloat16), np.arange(30).reshape(5, 6)),
        [((1, (2, (3,))), torch.randn(3, 4, dtype=torch.complex64)), {"t": (b"v", "s", 3.5)}],
        {"a": np.ones((4, 100), dtype=np.float16), "b": np.zeros(3, dtype=bool), "c": np.empty(0)},
        [torch.randint(0, 2, (64,), dtype=torch.bool), torch.randn(7, 3).to(torch.float16)],
    ]
    headers = [encode(obj)[0] for obj in objects]
    headers += [
        encode_message(Message(kind=kind, request_id=i, payload=objects[i % len(objects)]))[0]
        for i, kind in enumerate(MessageKind)
    ]
    assert all(len(encode(obj)) == 1 for obj in objects)
    return [bytes(header) for header in headers]


@pytest.mark.timeout(120)
def test_received_frames_decode_exactly_like_bytes() -> None:
    """The fast path for received messages with small headers (single frames, and headers
    referencing data frames) agrees with the full decoder (fed bytes) on every input: the same
    value, or the same typed error with the same text."""
    rng = random.Random(20261202)
    seeds = [[header] for header in small_seed_messages()]
    seeds += [frames for frames in seed_messages() if len(frames) > 1]
    kinds = [int(kind) for kind in MessageKind]
    limit_choices = [
        Limits(),
        SMALL_LIMITS,
        Limits(max_tensors=2, max_tuples=2, max_depth=2),
        Limits(max_values=64, max_containers=64),
    ]
    taken = Counter[str]()
    original = codec._decode_small

    def spy(header: Any, limits: Limits, frames: Any) -> Any:
        result = original(header, limits, frames)
        taken[("fast" if result is not None else "handed over", len(frames) > 1)] += 1
        return result

    codec._decode_small = spy
    try:
        for case in range(6000):
            frames = rng.choice(seeds)
            if case % 4:
                frames = mutate(rng, frames) if case % 4 != 3 else [random_header(rng)]
            limits = limit_choices[(case // 4) % len(limit_choices)]
            received = [zmq.Frame(frame) for frame in frames]
            fast = _outcome_with_text(
                functools.partial(decode_envelope, received, limits=limits, kinds=kinds)
            )
            full = _outcome_with_text(
                functools.partial(decode_envelope, frames, limits=limits, kinds=kinds)
            )
            assert fast[0] == full[0], (case, fast, full, frames)
            if fast[0] == "ok":
                assert fast[1][:2] == full[1][:2]
                assert_identical(full[1][2], fast[1][2])
    finally:
        codec._decode_small = original
    # each path was taken many times, with single frames and with data frames
    for key in [("fast", False), ("fast", True), ("handed over", False), ("handed over", True)]:
        assert taken[key] > 200, taken


def _outcome_with_text(decoder: Any) -> tuple[str, Any]:
    try:
        return "ok", decoder()
    except DecodeError as exc:
        return f"{type(exc).__name__}: {exc}", None


@SETTINGS
@given(st.binary(max_size=600), st.lists(st.integers(0, 599), max_size=6))
def test_timestamp_precheck_agrees_with_the_scan(data: bytes, positions: list[int]) -> None:
    # Plant 0xff bytes and the three timestamp prefixes at random places.
    buffer = bytearray(data)
    for i, position in enumerate(positions):
        if position < len(buffer):
            prefix = [b"\xff", b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff"][i % 4]
            buffer[position : position + len(prefix)] = prefix
    for view in (memoryview(bytes(buffer)), zmq.Frame(bytes(buffer)).buffer):
        expected = codec._TIMESTAMP_BYTES.search(view) is not None
        assert codec._may_hold_timestamp(view) == expected
