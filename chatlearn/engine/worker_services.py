"""The engine's code inside actor processes: reference replicas and trainer ranks.

Runs in the actor processes, next to the user's module: ``DPOEngine`` (``engine.py``) names
these as worker services and the actor runtime (``chatlearn.actors``) builds them there; the
coordinator talks to them through ``protocol.py``'s clients. Each has one entry point,
``handle``, which takes an order of the engine protocol (``protocol.py``), decodes it strictly (a
malformed or unknown order raises ``ProtocolError`` naming the message type) and dispatches on
its type.

- :class:`ReferenceService` builds the datasets (the module's ``build_dataset``), and for every
  work order collates the samples it names (the dataset's ``collate_fn`` if it has one), runs
  ``forward_step`` on the compute thread, and pushes the output, keyed by episode and buffer
  positions, straight to every trainer rank's inbox. The send runs on the event loop while the
  compute thread already works on the next order.
- :class:`TrainerService` owns the rank's inbox (a PULL socket) and the episode buffers
  (position → per-sample dict). A train order names micro-batches as lists of positions; the
  service waits until they have arrived, collates them (padding config from the module), and
  calls ``train_step`` on the compute thread. Evaluation batches are kept apart, for good: the
  reference is frozen, so its outputs for the eval set are computed once per run; for the same
  reason, outputs of orders flagged ``cache`` are kept by sample index and copied into a later
  episode's buffer by a ``fill`` order when the sample comes back (``reference_cache.py``).
  It also runs the module's ``save_checkpoint`` / ``load_checkpoint`` with ``checkpoint_dir()``
  pointing at this rank's directory of the checkpoint being written or read (``checkpoint.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatlearn.actors.checkpoint_paths import module_checkpoint_dir
from chatlearn.actors.module import (
    as_number,
    invoke,
    onloaded_to_save,
    resume_loads_checkpoint,
)
from chatlearn.actors.worker_core import add_error_context
from chatlearn.config.errors import free_space, storage_error
from chatlearn.engine.batching import (
    batch_size_of,
    collate_inputs,
    concat_outputs,
    gather_micro_batch,
    split_per_sample,
)
from chatlearn.engine.protocol import (
    EVAL,
    REFERENCE_ORDERS,
    TRAINER_ORDERS,
    BeginEpisode,
    BuildDatasets,
    Chunk,
    ChunkDone,
    Connect,
    DataParallel,
    DatasetSizes,
    EndEpisode,
    Evaluate,
    Evaluated,
    Fill,
    Forward,
    ForwardDone,
    Inbox,
    Interval,
    LoadCheckpoint,
    Memory,
    Message,
    OpenInbox,
    QueryDataParallel,
    Resume,
    SaveCheckpoint,
    Saved,
    StageSamples,
    Step,
    StepDone,
    Train,
    Trained,
    decode,
    encode,
)
from chatlearn.engine.reference_store import (
    ReferenceStore,
    ReplicaStore,
    fingerprint,
    sample_key,
)
from chatlearn.transport import (
    DataReceiver,
    DataSender,
    HeaderTooLargeError,
    MessageTooLargeError,
    NestingTooDeepError,
    TooManyFramesError,
    TooManyObjectsError,
)

logger = logging.getLogger("chatlearn.engine")

Handler = Callable[[Any], Awaitable[Message | None]]


class _Dispatch:
    """One entry point per service: ``handle(order)`` decodes and runs the order's handler."""

    orders: tuple[type[Message], ...]
    role: str
    handlers: dict[type[Message], Handler]

    async def handle(self, payload: Any) -> dict[str, Any] | None:
        """Run one order of the engine protocol (``protocol.py``); returns its encoded result.

        Decoding and dispatch do not suspend: the handler starts as the order arrives, so what
        it queues on the compute thread is queued in arrival order, as before any typed layer.
        """
        order = decode(payload, self.orders, where=self.role)
        result = await self.handlers[type(order)](order)
        return None if result is None else encode(result)


