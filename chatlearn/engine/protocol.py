"""The engine's protocol: every order the coordinator sends to a worker, and every result.

Runs on both sides: the coordinator and the actor processes import it. The coordinator
(``pipeline.py``, ``engine.py``, ``run_checkpoints.py``) calls the workers only through the two
clients at the bottom, :class:`ReferenceGroup` and :class:`TrainerGroup`, which send an order as
a plain dict (``kind`` plus its fields: our codec carries it, nothing is pickled) to the one
entry point of the worker's service (``ReferenceService.handle`` / ``TrainerService.handle`` in
``worker_services.py``); the service decodes it into its declared type and dispatches on that
type, and the reply comes back the same way. Decoding is strict: an unknown kind, or a missing,
extra or wrongly typed field, raises :class:`ProtocolError` naming the message type and the
field, since a malformed order is a bug of one of the run's own processes and must stop the run,
not be guessed at.

Orders to a reference replica: :class:`Connect`, :class:`StageSamples` (a large data set, in
parts), :class:`BuildDatasets`, :class:`BeginEpisode`,
:class:`Forward` (chunks of :class:`Chunk`), :class:`EndEpisode`, :class:`Resume`,
:class:`QueryDataParallel`, :class:`Memory`. Orders to a trainer rank: :class:`OpenInbox`,
:class:`QueryDataParallel`, :class:`BeginEpisode`, :class:`Fill`, :class:`Train` (steps of
:class:`Step`), :class:`EndEpisode`, :class:`Evaluate`, :class:`SaveCheckpoint`,
:class:`LoadCheckpoint`, :class:`Memory`. Each order names its result type (``result``; None: no
result).

The reference outputs themselves do not travel here: a replica pushes them straight to the
trainers' inboxes (``worker_services.py``), tensors as raw frames.
"""

from __future__ import annotations

import asyncio
import dataclasses
import types
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from chatlearn.transport.codec import DEFAULT_LIMITS

EVAL = "eval"  # the episode key and dataset split of the evaluation set

REFERENCE_ENTRY = "ref.handle"  # the reference replica's service entry (worker_services.py)
TRAINER_ENTRY = "train.handle"  # the trainer rank's


class ProtocolError(ValueError):
    """A message that is not one of the protocol's types, or not a well-formed one."""


# What one part of a data set sent in parts may hold: a quarter of what a receiver decodes
# (transport/codec.py's DEFAULT_LIMITS), so that the order around the samples fits too.
PART_BYTES = DEFAULT_LIMITS.max_header_bytes // 4
PART_VALUES = DEFAULT_LIMITS.max_values // 4
PART_CONTAINERS = DEFAULT_LIMITS.max_containers // 4
PART_TUPLES = DEFAULT_LIMITS.max_tuples // 4
PART_TENSORS = min(DEFAULT_LIMITS.max_tensors, DEFAULT_LIMITS.max_frames) // 4


def _cost(sample: Any) -> tuple[int, int, int, int, int]:
    """What a raw sample costs a message: bytes (text, tensor data), values, lists and maps,
    tuples, tensors; counted without recursion."""
    nbytes = values = containers = tuples = tensors = 0
    stack = [sample]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            nbytes += len(value) if len(value) < 1 << 16 else len(value.encode(errors="replace"))
        elif isinstance(value, bytes | bytearray | memoryview):
            nbytes += len(value)
        elif isinstance(value, dict):
            containers += 1
            values += 2 * len(value)
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            if isinstance(value, tuple):
                tuples += 1
            else:
                containers += 1
            values += len(value)
            stack.extend(value)
        elif hasattr(value, "nbytes") and hasattr(value, "shape"):  # a tensor or an array
            tensors += 1
            nbytes += 64 + int(value.nbytes)
        else:
            nbytes += 9
    return nbytes, values, containers, tuples, tensors


_PART_LIMITS = (PART_BYTES, PART_VALUES, PART_CONTAINERS, PART_TUPLES, PART_TENSORS)


