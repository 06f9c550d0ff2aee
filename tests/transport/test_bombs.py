"""Decode bombs: headers within the size limits that used to take seconds and gigabytes.

Each one fills a 16 MiB header (the default `Limits.max_header_bytes`) with the cheapest
encoding of an expensive object. Before `Limits` counted values, containers and tensors, these
took 6 to 47 s and up to 1.5 GiB to decode; now each is refused with a `DecodeError` subclass
after a bounded amount of work (tens of milliseconds on a quiet 2-core machine; the bound
asserted here is loose because the test machine is shared). Legitimate large payloads of the
sizes the limits promise still decode.
"""

from __future__ import annotations

import gc
import struct
import time
from collections.abc import Callable

import msgpack
import pytest
import torch

from chatlearn.transport import (
    DecodeError,
    Limits,
    NestingTooDeepError,
    TooManyObjectsError,
    decode,
    encode,
)

HEADER_BYTES = 16 * 1024 * 1024
# Far below the 6-47 s these took before; far above the ~20-60 ms they take on a quiet machine.
MAX_SECONDS = 1.0


def envelope(items: bytes, count: int) -> bytes:
    """A DATA envelope whose body is an array32 of ``count`` items."""
    return b"\x94\x01\x0a\x00\xdd" + struct.pack(">I", count) + items


def filled(item: bytes, per_array: int | None = None, *, map_pairs: int = 0) -> bytes:
    """16 MiB of ``item``: one flat array, or arrays of ``per_array`` items (which a cap on the
    length of one array does not stop), or maps of ``map_pairs`` items as pairs."""
    if per_array is None:
        count = (HEADER_BYTES - 16) // len(item)
        return envelope(item * count, count)
    if map_pairs:
        inner = b"\xdf" + struct.pack(">I", map_pairs) + item * map_pairs
    else:
        inner = b"\xdd" + struct.pack(">I", per_array) + item * per_array
    count = (HEADER_BYTES - 16) // len(inner)
    return envelope(inner * count, count)


def ext(code: int, payload: object) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True)))


TINY_TENSOR = ext(2, ["uint8", [1], b"\x00"])
EMPTY_TUPLE = ext(1, [])
BOMBS: dict[str, Callable[[], bytes]] = {
    "one-byte tensors": lambda: filled(TINY_TENSOR),
    "one-byte tensors in arrays": lambda: filled(TINY_TENSOR, 100_000),
    "empty tuples": lambda: filled(EMPTY_TUPLE),
    "empty tuples in arrays": lambda: filled(EMPTY_TUPLE, 100_000),
    "empty lists": lambda: filled(b"\x90"),
    "empty lists in arrays": lambda: filled(b"\x90", 1 << 18),
    "empty maps in arrays": lambda: filled(b"\x80", 1 << 18),
    "ints in arrays": lambda: filled(b"\x00", 1 << 18),
    # maps of 2**18 pairs of one key: the dicts stay small while every pair costs work
    "maps of one repeated key": lambda: filled(b"\x00\x00", 0, map_pairs=1 << 18),
}


@pytest.fixture(scope="module", autouse=True)
def _torch_imported() -> None:
    # The first tensor imports torch (seconds on a busy machine): not what is measured here.
    decode(encode({"t": torch.ones(1)}))


@pytest.mark.serial  # asserts a wall-clock bound: run alone (make test's second part)
@pytest.mark.parametrize("name", list(BOMBS))
def test_decode_bombs_are_refused_quickly(name: str) -> None:
    header = BOMBS[name]()
    assert len(header) <= HEADER_BYTES
    gc_was_enabled = gc.isenabled()
    started = time.perf_counter()
    with pytest.raises(TooManyObjectsError):
        decode([header])
    elapsed = time.perf_counter() - started
    print(f"{name}: refused in {elapsed * 1000:.1f} ms")
    assert elapsed < MAX_SECONDS
    assert gc.isenabled() == gc_was_enabled  # the pause of the collector ended


def test_deep_nesting_is_refused() -> None:
    nested = msgpack.packb([])
    for _ in range(65):
        nested = msgpack.packb(msgpack.ExtType(1, nested))
    with pytest.raises(NestingTooDeepError):
        decode([msgpack.packb([1, 10, 0, msgpack.ExtType(1, nested)])])
    # 64 levels are fine by default, and the depth is configurable
    assert decode(encode(((((1,),),),)), limits=Limits(max_depth=4)) == ((((1,),),),)
    with pytest.raises(NestingTooDeepError):
        decode(encode(((((1,),),),)), limits=Limits(max_depth=3))


def test_limits_are_configurable() -> None:
    payload = {"xs": list(range(100)), "t": (torch.ones(2), torch.ones(3)), "m": {"a": [(1,)]}}
    # small limits only bite on a header long enough to exceed them: make it so
    padded = {**payload, "pad": "p" * 300}
    assert decode(encode(padded), limits=Limits(max_values=200, max_containers=16))
    too_small = (
        Limits(max_values=50),
        Limits(max_containers=3),
        Limits(max_tuples=1),
        Limits(max_tensors=1),
    )
    for limits in too_small:
        with pytest.raises(TooManyObjectsError):
            decode(encode(padded), limits=limits)
    with pytest.raises(ValueError, match="max_tensors"):
        Limits(max_tensors=0)


def test_legit_large_payloads_pass() -> None:
    """What the defaults promise: 100k raw prompts (16 MiB), 100k prompt dicts, 30k tuples,
    a micro-batch of thousands of tensors."""
    prompts = ["p" * 150 + str(i) for i in range(100_000)]
    assert decode(encode(prompts)) == prompts
    rows = [{"prompt": "q" * 100, "chosen": "c" * 20, "rejected": str(i)} for i in range(100_000)]
    assert decode(encode(rows)) == rows
    pairs = [(i, str(i)) for i in range(30_000)]
    assert decode(encode(pairs)) == pairs
    batch = {f"key{i}": [torch.full((4,), j) for j in range(200)] for i in range(20)}
    out = decode(encode(batch))
    assert sum(len(v) for v in out.values()) == 4000 and torch.equal(
        out["key3"][7], batch["key3"][7]
    )


def test_gc_pause_restores_a_disabled_collector() -> None:
    rows = [{"a": [i]} for i in range(50_000)]
    frames = encode(rows)
    gc.disable()
    try:
        assert decode(frames) == rows
        assert not gc.isenabled()  # stays as the caller left it
    finally:
        gc.enable()
    assert decode(frames) == rows and gc.isenabled()
    with pytest.raises(DecodeError):  # also after an error midway
        decode([filled(b"\x90", 1 << 18)])
    assert gc.isenabled()