class _EpisodeHooks(_Dispatch):
    """Episode hooks as ``async`` service calls, so that they reach the compute thread in the
    same order as the (also ``async``) forward and train orders sent before them: a plain call
    is queued the moment it arrives, ahead of async calls that arrived earlier."""

    module: Any
    ctx: Any

    async def begin_episode(self, order: BeginEpisode) -> None:
        """Set the module's episode counter and run its ``before_episode``."""
        await self.ctx.run_compute(self._begin_episode, order.episode)

    async def end_episode(self, order: EndEpisode) -> None:
        await self.ctx.run_compute(self._end_episode)

    async def data_parallel(self, order: QueryDataParallel) -> DataParallel:
        return await self.ctx.run_compute(self._data_parallel)

    async def memory(self, order: Memory) -> None:
        """The module's ``onload()`` or ``offload()`` (colocated models taking turns)."""
        await self.ctx.run_compute(self.module.onload if order.onload else self.module.offload)

    def _data_parallel(self) -> DataParallel:
        return DataParallel(
            rank=int(self.module.data_parallel_rank), size=int(self.module.data_parallel_size)
        )

    def _begin_episode(self, episode: int) -> None:
        self.module._episode_id = episode
        self._count_samples(episode)
        self.module.before_episode()

    def _end_episode(self) -> None:
        # ChatLearn counts an episode's samples once its last batch is done, before
        # after_episode()
        self._count_samples(self.module._episode_id + 1)
        self.module.after_episode()

    def _count_samples(self, episodes: int) -> None:
        """``runtime_args.consumed_samples`` after ``episodes`` episodes, as ChatLearn's
        modules read it. Not in-process: the module shares the coordinator's config there, whose
        value is where a run starts."""
        if self.ctx.in_process:
            return
        runtime = self.module.runtime_args
        runtime.consumed_samples = episodes * runtime.sample_per_episode


