"""Acceptance tests of DPOEngine with echo modules in real actor processes.

Expected values are written out from ChatLearn's rules (docs/chatlearn-compat.md, "The rules we
reproduce"), not computed with the engine's own planning code.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import chatlearn
from chatlearn.config import reset_args
from chatlearn.engine.engine import DPOEngine

sys.path.insert(0, str(Path(__file__).parent))
from echo_modules import (  # noqa: E402
    EchoFailingReference,
    EchoIterationEvalTrainer,
    EchoListReference,
    EchoNumberReference,
    EchoPaddingReference,
    EchoPositionalReference,
    EchoReference,
    EchoSetupTrainer,
    EchoStringReference,
    EchoTokensTrainer,
    EchoTrainer,
)

pytestmark = pytest.mark.timeout(120)


def _config(
    tmp_path: Path, runtime: dict, reference: dict | None = None, trainer: dict | None = None
) -> dict:
    return {
        "models": {
            "reference": reference or {"num_cpu": 1},
            "policy_trainer": trainer or {"num_cpu": 1, "trainable": True},
        },
        "runtime": {
            "output_dir": str(tmp_path),
            "echo_log": str(tmp_path / "log.jsonl"),
            "data_shuffle": False,
            **runtime,
        },
    }


def _runtime(
    num_episode: int,
    sample_per_episode: int,
    generation_batch_size: int,
    train_micro_batch_size: int,
    train_global_batch_size: int,
    /,
    **extra,
) -> dict:
    """A test's runtime section: the five sizes every test sets, in this order, then ``extra``
    runtime keys by their config names (``_runtime(4, 16, 5, 2, 4, reference_cache=False)``:
    4 episodes of 16 samples, reference chunks of 5, steps of 4 samples in micro-batches of 2)."""
    return {
        "num_episode": num_episode,
        "sample_per_episode": sample_per_episode,
        "generation_batch_size": generation_batch_size,
        "train_micro_batch_size": train_micro_batch_size,
        "train_global_batch_size": train_global_batch_size,
        **extra,
    }


async def _learn(
    tmp_path: Path,
    runtime: dict,
    samples=range(35),
    *,
    reference=None,
    eval_set=None,
    trainer=EchoTrainer,
    reference_class=EchoReference,
    trainer_model=None,
):
    chatlearn.init(_config(tmp_path, runtime, reference, trainer_model))
    try:
        engine = DPOEngine(reference_class("reference"), trainer("policy_trainer"))
        engine.set_dataset(list(samples))
        if eval_set is not None:
            engine.set_eval_dataset(list(eval_set))
        await engine.learn_async()
    finally:
        reset_args()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    return engine, log


def _events(log, event, model=None):
    return [r for r in log if r["event"] == event and (model is None or r["model"] == model)]


async def test_episodes_chunks_batches_and_counters(tmp_path: Path) -> None:
    engine, log = await _learn(
        tmp_path,
        # without the reference cache: ChatLearn's chunks (reuse: test_reference_reuse...)
        _runtime(4, 16, 5, 2, 4, reference_cache=False),
    )
    forwards = _events(log, "forward")
    assert [len(f["rows"]) for f in forwards] == [5, 5, 5, 1] * 4
    drawn = [row for f in forwards for row in f["rows"]]
    expected = [*range(0, 16), *range(16, 32), 32, 33, 34, *range(0, 13), *range(13, 29)]
    assert drawn == expected
    trains = _events(log, "train")
    assert [t["batches"] for t in trains] == [
        [expected[i : i + 2], expected[i + 2 : i + 4]] for i in range(0, 64, 4)
    ]
    assert [t["iteration"] for t in trains] == list(range(16))
    assert engine.trainer.iteration == 16  # 4 episodes × 1 epoch × ceil(16 / 4)
    last = _events(log, "after_episode", "policy_trainer")[-1]
    assert last["train_iteration"] == 16 and last["episode"] == 3
    assert _events(log, "after_episode", "reference")[-1]["iteration"] == 16  # chunks
    assert [f["iteration"] for f in forwards] == list(range(16))


async def test_wrap_around_fill_padding_and_short_rank_list(tmp_path: Path) -> None:
    engine, log = await _learn(
        tmp_path,
        _runtime(1, 10, 4, 4, 8),
        samples=range(10),
    )
    trains = _events(log, "train")
    # 3 micro-batches (the last filled from the buffer's start); step 2 runs out of stream and
    # repeats its own first micro-batch.
    assert [t["batches"] for t in trains] == [
        [[0, 1, 2, 3], [4, 5, 6, 7]],
        [[8, 9, 0, 1], [8, 9, 0, 1]],
    ]
    # "tokens" has row % 3 + 1 entries, right-padded with -1 to the longest in the micro-batch
    assert trains[0]["widths"] == [[4, 3], [4, 3]]
    assert trains[1]["widths"] == [[4, 3], [4, 3]]
    assert engine.trainer.iteration == 2


@pytest.mark.parametrize(("trainer_pad", "pad"), [(None, -7), (-1, -1)])
async def test_the_references_padding_config_pads_the_micro_batches(
    tmp_path: Path, trainer_pad: int | None, pad: int
) -> None:
    """ChatLearn pads the trainer's micro-batches with the add_padding_config of the model that
    produced the data (the reference registers it in setup); one the trainer registers wins."""
    _, log = await _learn(
        tmp_path,
        _runtime(1, 4, 1, 2, 2, echo_pad=trainer_pad),
        samples=range(4),
        reference_class=EchoPaddingReference,
        trainer=EchoTokensTrainer,
    )
    # rows 0..3 have 1, 2, 3, 1 tokens (row % 3 + 1)
    assert [t["tokens"] for t in _events(log, "tokens")] == [
        [[[0, pad], [0, 1]]],
        [[[0, 1, 2], [0, pad, pad]]],
    ]


async def test_build_dataset_gets_its_eval_flag_by_position(tmp_path: Path) -> None:
    """ChatLearn calls build_dataset(prompts, is_eval) positionally, so a module may name the
    flag as it likes."""
    _, log = await _learn(
        tmp_path,
        _runtime(1, 4, 4, 2, 4, eval_episode_interval=1),
        samples=range(4),
        eval_set=[10, 20],
        reference_class=EchoPositionalReference,
    )
    builds = sorted((b["evaluation"], b["size"]) for b in _events(log, "build"))
    assert builds == [(False, 4), (True, 2)]


async def test_several_training_epochs_reuse_the_episode(tmp_path: Path) -> None:
    engine, log = await _learn(
        tmp_path,
        _runtime(1, 8, 8, 2, 4, num_training_epoch=3),
        samples=range(8),
    )
    assert len(_events(log, "forward")) == 1  # the reference ran once for the three passes
    trains = _events(log, "train")
    assert engine.trainer.iteration == len(trains) == 6
    first = [row for t in trains[:2] for mb in t["batches"] for row in mb]
    assert first == list(range(8))
    for epoch in (1, 2):
        rows = [row for t in trains[2 * epoch : 2 * epoch + 2] for mb in t["batches"] for row in mb]
        assert sorted(rows) == list(range(8))  # batch shuffle: the same micro-batches reordered
        blocks = {tuple(mb) for t in trains[2 * epoch : 2 * epoch + 2] for mb in t["batches"]}
        assert blocks == {(0, 1), (2, 3), (4, 5), (6, 7)}


async def test_shuffled_episodes_follow_seeded_passes(tmp_path: Path) -> None:
    # without the reference cache: every drawn sample goes through forward_step
    runtime = _runtime(3, 16, 4, 4, 8, data_shuffle=True, reference_cache=False)
    _, log = await _learn(tmp_path, runtime)
    passes = [
        torch.randperm(35, generator=torch.Generator().manual_seed(k)).tolist() for k in (0, 1)
    ]
    expected = (passes[0] + passes[1])[:48]
    assert [row for f in _events(log, "forward") for row in f["rows"]] == expected


async def test_drop_last_of_the_reference_model_args_drops_a_short_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # ChatLearn's build_dataloader reads drop_last from the reference's model_args (its
    # model_config_file); it was ignored here and the third episode wrapped into [32..34, 0..12]
    runtime = _runtime(3, 16, 16, 2, 4, reference_cache=False)
    reference = {"num_cpu": 1, "model_args": {"drop_last": True}}
    _, log = await _learn(tmp_path, runtime, reference=reference)
    drawn = [row for f in _events(log, "forward") for row in f["rows"]]
    assert drawn == [*range(16), *range(16, 32), *range(16)]
    # runtime.drop_last, when set, wins, in one warning line naming both
    runtime["drop_last"] = "cycle"
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        _, log = await _learn(tmp_path / "cycle", runtime, reference=reference)
    drawn = [row for f in _events(log, "forward") for row in f["rows"]]
    assert drawn == [*range(32), 32, 33, 34, *range(13)]
    (line,) = [r.getMessage() for r in caplog.records if "drop_last" in r.getMessage()]
    assert "runtime.drop_last: cycle wins over models.reference.model_args.drop_last" in line
    # a dataset smaller than an episode cannot drop: one line naming the key it came from (a
    # bare ValueError of the sampler before)
    from chatlearn.config import ConfigError

    with pytest.raises(ConfigError) as info:
        await _learn(tmp_path / "small", _runtime(1, 16, 16, 2, 4), range(8), reference=reference)
    assert info.value.key == "models.reference.model_args.drop_last"
    assert "sample_per_episode (16) <= the dataset's 8 samples" in info.value.one_line()


async def test_reference_reuse_across_data_epochs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Samples that come back are not recomputed, and training sees exactly the same data; the
    run says so at its start (a dataset that draws anew at every visit would not)."""
    runtime = _runtime(3, 12, 4, 2, 4, data_shuffle=True)
    logs = {}
    notice = "their reference outputs are computed once and reused"
    for cache in (True, False):
        out = tmp_path / str(cache)
        out.mkdir()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="chatlearn.engine"):
            _, logs[cache] = await _learn(out, {**runtime, "reference_cache": cache}, range(12))
        assert (notice in caplog.text) == cache
        # how often, said either way (a data set smaller than an episode went round unsaid)
        assert "the run draws 36 samples from 12 in the data set (3.0 passes)" in caplog.text
    forwarded = sorted(row for f in _events(logs[True], "forward") for row in f["rows"])
    assert forwarded == list(range(12))  # once each: episodes 2 and 3 come from the cache
    assert len([row for f in _events(logs[False], "forward") for row in f["rows"]]) == 36
    # same micro-batches in the same order (train_step also checks "double" == 2 * row)
    trained = {cache: [t["batches"] for t in _events(logs[cache], "train")] for cache in logs}
    assert trained[True] == trained[False]
    episodes = [
        json.loads(line)
        for line in next((tmp_path / "True").rglob("metrics.jsonl")).read_text().splitlines()
        if json.loads(line)["kind"] == "episode"
    ]
    assert [e["reference_reused"] for e in episodes][-1] == 24