def sample_parts(sample_lists: Sequence[Sequence[Any]]) -> list[tuple[int, int, list[Any]]]:
    """The samples cut into parts that each fit in one message with room to spare:
    ``(list index, start, samples)``; one part for a data set that fits whole.

    A data set of 100k+ records (or 16 MiB of text) does not fit in one message: sent whole,
    the receiver refused it and the run waited for its answer. A single sample too large for a
    message of its own is a ValueError naming it."""
    parts: list[tuple[int, int, list[Any]]] = []
    for index, samples in enumerate(sample_lists):
        start, used = 0, [0] * len(_PART_LIMITS)
        for position, sample in enumerate(samples):
            cost = _cost(sample)
            cost = (cost[0], cost[1] + 1, *cost[2:])  # an item of the message's list
            if any(c > 2 * limit for c, limit in zip(cost, _PART_LIMITS, strict=True)):
                raise ValueError(
                    f"sample {position} of data set {index} is too large to send to the "
                    f"reference (~{cost[0] / 2**20:.1f} MiB, {cost[1]} values, "
                    f"{cost[4]} tensors; a message carries at most "
                    f"{DEFAULT_LIMITS.max_header_bytes // 2**20} MiB of text): shorten or split it"
                )
            total = [u + c for u, c in zip(used, cost, strict=True)]
            if position > start and any(
                t > limit for t, limit in zip(total, _PART_LIMITS, strict=True)
            ):
                parts.append((index, start, list(samples[start:position])))
                start, total = position, list(cost)
            used = total
        if len(samples) > start or not samples:
            parts.append((index, start, list(samples[start:])))
    return parts


@dataclass(slots=True, kw_only=True)
class Message:
    """Base of every protocol message; ``kind`` is its name on the wire."""

    kind: ClassVar[str] = ""
    result: ClassVar[type[Message] | None] = None  # the reply's type (orders only)


# -- results --------------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class DatasetSizes(Message):
    kind = "dataset_sizes"
    sizes: list[int]


@dataclass(slots=True, kw_only=True)
class DataParallel(Message):
    kind = "data_parallel"
    rank: int
    size: int


@dataclass(slots=True, kw_only=True)
class Inbox(Message):
    kind = "inbox"
    endpoint: str


@dataclass(slots=True, kw_only=True)
class ChunkDone(Message):
    """One ``forward_step`` chunk computed: its interval, when its output was sent, its size."""

    kind = "chunk_done"
    start: float
    end: float
    sent: float
    nbytes: int = 0  # 0 on model-parallel ranks that send nothing
    stored: int = 0  # samples served from the reference store (reference_store.py)


@dataclass(slots=True, kw_only=True)
class ForwardDone(Message):
    kind = "forward_done"
    chunks: list[ChunkDone]


@dataclass(slots=True, kw_only=True)
class StepDone(Message):
    """One ``train_step``: its interval, the data wait that idled the rank, its metrics."""

    kind = "step_done"
    start: float
    end: float
    wait: float
    metrics: dict[str, float]


@dataclass(slots=True, kw_only=True)
class Trained(Message):
    kind = "trained"
    steps: list[StepDone]


@dataclass(slots=True, kw_only=True)
class Evaluated(Message):
    """Sample-weighted sums of the ``eval_step`` metrics over ``count`` samples."""

    kind = "evaluated"
    sums: dict[str, float]
    count: int
    start: float
    end: float


@dataclass(slots=True, kw_only=True)
class Interval(Message):
    kind = "interval"
    start: float
    end: float


@dataclass(slots=True, kw_only=True)
class Saved(Message):
    """A trainer rank's part of a checkpoint written: when, and ``final_extra_bytes``, what a
    save at the run's end or on request would write on it beyond this save (the module's
    ``final_checkpoint_extra_bytes()``: an export for inference written only then)."""

    kind = "saved"
    start: float
    end: float
    final_extra_bytes: int = 0


# -- orders ---------------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class Connect(Message):
    """Reference: connect one PUSH socket to each of these trainer inboxes."""

    kind = "connect"
    endpoints: list[str]
    hwm: int = 64


@dataclass(slots=True, kw_only=True)
class BuildDatasets(Message):
    """Reference: ``build_dataset`` over each list of raw samples, as split ``split``; with
    ``staged`` (a data set too large for one message), over the ``staged`` lists that
    `StageSamples` orders brought instead of ``sample_lists``."""

    kind = "build_datasets"
    result = DatasetSizes
    sample_lists: list[list[Any]]
    split: str = "train"
    staged: int = 0


@dataclass(slots=True, kw_only=True)
class StageSamples(Message):
    """Reference: keep these raw samples, list ``list_index`` from index ``start``, for the
    `BuildDatasets` that follows (a data set sent in parts: `sample_parts`). Sent again after
    a restart, a part replaces itself."""

    kind = "stage_samples"
    split: str
    list_index: int
    start: int
    samples: list[Any]


@dataclass(slots=True, kw_only=True)
class QueryDataParallel(Message):
    kind = "query_data_parallel"
    result = DataParallel