class ReferenceService(_EpisodeHooks):
    """A reference replica's side of the pipeline (service name ``ref``)."""

    orders = REFERENCE_ORDERS
    role = "an order to a reference replica"

    def __init__(self, module: Any, ctx: Any) -> None:
        self.module = module
        self.ctx = ctx
        self.datasets: dict[str, list[Any]] = {}
        # parts of data sets sent in parts (StageSamples): split -> (list, start) -> samples
        self._staged: dict[str, dict[tuple[int, int], list[Any]]] = {}
        self.senders: list[DataSender] = []
        # the add_padding_config the trainer ranks were last sent (None: not since `connect`)
        self._padding_sent: dict[str, Any] | None = None
        self._store: ReferenceStore | ReplicaStore | None = None
        self._store_checked = False
        self.handlers = {
            Connect: self.connect,
            StageSamples: self.stage_samples,
            BuildDatasets: self.build_datasets,
            QueryDataParallel: self.data_parallel,
            BeginEpisode: self.begin_episode,
            EndEpisode: self.end_episode,
            Forward: self.forward,
            Resume: self.resume,
            Memory: self.memory,
        }

    async def stage_samples(self, order: StageSamples) -> None:
        """Keep one part of a data set sent in parts, until its `BuildDatasets`."""
        staged = self._staged.setdefault(order.split, {})
        staged[(order.list_index, order.start)] = order.samples

    async def build_datasets(self, order: BuildDatasets) -> DatasetSizes:
        """``build_dataset`` over each list of raw samples; returns the dataset sizes."""
        sample_lists = order.sample_lists
        if order.staged:
            staged = self._staged.pop(order.split, {})
            sample_lists = [[] for _ in range(order.staged)]
            for (index, _), samples in sorted(staged.items()):
                sample_lists[index].extend(samples)
        sizes = await self.ctx.run_compute(self._build_datasets, sample_lists, order.split)
        return DatasetSizes(sizes=sizes)

    def _build_datasets(self, sample_lists: Sequence[Sequence[Any]], kind: str) -> list[int]:
        datasets = []
        for samples in sample_lists:
            # by position, as ChatLearn calls it: a module may name the flag as it likes
            dataset = self.module.build_dataset(list(samples), kind == EVAL)
            if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
                raise TypeError(
                    f"{type(self.module).__name__}.build_dataset returned "
                    f"{type(dataset).__qualname__ if dataset is not None else 'None'}; it must "
                    "return a dataset (len() and indexing), e.g. a list or a "
                    "torch.utils.data.Dataset"
                )
            datasets.append(dataset)
        self.datasets[kind] = datasets
        return [len(d) for d in datasets]

    async def connect(self, order: Connect) -> None:
        """Connect one PUSH socket to every trainer rank's inbox.

        Sent again after the trainer restarted (self-healing): a socket to an endpoint that did
        not change is kept, since it reconnects by itself and an output being sent on it must
        not fail; the others are replaced."""
        kept = {sender.endpoint: sender for sender in self.senders}
        senders = []
        for endpoint in order.endpoints:
            sender = kept.pop(endpoint, None)
            if sender is None:
                # on the process's sending context (transport/contexts.py), not the actor's
                sender = DataSender(endpoint, bind=False, hwm=order.hwm)
            senders.append(sender)
        for sender in kept.values():
            sender.close()
        self.senders = senders
        self._padding_sent = None  # a restarted trainer rank knows none

    async def forward(self, order: Forward) -> ForwardDone:
        """The order's chunks of one episode, one ``forward_step`` each, in one call; their
        outputs go to every trainer's inbox in one message.

        The coordinator groups chunks only when they are cheap (``schedule.GroupSizer``): one
        trip to the compute thread and one message to each trainer then carry them all, since
        per-message costs would otherwise exceed the work. Returns one result per chunk. With
        ``runtime.reference_store``, samples found in the store are served from it and only the
        others go through ``forward_step`` (``reference_store.py``).
        """
        chunks = order.chunks
        computed = await self.ctx.run_compute(self._compute_all, chunks)
        if not self.module.is_last_rank():  # model-parallel peers: no output
            return ForwardDone(
                chunks=[ChunkDone(start=c.start, end=c.end, sent=c.end) for c in computed]
            )
        parts = [part for c in computed for part in c.parts]
        message: dict[str, Any] = {"episode": chunks[0].episode, "parts": join_parts(parts)}
        padding = self.module.padding_config()
        if padding and padding != self._padding_sent:
            # ChatLearn pads the trainer's micro-batches as the models that produce the data
            # say (its environment's add_padding_config): the trainer gathers with these. Sent
            # when new to the trainers (after `connect`, or changed), not with every output
            message["padding"] = padding
            self._padding_sent = padding
        for sender in self.senders:
            await sender.send(message)
        sent = time.time()
        return ForwardDone(
            chunks=[
                ChunkDone(start=c.start, end=c.end, sent=sent, nbytes=c.nbytes, stored=c.stored)
                for c in computed
            ]
        )

    def _compute_all(self, chunks: Sequence[Chunk]) -> list[_Computed]:
        return [self._compute(chunk) for chunk in chunks]

    def _compute(self, chunk: Chunk) -> _Computed:
        """One chunk on the compute thread: its parts for the trainers (the store's samples,
        then the computed ones)."""
        start = time.time()
        datasets = self.datasets[chunk.split]
        samples = [datasets[dataset_id][row] for dataset_id, row in chunk.indices]
        store = self._reference_store()
        if store is None:
            output = self._forward_samples(datasets, samples)
            part = _part(chunk.positions, chunk.indices, chunk.cache, data=output)
            return _Computed(start, [part], time.time(), _nbytes(output))
        keys = [sample_key(sample) for sample in samples]
        found = store.get(keys)  # on a replica of several processes, agreed by every rank
        hits = [i for i, key in enumerate(keys) if key in found]
        misses = [i for i, key in enumerate(keys) if key not in found]
        sends = self.module.is_last_rank()  # the other ranks of a replica send nothing
        parts, nbytes = [], 0
        if hits and sends:
            served = [found[keys[i]] for i in hits]
            parts.append(_part_of(chunk, hits, samples=served))
            nbytes += sum(_nbytes(sample) for sample in served)
        if misses:
            output = self._forward_samples(datasets, [samples[i] for i in misses])
            if sends:
                per_sample = split_per_sample(output, expected_size=len(misses))
                store.put({keys[i]: value for i, value in zip(misses, per_sample, strict=True)})
                parts.append(_part_of(chunk, misses, data=output))
                nbytes += _nbytes(output)
        return _Computed(start, parts, time.time(), nbytes, stored=len(hits))

    def _forward_samples(self, datasets: Sequence[Any], samples: list[Any]) -> dict[str, Any]:
        """``forward_step`` on these samples (collated), checked to be one row per sample."""
        collate = getattr(datasets[0], "collate_fn", None)
        batch = collate(samples) if callable(collate) else collate_inputs(samples)
        output = invoke(self.module, "forward_step", (batch,))
        _appended_metrics(self.module)  # a reference's _metric_list is not recorded here
        what = f"{type(self.module).__name__}.forward_step output"
        if not isinstance(output, Mapping):
            raise TypeError(
                f"{what} must be a dict of batch-first tensors or lists, got {output!r}"
            )
        output = concat_outputs([dict(output)], what=what)
        size = batch_size_of(output, what=what)
        if size != len(samples):
            raise ValueError(
                f"{what} has batch size {size} for a chunk of {len(samples)} samples; "
                "every value must be batch-first (row i belongs to sample i)"
            )
        return output

    def _reference_store(self) -> ReferenceStore | ReplicaStore | None:
        """The on-disk store (``runtime.reference_store``), opened on first use (on the compute
        thread, where it is used); None when not configured. A replica of several processes
        shares its last rank's store (`ReplicaStore`); the fingerprint is then a collective,
        which every rank reaches at the same chunk, its first."""
        if self._store is not None or self._store_checked:
            return self._store
        self._store_checked = True
        path = self.module.runtime_args.get("reference_store", None)
        if not path:
            return None
        started = time.time()
        model_fingerprint = fingerprint(self.module)
        owner = self.module.is_last_rank()
        store = ReferenceStore(path, model_fingerprint) if owner else None
        if self.ctx.identity.world_size > 1:
            self._store = ReplicaStore(store)
        else:
            self._store = store
        if store is not None:
            logger.info(
                "%s: reference store %s (model fingerprint in %.1f s)",
                self.module.name,
                store.path,
                time.time() - started,
            )
        return self._store

    async def resume(self, order: Resume) -> None:
        """The run continues a checkpoint: set ``resume_training`` and the counters."""
        await self.ctx.run_compute(
            self.module._set_runtime_state,
            episode_id=order.episode,
            iteration=order.forward_calls,
            resume_training=True,
        )

    def close(self) -> None:
        for sender in self.senders:
            sender.close()
        self.senders = []
        store = self._store.store if isinstance(self._store, ReplicaStore) else self._store
        self._store = None
        if store is not None:
            logger.info(
                "%s: reference store: %d samples served, %d computed, %d broken entries redone",
                self.module.name,
                store.hits,
                store.computed,
                store.corrupted,
            )
            store.close()