async def test_reference_cache_respects_its_budget(tmp_path: Path) -> None:
    """A budget smaller than one sample: after the first report, nothing more is kept."""
    _, log = await _learn(
        tmp_path,
        _runtime(2, 12, 2, 2, 4, max_reference_cache_mb=1e-6),
        range(12),
    )
    rows = [row for f in _events(log, "forward") for row in f["rows"]]
    # at most the orders in flight before the first report (2 of 2 samples) were kept
    assert 24 - 4 <= len(rows) < 24


async def test_resume_at_consumed_samples(tmp_path: Path) -> None:
    engine, log = await _learn(
        tmp_path,
        _runtime(3, 16, 16, 4, 8, consumed_samples=32),
    )
    assert [f["rows"] for f in _events(log, "forward")] == [[32, 33, 34, *range(13)]]
    assert [t["iteration"] for t in _events(log, "train")] == [4, 5]
    assert engine.trainer.iteration == 6


async def test_two_reference_replicas_take_contiguous_shares(tmp_path: Path) -> None:
    _, log = await _learn(
        tmp_path,
        # colocated: 3 processes on this 2-core machine
        _runtime(2, 16, 4, 4, 8, colocation=["reference,policy_trainer"]),
        reference={"num_cpu": 2, "cpu_per_process": 1},
    )
    seen = {0: [], 1: []}
    for f in _events(log, "forward"):
        seen[f["replica"]].extend(f["rows"])
    assert seen[0] == [*range(0, 8), *range(16, 24)]
    assert seen[1] == [*range(8, 16), *range(24, 32)]
    # the buffer interleaves the replicas' chunks, so both feed the first step
    first_step = _events(log, "train")[0]["batches"]
    assert first_step == [[0, 1, 2, 3], [8, 9, 10, 11]]