@dataclass(slots=True, kw_only=True)
class BeginEpisode(Message):
    """Set the module's episode counter and run its ``before_episode``."""

    kind = "begin_episode"
    episode: int


@dataclass(slots=True, kw_only=True)
class EndEpisode(Message):
    """Run the module's ``after_episode``."""

    kind = "end_episode"


@dataclass(slots=True, kw_only=True)
class Chunk(Message):
    """One ``forward_step`` call: samples ``indices`` ([dataset, row]) of split ``split``, whose
    outputs go to ``positions`` of ``episode``'s buffer (``EVAL`` for the eval set); ``cache``:
    the trainers keep the outputs for samples that come back (``reference_cache.py``)."""

    kind = "chunk"
    episode: int | str
    positions: list[int]
    indices: list[list[int]]
    split: str = "train"
    cache: bool = False


@dataclass(slots=True, kw_only=True)
class Forward(Message):
    """Reference: run the chunks (of one episode) in order, send their outputs to the trainers."""

    kind = "forward"
    result = ForwardDone
    chunks: list[Chunk]


@dataclass(slots=True, kw_only=True)
class Resume(Message):
    """Reference: the run continues a checkpoint (``resume_training`` and the counters)."""

    kind = "resume"
    episode: int
    forward_calls: int


@dataclass(slots=True, kw_only=True)
class OpenInbox(Message):
    """Trainer: bind the rank's inbox; the result is the endpoint to connect to."""

    kind = "open_inbox"
    result = Inbox
    hwm: int = 64


@dataclass(slots=True, kw_only=True)
class Fill(Message):
    """Trainer: copy cached reference outputs of ``indices`` to ``positions`` of ``episode``."""

    kind = "fill"
    episode: int
    positions: list[int]
    indices: list[list[int]]


@dataclass(slots=True, kw_only=True)
class Step(Message):
    """One ``train_step`` over micro-batches (lists of buffer positions) at ``iteration``."""

    kind = "step"
    micro_batches: list[list[int]]
    iteration: int


@dataclass(slots=True, kw_only=True)
class Train(Message):
    """Trainer: consecutive steps of ``episode``; ``release_before``: drop the buffers of the
    episodes before it (fully trained); ``release``: positions of ``episode`` that no later
    step uses, dropped once these steps ran."""

    kind = "train"
    result = Trained
    episode: int
    steps: list[Step]
    release_before: int | None = None
    release: list[int] = dataclasses.field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class Evaluate(Message):
    """Trainer: ``eval_step`` on each batch of eval-set positions."""

    kind = "evaluate"
    result = Evaluated
    batches: list[list[int]]
    # batches evaluated only so that every rank runs as many forwards (a sharded model's are
    # collectives) and left out of the sums: a rank whose share of the eval set is empty
    uncounted: int = 0  # the last `uncounted` batches


@dataclass(slots=True, kw_only=True)
class SaveCheckpoint(Message):
    """Trainer: the module's ``save_checkpoint`` into its directory of checkpoint ``path``."""

    kind = "save_checkpoint"
    result = Saved
    path: str
    iteration: int
    # why the engine saves: "interval"/"step" (periodic), "signal" (a graceful stop), "end",
    # "request" (`engine.save_checkpoint()`); the module reads it as `checkpoint_reason`
    reason: str = ""


@dataclass(slots=True, kw_only=True)
class LoadCheckpoint(Message):
    """Trainer: continue from checkpoint ``path`` (counters, then ``load_checkpoint``)."""

    kind = "load_checkpoint"
    path: str
    iteration: int
    episode: int


@dataclass(slots=True, kw_only=True)
class Memory(Message):
    """Both: the module's ``onload()`` (before its turn) or ``offload()`` (after it), when
    colocated models take turns (``free_memory``)."""

    kind = "memory"
    onload: bool


REFERENCE_ORDERS: tuple[type[Message], ...] = (
    Connect,
    StageSamples,
    BuildDatasets,
    QueryDataParallel,
    BeginEpisode,
    EndEpisode,
    Forward,
    Resume,
    Memory,
)
TRAINER_ORDERS: tuple[type[Message], ...] = (
    OpenInbox,
    QueryDataParallel,
    BeginEpisode,
    EndEpisode,
    Fill,
    Train,
    Evaluate,
    SaveCheckpoint,
    LoadCheckpoint,
    Memory,
)


