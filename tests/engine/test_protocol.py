"""The engine protocol: typed orders and results, strict on decode, on the wire and in an actor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import chatlearn
from chatlearn.actors import ActorError, ActorSystem
from chatlearn.config import reset_args
from chatlearn.engine.engine import REFERENCE_SERVICE
from chatlearn.engine.protocol import (
    EVAL,
    REFERENCE_ENTRY,
    REFERENCE_ORDERS,
    TRAINER_ORDERS,
    Chunk,
    Forward,
    ProtocolError,
    ReferenceGroup,
    Step,
    StepDone,
    Train,
    Trained,
    decode,
    decode_result,
    encode,
)
from chatlearn.transport.codec import decode as wire_decode
from chatlearn.transport.codec import encode as wire_encode

sys.path.insert(0, str(Path(__file__).parent))
from echo_modules import EchoReference  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def _train() -> Train:
    steps = [Step(micro_batches=[[0, 1], [2, 3]], iteration=7)]
    return Train(episode=2, steps=steps, release_before=None)


def test_orders_and_results_survive_the_codec_as_plain_data() -> None:
    forward = Forward(
        chunks=[Chunk(episode=EVAL, positions=[0, 1], indices=[[0, 4], [1, 2]], split=EVAL)]
    )
    for order, side in ((forward, REFERENCE_ORDERS), (_train(), TRAINER_ORDERS)):
        wire = wire_decode(wire_encode(encode(order)))  # what the actor receives: dicts, lists
        assert decode(wire, side) == order
    done = Trained(steps=[StepDone(start=1.0, end=2, wait=0.0, metrics={"loss": float("nan")})])
    decoded = decode_result(_train(), wire_decode(wire_encode(encode(done))))
    assert decoded.steps[0].end == 2.0 and isinstance(decoded.steps[0].end, float)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda m: m.update(kind="no_such_order"), "unknown message kind 'no_such_order'"),
        (lambda m: m.pop("episode"), "Train: missing field 'episode'"),
        (lambda m: m.update(extra=1), "Train: unknown field 'extra'"),
        (lambda m: m.update(episode="2"), "Train.episode must be int, got str"),
        (lambda m: m.update(episode=True), "Train.episode must be int, got bool"),
        (
            lambda m: m["steps"][0]["micro_batches"][1].append(1.5),
            r"Train.steps\[0\].micro_batches\[1\]\[2\] must be int, got float",
        ),
        (
            lambda m: m["steps"][0].update(kind="chunk"),
            r"Train.steps\[0\] must be a Step, got kind 'chunk'",
        ),
        (lambda m: m.update(release_before="x"), "Train.release_before must be int | NoneType"),
    ],
)
def test_a_malformed_order_names_its_type_and_field(change, error) -> None:
    message = encode(_train())
    change(message)
    with pytest.raises(ProtocolError, match=error):
        decode(message, TRAINER_ORDERS, where="an order to a trainer rank")


def test_an_order_for_the_other_side_or_not_a_dict_is_refused() -> None:
    with pytest.raises(
        ProtocolError, match="unknown message kind 'train', in an order to a reference"
    ):
        decode(encode(_train()), REFERENCE_ORDERS, where="an order to a reference replica")
    with pytest.raises(ProtocolError, match="must be a dict, got list"):
        decode([1, 2], TRAINER_ORDERS)
    with pytest.raises(
        ProtocolError, match="Trained: missing field 'steps', in the reply to Train"
    ):
        decode_result(_train(), {"kind": "trained"})


async def test_a_reference_replica_refuses_a_malformed_order_and_serves_on(tmp_path: Path):
    chatlearn.init(
        {"models": {"reference": {"num_cpu": 1}}, "runtime": {"output_dir": str(tmp_path)}}
    )
    try:
        module = EchoReference("reference")
        async with ActorSystem(module.global_args, fail_fast=False) as system:
            (group,) = await system.launch(
                module, services={"reference": {"ref": REFERENCE_SERVICE}}
            )
            bad = encode(Forward(chunks=[Chunk(episode=0, positions=[0], indices=[[0, 0]])]))
            bad["chunks"][0]["positions"] = ["first"]
            with pytest.raises(ActorError) as info:
                await group[0].call(REFERENCE_ENTRY, bad)
            assert info.value.type_name == "ProtocolError"
            assert "Forward.chunks[0].positions[0] must be int, got str" in info.value.message
            with pytest.raises(ActorError, match="unknown message kind 'train'"):
                await group[0].call(REFERENCE_ENTRY, encode(_train()))
            reference = ReferenceGroup(group)
            assert await reference.build_datasets([list(range(5))], "train") == [5]
            assert await reference.data_parallel() == [(0, 1)]
    finally:
        reset_args()
