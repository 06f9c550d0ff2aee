"""Which dataset samples each episode draws: the coordinator's deterministic, resumable sampler.

Runs in the coordinator.

The coordinator owns one :class:`EpisodeSampler`. Every episode it calls
:meth:`EpisodeSampler.next_episode`, gets the episode's ``sample_per_episode`` indices (each a
:class:`SampleIndex` naming a dataset and a row of it), splits them into one contiguous
:class:`ReplicaShare` per reference replica with :meth:`Episode.shares`, and sends each replica its
share as a work order. A sample's *buffer position* is its place in the episode (0-based); the
reference outputs are keyed by it and the training plan (``training_plan.py``) names positions.

Semantics follow ChatLearn's ``MultiDatasetSampler`` / ``RLHFSingleSampler``
(``chatlearn/data/sampler.py``, the version whose ``build_dataloader`` in
``chatlearn/models/base_module.py`` passes ``sample_per_episode``, ``data_shuffle`` and
``drop_last="drop" if drop_last else "cycle"``):

* Pass ``k`` over a dataset (its ``k``-th epoch) visits the rows in order, or with shuffle in the
  order ``torch.randperm(size, generator=torch.Generator().manual_seed(seed + k))``. ChatLearn
  never passes a seed to its sampler, so its seed is always 0: ``seed=0`` here reproduces it.
* ``drop_last="cycle"`` (default): an episode that reaches the end of a pass continues with the
  start of the next pass. ``"drop"`` (single dataset only): the rows of a pass that cannot fill a
  whole episode are skipped and the episode starts the next pass.
* Several datasets (``set_multiple_datasets``) are mixed by ``data_ratio``: the draw walks a cycle
  of ``ratio[0]`` samples of dataset 0, then ``ratio[1]`` of dataset 1, ... and repeats. The cycle
  continues across episode boundaries. Each dataset has its own passes. ``data_ratio`` ``None``,
  ``0`` or ``[]`` means 1 for every dataset; an int means that value for every dataset. With
  several datasets ChatLearn always uses ``"cycle"`` (it ignores ``drop_last``); so do we.
* The whole state is ``consumed_samples``: ChatLearn rebuilds the sampler from it on resume, and
  so can we (``EpisodeSampler(..., consumed_samples=n)``). Resuming at 32 with 35 rows and 16 per
  episode continues with ``[32, 33, 34, 0, ..., 12]``.
* With ``R`` reference replicas replica ``r`` takes the ``r``-th contiguous ``1/R`` of the episode
  (ChatLearn's ``Environment.setup_dataset`` requires ``sample_per_episode % R == 0``).

Deliberate deviations: ChatLearn's ``"retain"`` mode is not offered (its config cannot select it,
and it can yield an empty episode); non-integer ``data_ratio`` values raise a clear error (ChatLearn
fails with a ``TypeError`` deep in slicing); ``num_inference_per_prompt`` (a GRPO feature) is not
part of DPO and not supported.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from chatlearn.config.errors import ConfigError
from chatlearn.transport.codec import encode

logger = logging.getLogger("chatlearn.engine")

DropLast = Literal["cycle", "drop"]


class EpisodeLongerThanData(ValueError):
    """``drop_last`` with a dataset smaller than an episode; ``fix`` says what to change (the
    engine names the key the mode came from)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


_STATE_VERSION = 1
FINGERPRINT_ROWS = 4096  # the rows of a dataset its fingerprint reads (~15 ms)


class SampleIndex(NamedTuple):
    """Row ``row`` of dataset ``dataset_id`` (order of ``set_multiple_datasets``; 0 for one)."""

    dataset_id: int
    row: int


@dataclass(frozen=True, slots=True)
class ReplicaShare:
    """The contiguous part of an episode one reference replica computes.

    ``start`` is the buffer position of ``indices[0]``; ``indices[i]`` is at ``start + i``.
    """

    replica_id: int
    start: int
    indices: tuple[SampleIndex, ...]

    @property
    def positions(self) -> range:
        return range(self.start, self.start + len(self.indices))


