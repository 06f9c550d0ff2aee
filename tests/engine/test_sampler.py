"""The episode sampler reproduces ChatLearn's draws: cycle, shuffle, replicas, resume, mixing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chatlearn.engine.sampler import (
    EpisodeSampler,
    ReplicaShare,
    SampleIndex,
    dataset_fingerprint,
    normalize_data_ratio,
    split_among_replicas,
)


def rows(episode) -> list[int]:
    assert all(i.dataset_id == 0 for i in episode.indices)
    return [i.row for i in episode.indices]


def chatlearn_perm(size: int, pass_index: int, seed: int = 0) -> list[int]:
    g = torch.Generator()
    g.manual_seed(seed + pass_index)
    return torch.randperm(size, generator=g).tolist()


class ChatLearnOracle:
    """An independent model of ChatLearn's MultiDatasetSampler (cycle mode), one episode a call.

    Structured like ChatLearn's loop: per episode it restarts at dataset 0 and walks the datasets,
    taking what is left of each dataset's share of the ratio cycle; each dataset walks its passes.
    """

    def __init__(self, sizes, spe, ratio, shuffle, seed=0):
        self.sizes, self.spe, self.ratio, self.shuffle, self.seed = sizes, spe, ratio, shuffle, seed
        self.remains = list(ratio)
        self.offsets = [0] * len(sizes)
        self.passes = [0] * len(sizes)

    def _order(self, d):
        if self.shuffle:
            return chatlearn_perm(self.sizes[d], self.passes[d], self.seed)
        return list(range(self.sizes[d]))

    def _take(self, d, n):
        out = []
        while n > 0:
            order = self._order(d)
            step = min(n, self.sizes[d] - self.offsets[d])
            out += order[self.offsets[d] : self.offsets[d] + step]
            self.offsets[d] += step
            n -= step
            if self.offsets[d] == self.sizes[d]:
                self.offsets[d] = 0
                self.passes[d] += 1
        return out

    def episode(self):
        got = []
        d = 0
        while len(got) != self.spe:
            n = min(self.remains[d], self.spe - len(got))
            self.remains[d] -= n
            got += [(d, r) for r in self._take(d, n)]
            d = (d + 1) % len(self.sizes)
            if self.remains == [0] * len(self.sizes):
                self.remains = list(self.ratio)
        return got


# -- the spec's numbers ------------------------------------------------------------------------


def test_spec_episodes_without_shuffle():
    sampler = EpisodeSampler(35, 16, shuffle=False)
    episodes = [sampler.next_episode() for _ in range(4)]
    assert rows(episodes[0]) == list(range(0, 16))
    assert rows(episodes[1]) == list(range(16, 32))
    assert rows(episodes[2]) == [32, 33, 34] + list(range(0, 13))
    assert rows(episodes[3]) == list(range(13, 29))
    assert [e.episode_id for e in episodes] == [0, 1, 2, 3]
    assert [e.consumed_samples_before for e in episodes] == [0, 16, 32, 48]
    assert sampler.consumed_samples == 64


def test_spec_resume_at_32():
    sampler = EpisodeSampler(35, 16, shuffle=False, consumed_samples=32)
    assert sampler.episode_id == 2
    episode = sampler.next_episode()
    assert episode.episode_id == 2
    assert rows(episode) == [32, 33, 34] + list(range(0, 13))
    assert rows(sampler.next_episode()) == list(range(13, 29))


def test_shuffle_uses_chatlearn_permutation_per_pass():
    sampler = EpisodeSampler(35, 16, shuffle=True)
    p0, p1, p2 = (chatlearn_perm(35, k) for k in range(3))
    assert rows(sampler.next_episode()) == p0[0:16]
    assert rows(sampler.next_episode()) == p0[16:32]
    assert rows(sampler.next_episode()) == p0[32:35] + p1[0:13]
    assert rows(sampler.next_episode()) == p1[13:29]
    assert rows(sampler.next_episode()) == p1[29:35] + p2[0:10]
    assert p0 != p1  # the passes really differ


def test_seed_offsets_the_pass_seed():
    sampler = EpisodeSampler(35, 16, shuffle=True, seed=7)
    assert rows(sampler.next_episode()) == chatlearn_perm(35, 0, seed=7)[0:16]
    assert rows(EpisodeSampler(35, 16, seed=0).next_episode()) == chatlearn_perm(35, 0)[0:16]


def test_shuffled_resume_matches_uninterrupted_run():
    full = EpisodeSampler(35, 16, shuffle=True)
    expected = [rows(full.next_episode()) for _ in range(6)]
    resumed = EpisodeSampler(35, 16, shuffle=True, consumed_samples=32)
    assert [rows(resumed.next_episode()) for _ in range(4)] == expected[2:]


def test_state_dict_round_trip():
    a = EpisodeSampler([7, 5], 4, data_ratio=[2, 1], seed=3)
    for _ in range(3):
        a.next_episode()
    state = a.state_dict()
    b = EpisodeSampler([7, 5], 4, data_ratio=[2, 1], seed=3)
    b.load_state_dict(state)
    assert b.consumed_samples == 12
    assert [b.next_episode().indices for _ in range(5)] == [
        a.next_episode().indices for _ in range(5)
    ]


def test_state_dict_mismatch_is_reported():
    state = EpisodeSampler(35, 16).state_dict()
    other = EpisodeSampler(36, 16)
    with pytest.raises(ValueError, match="dataset_sizes: saved \\[35\\], now \\[36\\]"):
        other.load_state_dict(state)
    other.load_state_dict(dict(state, consumed_samples=32), strict=False)
    assert other.consumed_samples == 32
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({"consumed_samples": 0})


# -- replicas ----------------------------------------------------------------------------------


def test_two_replicas_take_contiguous_halves():
    episode = EpisodeSampler(35, 16, shuffle=False, consumed_samples=32).next_episode()
    shares = episode.shares(2)
    assert [s.replica_id for s in shares] == [0, 1]
    assert [s.start for s in shares] == [0, 8]
    assert [i.row for i in shares[0].indices] == [32, 33, 34, 0, 1, 2, 3, 4]
    assert [i.row for i in shares[1].indices] == [5, 6, 7, 8, 9, 10, 11, 12]
    assert list(shares[1].positions) == list(range(8, 16))


def test_one_replica_takes_everything():
    episode = EpisodeSampler(35, 16, shuffle=False).next_episode()
    (share,) = episode.shares(1)
    assert share == ReplicaShare(0, 0, episode.indices)


def test_indivisible_replica_count_is_a_clear_error():
    episode = EpisodeSampler(35, 16, shuffle=False).next_episode()
    with pytest.raises(ValueError, match=r"sample_per_episode \(16\) must be divisible .* \(3\)"):
        episode.shares(3)
    with pytest.raises(ValueError, match=">= 1"):
        split_among_replicas(episode.indices, 0)


# -- drop mode ---------------------------------------------------------------------------------


def test_drop_mode_skips_the_incomplete_tail():
    sampler = EpisodeSampler(35, 16, shuffle=False, drop_last="drop")
    got = [rows(sampler.next_episode()) for _ in range(4)]
    assert got == [list(range(16)), list(range(16, 32)), list(range(16)), list(range(16, 32))]
    resumed = EpisodeSampler(35, 16, shuffle=False, drop_last="drop", consumed_samples=32)
    assert rows(resumed.next_episode()) == list(range(16))


def test_drop_mode_shuffles_each_pass():
    sampler = EpisodeSampler(35, 16, shuffle=True, drop_last="drop")
    got = [rows(sampler.next_episode()) for _ in range(3)]
    assert got == [
        chatlearn_perm(35, 0)[:16],
        chatlearn_perm(35, 0)[16:32],
        chatlearn_perm(35, 1)[:16],
    ]


def test_drop_mode_is_ignored_with_several_datasets():
    a = EpisodeSampler([5, 3], 4, drop_last="drop", shuffle=False)
    b = EpisodeSampler([5, 3], 4, drop_last="cycle", shuffle=False)
    assert a.drop_last == "cycle"
    assert [a.next_episode().indices for _ in range(3)] == [
        b.next_episode().indices for _ in range(3)
    ]


# -- several datasets --------------------------------------------------------------------------


def test_data_ratio_mixing_cycle():
    sampler = EpisodeSampler([5, 3], 4, data_ratio=[2, 1], shuffle=False)
    e0, e1, e2 = (sampler.next_episode() for _ in range(3))
    assert e0.indices == (
        SampleIndex(0, 0),
        SampleIndex(0, 1),
        SampleIndex(1, 0),
        SampleIndex(0, 2),
    )
    # the ratio cycle continues across the episode boundary: one more of dataset 0, then 1
    assert e1.indices == (
        SampleIndex(0, 3),
        SampleIndex(1, 1),
        SampleIndex(0, 4),
        SampleIndex(0, 0),
    )
    assert e2.indices == (
        SampleIndex(1, 2),
        SampleIndex(0, 1),
        SampleIndex(0, 2),
        SampleIndex(1, 0),
    )


def test_equal_ratio_by_default():
    sampler = EpisodeSampler([3, 3], 6, shuffle=False)
    assert [tuple(i) for i in sampler.next_episode().indices] == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
        (0, 2),
        (1, 2),
    ]


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    spe=st.integers(1, 12),
    ratio_seed=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
    resume_at=st.integers(0, 5),
)
def test_matches_chatlearn_model_and_resumes_anywhere(
    sizes, spe, ratio_seed, shuffle, seed, resume_at
):
    ratio = ratio_seed[: len(sizes)]
    if sum(ratio) == 0:
        ratio[0] = 1
    oracle = ChatLearnOracle(sizes, spe, ratio, shuffle, seed)
    sampler = EpisodeSampler(sizes, spe, data_ratio=ratio, shuffle=shuffle, seed=seed)
    expected = [oracle.episode() for _ in range(8)]
    got = [[tuple(i) for i in sampler.next_episode().indices] for _ in range(8)]
    assert got == expected
    resumed = EpisodeSampler(
        sizes, spe, data_ratio=ratio, shuffle=shuffle, seed=seed, consumed_samples=resume_at * spe
    )
    assert [[tuple(i) for i in resumed.next_episode().indices] for _ in range(8 - resume_at)] == (
        expected[resume_at:]
    )


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset_sizes": 0, "sample_per_episode": 4}, "the dataset is empty"),
        ({"dataset_sizes": [3, 0], "sample_per_episode": 4}, "dataset 1 is empty"),
        ({"dataset_sizes": [], "sample_per_episode": 4}, "set_dataset"),
        ({"dataset_sizes": 5, "sample_per_episode": 0}, "sample_per_episode must be >= 1"),
        ({"dataset_sizes": 5, "sample_per_episode": 8, "drop_last": "drop"}, "drop_last needs"),
        ({"dataset_sizes": 5, "sample_per_episode": 2, "drop_last": "retain"}, "'cycle' or 'drop'"),
        ({"dataset_sizes": 5, "sample_per_episode": 2, "consumed_samples": -1}, ">= 0"),
        ({"dataset_sizes": [3, 3], "sample_per_episode": 2, "data_ratio": [1]}, "2 datasets"),
        ({"dataset_sizes": [3, 3], "sample_per_episode": 2, "data_ratio": [0.7, 0.3]}, "whole"),
        ({"dataset_sizes": [3, 3], "sample_per_episode": 2, "data_ratio": [1, -1]}, "negative"),
        ({"dataset_sizes": [3, 3], "sample_per_episode": 2, "data_ratio": "1:1"}, "int or a list"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(**kwargs)


def test_normalize_data_ratio_reads_like_chatlearn():
    assert normalize_data_ratio(None, 2) == [1, 1]
    assert normalize_data_ratio(0, 2) == [1, 1]
    assert normalize_data_ratio([], 2) == [1, 1]
    assert normalize_data_ratio(3, 2) == [3, 3]
    assert normalize_data_ratio([0, 2], 2) == [0, 2]
    with pytest.raises(ValueError, match="positive"):
        normalize_data_ratio([0, 0], 2)


def test_the_state_records_each_datasets_fingerprint_and_says_which_rows_changed() -> None:
    # another data file with as many rows resumed without a word: only the sizes were recorded
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(5000)]
    edited = [*rows[:-1], {**rows[-1], "chosen": "c"}]
    prints = [dataset_fingerprint(rows), dataset_fingerprint(list(range(7)))]
    assert dataset_fingerprint(edited) != prints[0]  # the last row is always read
    assert dataset_fingerprint(rows[::-1]) != prints[0]
    assert dataset_fingerprint([dict(r) for r in rows]) == prints[0]
    saved = EpisodeSampler([5000, 7], 4, fingerprints=prints).state_dict()
    assert saved["dataset_fingerprints"] == prints
    now = EpisodeSampler([5000, 7], 4, fingerprints=[dataset_fingerprint(edited), prints[1]])
    now.load_state_dict(saved)  # a warning (run_checkpoints), not a refusal: data gets fixed
    assert now.other_rows(saved) == [0]
    assert EpisodeSampler([5000, 7], 4, fingerprints=prints).other_rows(saved) == []
    assert now.other_rows({k: v for k, v in saved.items() if k != "dataset_fingerprints"}) == []