async def test_replicas_times_the_batch_size_beyond_the_episode_are_said_up_front(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 2 replicas × generation_batch_size 4 > 4 samples an episode (ChatLearn refuses it): each
    # replica ran its share of 2 rows in one forward_step, every episode, without a word
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        _, log = await _learn(
            tmp_path,
            _runtime(2, 4, 4, 2, 4, colocation=["reference,policy_trainer"]),
            reference={"num_cpu": 2, "cpu_per_process": 1},
        )
    assert [len(f["rows"]) for f in _events(log, "forward")] == [2] * 4  # as said, nothing idle
    (line,) = [r.getMessage() for r in caplog.records if "generation_batch_size" in r.getMessage()]
    assert line == (
        "config built in code: runtime.sample_per_episode: 4 samples an episode over the 2 "
        "replicas of model 'reference' give each 2, so its forward_step runs 2 rows, not its "
        "generation_batch_size 4 (ChatLearn refuses num_replica × generation_batch_size > "
        "sample_per_episode); set sample_per_episode to 8 or more, or generation_batch_size to 2"
    )


async def test_evaluation_runs_eval_step_on_held_out_samples(tmp_path: Path) -> None:
    engine, _ = await _learn(
        tmp_path,
        _runtime(2, 8, 4, 2, 4, eval_episode_interval=1, enable_eval_before_training=True),
        eval_set=[10, 20, 30, 40, 50],
        trainer=EchoIterationEvalTrainer,  # declares iteration: given the train iteration
    )
    assert engine.pipeline is not None
    assert [e["mean_row"] for e in engine.pipeline.eval_history] == [30.0, 30.0, 30.0]
    assert [e["at"] for e in engine.pipeline.eval_history] == [0.0, 2.0, 4.0]
    records = [
        json.loads(x) for x in (tmp_path / "CHATLEARN" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {r["kind"] for r in records} == {"train", "eval", "episode"}
    # an evaluation comes between episodes: how many were done, not a 0-based episode that
    # reads one ahead of the train records of the same step
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["step"], r["episodes_done"]) for r in evals] == [(0, 0), (2, 1), (4, 2)]
    assert all("episode" not in r for r in evals)
    trains = [r for r in records if r["kind"] == "train"]
    assert [(r["step"], r["episode"]) for r in trains] == [(1, 0), (2, 0), (3, 1), (4, 1)]


async def test_a_trainer_lost_before_the_first_checkpoint_evaluates_before_training_again(
    tmp_path: Path,
) -> None:
    """No checkpoint yet: the run goes back to its start, where the evaluation before training
    is part of the run (its record was rewound with the steps'): every evaluation once."""
    runtime = _runtime(2, 8, 4, 2, 4, eval_episode_interval=1, enable_eval_before_training=True)
    engine, _ = await _learn(
        tmp_path, {**runtime, "echo_die_at": 1}, range(8), eval_set=[10, 20, 30, 40, 50]
    )
    assert list(tmp_path.rglob("echo_died"))  # the trainer died once
    assert engine.pipeline is not None
    assert [e["iteration"] for e in engine.pipeline.eval_history] == [0, 2, 4]
    records = [
        json.loads(x) for x in (tmp_path / "CHATLEARN" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["model"] for r in records if r["kind"] == "restart"] == ["policy_trainer"]


@pytest.mark.serial  # asserts a wall-clock bound: run alone (make test's second part)
async def test_reference_overlaps_training(tmp_path: Path) -> None:
    cost = 0.1
    _, log = await _learn(
        tmp_path,
        _runtime(2, 16, 2, 2, 2, echo_cost=cost),
    )
    forwards, trains = _events(log, "forward"), _events(log, "train")
    busy = sum(r["end"] - r["start"] for r in forwards + trains)
    span = trains[-1]["end"] - forwards[0]["start"]
    assert len(forwards) == len(trains) == 16
    assert busy >= 32 * cost * 0.95
    # ideal: the first chunk alone, then every step hidden behind the next chunk: 17/32 ≈ 0.53
    print(f"overlap test: span {span:.3f}s busy {busy:.3f}s ratio {span / busy:.3f}")
    assert span <= 0.6 * busy, f"span {span:.2f}s vs busy {busy:.2f}s: no overlap"


async def test_chunks_larger_than_the_window_still_feed_every_step(tmp_path: Path) -> None:
    # A chunk of 6 samples, steps of 2 and a window of 2 micro-batches: the step waiting for the
    # chunk's first samples could never get them (the chunk needed more credit than the window
    # had) and the run hung. The window now always holds a step plus the chunk it waits for.
    engine, log = await asyncio.wait_for(
        _learn(
            tmp_path,
            _runtime(2, 12, 6, 1, 2, pipeline_window=2),
        ),
        60,
    )
    assert engine.trainer.iteration == 12
    assert [len(f["rows"]) for f in _events(log, "forward")] == [6, 6, 6, 6]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="a Linux scheduling policy")
async def test_only_the_data_senders_io_thread_runs_batched(tmp_path: Path) -> None:
    # transport/contexts.py: the reference's outputs leave through a context whose I/O thread
    # waits for the sender to block; receiving and the control plane keep the default policy
    # (the last records: a new I/O thread shows up named, with its policy, a moment after the
    # socket that starts it)
    _, log = await _learn(tmp_path, _runtime(1, 8, 4, 2, 4), samples=range(8))
    assert _events(log, "forward")[-1]["io_threads"] == [os.SCHED_OTHER, os.SCHED_BATCH]
    assert _events(log, "train")[-1]["io_threads"] == [os.SCHED_OTHER]


# A dataset without collate_fn, collated as ChatLearn's data loader does (default_collate):
# numbers reach forward_step as tensors (its data["row"].tolist() on the list collated here
# before was an AttributeError), strings as a list (collated key by key, the first forward
# stopped with "'str' object has no attribute 'keys'")
@pytest.mark.parametrize("reference_class", [EchoNumberReference, EchoStringReference])
async def test_a_dataset_without_collate_fn_reaches_forward_step_as_default_collate_gives_it(
    tmp_path: Path, reference_class: type
) -> None:
    _, log = await _learn(
        tmp_path, _runtime(1, 8, 4, 2, 4), range(8), reference_class=reference_class
    )
    assert sorted(row for e in _events(log, "forward") for row in e["rows"]) == list(range(8))


async def test_a_forward_output_too_large_for_a_message_names_forward_step(tmp_path: Path) -> None:
    """The trainer refused it as a broken message of the reference, naming neither
    forward_step nor what to change."""
    with pytest.raises(Exception) as info:
        await _learn(tmp_path, _runtime(1, 8, 4, 2, 4), range(8), reference_class=EchoListReference)
    text = str(info.value)
    assert "TooManyObjectsError" in text and "sent by reference" in text, text
    assert "forward_step output for one chunk is more than a message may hold" in text, text


async def test_a_failing_forward_step_leaves_no_coroutine_unawaited(tmp_path: Path) -> None:
    """Every forward_step failure also printed "RuntimeWarning: coroutine
    'ReferenceGroup.end_episode' was never awaited" (made for a task group already stopping)."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Exception, match="a bug in forward_step"):
            await _learn(
                tmp_path,
                _runtime(2, 8, 2, 2, 4, echo_fail_row=0),
                range(8),
                reference_class=EchoFailingReference,
            )
        gc.collect()
    unawaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert unawaited == []


@pytest.mark.parametrize("eval_size", [1, 5])
async def test_every_trainer_rank_evaluates_as_many_batches(tmp_path: Path, eval_size) -> None:
    """A sharded (FSDP2) trainer's forwards are collectives: with 33 eval samples over 2 ranks in
    batches of 16, rank 0 ran one more and waited for the other forever. Batches are now evened
    out, and a rank without a sample of its own evaluates one uncounted."""
    eval_set = [10 * (i + 1) for i in range(eval_size)]
    engine, log = await _learn(
        tmp_path,
        _runtime(
            1,
            8,
            4,
            2,
            4,
            eval_episode_interval=1,
            enable_eval_before_training=True,
            colocation=["reference,policy_trainer"],
        ),
        range(8),
        eval_set=eval_set,
        trainer=EchoIterationEvalTrainer,
        trainer_model={"num_cpu": 2, "cpu_per_process": 1, "trainable": True},
    )
    evals = _events(log, "eval")
    per_rank = [[e["rows"] for e in evals if e["rank"] == rank] for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # as many forwards on both ranks
    assert all(len(rows) <= 2 for rows in per_rank[0] + per_rank[1])  # micro-batches of 2
    assert engine.pipeline is not None
    mean = sum(eval_set) / len(eval_set)  # the uncounted batch is left out of the mean
    assert [e["mean_row"] for e in engine.pipeline.eval_history] == [mean, mean]


def test_eval_batches_are_as_many_on_every_rank_and_count_each_position_once() -> None:
    from chatlearn.engine.pipeline import eval_batches

    for size in range(1, 40):
        for dp_size in (1, 2, 3, 4):
            for micro in (1, 2, 16):
                batches, uncounted = eval_batches(size, dp_size, micro)
                assert len({len(b) for b in batches}) == 1
                assert all(0 < len(batch) <= micro for b in batches for batch in b)
                counted = [
                    p
                    for b, n in zip(batches, uncounted, strict=True)
                    for batch in b[: len(b) - n]
                    for p in batch
                ]
                assert sorted(counted) == list(range(size))
    assert eval_batches(33, 2, 16)[0] == [
        [list(range(0, 18, 2)), list(range(18, 33, 2))],
        [list(range(1, 17, 2)), list(range(17, 33, 2))],
    ]


def test_an_empty_dataset_is_one_config_line_before_any_model_starts(tmp_path: Path) -> None:
    # engine.set_dataset([]) (a filter that kept nothing) started both models, then stopped with
    # a traceback from the sampler
    from chatlearn.config import ConfigError

    with pytest.raises(ConfigError) as info:
        asyncio.run(_learn(tmp_path, _runtime(1, 4, 2, 2, 4), samples=[]))
    assert info.value.one_line() == (
        "the dataset is empty: it must hold at least one sample (fix: give engine.set_dataset() "
        "at least one sample (did a filter keep none?), or return at least one from the model's "
        "build_dataset)"
    )
    assert not (tmp_path / "log.jsonl").exists()  # the echo modules' log: none was set up


def test_a_drop_last_in_model_args_that_is_not_a_bool_is_one_config_error(tmp_path: Path) -> None:
    from chatlearn.config import Config, ConfigError
    from chatlearn.engine.engine import _drop_last

    reference = {"num_cpu": 1, "model_args": {"drop_last": "drop"}}
    config = Config(_config(tmp_path, {}, reference))
    with pytest.raises(ConfigError, match="models.reference.model_args.drop_last: expected true"):
        _drop_last(config, "reference")


def test_a_second_learn_on_one_engine_trains_its_own_run(tmp_path: Path) -> None:
    # without checkpoints the second learn() started from the counters the first left behind:
    # it trained nothing, said "training done: 4 iterations", returned the first run's figures
    # and had moved the first run's metrics.jsonl aside, leaving it empty
    chatlearn.init(_config(tmp_path, _runtime(2, 8, 4, 2, 4, in_process=True)))
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engine.set_dataset(list(range(20)))
        first = engine.learn()
        second = engine.learn()
    finally:
        reset_args()
    assert (first.steps, first.samples_trained) == (second.steps, second.samples_trained) == (4, 16)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [t["iteration"] for t in _events(log, "train")] == [0, 1, 2, 3] * 2
    records = (tmp_path / "CHATLEARN" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records if '"train"' in r] == [1, 2, 3, 4]


def test_models_built_under_different_inits_are_refused(tmp_path: Path) -> None:
    # a notebook that ran chatlearn.init() again after building the reference: the run used the
    # reference's (older) config for everything, the trainer's only for its placement
    chatlearn.init(_config(tmp_path, _runtime(1, 8, 4, 2, 4)))
    try:
        reference = EchoReference("reference")
        chatlearn.init(_config(tmp_path, _runtime(3, 8, 4, 2, 4)))
        with pytest.raises(ValueError, match=r"policy_trainer under another one than reference"):
            DPOEngine(reference, EchoTrainer("policy_trainer"))
        DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))  # both after it
    finally:
        reset_args()


@pytest.mark.parametrize(
    ("dataset", "given"),
    [
        ("data/train.jsonl", "a str, whose samples would be its characters"),
        (Path("data/train.jsonl"), "whose samples would be its characters"),
        ({"prompt": ["p"], "chosen": ["c"]}, "a dict, whose samples would be its keys"),
    ],
)
def test_a_value_that_does_not_iterate_over_samples_is_refused(tmp_path, dataset, given) -> None:
    # the samples were the path's characters or the dict's keys: a run on them, without a word
    chatlearn.init(_config(tmp_path, _runtime(1, 8, 4, 2, 4)))
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        for method in (engine.set_dataset, engine.set_eval_dataset):
            with pytest.raises(TypeError, match=given):
                method(dataset)
        with pytest.raises(TypeError, match=r"set_multiple_datasets\(\) takes the samples"):
            engine.set_multiple_datasets([list(range(4)), dataset])
        engine.set_dataset(iter(range(4)))  # any iterable of samples will do
        assert engine._datasets == [[0, 1, 2, 3]]
    finally:
        reset_args()


def _timed_commits(
    monkeypatch: pytest.MonkeyPatch,
    seconds: float,
    fail_at: int | None = None,
    slow_at: int | None = None,
):
    """Every checkpoint commit (fsync, hash, rename: ``CheckpointManager.commit``) takes
    ``seconds`` more, as a big checkpoint's does (only the one of iteration ``slow_at``, when
    given); the one of iteration ``fail_at`` fails as on a full disk. Returns the commits'
    (iteration, start, end)."""
    from chatlearn.engine.checkpoint import CheckpointManager

    commits: list[tuple[int, float, float]] = []
    real = CheckpointManager.commit

    def commit(self: CheckpointManager, staging: Path, state) -> Path:
        start = time.time()
        if slow_at is None or state.iteration == slow_at:
            time.sleep(seconds)
        if state.iteration == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(staging))
        path = real(self, staging, state)
        commits.append((state.iteration, start, time.time()))
        return path

    monkeypatch.setattr(CheckpointManager, "commit", commit)
    return commits


async def test_periodic_checkpoints_are_committed_while_the_next_steps_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fsyncing and hashing a 7B DDP checkpoint (84 GB) takes a minute or two; training waited
    commits = _timed_commits(monkeypatch, 0.6)
    _, log = await _learn(tmp_path, _runtime(2, 16, 4, 2, 4, save_step_interval=2))
    trains = _events(log, "train")
    assert [c[0] for c in commits] == [2, 4, 6, 8]  # in order; the last one's end save waited
    started = {t["iteration"]: t["start"] for t in trains}
    # the step after each save started before that save's commit ended (the last one's end
    # save waited for it); waiting for the commit, it started after
    assert all(started[k] < end for k, _, end in commits[:-1]), (commits, started)
    checkpoints = sorted((tmp_path / "CHATLEARN" / "checkpoints").iterdir())
    assert checkpoints[-1].name == "iter_0000008"  # the older ones as save_keep_last says
    assert all((path / "MANIFEST.json").is_file() for path in checkpoints)  # all complete


async def test_a_trainer_lost_while_its_checkpoint_is_committed_restarts_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # iteration 3 kills the trainer while the checkpoint of iteration 2 is still being
    # committed: the run goes back to that checkpoint once it is (not to the run's start);
    # the run's end's commit (iteration 4) need not be slow
    _timed_commits(monkeypatch, 4.0, slow_at=2)
    runtime = _runtime(1, 16, 4, 2, 4, save_step_interval=2, echo_die_at=3)
    _, log = await _learn(tmp_path, runtime, range(16), trainer=EchoSetupTrainer)
    assert list(tmp_path.rglob("echo_died"))  # the trainer died once
    assert [t["iteration"] for t in _events(log, "train")] == [0, 1, 2, 2, 3]
    # the new process's setup() already knew the checkpoint it resumes from (a module that
    # loads its own checkpoint there, as ChatLearn's do): its restart waited for the commit
    setups = [(s["resume"], s["train_iteration"]) for s in _events(log, "setup")]
    assert setups == [(False, 0), (True, 2)], setups
    records = [
        json.loads(x) for x in (tmp_path / "CHATLEARN" / "metrics.jsonl").read_text().splitlines()
    ]
    (restart,) = [r for r in records if r["kind"] == "restart"]
    assert restart["model"] == "policy_trainer" and restart["step"] == 2, restart


async def test_a_checkpoint_that_cannot_be_committed_stops_the_run_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatlearn.config.errors import StorageError

    _timed_commits(monkeypatch, 0.0, fail_at=4)
    with pytest.raises(StorageError) as raised:
        await _learn(tmp_path, _runtime(4, 16, 4, 2, 4, save_step_interval=2, echo_cost=0.2))
    assert "No space left on device" in str(raised.value) and "iter_0000002" in str(raised.value)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert max(t["iteration"] for t in _events(log, "train")) < 8  # of 32: it stopped then
    checkpoints = sorted(p.name for p in (tmp_path / "CHATLEARN" / "checkpoints").iterdir())
    assert checkpoints == ["iter_0000002"]  # the one a rerun resumes from; no staging left


async def test_a_stop_at_once_names_the_checkpoint_still_being_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two signals right after the checkpoint of iteration 4 was handed to the background
    # commit: the stop named iteration 2's as the newest, which that commit (its thread goes
    # on) then pruned (save_keep_last 1)
    import signal

    from chatlearn.engine.interrupts import TrainingStopped
    from chatlearn.engine.run_checkpoints import RunCheckpoints

    _timed_commits(monkeypatch, 2.0, slow_at=4)  # iteration 2's is committed before the stop
    real = RunCheckpoints.save
    engines: list[DPOEngine] = []

    async def save(self, state, reason, eval_history=None, *, wait=True):
        path = await real(self, state, reason, eval_history, wait=wait)
        if state.iteration == 4 and reason == "step":
            engines[0]._interrupts.handle(signal.SIGINT)  # graceful
            engines[0]._interrupts.handle(signal.SIGINT)  # at once
        return path

    monkeypatch.setattr(RunCheckpoints, "save", save)
    runtime = _runtime(4, 16, 4, 2, 4, save_step_interval=2, save_keep_last=1, echo_cost=0.05)
    chatlearn.init(_config(tmp_path, runtime))
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engines.append(engine)
        engine.set_dataset(list(range(35)))
        with pytest.raises(TrainingStopped) as stopped:
            await engine.learn_async()
    finally:
        reset_args()
    checkpoint = stopped.value.checkpoint
    assert checkpoint is not None and checkpoint.name == "iter_0000004", checkpoint
    root = tmp_path / "CHATLEARN" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004"]


async def test_a_commit_that_fails_during_a_graceful_stop_is_said_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # the signal right after the checkpoint of iteration 4 was handed to the background commit,
    # which then fails on a full disk: the stop's save waits for it and meets its StorageError,
    # a one-line error (exit 2 on its own), which the stop logged with a whole traceback
    import signal

    from chatlearn.engine.interrupts import TrainingStopped
    from chatlearn.engine.run_checkpoints import RunCheckpoints

    _timed_commits(monkeypatch, 0.5, fail_at=4)
    real = RunCheckpoints.save
    engines: list[DPOEngine] = []

    async def save(self, state, reason, eval_history=None, *, wait=True):
        path = await real(self, state, reason, eval_history, wait=wait)
        if state.iteration == 4 and reason == "step":
            engines[0]._interrupts.handle(signal.SIGINT)
        return path

    monkeypatch.setattr(RunCheckpoints, "save", save)
    runtime = _runtime(4, 16, 4, 2, 4, save_step_interval=2, echo_cost=0.05)
    chatlearn.init(_config(tmp_path, runtime))
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engines.append(engine)
        engine.set_dataset(list(range(35)))
        with caplog.at_level(logging.ERROR, logger="chatlearn"):
            with pytest.raises(TrainingStopped) as stopped:
                await engine.learn_async()
    finally:
        reset_args()
    assert stopped.value.checkpoint is not None
    assert stopped.value.checkpoint.name == "iter_0000002"
    said = [r for r in caplog.records if "failed while stopping" in r.getMessage()]
    assert len(said) == 1 and "No space left on device" in said[0].getMessage(), said
    assert said[0].exc_info is None  # one line, not a traceback
    assert not [r for r in caplog.records if "not committed" in r.getMessage()]  # said once


def _disk_holding(monkeypatch: pytest.MonkeyPatch, checkpoints: float) -> list[int]:
    """The checkpoints' file system, as the run sees it, with room for this many checkpoints
    of the size of the one just committed; the sizes it was asked with, in order."""
    import shutil

    from chatlearn.engine import run_checkpoints
    from chatlearn.engine.checkpoint import checkpoint_bytes

    sizes: list[int] = []

    def usage(path):
        real = shutil.disk_usage(path)
        sizes.append(checkpoint_bytes(Path(path)))  # called with the checkpoint just committed
        return real._replace(free=int(checkpoints * sizes[-1]))

    monkeypatch.setattr(run_checkpoints, "disk_usage", usage)
    return sizes


async def test_a_disk_without_room_for_the_checkpoints_to_come_is_said_at_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run of days learns at its first checkpoint that the disk holds two more, not when the
    # fourth fills it and stops the run: four episodes, a checkpoint each, all kept
    sizes = _disk_holding(monkeypatch, 2.5)
    runtime = _runtime(4, 8, 8, 2, 4, save_episode_interval=1, save_keep_last=0)
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        await _learn(tmp_path, runtime)
    said = [r.getMessage() for r in caplog.records if "full disk" in r.getMessage()]
    assert len(said) == 1 and len(sizes) == 1 and sizes[0] > 0, said  # once, at the first
    assert "room for 2 more, where the run writes 3 more and keeps every one" in said[0]
    assert "checkpoint 3 from now (the run's last) would stop the run" in said[0]
    # the newest 3 kept: at most 4 on disk, 3 more than now, 2 fit: said too
    caplog.clear()
    sizes.clear()
    runtime["save_keep_last"] = 3
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        await _learn(tmp_path / "kept", runtime)
    said = [r.getMessage() for r in caplog.records if "full disk" in r.getMessage()]
    assert len(said) == 1 and "keeps the newest 3" in said[0], said
    # the newest 2: at most 3 on disk, 2 more than now: room enough, nothing said
    caplog.clear()
    sizes.clear()
    runtime["save_keep_last"] = 2
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        await _learn(tmp_path / "two", runtime)
    assert not [r for r in caplog.records if "full disk" in r.getMessage()]
    assert len(sizes) == 4  # checked after every commit while there was room


async def test_a_disk_without_room_for_the_runs_last_checkpoint_and_its_export_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A LoRA trainer's periodic checkpoints hold its adapter (MBs), its last one the merged
    # weights too (the base's size: 140 GB for a 70B model in bf16): the room was judged by
    # the periodic ones' size alone, and the run's last save filled the disk at its end. The
    # trainer says what its last save adds (final_checkpoint_extra_bytes), counted at the first
    from echo_modules import ExportingEchoTrainer

    sizes = _disk_holding(monkeypatch, 3.5)  # room for 3 more periodic ones
    runtime = _runtime(4, 8, 8, 2, 4, save_episode_interval=1, save_keep_last=0)
    runtime["echo_export_bytes"] = 2**30
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        _, log = await _learn(tmp_path, runtime, trainer=ExportingEchoTrainer)
    said = [r.getMessage() for r in caplog.records if "full disk" in r.getMessage()]
    assert len(said) == 1 and len(sizes) == 1, said  # at the first checkpoint
    assert "room for 2 more, where the run writes 3 more" in said[0], said
    assert "the last one 1 GiB, with the trainer's export for inference" in said[0], said
    assert "checkpoint 3 from now (the run's last) would stop the run" in said[0], said
    assert [e["reason"] for e in _events(log, "save")] == ["interval"] * 3 + ["end"]
    # without the export the same disk holds them all: nothing said
    caplog.clear()
    sizes.clear()
    runtime["echo_export_bytes"] = 0
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        await _learn(tmp_path / "none", runtime, trainer=ExportingEchoTrainer)
    assert not [r for r in caplog.records if "full disk" in r.getMessage()]
    assert len(sizes) == 4
    # an estimate that is not a number is taken as 0, said, and the run goes on (it stopped)
    runtime["echo_export_bytes"] = None
    _, log = await _learn(tmp_path / "null", runtime, trainer=ExportingEchoTrainer)
    assert len(_events(log, "save")) == 4