# -- the codec ------------------------------------------------------------------------------
# Per type, compiled once from its annotations: (field name, to wire, from wire, required).
_Check = Callable[[Any, str], Any]
_FIELDS: dict[type[Message], list[tuple[str, Callable[[Any], Any], _Check, bool]]] = {}


def encode(message: Message) -> dict[str, Any]:
    """``message`` as a plain dict: ``kind`` and its fields (nested messages as dicts)."""
    out: dict[str, Any] = {"kind": message.kind}
    for name, to_wire, _, _ in _fields(type(message)):
        out[name] = to_wire(getattr(message, name))
    return out


M = TypeVar("M", bound=Message)


def decode(payload: Any, expected: Sequence[type[M]] | type[M], where: str = "") -> M:
    """The message ``payload`` encodes, which must be one of ``expected``; strict (module
    docstring). ``where`` says what the message is, for the error."""
    options = (expected,) if isinstance(expected, type) else tuple(expected)
    context = f", in {where}" if where else ""
    if not isinstance(payload, dict):
        raise ProtocolError(f"a protocol message must be a dict, got {_kind(payload)}{context}")
    kind = payload.get("kind")
    for cls in options:
        if cls.kind == kind:
            try:
                return _decode_as(cls, payload, cls.__name__)
            except ProtocolError as exc:
                raise ProtocolError(f"{exc}{context}") from None
    names = ", ".join(cls.__name__ for cls in options)
    raise ProtocolError(f"unknown message kind {kind!r}{context} (expected one of: {names})")


def decode_result(order: Message, payload: Any) -> Any:
    """The reply to ``order``: its declared result type, or None."""
    if order.result is None:
        if payload is not None:
            raise ProtocolError(f"the reply to {type(order).__name__} must be empty")
        return None
    return decode(payload, order.result, where=f"the reply to {type(order).__name__}")


def _decode_as(cls: type[M], payload: dict[str, Any], path: str) -> M:
    values = {}
    for name, _, check, required in _fields(cls):
        if name in payload:
            try:
                values[name] = check(payload[name], "")
            except ProtocolError:  # again, naming the field (paths cost only on failure)
                check(payload[name], f"{path}.{name}")
                raise
        elif required:
            raise ProtocolError(f"{path}: missing field {name!r}")
    if len(payload) != len(values) + ("kind" in payload):
        extra = [key for key in payload if key != "kind" and key not in values]
        raise ProtocolError(f"{path}: unknown field {extra[0]!r}")
    return cls(**values)


def _fields(cls: type[Message]) -> list[tuple[str, Callable[[Any], Any], _Check, bool]]:
    compiled = _FIELDS.get(cls)
    if compiled is None:
        hints = typing.get_type_hints(cls)
        compiled = []
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            compiled.append((f.name, _to_wire(hints[f.name]), _checker(hints[f.name]), required))
        _FIELDS[cls] = compiled
    return compiled


def _identity(value: Any) -> Any:
    return value


def _to_wire(hint: Any) -> Callable[[Any], Any]:
    """How a field of type ``hint`` goes on the wire: messages become dicts, the rest as is."""
    if isinstance(hint, type) and issubclass(hint, Message):
        return encode
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        inner = _to_wire(item)
        if inner is not _identity:
            return lambda values: [inner(v) for v in values]
    return _identity