@dataclass(frozen=True, slots=True)
class Episode:
    """The samples of one episode, in buffer-position order."""

    episode_id: int
    consumed_samples_before: int
    indices: tuple[SampleIndex, ...]

    def __len__(self) -> int:
        return len(self.indices)

    def shares(self, num_replicas: int) -> list[ReplicaShare]:
        return split_among_replicas(self.indices, num_replicas)


def split_among_replicas(
    indices: Sequence[SampleIndex], num_replicas: int, *, start: int = 0
) -> list[ReplicaShare]:
    """Equal contiguous shares, replica ``r`` taking the ``r``-th (ChatLearn's order)."""
    if num_replicas < 1:
        raise ValueError(f"the number of reference replicas must be >= 1, got {num_replicas}")
    if len(indices) % num_replicas != 0:
        raise ValueError(
            f"sample_per_episode ({len(indices)}) must be divisible by the number of reference "
            f"replicas ({num_replicas}): set runtime.sample_per_episode to a multiple of "
            f"{num_replicas}, or change the reference's devices so the replica count divides it"
        )
    size = len(indices) // num_replicas
    return [
        ReplicaShare(r, start + r * size, tuple(indices[r * size : (r + 1) * size]))
        for r in range(num_replicas)
    ]


def normalize_data_ratio(data_ratio: Any, num_datasets: int) -> list[int]:
    """ChatLearn's reading of ``runtime.data_ratio`` as one whole number per dataset."""
    if data_ratio is None or data_ratio == 0 or data_ratio == []:
        return [1] * num_datasets
    if isinstance(data_ratio, bool):
        raise ValueError(f"runtime.data_ratio must be an int or a list of ints, got {data_ratio!r}")
    if isinstance(data_ratio, int):
        ratios = [data_ratio] * num_datasets
    elif isinstance(data_ratio, (list, tuple)):
        if len(data_ratio) != num_datasets:
            raise ValueError(
                f"runtime.data_ratio has {len(data_ratio)} entries but {num_datasets} datasets "
                f"were set: give one weight per dataset of set_multiple_datasets"
            )
        ratios = list(data_ratio)
    else:
        raise ValueError(
            f"runtime.data_ratio must be an int or a list of ints, got {type(data_ratio).__name__}"
        )
    for i, r in enumerate(ratios):
        if isinstance(r, bool) or not isinstance(r, int):
            raise ValueError(
                f"runtime.data_ratio[{i}] = {r!r}: weights are whole numbers of samples per "
                f"mixing cycle, e.g. [7, 3] rather than [0.7, 0.3]"
            )
        if r < 0:
            raise ValueError(f"runtime.data_ratio[{i}] = {r} must not be negative")
    if sum(ratios) == 0:
        raise ValueError("runtime.data_ratio must give at least one dataset a positive weight")
    return ratios


def permutation(size: int, pass_index: int, *, shuffle: bool, seed: int = 0) -> list[int]:
    """The row order of pass ``pass_index`` over a dataset of ``size`` rows (ChatLearn's)."""
    if not shuffle:
        return list(range(size))
    # imported here so the coordinator can draw unshuffled episodes without loading torch
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed + pass_index)
    return torch.randperm(size, generator=generator).tolist()


class _DatasetCursor:
    """Position in one dataset's sequence of passes; rebuilt from the rows drawn so far."""

    def __init__(self, size: int, drawn: int, *, shuffle: bool, seed: int, pass_length: int):
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        # rows of each pass actually used: `size` in cycle mode, whole episodes in drop mode
        self.pass_length = pass_length
        self.pass_index = drawn // pass_length
        self.offset = drawn % pass_length
        self._order: list[int] | None = None

    def _current_order(self) -> list[int]:
        if self._order is None:
            self._order = permutation(
                self.size, self.pass_index, shuffle=self.shuffle, seed=self.seed
            )
        return self._order

    def _next_pass(self) -> None:
        self.pass_index += 1
        self.offset = 0
        self._order = None

    def take_cycle(self, count: int) -> list[int]:
        rows: list[int] = []
        while count > 0:
            step = min(count, self.size - self.offset)
            rows.extend(self._current_order()[self.offset : self.offset + step])
            self.offset += step
            count -= step
            if self.offset == self.size:
                self._next_pass()
        return rows

    def take_whole(self, count: int) -> list[int]:
        if count > self.pass_length - self.offset:
            self._next_pass()
        rows = self._current_order()[self.offset : self.offset + count]
        self.offset += count
        if self.offset == self.pass_length:
            self._next_pass()
        return rows


