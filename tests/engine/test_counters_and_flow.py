"""Counters, and the whole pure data flow: sampler, replicas, chunks, buffer, plan, micro-batches.

The flow test plays both sides without processes: each reference replica collates its share,
runs an echo ``forward_step`` per ``generation_batch_size`` chunk, concatenates and splits the
output per sample; the trainer side stores samples by buffer position and assembles every
micro-batch the plan names. It checks what every ``forward_step`` and ``train_step`` sees.
"""

from __future__ import annotations

import pytest
import torch

from chatlearn.engine.batching import (
    PaddingSpec,
    chunk_sizes,
    concat_outputs,
    gather_micro_batch,
    split_into_chunks,
    split_per_sample,
)
from chatlearn.engine.counters import (
    check_batch_sizes,
    consumed_samples_after,
    episodes_completed,
    num_forward_chunks,
    num_steps_per_episode,
    num_steps_per_epoch,
    reference_iteration,
    trainer_iteration,
)
from chatlearn.engine.sampler import EpisodeSampler
from chatlearn.engine.training_plan import plan_episode


def test_counter_formulas():
    assert num_steps_per_epoch(16, 6) == 3
    assert num_steps_per_epoch(16, 16) == 1
    assert num_steps_per_epoch(16, 32) == 1
    assert num_steps_per_episode(16, 6, 2) == 6
    assert trainer_iteration(3, 16, 6, 2) == 18
    assert trainer_iteration(0, 16, 6, 2) == 0
    assert consumed_samples_after(3, 16) == 48
    assert episodes_completed(48, 16) == 3 and episodes_completed(50, 16) == 3
    assert num_forward_chunks(8, 3) == 3
    assert num_forward_chunks(8, 0) == 1 and num_forward_chunks(8, -1) == 1
    assert num_forward_chunks(0, 3) == 1
    # ChatLearn's resume value: start_episode * ceil(spe / num_replica / generation_batch_size)
    assert reference_iteration(2, 16, 2, 3) == 2 * 3
    assert reference_iteration(5, 1000, 4, 2) == 5 * 125
    with pytest.raises(ValueError, match="global_batch_size must be >= 1"):
        num_steps_per_epoch(16, 0)
    check_batch_sizes(2, 8, 4)
    with pytest.raises(ValueError, match="multiple of runtime.train_micro_batch_size"):
        check_batch_sizes(3, 8)


class EchoReference:
    """forward_step returns the row ids, the prompt tokens and a per-sample score."""

    def __init__(self) -> None:
        self.iteration = 0
        self.chunk_sizes: list[int] = []

    def forward_step(self, data: dict, iteration: int) -> dict:
        assert iteration == self.iteration
        self.iteration += 1
        self.chunk_sizes.append(len(data["row"]))
        return {
            "row": data["row"].clone(),
            "tokens": list(data["tokens"]),
            "score": data["row"].float() / 10,
        }


def dataset_row(index: int) -> dict:
    # variable length prompts so collation has to pad
    return {"row": index, "tokens": torch.arange(index % 3 + 1) + 100 * index}


def collate_fn(rows: list[dict]) -> dict:
    return {"row": torch.tensor([x["row"] for x in rows]), "tokens": [x["tokens"] for x in rows]}


def run_reference(replica: EchoReference, share, generation_batch_size: int) -> dict[int, dict]:
    batch = collate_fn([dataset_row(i.row) for i in share.indices])
    outputs = [
        replica.forward_step(chunk, replica.iteration)
        for chunk in split_into_chunks(batch, generation_batch_size)
    ]
    samples = split_per_sample(concat_outputs(outputs), expected_size=len(share.indices))
    return {share.start + i: sample for i, sample in enumerate(samples)}


@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_whole_flow_spec_numbers(num_replicas, shuffle):
    num_episode, spe, gbs = 4, 16, 3
    micro, global_, dp, epochs = 2, 6, 1, 2
    sampler = EpisodeSampler(35, spe, shuffle=shuffle)
    replicas = [EchoReference() for _ in range(num_replicas)]
    padding = {"tokens": PaddingSpec(-1, "left")}
    train_steps = 0
    drawn: list[list[int]] = []
    for _ in range(num_episode):
        episode = sampler.next_episode()
        drawn.append([i.row for i in episode.indices])
        buffer: dict[int, dict] = {}
        for share in episode.shares(num_replicas):
            buffer.update(run_reference(replicas[share.replica_id], share, gbs))
        assert sorted(buffer) == list(range(spe))
        plan = plan_episode(
            len(buffer),
            train_micro_batch_size=micro,
            train_global_batch_size=global_,
            data_parallel_size=dp,
            num_training_epoch=epochs,
            episode_id=episode.episode_id,
        )
        for step in plan.steps:
            (micro_batch_positions,) = step.micro_batches  # one rank
            data_list = [gather_micro_batch(buffer, mb, padding) for mb in micro_batch_positions]
            assert len(data_list) == global_ // micro
            for positions, data in zip(micro_batch_positions, data_list, strict=True):
                rows = [episode.indices[p].row for p in positions]
                assert data["row"].tolist() == rows
                assert torch.allclose(data["score"], torch.tensor(rows).float() / 10)
                longest = max(r % 3 + 1 for r in rows)
                for row, tokens in zip(rows, data["tokens"].tolist(), strict=True):
                    n = row % 3 + 1
                    assert tokens == [-1] * (longest - n) + [100 * row + j for j in range(n)]
            train_steps += 1

    if not shuffle:
        assert drawn == [
            list(range(16)),
            list(range(16, 32)),
            [32, 33, 34, *range(13)],
            list(range(13, 29)),
        ]
    # chunk sizes forward_step saw, per replica and episode: share 16/R in chunks of 3
    share = spe // num_replicas
    for replica in replicas:
        assert replica.chunk_sizes == chunk_sizes(share, gbs) * num_episode
        assert replica.iteration == reference_iteration(num_episode, spe, num_replicas, gbs)
    assert chunk_sizes(share, gbs) == ([3, 3, 3, 3, 3, 1] if num_replicas == 1 else [3, 3, 2])
    assert train_steps == trainer_iteration(num_episode, spe, global_, epochs) == 4 * 2 * 3
    assert sampler.consumed_samples == consumed_samples_after(num_episode, spe) == 64


def test_first_step_of_two_replicas_needs_only_the_first_share():
    # what the pipeline may start on: with 2 replicas, step 0 needs positions 0..5 (replica 0's);
    # the wrap fill of the last step only adds positions from the start of the buffer
    plan = plan_episode(16, train_micro_batch_size=3, train_global_batch_size=6)
    assert plan.steps[0].required_positions == tuple(range(6))
    assert plan.steps[-1].required_positions == (0, 1, 12, 13, 14, 15)
    assert [s.max_required_position for s in plan.steps] == [5, 11, 15]
    # the short last step repeats its own micro-batch instead
    plan = plan_episode(16, train_micro_batch_size=2, train_global_batch_size=6)
    assert plan.steps[-1].micro_batches == (((12, 13), (14, 15), (12, 13)),)
    assert plan.steps[-1].required_positions == (12, 13, 14, 15)