def _checker(hint: Any) -> _Check:
    """A function that checks (and returns) a wire value of type ``hint``, naming its path."""
    if hint is Any:
        return lambda value, path: value
    if hint is float:
        return _check_float
    if hint in (int, str, bool):
        return _scalar(hint)
    if isinstance(hint, type) and issubclass(hint, Message):
        return lambda value, path: _decode_nested(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    # Paths name the element only when a check fails: built for every element, they would
    # cost more than the checks (a train order holds every micro-batch's positions).
    if origin is list:
        item = _checker(args[0])

        def check_list(value: Any, path: str) -> list[Any]:
            values = _seq(value, path)
            try:
                return [item(v, path) for v in values]
            except ProtocolError:
                return [item(v, f"{path}[{i}]") for i, v in enumerate(values)]

        return check_list
    if origin is dict:
        key, val = _checker(args[0]), _checker(args[1])

        def check_dict(value: Any, path: str) -> dict[Any, Any]:
            items = _map(value, path).items()
            try:
                return {key(k, path): val(v, path) for k, v in items}
            except ProtocolError:
                return {key(k, f"{path} key"): val(v, f"{path}[{k!r}]") for k, v in items}

        return check_dict
    if origin in (types.UnionType, typing.Union):
        options = [_checker(a) for a in args]
        names = " | ".join(getattr(a, "__name__", str(a)) for a in args)
        return lambda value, path: _first_fit(options, names, value, path)
    if hint is type(None):
        return _check_none
    raise TypeError(f"protocol field type {hint!r} is not supported")


def _scalar(kind: type) -> _Check:
    def check(value: Any, path: str) -> Any:
        if type(value) is not kind:  # bool is not an int here
            raise ProtocolError(f"{path} must be {kind.__name__}, got {_kind(value)}")
        return value

    return check


def _check_float(value: Any, path: str) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise ProtocolError(f"{path} must be float, got {_kind(value)}")


def _check_none(value: Any, path: str) -> None:
    if value is not None:
        raise ProtocolError(f"{path} must be None, got {_kind(value)}")


def _seq(value: Any, path: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise ProtocolError(f"{path} must be a list, got {_kind(value)}")
    return value


def _map(value: Any, path: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{path} must be a dict, got {_kind(value)}")
    return value


def _first_fit(options: list[_Check], names: str, value: Any, path: str) -> Any:
    for check in options:
        try:
            return check(value, path)
        except ProtocolError:
            continue
    raise ProtocolError(f"{path} must be {names}, got {_kind(value)}")


def _decode_nested(cls: type[Message], value: Any, path: str) -> Message:
    payload = _map(value, path)
    if payload.get("kind") != cls.kind:
        raise ProtocolError(f"{path} must be a {cls.__name__}, got kind {payload.get('kind')!r}")
    return _decode_as(cls, payload, path)


def _kind(value: Any) -> str:
    return type(value).__name__


# -- the coordinator's clients --------------------------------------------------------------
async def _ask(handle: Any, entry: str, order: Message) -> Any:
    """Send ``order`` to one worker and decode its reply."""
    return decode_result(order, await handle.call(entry, encode(order)))


class _Workers:
    entry: ClassVar[str]

    def __init__(self, group: Any, system: Any = None) -> None:
        """``group``: the model's :class:`~chatlearn.actors.ModelGroup`; ``system``: the
        :class:`~chatlearn.actors.ActorSystem` that restarts lost replicas (None: no healing)."""
        self.group = group
        self.name: str = group.name
        self.system = system

    def available(self, replica: int) -> bool:
        """Whether ``replica`` takes orders now (it is not being restarted)."""
        return self.system is None or not self.system.restarting(self.name, replica)

    async def wait_ready(self, replica: int | None = None) -> None:
        """Until ``replica`` (every replica: None) is back from a restart."""
        if self.system is not None:
            await self.system.wait_ready(self.name, replica)

    def incarnation(self, replica: int) -> int:
        """Changes whenever a process of ``replica`` is restarted."""
        return sum(handle.incarnation for handle in self.replicas[replica])

    @property
    def replicas(self) -> list[list[Any]]:
        """Handles grouped by replica: ``replicas[r][rank]``."""
        return self.group.replicas  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self.group)

    async def _all(self, order: Message) -> list[Any]:
        """``order`` to every process of the model (the run's root cause raises, if any)."""
        from chatlearn.actors.handles import gather_calls

        return await gather_calls([_ask(h, self.entry, order) for h in self.group])

    async def _ranks(self, ranks: Sequence[Any], order: Message) -> list[Any]:
        """``order`` to some processes (one replica's ranks), results in their order."""
        return await asyncio.gather(*(_ask(h, self.entry, order) for h in ranks))

    async def memory(self, onload: bool, replica: int | None = None) -> None:
        """``onload()`` or ``offload()`` on every process (of ``replica`` only, if given)."""
        if replica is None:
            await self._all(Memory(onload=onload))
        else:
            await self._ranks(self.replicas[replica], Memory(onload=onload))

    async def data_parallel(self) -> list[tuple[int, int]]:
        """(data-parallel rank, size) of every process."""
        return [(r.rank, r.size) for r in await self._all(QueryDataParallel())]


class ReferenceGroup(_Workers):
    """The coordinator's client of the reference replicas (``ReferenceService``)."""

    entry = REFERENCE_ENTRY

    async def connect(self, endpoints: Sequence[str], replica: int | None = None) -> None:
        """Every replica (or ``replica`` only) pushes its outputs to these trainer inboxes."""
        order = Connect(endpoints=list(endpoints))
        if replica is None:
            await self._all(order)
        else:
            await self._ranks(self.replicas[replica], order)

    async def build_datasets(
        self, sample_lists: Sequence[Sequence[Any]], split: str, replica: int | None = None
    ) -> list[int]:
        """Every replica (or ``replica`` only) builds the datasets; returns their sizes. A data
        set too large for one message goes in parts (`sample_parts`) first."""
        lists = [list(s) for s in sample_lists]
        parts = sample_parts(lists)
        if len(parts) <= 1:
            orders: list[Message] = [BuildDatasets(sample_lists=lists, split=split)]
        else:
            orders = [
                StageSamples(split=split, list_index=index, start=start, samples=samples)
                for index, start, samples in parts
            ]
            orders.append(BuildDatasets(sample_lists=[], split=split, staged=len(lists)))
        ranks = None if replica is None else self.replicas[replica]
        results: list[Any] = []
        for order in orders:
            results = await (self._all(order) if ranks is None else self._ranks(ranks, order))
        return results[0].sizes  # type: ignore[no-any-return]

    async def resume(self, episode: int, forward_calls: int) -> None:
        await self._all(Resume(episode=episode, forward_calls=forward_calls))

    async def begin_episode(self, replica: int, episode: int) -> None:
        await self._ranks(self.replicas[replica], BeginEpisode(episode=episode))

    async def end_episode(self, replica: int) -> None:
        await self._ranks(self.replicas[replica], EndEpisode())

    async def forward(self, replica: int, chunks: list[Chunk]) -> list[list[ChunkDone]]:
        """The chunks on every rank of ``replica``: per rank, one result per chunk."""
        done = await self._ranks(self.replicas[replica], Forward(chunks=chunks))
        return [d.chunks for d in done]


class TrainerGroup(_Workers):
    """The coordinator's client of the trainer ranks (``TrainerService``)."""

    entry = TRAINER_ENTRY

    async def open_inbox(self) -> list[str]:
        """Bind every rank's inbox; returns the endpoints for the reference to connect to."""
        return [inbox.endpoint for inbox in await self._all(OpenInbox())]

    async def begin_episode(self, episode: int) -> None:
        await self._all(BeginEpisode(episode=episode))

    async def end_episode(self) -> None:
        await self._all(EndEpisode())

    async def fill(self, episode: int, positions: list[int], indices: list[list[int]]) -> None:
        await self._ranks(self.group, Fill(episode=episode, positions=positions, indices=indices))

    def train(
        self,
        episode: int,
        per_rank: Sequence[list[Step]],
        release_before: int | None,
        release: Sequence[int] = (),
    ) -> asyncio.Future[list[list[StepDone]]]:
        """Send the steps to every rank now (``per_rank[i]``: rank i's steps); the future gets,
        per rank, one result per step."""
        orders = [
            Train(episode=episode, steps=s, release_before=release_before, release=list(release))
            for s in per_rank
        ]
        sent = asyncio.gather(
            *(_ask(h, self.entry, order) for h, order in zip(self.group, orders, strict=True))
        )
        sent.add_done_callback(_retrieve)  # seen even if the caller abandons the future
        return asyncio.ensure_future(_steps_of(sent))

    async def evaluate(
        self, per_rank: Sequence[list[list[int]]], uncounted: Sequence[int] | None = None
    ) -> list[Evaluated]:
        """``eval_step`` on every rank over its batches of eval positions (the last
        ``uncounted[rank]`` of them left out of its sums)."""
        left_out = list(uncounted) if uncounted is not None else [0] * len(per_rank)
        orders = [
            Evaluate(batches=batches, uncounted=n)
            for batches, n in zip(per_rank, left_out, strict=True)
        ]
        return await asyncio.gather(
            *(_ask(h, self.entry, o) for h, o in zip(self.group, orders, strict=True))
        )

    async def save_checkpoint(self, path: str, iteration: int, reason: str = "") -> int:
        """Every rank's part of checkpoint ``path``; returns the bytes a save at the run's end
        would write beyond this one, over every rank (`Saved.final_extra_bytes`)."""
        saved = await self._all(SaveCheckpoint(path=path, iteration=iteration, reason=reason))
        return sum(part.final_extra_bytes for part in saved)

    async def load_checkpoint(self, path: str, iteration: int, episode: int) -> None:
        await self._all(LoadCheckpoint(path=path, iteration=iteration, episode=episode))


async def _steps_of(sent: Awaitable[list[Trained]]) -> list[list[StepDone]]:
    return [trained.steps for trained in await sent]


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen (no "exception was never retrieved")."""
    if not future.cancelled():
        future.exception()