def dataset_fingerprint(rows: Sequence[Any], most: int = FINGERPRINT_ROWS) -> str:
    """A cheap fingerprint of a dataset: its length and the wire encoding (what the reference
    receives) of ``most`` rows spread evenly over it (all of them in a smaller one). Another
    data file, or rows changed, reordered, added or removed, almost always change it; a change
    confined to rows it does not read goes unseen."""
    digest = hashlib.blake2b(f"chatlearn-dataset/{len(rows)}".encode(), digest_size=16)
    count = min(len(rows), most)
    for i in range(count):
        index = i * (len(rows) - 1) // (count - 1) if count > 1 else 0
        for frame in encode(rows[index]):
            digest.update(frame)
    return digest.hexdigest()


class DataSettingsChanged(ValueError):
    """A sampler state saved with other data settings (``changed``: the setting names)."""

    def __init__(self, changed: Sequence[str], details: str) -> None:
        super().__init__(
            f"the data checkpoint was written with other data settings ({details}); restore "
            "them, or load the state with strict=False to continue from consumed_samples alone"
        )
        self.changed = list(changed)
        self.details = details


def empty_dataset_error(index: int | None = None) -> ConfigError:
    """The one-line error of an empty training data set (dataset ``index`` of several)."""
    name = "the dataset" if index is None else f"dataset {index}"
    return ConfigError(
        f"{name} is empty: it must hold at least one sample",
        fix="give engine.set_dataset() at least one sample (did a filter keep none?), or "
        "return at least one from the model's build_dataset",
    )


