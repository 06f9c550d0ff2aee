"""The episode training plan: micro-batch contents, wrap-around fill, dp split, epochs, counters."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatlearn.engine.counters import trainer_iteration
from chatlearn.engine.training_plan import plan_episode


def r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b))


def chatlearn_first_epoch(num_samples, micro, global_, dp):
    """ChatLearn's StreamDataset + Trainer.next_batch + executor dp order, for one pass.

    Returns {(step, rank): list of micro-batches or None}, exactly as ChatLearn would hand them
    out (including its short padding and its None for a rank that gets nothing).
    """
    buffer = list(range(num_samples))

    def stream():
        for start in range(0, num_samples, micro):
            mb = buffer[start : min(start + micro, len(buffer))]
            if len(mb) < micro:
                mb += buffer[0 : micro - len(mb)]
            yield tuple(mb)

    it = stream()
    k = global_ // micro // dp
    out = {}
    for q in range(math.ceil(num_samples / global_) * dp):
        batches = [mb for mb in (next(it, None) for _ in range(k)) if mb is not None]
        if not batches:
            out[(q // dp, q % dp)] = None
            continue
        if len(batches) < k:
            batches += batches[: k - len(batches)]
        out[(q // dp, q % dp)] = batches
    return out


# -- exact contents ------------------------------------------------------------------------------


def test_divisible_sizes_one_rank():
    plan = plan_episode(16, train_micro_batch_size=2, train_global_batch_size=4)
    assert [s.micro_batches for s in plan.steps] == [
        ((r(0, 2), r(2, 4)),),
        ((r(4, 6), r(6, 8)),),
        ((r(8, 10), r(10, 12)),),
        ((r(12, 14), r(14, 16)),),
    ]
    assert [s.global_batch() for s in plan.steps] == [r(0, 4), r(4, 8), r(8, 12), r(12, 16)]


def test_wrap_around_fill_and_short_step_padding():
    # 10 samples, micro 4: the third micro-batch [8, 9] is filled with [0, 1] from the start;
    # global 8: the second step has one micro-batch left and repeats it
    plan = plan_episode(10, train_micro_batch_size=4, train_global_batch_size=8)
    assert [s.micro_batches for s in plan.steps] == [
        ((r(0, 4), r(4, 8)),),
        (((8, 9, 0, 1), (8, 9, 0, 1)),),
    ]
    assert plan.steps[1].required_positions == (0, 1, 8, 9)
    assert [s.max_required_position for s in plan.steps] == [7, 9]


def test_two_ranks_get_consecutive_micro_batches():
    plan = plan_episode(
        16, train_micro_batch_size=2, train_global_batch_size=8, data_parallel_size=2
    )
    assert [s.micro_batches for s in plan.steps] == [
        ((r(0, 2), r(2, 4)), (r(4, 6), r(6, 8))),
        ((r(8, 10), r(10, 12)), (r(12, 14), r(14, 16))),
    ]
    assert plan.steps[0].positions_for_rank(1) == r(4, 8)
    assert plan.num_micro_batches_per_rank == 2


def test_indivisible_sizes_with_two_ranks():
    # stream: [0,1] [2,3] [4,5] [6,7] [8,9]; step 1: rank 0 has one left (repeated), rank 1 none
    plan = plan_episode(
        10, train_micro_batch_size=2, train_global_batch_size=8, data_parallel_size=2
    )
    assert [s.micro_batches for s in plan.steps] == [
        ((r(0, 2), r(2, 4)), (r(4, 6), r(6, 8))),
        ((r(8, 10), r(8, 10)), (r(0, 2), r(2, 4))),
    ]


def test_spec_episode_of_16_with_micro_3():
    plan = plan_episode(16, train_micro_batch_size=3, train_global_batch_size=6)
    assert [s.micro_batches for s in plan.steps] == [
        ((r(0, 3), r(3, 6)),),
        ((r(6, 9), r(9, 12)),),
        ((r(12, 15), (15, 0, 1)),),
    ]


def test_micro_batch_larger_than_the_buffer_wraps_cyclically():
    plan = plan_episode(3, train_micro_batch_size=4, train_global_batch_size=4)
    assert [s.micro_batches for s in plan.steps] == [(((0, 1, 2, 0),),)]


# -- later epochs --------------------------------------------------------------------------------


def test_batch_shuffle_moves_whole_blocks_and_drops_the_remainder():
    plan = plan_episode(
        10, train_micro_batch_size=4, train_global_batch_size=4, num_training_epoch=3, seed=1
    )
    assert plan.steps_per_epoch == 3 and len(plan.steps) == 9
    blocks = {r(0, 4), r(4, 8)}
    for epoch in (1, 2):
        mbs = [s.micro_batches[0][0] for s in plan.epoch_steps(epoch)]
        assert set(mbs) == blocks  # 8 and 9 are dropped
        assert mbs[2] == mbs[0]  # the wrap fill on the shortened buffer repeats the first block
        assert all(s.max_required_position == 9 for s in plan.epoch_steps(epoch))


def test_sample_shuffle_permutes_samples():
    plan = plan_episode(
        12,
        train_micro_batch_size=3,
        train_global_batch_size=6,
        num_training_epoch=2,
        training_shuffle_mode="sample",
        seed=0,
    )
    second = [p for s in plan.epoch_steps(1) for p in s.global_batch()]
    assert sorted(second) == list(range(12))
    assert second != list(range(12))


def test_shuffles_are_seeded_per_episode_and_epoch():
    def order(**kw):
        args = dict(train_micro_batch_size=2, train_global_batch_size=2, num_training_epoch=3)
        plan = plan_episode(40, **(args | kw))
        return [s.global_batch() for s in plan.steps]

    assert order(seed=3, episode_id=5) == order(seed=3, episode_id=5)
    assert order(seed=3, episode_id=5) != order(seed=3, episode_id=6)
    assert order(seed=3, episode_id=5) != order(seed=4, episode_id=5)
    assert order()[:20] == [r(2 * i, 2 * i + 2) for i in range(20)]  # the first epoch is in order


# -- properties over many sizes --------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    num_samples=st.integers(1, 40),
    micro=st.integers(1, 6),
    dp=st.integers(1, 3),
    per_rank=st.integers(1, 4),
    epochs=st.integers(1, 3),
    mode=st.sampled_from(["batch", "sample"]),
    seed=st.integers(0, 5),
)
def test_plan_invariants(num_samples, micro, dp, per_rank, epochs, mode, seed):
    global_ = micro * dp * per_rank
    plan = plan_episode(
        num_samples,
        train_micro_batch_size=micro,
        train_global_batch_size=global_,
        data_parallel_size=dp,
        num_training_epoch=epochs,
        training_shuffle_mode=mode,
        seed=seed,
    )
    # the trainer iteration formula, exactly
    assert len(plan.steps) == epochs * math.ceil(num_samples / global_)
    assert len(plan.steps) == trainer_iteration(1, num_samples, global_, epochs)
    for step in plan.steps:
        assert len(step.micro_batches) == dp
        for rank in step.micro_batches:
            assert len(rank) == per_rank
            assert all(len(mb) == micro and all(0 <= p < num_samples for p in mb) for mb in rank)
        assert step.required_positions == tuple(sorted(set(step.global_batch())))
    first = [p for s in plan.epoch_steps(0) for p in s.global_batch()]
    assert set(first) == set(range(num_samples))  # the first pass sees every sample
    maxima = [s.max_required_position for s in plan.steps]
    assert maxima == sorted(maxima) and maxima[-1] == num_samples - 1
    for epoch in range(1, epochs):
        mbs = [mb for s in plan.epoch_steps(epoch) for rank in s.micro_batches for mb in rank]
        if mode == "batch" and num_samples >= micro:
            blocks = {r(b * micro, (b + 1) * micro) for b in range(num_samples // micro)}
            assert {mb for mb in mbs} <= blocks
            assert {tuple(sorted(mb)) for mb in mbs} == blocks
        if mode == "sample" and num_samples >= micro:
            assert {p for mb in mbs for p in mb} == set(range(num_samples))


@settings(max_examples=300, deadline=None)
@given(
    num_samples=st.integers(1, 40),
    micro=st.integers(1, 6),
    dp=st.integers(1, 3),
    per_rank=st.integers(1, 4),
)
def test_first_epoch_matches_chatlearn_where_chatlearn_is_defined(num_samples, micro, dp, per_rank):
    global_ = micro * dp * per_rank
    plan = plan_episode(
        num_samples,
        train_micro_batch_size=micro,
        train_global_batch_size=global_,
        data_parallel_size=dp,
    )
    expected = chatlearn_first_epoch(num_samples, micro, global_, dp)
    for step in plan.steps:
        for rank, mbs in enumerate(step.micro_batches):
            theirs = expected[(step.step_in_epoch, rank)]
            if theirs is None or len(theirs) < per_rank or micro > num_samples:
                continue  # ChatLearn hands out None or a short list here: our documented fix
            assert list(mbs) == theirs


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_micro_batch_size": 3, "train_global_batch_size": 8}, "multiple of"),
        (
            {"train_micro_batch_size": 2, "train_global_batch_size": 6, "data_parallel_size": 2},
            r"micro_batch_size x data parallel size \(2 x 2 = 4\)",
        ),
        ({"train_micro_batch_size": 0, "train_global_batch_size": 8}, "micro_batch_size must"),
        ({"train_micro_batch_size": 2, "train_global_batch_size": 0}, "global_batch_size must"),
        (
            {"train_micro_batch_size": 2, "train_global_batch_size": 2, "data_parallel_size": 0},
            "data parallel size must",
        ),
        (
            {"train_micro_batch_size": 2, "train_global_batch_size": 2, "num_training_epoch": 0},
            "num_training_epoch",
        ),
        (
            {
                "train_micro_batch_size": 2,
                "train_global_batch_size": 2,
                "training_shuffle_mode": "token",
            },
            "'batch' or 'sample'",
        ),
    ],
)
def test_invalid_plans(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_episode(16, **kwargs)
    with pytest.raises(ValueError, match="at least one sample"):
        plan_episode(0, train_micro_batch_size=2, train_global_batch_size=2)