class TrainerService(_EpisodeHooks):
    """A trainer rank's side of the pipeline (service name ``train``)."""

    orders = TRAINER_ORDERS
    role = "an order to a trainer rank"

    def __init__(self, module: Any, ctx: Any) -> None:
        self.module = module
        self.ctx = ctx
        self.handlers = {
            OpenInbox: self.open_inbox,
            QueryDataParallel: self.data_parallel,
            BeginEpisode: self.begin_episode,
            EndEpisode: self.end_episode,
            Fill: self.fill,
            Train: self.train,
            Evaluate: self.evaluate,
            SaveCheckpoint: self.save_checkpoint,
            LoadCheckpoint: self.load_checkpoint,
            Memory: self.memory,
        }
        self.buffers: dict[Any, dict[int, dict[str, Any]]] = {}
        # reference outputs kept for samples that come back (reference_cache.py)
        self.cache: dict[tuple[int, int], dict[str, Any]] = {}
        self.receiver: DataReceiver | None = None
        self._arrived = asyncio.Condition()
        self._receive_task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._compute_free_since = 0.0  # end of the last train/eval compute
        # the reference's add_padding_config, as its messages carry it (`_padding`)
        self._reference_padding: dict[str, Any] = {}
        self._last_step_queued: asyncio.Future[None] | None = None  # done once it is queued

    async def open_inbox(self, order: OpenInbox) -> Inbox:
        """Bind this rank's inbox and start receiving; returns the endpoint to connect to."""
        if self.receiver is None:
            name = f"inbox-{self.ctx.identity.model}-{self.ctx.identity.rank}"
            # Only the run's processes can reach it (security.py): a message it cannot use is
            # a bug of one of them, which must stop the run naming it, not be skipped.
            self.receiver = DataReceiver(
                self.ctx.ipc_endpoint(name),
                bind=True,
                hwm=order.hwm,
                context=self.ctx.zmq_context,
                drop_malformed=False,
            )
            self._receive_task = asyncio.create_task(self._receive_loop(), name="inbox")
        return Inbox(endpoint=self.receiver.endpoint)

    async def _receive_loop(self) -> None:
        """Consumes the inbox; produces buffer entries; wakes the train calls that wait."""
        assert self.receiver is not None
        while True:
            try:
                message = await self.receiver.recv()
                buffer = self.buffers.setdefault(message["episode"], {})
                self._reference_padding.update(message.get("padding") or {})
                for part in message["parts"]:  # one per forward_step chunk
                    self._store(buffer, part)
            except Exception as exc:  # a broken message must fail the waiting step, not hang it
                sender = self.receiver.last_peer or "an unknown sender"
                hint = _OVER_LIMITS if isinstance(exc, _OVER_LIMITS_ERRORS) else ""
                self._failure = RuntimeError(
                    f"{type(exc).__name__}: {exc} (sent by {sender}){hint}"
                )
            async with self._arrived:
                self._arrived.notify_all()

    def _store(self, buffer: dict[int, dict[str, Any]], part: Mapping[str, Any]) -> None:
        """One chunk's output into the episode buffer (and the cache if it is to be kept)."""
        positions = list(part["positions"])
        if "samples" in part:  # served from the reference store: already one dict a sample
            samples = [dict(sample) for sample in part["samples"]]
            if len(samples) != len(positions):
                raise ValueError(f"{len(samples)} samples for {len(positions)} positions")
        else:
            samples = split_per_sample(part["data"], expected_size=len(positions))
        # A position already filled keeps its output: a replayed order (a reference replica
        # restarted, self-healing) computes the same samples again, and steps may be using it.
        for position, sample in zip(positions, samples, strict=True):
            buffer.setdefault(position, sample)
        keep = part.get("cache")
        if keep is not None:
            keys = [(int(d), int(r)) for d, r in keep]
            self.cache.update(zip(keys, samples, strict=True))

    def _padding(self) -> dict[str, Any]:
        """How micro-batches are padded: as ChatLearn, the reference's ``add_padding_config``
        (the model that produces the data, registered in its ``setup``); keys the trainer
        registers itself win."""
        return {**self._reference_padding, **self.module.padding_config()}

    async def _wait_for(self, episode: Any, positions: Iterable[int]) -> float:
        """Wait until every position of ``episode`` has arrived; returns the seconds waited."""
        needed = set(positions)
        start = time.time()

        def ready() -> bool:
            return self._failure is not None or needed <= self.buffers.get(episode, {}).keys()

        if not ready():
            async with self._arrived:
                await self._arrived.wait_for(ready)
        if self._failure is not None:
            raise RuntimeError(f"the trainer inbox got a broken message: {self._failure}")
        return time.time() - start

    async def fill(self, order: Fill) -> None:
        """Put cached reference outputs (of ``indices``) at ``positions`` of ``episode``.

        The outputs may still be on their way (the order that computes them was sent just
        before): wait for them like a train step waits for its positions.
        """
        episode, positions = order.episode, order.positions
        keys = [(int(d), int(r)) for d, r in order.indices]
        needed = set(keys)
        if not self.cache.keys() >= needed:
            async with self._arrived:
                await self._arrived.wait_for(
                    lambda: self._failure is not None or self.cache.keys() >= needed
                )
        if self._failure is not None:
            raise RuntimeError(f"the trainer inbox got a broken message: {self._failure}")
        buffer = self.buffers.setdefault(episode, {})
        buffer.update(zip(positions, (self.cache[key] for key in keys), strict=True))
        async with self._arrived:
            self._arrived.notify_all()

    async def train(self, order: Train) -> Trained:
        """Consecutive ``train_step`` calls of one episode, each over its micro-batches (lists
        of buffer positions); ``release_before``: drop the buffers of the episodes before it.

        The coordinator groups steps only when they are cheap (``schedule.GroupSizer``): they
        then wait for all their samples and run in one trip to the compute thread. Returns one
        result per step; the group's data wait is the first step's.
        """
        episode, steps, release_before = order.episode, order.steps, order.release_before
        if release_before is not None:
            for key in [k for k in self.buffers if isinstance(k, int) and k < release_before]:
                del self.buffers[key]
        # Steps reach the compute thread in the order they were sent, whichever one's data
        # arrives first: the coordinator keeps one step queued behind the running one, and a
        # step whose samples all come from the cache (a fill) is ready before the step ahead of
        # it that waits for a forward. Out of order, the run would depend on timing.
        previous, queued = self._last_step_queued, asyncio.get_running_loop().create_future()
        self._last_step_queued = queued
        try:
            arrived = time.time()
            await self._wait_for(
                episode, (p for step in steps for mb in step.micro_batches for p in mb)
            )
            ready = time.time()
            if previous is not None:
                await previous
            compute = self.ctx.submit_compute(self._train_all, episode, steps)
        finally:
            queued.set_result(None)
        results, free_since = await compute
        # outputs no later step of the episode uses: kept, an episode's buffer held every
        # sample of it until the next episode (sample_per_episode x the output's size)
        buffer = self.buffers.get(episode, {})
        for position in order.release:
            buffer.pop(position, None)
        # Data wait that left the compute thread idle: the call arrives while the previous step
        # still runs (the coordinator keeps one queued), and waiting then costs nothing.
        waited = max(0.0, ready - max(arrived, free_since))
        return Trained(
            steps=[
                StepDone(start=start, end=end, wait=waited if i == 0 else 0.0, metrics=metrics)
                for i, (start, metrics, end) in enumerate(results)
            ]
        )

    def _train_all(
        self, episode: int, steps: Sequence[Step]
    ) -> tuple[list[tuple[float, dict[str, float], float]], float]:
        """The steps on the compute thread; also returns when that thread became free."""
        free_since = self._compute_free_since
        buffer = self.buffers[episode]
        padding = self._padding()
        results = [self._train(buffer, padding, s.micro_batches, s.iteration) for s in steps]
        return results, free_since

    def _train(
        self,
        buffer: Mapping[int, Mapping[str, Any]],
        padding: Any,
        micro_batches: Sequence[Sequence[int]],
        iteration: int,
    ) -> tuple[float, dict[str, float], float]:
        """One ``train_step`` on the compute thread."""
        start = time.time()
        data = [gather_micro_batch(buffer, mb, padding=padding) for mb in micro_batches]
        try:
            result = invoke(self.module, "train_step", (data,), {"iteration": iteration})
        except BaseException as exc:
            # a call may run several steps: the coordinator names the one that failed
            add_error_context(exc, train_step_iteration=iteration)
            raise
        self.module._train_iteration = iteration + 1
        self._compute_free_since = end = time.time()
        metrics = _numeric_metrics(result, "train_step")
        prefix, appended = _appended_metrics(self.module)
        for key, value in appended.items():
            metrics.setdefault(f"{prefix}/{key}" if prefix else key, value)
        return start, metrics, end

    async def evaluate(self, order: Evaluate) -> Evaluated:
        """``eval_step`` on each batch of eval positions; returns sample-weighted sums."""
        await self._wait_for(EVAL, (p for batch in order.batches for p in batch))
        return await self.ctx.run_compute(self._evaluate, order.batches, order.uncounted)

    def _evaluate(self, batches: Sequence[Sequence[int]], uncounted: int = 0) -> Evaluated:
        start = time.time()
        buffer = self.buffers[EVAL]
        padding = self._padding()
        sums: dict[str, float] = {}
        count = 0
        counted = len(batches) - uncounted
        for number, positions in enumerate(batches):
            batch = gather_micro_batch(buffer, positions, padding=padding)
            # the train iteration evaluated at, to an eval_step that declares `iteration`
            iteration = getattr(self.module, "_train_iteration", None)
            result = invoke(self.module, "eval_step", (batch,), {"iteration": iteration})
            if number >= counted:  # only to run as many forwards as the other ranks
                continue
            metrics = _numeric_metrics(result, "eval_step")
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * len(positions)
            count += len(positions)
        self._compute_free_since = end = time.time()
        return Evaluated(sums=sums, count=count, start=start, end=end)

    # -- checkpoints -----------------------------------------------------------------------
    async def save_checkpoint(self, order: SaveCheckpoint) -> Saved:
        """The module's ``save_checkpoint(iteration)`` into its directory of the checkpoint,
        and what its save at the run's end would add (``final_checkpoint_extra_bytes``)."""
        return await self.ctx.run_compute(self._save, order)

    def _save(self, order: SaveCheckpoint) -> Saved:
        # why the engine saves, for the module's save and for its estimate of the last one
        self.module.checkpoint_reason = order.reason or None
        try:
            done = self._checkpoint_call("save", order.path, order.iteration)
            extra = self.module.final_checkpoint_extra_bytes()
        finally:
            self.module.checkpoint_reason = None
        if isinstance(extra, bool) or not isinstance(extra, int | float) or extra != extra:
            # an estimate for a warning: not worth the run (the checkpoint is written)
            logger.warning(
                "%s.final_checkpoint_extra_bytes() returned %r, not a number of bytes: taken as 0",
                type(self.module).__name__,
                extra,
            )
            extra = 0
        return Saved(start=done.start, end=done.end, final_extra_bytes=max(0, int(extra)))

    async def load_checkpoint(self, order: LoadCheckpoint) -> None:
        """Continue from the checkpoint: counters, ``resume_training``, ``load_checkpoint``."""
        await self.ctx.run_compute(
            self.module._set_runtime_state,
            episode_id=order.episode,
            train_iteration=order.iteration,
            resume_training=True,
        )
        await self.ctx.run_compute(self._checkpoint_call, "load", order.path, order.iteration)

    def _checkpoint_call(self, kind: str, checkpoint: str, iteration: int) -> Interval:
        start = time.time()
        directory = module_checkpoint_dir(
            Path(checkpoint), self.module.name, self.ctx.identity.rank
        )
        if kind == "save":
            directory.mkdir(parents=True, exist_ok=True)
        if kind == "load" and not directory.is_dir():
            # every rank that saved has its directory: the checkpoint was written by fewer
            # processes, and this one would go on with the weights setup() built, apart from
            # the others (a data-parallel rank whose weights differ from the rest)
            written = sorted(p.name for p in directory.parent.glob("rank_*") if p.is_dir())
            if written:
                raise FileNotFoundError(
                    f"{self.module.name}: no directory of rank {self.ctx.identity.rank} in the "
                    f"checkpoint ({directory}): it was written by {len(written)} process(es) "
                    "of this model"
                )
        if kind == "load" and not resume_loads_checkpoint(self.module, directory):
            logger.info(
                "%s: no load_checkpoint of its own and a checkpoint not written by "
                "TorchModule.save_checkpoint: the resume restores the data position and the "
                "counters; its weights are those its setup() built or loaded (a module that "
                "reads its own checkpoint there, as ChatLearn's can, has them)",
                self.module.name,
            )
            return Interval(start=start, end=time.time())
        self.module._checkpoint_dir = directory
        try:
            with onloaded_to_save(self.module) if kind == "save" else contextlib.nullcontext():
                invoke(self.module, f"{kind}_checkpoint", (), {"iteration": iteration})
        except Exception as exc:
            if kind == "save":  # a full disk often says only "unexpected pos" (torch.save)
                what = f"writing the checkpoint of iteration {iteration}"
                error = storage_error(exc, directory, what)
                if error is not None:  # the disk's fault, not the module's: one line
                    raise error from exc
                add_error_context(exc, checkpoint=str(directory), **_disk_space(directory))
            raise
        finally:
            self.module._checkpoint_dir = None
        return Interval(start=start, end=time.time())

    async def close(self) -> None:
        if self._receive_task is not None:
            self._receive_task.cancel()
            await asyncio.gather(self._receive_task, return_exceptions=True)
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None