class EpisodeSampler:
    """Deterministic, seeded, resumable episode sampler over one or several datasets.

    ``dataset_sizes`` is one int (one dataset) or a list (``set_multiple_datasets``). The sampler
    holds no randomness beyond ``seed`` and its state is ``consumed_samples``: two samplers built
    with the same arguments and ``consumed_samples`` draw the same episodes.
    """

    def __init__(
        self,
        dataset_sizes: int | Sequence[int],
        sample_per_episode: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        data_ratio: Any = None,
        drop_last: DropLast = "cycle",
        consumed_samples: int = 0,
        fingerprints: Sequence[str] | None = None,
    ) -> None:
        sizes = [dataset_sizes] if isinstance(dataset_sizes, int) else list(dataset_sizes)
        if not sizes:
            raise ValueError("no dataset was set: call engine.set_dataset(samples) before learn()")
        for i, size in enumerate(sizes):
            if size < 1:
                raise empty_dataset_error(None if len(sizes) == 1 else i)
        if sample_per_episode < 1:
            raise ValueError(f"runtime.sample_per_episode must be >= 1, got {sample_per_episode}")
        if drop_last not in ("cycle", "drop"):
            raise ValueError(f"drop_last must be 'cycle' or 'drop', got {drop_last!r}")
        if drop_last == "drop" and len(sizes) > 1:
            # ChatLearn's MultiDatasetSampler silently cycles with several datasets
            logger.warning("drop_last is ignored with several datasets: samples cycle instead")
            drop_last = "cycle"
        if drop_last == "drop" and sample_per_episode > sizes[0]:
            raise EpisodeLongerThanData(
                f"drop_last needs sample_per_episode ({sample_per_episode}) <= the dataset's "
                f"{sizes[0]} samples: no episode would be complete",
                "lower runtime.sample_per_episode, or let episodes cycle (drop_last false)",
            )
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset_sizes = sizes
        self.sample_per_episode = sample_per_episode
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.data_ratio = normalize_data_ratio(data_ratio, len(sizes))
        self.drop_last: DropLast = drop_last
        # each dataset's `dataset_fingerprint`, recorded in the state (compared on resume, not
        # enforced: fixing the data of a run is legitimate)
        self.fingerprints = list(fingerprints) if fingerprints is not None else None
        self._reset(consumed_samples)

    # -- state -------------------------------------------------------------------------------

    def _reset(self, consumed_samples: int) -> None:
        self._consumed = consumed_samples
        drawn = self.consumed_per_dataset(consumed_samples)
        self._cursors = [
            _DatasetCursor(
                size,
                drawn[d],
                shuffle=self.shuffle,
                seed=self.seed,
                pass_length=self._pass_length(size),
            )
            for d, size in enumerate(self.dataset_sizes)
        ]

    def _pass_length(self, size: int) -> int:
        if self.drop_last == "drop":
            return size // self.sample_per_episode * self.sample_per_episode
        return size

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    @property
    def episode_id(self) -> int:
        """The id of the episode :meth:`next_episode` returns next (episodes start at 0)."""
        return self._consumed // self.sample_per_episode

    def consumed_per_dataset(self, consumed_samples: int) -> list[int]:
        """Rows drawn from each dataset after ``consumed_samples`` (ChatLearn's split)."""
        cycle = sum(self.data_ratio)
        drawn = [r * (consumed_samples // cycle) for r in self.data_ratio]
        rest = consumed_samples % cycle
        for d, r in enumerate(self.data_ratio):
            take = min(rest, r)
            drawn[d] += take
            rest -= take
        return drawn

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (msgpack/JSON-able) for the coordinator's checkpoint."""
        state = {
            "version": _STATE_VERSION,
            "consumed_samples": self._consumed,
            "dataset_sizes": list(self.dataset_sizes),
            "sample_per_episode": self.sample_per_episode,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "data_ratio": list(self.data_ratio),
            "drop_last": self.drop_last,
        }
        if self.fingerprints is not None:
            state["dataset_fingerprints"] = list(self.fingerprints)
        return state

    def other_rows(self, state: dict[str, Any]) -> list[int]:
        """The datasets whose rows differ from those a saved state was drawn from (by their
        fingerprints; none when either side has none)."""
        saved = state.get("dataset_fingerprints")
        if not saved or self.fingerprints is None or len(saved) != len(self.fingerprints):
            return []
        return [i for i, (a, b) in enumerate(zip(saved, self.fingerprints, strict=True)) if a != b]

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Continue from a saved state. With ``strict`` the data settings must be unchanged."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported sampler state version {state.get('version')!r}")
        if strict:
            mine = self.state_dict()
            changed = [
                key
                for key in ("dataset_sizes", "sample_per_episode", "shuffle", "seed")
                + ("data_ratio", "drop_last")
                if key in state and state[key] != mine[key]
            ]
            if changed:
                details = ", ".join(f"{k}: saved {state[k]!r}, now {mine[k]!r}" for k in changed)
                raise DataSettingsChanged(changed, details)
        self._reset(int(state["consumed_samples"]))

    # -- drawing -----------------------------------------------------------------------------

    def _mixing_plan(self, count: int) -> list[tuple[int, int]]:
        """(dataset_id, rows) runs of the next ``count`` samples in the ratio cycle."""
        cycle = sum(self.data_ratio)
        point = self._consumed % cycle
        runs: list[tuple[int, int]] = []
        while count > 0:
            block_start = 0
            for d, r in enumerate(self.data_ratio):
                if block_start <= point < block_start + r:
                    take = min(block_start + r - point, count)
                    runs.append((d, take))
                    count -= take
                    point = (point + take) % cycle
                    break
                block_start += r
        return runs

    def next_episode(self) -> Episode:
        """Draw the next ``sample_per_episode`` indices and advance ``consumed_samples``."""
        episode_id = self.episode_id
        before = self._consumed
        indices: list[SampleIndex] = []
        if self.drop_last == "drop":
            rows = self._cursors[0].take_whole(self.sample_per_episode)
            indices.extend(SampleIndex(0, row) for row in rows)
        else:
            for dataset_id, count in self._mixing_plan(self.sample_per_episode):
                rows = self._cursors[dataset_id].take_cycle(count)
                indices.extend(SampleIndex(dataset_id, row) for row in rows)
        self._consumed += self.sample_per_episode
        return Episode(episode_id, before, tuple(indices))
