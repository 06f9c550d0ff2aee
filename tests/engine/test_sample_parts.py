"""Data sets too large for one message reach the reference in parts (protocol.sample_parts):
sent whole, a data set of 100k+ records or 16 MiB of text was refused by the receiving replica,
and the run waited for its answer forever."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from chatlearn.engine.protocol import StageSamples, encode, sample_parts
from chatlearn.transport.codec import decode
from chatlearn.transport.codec import encode as encode_frames

sys.path.insert(0, str(Path(__file__).parent))
from echo_modules import EchoLazyReference  # noqa: E402
from test_dpo_engine import _learn, _runtime  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _roundtrip(part: tuple[int, int, list]) -> list:
    """One part as its order travels: encoded, then decoded under the default limits."""
    index, start, samples = part
    order = StageSamples(split="train", list_index=index, start=start, samples=samples)
    return decode(encode_frames(encode(order)))["samples"]


def test_records_past_what_one_message_holds_go_in_parts_that_each_decode() -> None:
    # 150k maps: more than a message's 131,072
    records = [
        {"prompt": f"max({i},7)=", "chosen": "7", "rejected": str(i)} for i in range(150_000)
    ]
    text = ["x" * 100_000] * 300  # 30 MB of text: more than a message's 16 MiB
    parts = sample_parts([records, text, []])
    assert len(parts) > 3 and {index for index, _, _ in parts} == {0, 1, 2}
    for index, whole in enumerate([records, text, []]):
        mine = [p for p in parts if p[0] == index]
        assert [start for _, start, _ in mine][0] == 0
        assert sum((_roundtrip(p) for p in mine), []) == whole
    assert sample_parts([list(range(10))]) == [(0, 0, list(range(10)))]  # small: one part


def test_a_sample_too_large_for_any_message_is_named() -> None:
    with pytest.raises(ValueError, match="sample 1 of data set 0 is too large"):
        sample_parts([["a", "y" * (20 * 2**20)]])


async def test_a_run_over_600k_samples_builds_its_datasets(tmp_path: Path) -> None:
    # 600k samples: more items than one message may hold (524,288); the reference's dataset
    # makes its rows when read (EchoReference's list of 1.2M tensors took 4 s to make)
    engine, log = await _learn(
        tmp_path,
        _runtime(1, 4, 2, 2, 2),
        samples=range(600_000),
        reference_class=EchoLazyReference,
    )
    builds = [(r["size"], r["last"]) for r in log if r["event"] == "build"]
    assert builds == [(600_000, 599_999)]  # every part, in order, to build_dataset
    assert engine.state.iteration == 2
    rows = [row for r in log if r["event"] == "forward" for row in r["rows"]]
    assert len(rows) == 4 and all(0 <= row < 600_000 for row in rows)