def join_parts(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive chunk outputs joined into one where they can be (same keys and trailing
    shapes, all kept in the cache or none): a few tensors to encode and decode instead of one
    per chunk and key. Outputs that cannot be joined (other sequence lengths) stay apart."""
    if len(parts) < 2:
        return parts
    joined: list[dict[str, Any]] = []
    run: list[dict[str, Any]] = []
    for part in [*parts, None]:
        if run and (part is None or "samples" in part or ("cache" in part) != ("cache" in run[0])):
            joined.extend(_join_run(run))
            run = []
        if part is not None and "samples" in part:  # store parts travel as they are
            joined.append(part)
        elif part is not None:
            run.append(part)
    return joined


def _join_run(run: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(run) == 1:
        return run
    try:
        data = concat_outputs([part["data"] for part in run])
    except ValueError:  # e.g. chunks padded to other lengths
        return run
    part = {"positions": [p for part in run for p in part["positions"]], "data": data}
    if "cache" in run[0]:
        part["cache"] = [index for part in run for index in part["cache"]]
    return [part]


@dataclass(slots=True)
class _Computed:
    """One chunk computed on a reference replica: its interval, parts, bytes, store hits."""

    start: float
    parts: list[dict[str, Any]]
    end: float
    nbytes: int
    stored: int = 0


def _part(
    positions: Sequence[int],
    indices: Sequence[Sequence[int]],
    cache: bool,
    *,
    data: Mapping[str, Any] | None = None,
    samples: list[Any] | None = None,
) -> dict[str, Any]:
    """What the trainers get for some samples of a chunk: their buffer positions and either the
    batch-first output (``data``) or one output per sample (``samples``, from the store);
    ``cache``: the trainers keep them by sample index (``reference_cache.py``)."""
    part: dict[str, Any] = {"positions": list(positions)}
    if samples is not None:
        part["samples"] = samples
    else:
        part["data"] = data
    if cache:
        part["cache"] = [list(index) for index in indices]
    return part


def _part_of(chunk: Chunk, which: Sequence[int], **contents: Any) -> dict[str, Any]:
    """`_part` for some of a chunk's samples (their indices in the chunk)."""
    positions = [chunk.positions[i] for i in which]
    return _part(positions, [chunk.indices[i] for i in which], chunk.cache, **contents)


def _nbytes(output: Mapping[str, Any]) -> int:
    """Bytes of a reference output's tensors and arrays (what keeping it in a cache costs)."""
    total = 0
    for value in output.values():
        if hasattr(value, "element_size") and hasattr(value, "numel"):
            total += value.element_size() * value.numel()
        elif hasattr(value, "nbytes"):
            total += int(value.nbytes)
        elif isinstance(value, list | tuple):
            total += 8 * len(value)
    return total


def _disk_space(directory: Path) -> dict[str, str]:
    """What a failed save's error should say about where it wrote: the free space of its file
    system, and this process's file size limit when it has one (``ulimit -f``)."""
    import resource

    facts = {"disk_free": free_space(directory)}
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        facts["file_size_limit"] = f"{limit / 2**20:.1f} MiB (ulimit -f)"
    return facts


def _appended_metrics(module: Any) -> tuple[str, dict[str, float]]:
    """What the module appended to ChatLearn's ``_metric_list`` since the last call, reduced
    (``BaseModule.get_and_clear_metrics``); nothing for a module without it."""
    drain = getattr(module, "get_and_clear_metrics", None)
    return drain() if callable(drain) else ("", {})


# A run's own reference sent more than a message may hold (transport/codec.py's Limits): what
# its forward_step returned, which is the user's to change.
_OVER_LIMITS_ERRORS = (
    HeaderTooLargeError,
    MessageTooLargeError,
    NestingTooDeepError,
    TooManyFramesError,
    TooManyObjectsError,
)
_OVER_LIMITS = (
    ": the reference's forward_step output for one chunk is more than a message may hold; "
    "return per-token values as tensors, not lists of Python numbers or long strings, or "
    "lower generation_batch_size"
)


def _numeric_metrics(result: Any, step: str) -> dict[str, float]:
    """The numbers of the dict `step` (a method's name) returned (one-element tensors and numpy
    scalars included); anything else is said once.

    NaN and inf are kept on purpose: a diverging loss must show in the metrics.
    """
    if not isinstance(result, Mapping):
        # None is what a train_step without metrics returns; from eval_step it means an
        # evaluation that records nothing (the base class's, or one that forgot to return)
        if (result is not None or step == "eval_step") and f"{step}()" not in _LEFT_OUT:
            _LEFT_OUT.add(f"{step}()")
            logger.warning(
                "%s returned %s, not a dict: %s (return a dict of numbers, e.g. {'loss': ...})",
                step,
                "None" if result is None else f"a {type(result).__name__}",
                "the evaluation records nothing"
                if step == "eval_step"
                else "nothing of it is recorded",
            )
        return {}
    metrics = {}
    for key, value in result.items():
        number = as_number(value)
        if number is not None:
            metrics[str(key)] = number
        elif str(key) not in _LEFT_OUT:  # said once per key, not per step
            _LEFT_OUT.add(str(key))
            shape = getattr(value, "shape", None)
            what = f"a {type(value).__name__}" + (f" of shape {tuple(shape)}" if shape else "")
            logger.warning(
                "the step's result %r is %s, not a number: left out of the metrics (return a "
                "number or a one-element tensor, e.g. .mean(), for it to be recorded)",
                str(key),
                what,
            )
    return metrics


_LEFT_OUT: set[str] = set()  # result keys (and steps) already reported as not numbers
