"""The coordinator's DPO pipeline: reference inference runs ahead of policy training.

Runs in the coordinator.

A few asyncio loops joined by a credit window (``schedule.CreditWindow``):

- one ``_reference_loop`` per reference replica: consumes the replica's chunks of each episode
  (``schedule.EpisodeLayout``), waits for credit, and keeps up to ``max_inflight`` work orders at
  the replica so its compute thread never idles; the replica pushes outputs straight to the
  trainer ranks. Produces busy intervals and "episode produced" events.
- ``_train_loop``: consumes the episode training plans (``training_plan.plan_episode``), sends
  every step's micro-batches (buffer positions) to the trainer ranks, keeping one step queued
  behind the running one so the trainer never waits on the coordinator; as first-pass steps
  finish it releases credit. Produces metrics, progress, evaluation and episode summaries.

An order carries one chunk and a training call one step, unless they are cheap: then several
travel together (``schedule.GroupSizer``: about 5 ms of work per order by the measured cost),
since messaging would otherwise cost more than the work (a no-op step costs tens of
microseconds, an order a few hundred). Only message boundaries move: every chunk is still one
``forward_step`` and every step one ``train_step``, in the same order on the same data, so
runs and resumes are the same either way. A training group never needs more new samples than
half the credit window, so the reference can fill the next group while the trainer runs one.

The statistics are kept incrementally (``metrics.Timers``) and the history holds the last
steps only (``state.RunState``): the coordinator's cost per step does not grow over a run.

The window lets the reference produce global position ``p`` (``episode * sample_per_episode +
position``) once ``p < released + window``; ``released`` is the end of what completed training
steps needed. So the reference computes steps k+1.. while the trainer runs step k, continues into
the next episode while the trainer finishes this one (later passes need no reference work), and
the outputs held ahead of training stay bounded whatever the dataset size. ``pipeline_window: 0``
gives ChatLearn's schedule instead: the whole episode's inference, then its training.

Colocated models with ``free_memory`` (``PipelineSettings.take_turns``) take turns as in
ChatLearn: the same episode-synchronous schedule as ``pipeline_window: 0`` (the credit window is
the episode), and nothing of one model runs during the other's turn. Each replica's reference
turn is ``onload()``, the episode's forwards, ``after_episode``, ``offload()``; the trainer's
turn starts once every replica has offloaded: ``onload()``, the episode's steps,
``after_episode``, ``offload()``. Evaluation and checkpoints follow before the next reference
turn (the eval set's reference outputs and ``eval_step`` each in a turn of their own). Only the
models with ``free_memory`` get the ``onload()``/``offload()`` calls; the trainer also offloads
once before the first turn.

Checkpoints and stops happen *between* training steps, never inside one. Every
``save_episode_interval`` episodes, once the episode's last step is done, the train loop awaits
the ``checkpoint`` hook (the engine's writer) before it sends the next step; the reference loops
keep running ahead meanwhile, which is harmless: the state saved (``RunState``) describes the
trained steps, not the reference's position. ``request_checkpoint()`` does the same at the next
step boundary, and ``request_stop()`` makes the train loop send no new step, wait for the ones
already sent, and return with ``stopped`` set; ``run()`` then cancels the reference loops. A run
restarted from a state with ``step_in_episode > 0`` draws that episode again (the reference
recomputes it: its outputs do not depend on the policy) and skips the steps already trained.

When the run draws more samples than its datasets hold, the trainers keep reference outputs
(``reference_cache.py``): a chunk's samples already cached are sent to the trainers as a fill
order, and only the rest goes to the reference.

Self-healing (docs/self-healing.md): a reference replica that is lost fails its orders with
``ActorLostError`` while the runtime restarts it; ``_send_forward`` sends each failed order again,
to another replica that is up (it takes the lost one's chunks meanwhile) or, with none, to the
replica once it is back, after ``begin_episode`` for its new process. The trainers keep the first
output of a position, so an order that ran twice changes nothing. A lost trainer rank ends
``run()`` with that error: the engine rewinds to the last checkpoint and builds a new pipeline.
With ``save_step_interval``, the train loop also checkpoints every that many steps, so such a
restart repeats at most that many.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from chatlearn.actors import ActorLostError
from chatlearn.engine.counters import num_steps_per_episode
from chatlearn.engine.metrics import MetricsSink, Timers
from chatlearn.engine.protocol import (
    EVAL,
    Chunk,
    ChunkDone,
    ReferenceGroup,
    Step,
    StepDone,
    TrainerGroup,
)
from chatlearn.engine.reference_cache import MIB, ReferenceCache, repeats_samples
from chatlearn.engine.sampler import EpisodeSampler, SampleIndex
from chatlearn.engine.schedule import ChunkOrder, CreditWindow, EpisodeLayout, GroupSizer
from chatlearn.engine.state import RunState, bounded_history
from chatlearn.engine.training_plan import EpisodePlan, TrainStep, plan_episode

logger = logging.getLogger("chatlearn.engine")


@dataclass(slots=True, kw_only=True)
class PipelineSettings:
    num_episode: int
    sample_per_episode: int
    micro_batch_size: int
    global_batch_size: int
    num_training_epoch: int
    training_shuffle_mode: str
    seed: int
    window_micro_batches: int  # 0: ChatLearn's episode-synchronous schedule
    generation_batch_size: int | None
    eval_episode_interval: int = 0
    enable_eval_before_training: bool = False
    save_episode_interval: int = 0  # 0: no periodic checkpoints
    max_inflight_orders: int = 2
    reference_cache_mb: float = 0.0  # 0: recompute reference outputs of samples that come back
    reference_free_memory: bool = False  # colocated with the trainer, offloaded between turns
    trainer_free_memory: bool = False
    save_step_interval: int = 0  # 0: no checkpoints every N steps

    @property
    def take_turns(self) -> bool:
        return self.reference_free_memory or self.trainer_free_memory

    @property
    def steps_per_episode(self) -> int:
        return num_steps_per_episode(
            self.sample_per_episode, self.global_batch_size, self.num_training_epoch
        )

    def saves_after(self, iteration: int) -> int:
        """How many checkpoints a run at trainer ``iteration`` writes still: at the iterations
        after it that end an episode of the episode interval or reach a step interval's, and
        at its end (each iteration once)."""
        total = self.num_episode * self.steps_per_episode
        if iteration >= total:
            return 0
        periods = [
            period
            for period in (
                self.save_episode_interval * self.steps_per_episode,
                self.save_step_interval,
            )
            if period > 0
        ]

        def multiples(period: int) -> int:  # of `period` in (iteration, total]
            return total // period - iteration // period

        saves = sum(multiples(period) for period in periods)
        if len(periods) == 2:  # counted twice where both fall
            saves -= multiples(math.lcm(*periods))
        at_end = any(total % period == 0 for period in periods)
        return saves + (0 if at_end else 1)

    @property
    def window_samples(self) -> int | None:
        if self.window_micro_batches <= 0 or self.take_turns:
            return None
        # The step the trainer waits for needs the chunk that holds its last sample: with less
        # than a global batch plus that chunk ahead, the reference could never produce it
        # (chunks larger than a step deadlocked here). No split: a chunk is a replica's share.
        chunk = self.generation_batch_size
        if chunk is None or chunk <= 0:
            chunk = self.sample_per_episode
        return max(
            self.window_micro_batches * self.micro_batch_size,
            self.global_batch_size + min(chunk, self.sample_per_episode) - 1,
        )


class DPOPipeline:
    """Drives reference replicas and trainer ranks through the episodes (module docstring)."""

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        reference: ReferenceGroup,
        trainer: TrainerGroup,
        sampler: EpisodeSampler,
        state: RunState,
        trainer_dp: list[tuple[int, int]],
        sink: MetricsSink | None = None,
        eval_size: int = 0,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        checkpoint: Callable[[str], Awaitable[Any]] | None = None,
        resumed: bool = False,
        timers: Timers | None = None,
    ) -> None:
        """``checkpoint(reason)`` writes a checkpoint of ``state`` (reason: interval, request);
        ``resumed``: the run continues a checkpoint (no evaluation "before training")."""
        self.settings = settings
        self.reference = reference
        self.trainer = trainer
        self.sampler = sampler
        self.state = state
        self.trainer_dp = trainer_dp  # (data-parallel rank, size) of every trainer rank
        self.sink = sink
        self.eval_size = eval_size
        self.on_step = on_step
        self.first_episode = state.episode
        # a pipeline rebuilt after a trainer restart keeps measuring into the run's timers
        self.timers = timers or Timers([reference.name, trainer.name])
        self.episode_timers = self.timers
        self._layouts: dict[int, EpisodeLayout] = {}
        self._next_layout = state.episode
        self._produced: dict[int, asyncio.Event] = {}
        self._trained: dict[int, asyncio.Event] = {}
        self._offloaded: dict[int, asyncio.Event] = {}  # every reference replica's turn ended
        self._turns_ended: dict[int, int] = {}
        self._remaining: dict[int, int] = {}
        self._window = CreditWindow(settings.window_samples)
        self._forward_sizes = GroupSizer()  # chunks per reference order
        self._train_sizes = GroupSizer()  # steps per training call
        self.num_forward_orders = 0  # per replica (its ranks get the same order)
        self.num_train_calls = 0  # per trainer rank
        # the samples this run draws from here on (its episodes left)
        self.samples_to_draw = (settings.num_episode - state.episode) * settings.sample_per_episode
        self.reference_cache = ReferenceCache(
            int(settings.reference_cache_mb * MIB),
            enabled=repeats_samples(sampler.dataset_sizes, self.samples_to_draw),
        )
        self._eval_ready = False
        self.eval_history: list[dict[str, float]] = []
        self.checkpoint = checkpoint
        self.resumed = resumed
        self.running = False
        self.stopped = False  # the train loop returned early on request_stop()
        self._stop = asyncio.Event()
        self._checkpoint_requests: list[asyncio.Future[Any]] = []
        interval = settings.save_step_interval
        self._next_step_save = (state.iteration // interval + 1) * interval if interval else None
        # self-healing: the process incarnation each replica began its episode with, and how
        # many orders were sent again (to another replica or the restarted one)
        self._begun = [reference.incarnation(r) for r in range(len(reference.replicas))]
        self._steals = 0
        self.num_replayed_orders = 0
        self.reference_stored = 0  # samples the reference served from its on-disk store
        self.replay_seconds: list[float] = []  # per replayed order: from its failure to done
        self._in_flight: deque[tuple[TrainStep, ...]] = deque()  # training calls sent, not done

    # -- episode bookkeeping ---------------------------------------------------------------
    def _global(self, episode: int, position: int) -> int:
        return (episode - self.first_episode) * self.settings.sample_per_episode + position

    def layout(self, episode: int) -> EpisodeLayout:
        """The layout of ``episode``; the sampler advances the first time it is asked."""
        while self._next_layout <= episode:
            number = self._next_layout
            self._layouts[number] = EpisodeLayout(
                self.sampler.next_episode(),
                len(self.reference.replicas),
                self.settings.generation_batch_size,
            )
            self._remaining[number] = sum(len(c) for c in self._layouts[number].chunks)
            self._next_layout += 1
        return self._layouts[episode]

    def _event(self, table: dict[int, asyncio.Event], episode: int) -> asyncio.Event:
        return table.setdefault(episode, asyncio.Event())

    # -- control from outside ---------------------------------------------------------------
    def request_stop(self) -> None:
        """Send no new training step; the train loop returns once the sent ones are done."""
        if not self._stop.is_set():
            # what was sent is what will finish: the loop sends nothing once this is set
            in_flight = sum(len(group) for group in self._in_flight)
            if in_flight:
                logger.info(
                    "no new training step is sent; iteration%s %s in flight finish first",
                    "s" if in_flight > 1 else "",
                    _iterations(self.state.iteration + 1, in_flight),
                )
        self._stop.set()

    def request_checkpoint(self) -> asyncio.Future[Any]:
        """A checkpoint at the next step boundary; the future gets the hook's result (a path)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.running:
            future.set_exception(RuntimeError("the pipeline is not running"))
        else:
            self._checkpoint_requests.append(future)
        return future

    async def _serve_checkpoint_requests(self) -> None:
        if not self._checkpoint_requests:
            return
        requests, self._checkpoint_requests = self._checkpoint_requests, []
        try:
            result = await self._save("request")
        except BaseException as exc:
            for future in requests:
                if not future.done():
                    future.set_exception(exc)
            raise
        for future in requests:
            if not future.done():
                future.set_result(result)

    async def _save(self, reason: str) -> Any:
        return None if self.checkpoint is None else await self.checkpoint(reason)

    async def _until(self, event: asyncio.Event) -> bool:
        """Wait for ``event`` unless a stop is requested first; whether it is set."""
        if not event.is_set() and not self._stop.is_set():
            waiters = [
                asyncio.ensure_future(event.wait()),
                asyncio.ensure_future(self._stop.wait()),
            ]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        return event.is_set()

    # -- loops -----------------------------------------------------------------------------
    async def run(self) -> RunState:
        """Train the remaining episodes (or until ``request_stop()``); the first error raises."""
        episodes = range(self.first_episode, self.settings.num_episode)
        if not episodes:
            return self.state
        self.running = True
        if self.settings.take_turns:
            await self._memory(self.trainer, onload=False)
            if self._eval_before_training():  # its own turns, before the first reference turn
                await self.evaluate()
        tasks = [
            asyncio.create_task(
                self._reference_loop(replica_id, episodes),
                name=f"DPOPipeline._reference_loop[{replica_id}]",
            )
            for replica_id in range(len(self.reference.replicas))
        ]
        train = asyncio.create_task(self._train_loop(episodes), name="DPOPipeline._train_loop")
        tasks.append(train)
        try:
            for _ in range(len(tasks)):  # every round ends at least one task
                if train.done() and self.stopped:
                    break  # the reference loops are waiting for credit that will not come
                running = [t for t in tasks if not t.done()]
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                # the train loop's error first: it says which step failed
                for task in sorted(done, key=lambda task: task is not train):
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            if not self.stopped:
                await self._serve_checkpoint_requests()  # asked for after the last step
        finally:
            self.running = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for future in self._checkpoint_requests:
                if not future.done():
                    future.set_exception(
                        RuntimeError("training stopped before the requested checkpoint")
                    )
            self._checkpoint_requests = []
        return self.state

    async def _reference_loop(self, replica_id: int, episodes: range) -> None:
        """Consumes this replica's chunks; produces reference outputs at the trainers. Fails
        with the first error of its orders, as the train loop does (not a task group's
        `ExceptionGroup`: the engine restarts a lost trainer on its `ActorLostError`, which a
        fill order to a trainer rank that died meets as well as the train loop)."""
        try:
            await self._reference_orders(replica_id, episodes)
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None

    async def _reference_orders(self, replica_id: int, episodes: range) -> None:
        inflight = asyncio.Semaphore(self.settings.max_inflight_orders)
        async with asyncio.TaskGroup() as orders:
            for episode in episodes:
                if self.settings.window_samples is None and episode > self.first_episode:
                    await self._event(self._trained, episode - 1).wait()
                layout = self.layout(episode)
                if self.settings.take_turns:
                    await self._memory(self.reference, onload=True, replica=replica_id)
                # queued at the replica behind the previous episode's orders, not awaited
                _queue(orders, functools.partial(self.reference.begin_episode, replica_id, episode))
                chunks = layout.chunks[replica_id]
                next_chunk = 0
                while next_chunk < len(chunks):
                    first = chunks[next_chunk]
                    await self._window.acquire(self._global(episode, first.positions[-1]))
                    group = self._ready_chunks(episode, chunks, next_chunk)
                    next_chunk += len(group)
                    # admitted once in flight: the cache's budget counts the reports of the
                    # orders before; chunk by chunk, so a chunk's hits include the samples an
                    # earlier chunk of the group admitted
                    await inflight.acquire()
                    work, filled, num_filled = [], [], 0
                    for chunk in group:
                        hits, misses = self.reference_cache.split(chunk.positions, chunk.indices)
                        filled.extend(hits)
                        num_filled += not misses
                        if misses:
                            flagged = self.reference_cache.admit(i for _, i in misses)
                            work.append((chunk, misses, flagged))
                    if filled:
                        self.reference_cache.reused += len(filled)
                        orders.create_task(self._fill(episode, filled, num_filled))
                    if work:
                        orders.create_task(self._forward(replica_id, work, inflight))
                    else:
                        inflight.release()
                if self.settings.take_turns:
                    await self._end_reference_turn(replica_id, episode)
                else:
                    _queue(orders, functools.partial(self.reference.end_episode, replica_id))

    async def _end_reference_turn(self, replica_id: int, episode: int) -> None:
        """After the episode's inference (every replica's: the trainers must have it all):
        ``after_episode``, ``offload()``; the trainer's turn starts when every replica is done."""
        await self._event(self._produced, episode).wait()
        await _unless_lost(functools.partial(self.reference.end_episode, replica_id))
        await self._memory(self.reference, onload=False, replica=replica_id)
        self._turns_ended[episode] = self._turns_ended.get(episode, 0) + 1
        if self._turns_ended[episode] == len(self.reference.replicas):
            del self._turns_ended[episode]
            self._event(self._offloaded, episode).set()

    async def _memory(self, group: Any, *, onload: bool, replica: int | None = None) -> None:
        """``onload()``/``offload()`` of ``group``'s modules, if they free memory between turns."""
        settings = self.settings
        frees = (
            settings.reference_free_memory
            if group is self.reference
            else settings.trainer_free_memory
        )
        if frees:
            if group is self.reference:  # a replica being restarted starts onloaded
                await _unless_lost(functools.partial(group.memory, onload, replica))
            else:
                await group.memory(onload, replica)

    def _eval_before_training(self) -> bool:
        return bool(
            self.settings.enable_eval_before_training and self.eval_size and not self.resumed
        )

    def _ready_chunks(self, episode: int, chunks: list[ChunkOrder], first: int) -> list[ChunkOrder]:
        """``chunks[first]`` (its credit acquired) and the next ones whose credit is there too,
        as many as one order should carry."""
        end = min(len(chunks), first + self._forward_sizes.size())
        last = first + 1
        while last < end and self._window.allows(self._global(episode, chunks[last].positions[-1])):
            last += 1
        return chunks[first:last]

    async def _forward(
        self,
        replica_id: int,
        work: list[tuple[ChunkOrder, list[tuple[int, SampleIndex]], bool]],
        inflight: asyncio.Semaphore,
    ) -> None:
        """One order of ``forward_step`` calls, one per chunk of ``work``: (chunk, its samples
        not in the cache, whether the trainers keep their outputs)."""
        try:
            chunks = [
                _chunk(chunk.episode_id, misses, "train", cache=flagged)
                for chunk, misses, flagged in work
            ]
            self.num_forward_orders += 1
            results = await self._send_forward(replica_id, chunks)
        finally:
            inflight.release()
        timer = self.timers[self.reference.name]
        for per_chunk in results:
            # the chunks ran back to back in one trip to the compute thread: one interval
            timer.add(per_chunk[0].start, per_chunk[-1].end)
        self._forward_sizes.observe(sum(r.end - r.start for r in results[-1]), len(results[-1]))
        for number, (chunk, misses, flagged) in enumerate(work):
            nbytes = max(per_chunk[number].nbytes for per_chunk in results)
            self.reference_stored += max(per_chunk[number].stored for per_chunk in results)
            self.reference_cache.reported(len(misses), nbytes, flagged=flagged)
            self._chunk_done(chunk.episode_id)

    async def _send_forward(self, replica_id: int, chunks: list[Chunk]) -> list[list[ChunkDone]]:
        """``chunks`` on ``replica_id``, or, while it is being restarted, on another replica
        that is up (or on it once it is back): the order is sent again until one runs it."""
        reference = self.reference
        lost_at: float | None = None
        for _ in range(_MAX_REPLAYS):
            target = self._forward_target(replica_id)
            if target is None:
                await reference.wait_ready(replica_id)  # the run's failure, if it fails
                continue
            incarnation = reference.incarnation(target)
            try:
                if incarnation != self._begun[target] and isinstance(chunks[0].episode, int):
                    # a restarted replica's new process begins the episode it now works on
                    await reference.begin_episode(target, chunks[0].episode)
                    self._begun[target] = incarnation
                done = await reference.forward(target, chunks)
            except ActorLostError:
                self.num_replayed_orders += 1
                lost_at = lost_at or time.time()
                continue
            if lost_at is not None:
                self.replay_seconds.append(time.time() - lost_at)
                logger.info(
                    "an order of reference replica %d (%d samples) ran again on replica %d, "
                    "done %.1f s after it failed",
                    replica_id,
                    sum(len(c.positions) for c in chunks),
                    target,
                    self.replay_seconds[-1],
                )
            return done
        raise RuntimeError(
            f"an order of reference replica {replica_id} failed {_MAX_REPLAYS} times"
        )

    def _forward_target(self, replica_id: int) -> int | None:
        """The replica to send ``replica_id``'s next order to: itself when it is up, else the
        next of the others that are up (round robin), else None (wait for it)."""
        reference = self.reference
        if reference.available(replica_id):
            return replica_id
        others = [
            r for r in range(len(reference.replicas)) if r != replica_id and reference.available(r)
        ]
        if not others:
            return None
        self._steals += 1
        return others[self._steals % len(others)]

    async def _fill(
        self, episode: int, work: list[tuple[int, SampleIndex]], num_chunks_done: int
    ) -> None:
        """Trainers copy cached reference outputs into ``episode``'s buffer; that completes
        ``num_chunks_done`` chunks (those with nothing to compute)."""
        positions = [position for position, _ in work]
        indices = [[index.dataset_id, index.row] for _, index in work]
        await self.trainer.fill(episode, positions, indices)
        for _ in range(num_chunks_done):
            self._chunk_done(episode)

    def _chunk_done(self, episode: int) -> None:
        self._remaining[episode] -= 1
        if self._remaining[episode] == 0:
            del self._remaining[episode]
            self._event(self._produced, episode).set()

    async def _train_loop(self, episodes: range) -> None:
        """Consumes training plans; produces steps, metrics, evaluations, credit."""
        settings = self.settings
        if self._eval_before_training() and not settings.take_turns:  # else run() did it
            await self.evaluate()
        for episode in episodes:
            if self._stop.is_set():
                self.stopped = True
                return
            started = time.time()
            layout = self.layout(episode)
            plan = plan_episode(
                layout.num_samples,
                train_micro_batch_size=settings.micro_batch_size,
                train_global_batch_size=settings.global_batch_size,
                data_parallel_size=self.trainer_dp[0][1],
                num_training_epoch=settings.num_training_epoch,
                training_shuffle_mode=settings.training_shuffle_mode,  # type: ignore[arg-type]
                seed=settings.seed,
                episode_id=episode,
            )
            skip = self.state.step_in_episode
            logger.info(
                "start train episode_id: %d/%d%s",
                episode + 1,
                settings.num_episode,
                f" (resuming after step {skip} of {len(plan.steps)})" if skip else "",
            )
            await self.trainer.begin_episode(episode)
            # taking turns: the reference replicas have also ended their turns
            inference = self._offloaded if settings.take_turns else self._produced
            if settings.window_samples is None and not await self._until(
                self._event(inference, episode)
            ):
                self.stopped = True
                return
            await self._memory(self.trainer, onload=True)
            if not await self._train_episode(episode, plan):
                await self._memory(self.trainer, onload=False)
                self.stopped = True
                return
            self.state.episode_trained(episode, layout.num_samples)
            await self._window.release_through(self._global(episode + 1, 0))
            if not settings.take_turns:  # else after the evaluation's turns
                self._event(self._trained, episode).set()
            # only the previous episode's event is still awaited (by the reference loops)
            self._trained.pop(episode - 1, None)
            self._produced.pop(episode, None)
            self._offloaded.pop(episode, None)
            del self._layouts[episode]
            await self.trainer.end_episode()
            await self._memory(self.trainer, onload=False)
            evaluated = None
            interval = settings.eval_episode_interval
            if self.eval_size and interval and (episode + 1) % interval == 0:
                evaluated = await self.evaluate()
            self._episode_summary(episode, started, evaluated)
            # a request is served first: the periodic save at the same iteration is then the
            # requested checkpoint (a sharded trainer's export is written only on request and
            # at the end); the run's last episode's checkpoint is its end's
            await self._serve_checkpoint_requests()
            interval = settings.save_episode_interval
            if interval and (episode + 1) % interval == 0:
                await self._save("end" if episode + 1 == settings.num_episode else "interval")
            if settings.take_turns:
                self._event(self._trained, episode).set()

    async def _train_episode(self, episode: int, plan: EpisodePlan) -> bool:
        """The episode's steps after ``state.step_in_episode``; False if stopped before the end."""
        skip = self.state.step_in_episode
        produced = 0  # first-pass positions that the steps sent so far need
        if skip:
            # the skipped steps were trained before the restart: their credit is free
            produced = plan.steps[skip - 1].max_required_position + 1
            await self._window.release_through(self._global(episode, produced))
        steps = plan.steps[skip:]
        done_after = last_uses(plan)
        self._in_flight.clear()
        pending: deque[tuple[tuple[TrainStep, ...], asyncio.Future[list[list[StepDone]]]]] = deque()
        try:
            next_step = 0
            while next_step < len(steps):
                queued = self.state.iteration + sum(len(g) for g, _ in pending)
                save_now = self._next_step_save is not None and queued >= self._next_step_save
                if self._stop.is_set() or self._checkpoint_requests or save_now:
                    while pending:
                        await self._finish_steps(*pending.popleft())
                    if self._stop.is_set():
                        return False
                    await self._serve_checkpoint_requests()  # first: as at an episode's end
                    if save_now:
                        await self._save_steps()
                    queued = self.state.iteration
                group = self._step_group(steps, next_step, produced)
                if self._next_step_save is not None:  # no group runs past the next save
                    group = group[: max(1, self._next_step_save - queued)]
                next_step += len(group)
                produced = max(produced, group[-1].max_required_position + 1)
                release_before = episode if group[0].step_in_episode == 0 else None
                iteration = self.state.iteration + sum(len(g) for g, _ in pending)
                per_rank = [
                    [
                        Step(
                            micro_batches=[list(mb) for mb in step.for_rank(dp_rank)],
                            iteration=iteration + number,
                        )
                        for number, step in enumerate(group)
                    ]
                    for dp_rank, _ in self.trainer_dp
                ]
                release = [p for step in group for p in done_after.get(step.step_in_episode, ())]
                sent = self.trainer.train(episode, per_rank, release_before, release)
                self._in_flight.append(group)
                self.num_train_calls += 1
                pending.append((group, asyncio.ensure_future(sent)))
                if len(pending) >= 2:
                    await self._finish_steps(*pending.popleft())
            while pending:
                await self._finish_steps(*pending.popleft())
            return True
        finally:
            # after a failure: the steps queued behind the failed one fail too; nobody awaits them
            for _, task in pending:
                task.cancel()
                task.add_done_callback(_retrieve)

    async def _save_steps(self) -> None:
        """The ``save_step_interval`` checkpoint (the trained steps reached the next one)."""
        interval = self.settings.save_step_interval
        await self._save("step")
        self._next_step_save = (self.state.iteration // interval + 1) * interval

    def _step_group(
        self, steps: tuple[TrainStep, ...], first: int, produced: int
    ) -> tuple[TrainStep, ...]:
        window = self.settings.window_samples
        room = None if window is None else max(window // 2, self.settings.global_batch_size)
        return step_group(steps, first, produced, most=self._train_sizes.size(), room=room)

    async def _finish_steps(
        self, group: tuple[TrainStep, ...], task: asyncio.Future[list[list[StepDone]]]
    ) -> None:
        try:
            per_rank = await task  # per rank: one result per step of the group
        except Exception as exc:
            # this group and those queued behind it: a process that dies may have finished a
            # step whose answer it never sent, so the step that killed it may be a later one
            in_flight = [group, *(g for g in self._in_flight if g is not group)]
            failed = self._failed_step(exc, in_flight)
            if failed is not None:
                exc.add_note("failed at " + self._describe_steps(*failed))
            exc.add_note(
                "in flight when it failed: " + "; ".join(self._describe_steps(g) for g in in_flight)
            )
            raise
        if self._in_flight and self._in_flight[0] is group:
            self._in_flight.popleft()
        timer = self.timers[self.trainer.name]
        self._train_sizes.observe(sum(r.end - r.start for r in per_rank[0]), len(per_rank[0]))
        for number, step in enumerate(group):
            results = [rank_results[number] for rank_results in per_rank]
            for result in results:
                timer.add(result.start, result.end)
            timer.wait_seconds += max(result.wait for result in results)
            self._step_done(step, results)
        first_pass = [step for step in group if step.epoch == 0]
        if first_pass:
            last = first_pass[-1]
            await self._window.release_through(
                self._global(last.episode_id, last.max_required_position + 1)
            )

    def _failed_step(
        self, exc: Exception, in_flight: list[tuple[TrainStep, ...]]
    ) -> tuple[tuple[TrainStep, ...], int] | None:
        """The call and the index in it of the step whose ``train_step`` raised ``exc``, when
        the trainer said which (a call runs several steps)."""
        context = getattr(exc, "context", None)
        failed = context.get("train_step_iteration") if isinstance(context, dict) else None
        if type(failed) is not int:
            return None
        for group in in_flight:
            index = failed + 1 - self._first_iteration(group)
            if 0 <= index < len(group):
                return group, index
        return None

    def _first_iteration(self, group: tuple[TrainStep, ...]) -> int:
        """The (1-based) iteration of the first step of an in-flight training call."""
        before = 0  # steps of the calls in flight ahead of this one
        for other in self._in_flight:
            if other is group:
                break
            before += len(other)
        return self.state.iteration + before + 1

    def _describe_steps(self, group: tuple[TrainStep, ...], only: int | None = None) -> str:
        """Which steps a training call ran (or only its step at index ``only``), and their
        samples (dataset, row)."""
        iteration = self._first_iteration(group)
        if only is not None:
            iteration += only
            group = group[only : only + 1]
        first, last = group[0], group[-1]
        iterations = _iterations(iteration, len(group))
        steps = f"{first.step_in_episode + 1}"
        if len(group) > 1:
            steps += f"..{last.step_in_episode + 1}"
        samples: list[SampleIndex] = []
        layout = self._layouts.get(first.episode_id)
        if layout is not None:
            where = {
                position: index
                for chunks in layout.chunks
                for chunk in chunks
                for position, index in zip(chunk.positions, chunk.indices, strict=True)
            }
            samples = [where[p] for step in group for p in step.global_batch() if p in where]
        shown = ", ".join(f"({i.dataset_id}, {i.row})" for i in samples[:32])
        more = f", ... ({len(samples)} in all)" if len(samples) > 32 else ""
        return (
            f"iteration {iterations} (train_step's iteration={iteration - 1}"
            f"{'...' if len(group) > 1 else ''}; episode {first.episode_id + 1}, its step "
            f"{steps}), samples (dataset, row): {shown or 'unknown'}{more}"
        )

    def _step_done(self, step: TrainStep, results: list[StepDone]) -> None:
        metrics = _mean_over_ranks([r.metrics for r in results])
        self.state.step_trained(metrics)
        if self.sink is not None:
            self.sink.write("train", self.state.iteration, metrics, episode=step.episode_id)
        if self.on_step is not None:
            self.on_step(self.settings.global_batch_size, metrics)

    # -- evaluation ------------------------------------------------------------------------
    async def evaluate(self) -> dict[str, float]:
        """Reference outputs for the eval set (once per run), then ``eval_step`` on every rank."""
        if not self._eval_ready:
            await self._memory(self.reference, onload=True)
            await self._eval_reference()
            await self._memory(self.reference, onload=False)
            self._eval_ready = True
        dp_size = self.trainer_dp[0][1]
        batches, uncounted = eval_batches(self.eval_size, dp_size, self.settings.micro_batch_size)
        per_rank = [batches[dp_rank] for dp_rank, _ in self.trainer_dp]
        await self._memory(self.trainer, onload=True)
        results = await self.trainer.evaluate(
            per_rank, [uncounted[dp_rank] for dp_rank, _ in self.trainer_dp]
        )
        await self._memory(self.trainer, onload=False)
        # every rank of a data-parallel group evaluates the same share: count each share once
        seen: set[int] = set()
        sums: dict[str, float] = {}
        count = 0
        for result, (dp_rank, _) in zip(results, self.trainer_dp, strict=True):
            if dp_rank in seen:
                continue
            seen.add(dp_rank)
            count += result.count
            for key, value in result.sums.items():
                sums[key] = sums.get(key, 0.0) + value
        metrics = {key: value / max(count, 1) for key, value in sums.items()}
        self.eval_history.append({"iteration": self.state.iteration, **metrics})
        bounded_history(self.eval_history)
        if self.sink is not None:
            # not `episode`, which train and episode records give as the 0-based episode of
            # the step: an evaluation comes between episodes (0: before training)
            self.sink.write("eval", self.state.iteration, metrics, episodes_done=self.state.episode)
        return metrics

    async def _eval_reference(self) -> None:
        chunk = self.settings.generation_batch_size or self.eval_size
        num_replicas = len(self.reference.replicas)
        orders: list[list[Chunk]] = [[] for _ in range(num_replicas)]
        for number, start in enumerate(range(0, self.eval_size, chunk)):
            samples = [
                (p, SampleIndex(0, p)) for p in range(start, min(start + chunk, self.eval_size))
            ]
            orders[number % num_replicas].append(_chunk(EVAL, samples, EVAL))

        async def run(replica: int, work: list[Chunk]) -> None:
            for order in work:
                await self._send_forward(replica, [order])

        await asyncio.gather(*(run(r, w) for r, w in enumerate(orders)))

    def _episode_summary(self, episode: int, started: float, evaluated: dict | None) -> None:
        now = time.time()
        clock = time.perf_counter()
        summary = self.timers.summary(now)
        overlap = self.timers.overlap(self.reference.name, self.trainer.name)
        stats_ms = 1e3 * (time.perf_counter() - clock)
        last = self.state.history[-1] if self.state.history else {}
        text = _brief({k: v for k, v in last.items() if k != "iteration"})
        logger.info(
            "episode %d/%d done in %.1fs: iteration %d%s; overlap %.0f%%%s",
            episode + 1,
            self.settings.num_episode,
            now - started,
            self.state.iteration,
            f", {text}" if text else "",
            100 * overlap,
            "" if evaluated is None else f"; eval {_brief(evaluated)}",
        )
        if self.sink is not None:
            self.sink.write(
                "episode",
                self.state.iteration,
                {
                    **summary,
                    "overlap": overlap,
                    "episode_s": now - started,
                    "reference_reused": self.reference_cache.reused,
                    "reference_stored": self.reference_stored,  # from runtime.reference_store
                    "stats_ms": stats_ms,  # what the timing statistics cost (issue 17)
                },
                episode=episode,
            )


# The metrics an episode's log line shows when a step reports them (all go to metrics.jsonl).
_HEADLINE = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm")


def _brief(metrics: dict[str, float], at_most: int = 4) -> str:
    """A few metrics for a log line: the headline ones if present, else the first ones."""
    keys = [k for k in _HEADLINE if k in metrics] or list(metrics)
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys[:at_most])


def _chunk(
    episode: int | str, samples: list[tuple[int, SampleIndex]], split: str, cache: bool = False
) -> Chunk:
    """A ``forward_step`` chunk of ``samples`` (buffer position, sample index)."""
    return Chunk(
        episode=episode,
        positions=[position for position, _ in samples],
        indices=[[index.dataset_id, index.row] for _, index in samples],
        split=split,
        cache=cache,
    )


def step_group(
    steps: tuple[TrainStep, ...], first: int, produced: int, *, most: int, room: int | None
) -> tuple[TrainStep, ...]:
    """``steps[first]`` and the next ones one training call should carry: at most ``most``,
    whose first-pass samples beyond ``produced`` (what the steps sent before need) number at
    most ``room`` (half the credit window; None: no window). So the reference can produce the
    next group while the trainer runs this one, and no group needs more samples than the window
    lets the reference produce before the group's own credit comes back (it never would)."""
    end = min(len(steps), first + most)
    last = first + 1
    while last < end:
        if room is not None and steps[last].max_required_position + 1 - produced > room:
            break
        last += 1
    return steps[first:last]


_MAX_REPLAYS = 1000  # bounds _send_forward; restarts are bounded far below by the policy


def last_uses(plan: EpisodePlan) -> dict[int, list[int]]:
    """Per step of ``plan`` (its ``step_in_episode``), the buffer positions no later step uses:
    the trainer ranks drop them once it ran."""
    last: dict[int, int] = {}
    for step in plan.steps:
        for position in step.required_positions:
            last[position] = step.step_in_episode
    done_after: dict[int, list[int]] = {}
    for position, step_in_episode in last.items():
        done_after.setdefault(step_in_episode, []).append(position)
    return done_after


def eval_batches(size: int, dp_size: int, micro: int) -> tuple[list[list[list[int]]], list[int]]:
    """Each data-parallel rank's batches of eval positions, and how many of its last ones are
    not to be counted. Rank r takes positions r, r + dp_size, ...; every rank gets the same
    number of batches, of at most `micro` positions each: a sharded trainer's forwards are
    collectives, and a rank with one more (33 samples, 2 ranks, 16 a batch: 16 + 1 against 16)
    waited for the others forever. A rank with fewer positions than batches (an empty share:
    fewer samples than ranks) evaluates one more time uncounted, so it runs as many forwards."""
    shares = [list(range(size))[rank::dp_size] for rank in range(dp_size)]
    count = max(-(-len(share) // micro) for share in shares)  # ceil: the largest share's
    batches, uncounted = [], []
    for share in shares:
        real = min(count, len(share))  # batches of its own positions, as even as can be
        base, extra = divmod(len(share), max(real, 1))
        bounds = [0]
        for number in range(real):
            bounds.append(bounds[-1] + base + (number < extra))
        own = [share[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        batches.append(own + [[share[0] if share else 0]] * (count - real))
        uncounted.append(count - real)
    return batches, uncounted


async def _unless_lost(call: Callable[[], Awaitable[Any]]) -> None:
    """An episode hook or memory order to a reference replica; if the replica is lost meanwhile
    it is dropped: its new process begins the episode afresh (``_send_forward``)."""
    try:
        await call()
    except ActorLostError:
        pass


def _queue(orders: asyncio.TaskGroup, call: Callable[[], Awaitable[Any]]) -> None:
    """`_unless_lost(call)` as a task of `orders`, the call made when the task runs: a group
    already stopping (an error elsewhere) refuses the task, and the coroutines made for it
    were never awaited (a RuntimeWarning after every failed forward_step)."""
    task = _unless_lost(call)
    try:
        orders.create_task(task)
    except RuntimeError:
        task.close()
        raise


def first_error(errors: BaseExceptionGroup) -> BaseException:
    """The first error of a task group (nested groups unwrapped); the others, if any, are named
    in a note on it."""
    leaves: list[BaseException] = []

    def collect(group: BaseExceptionGroup) -> None:
        for error in group.exceptions:
            if isinstance(error, BaseExceptionGroup):
                collect(error)
            elif not any(error is seen for seen in leaves):  # one error may fail several orders
                leaves.append(error)

    collect(errors)
    first = leaves[0]
    if len(leaves) > 1:
        others = (f"{type(e).__name__}: {_headline(e)}" for e in leaves[1:])
        first.add_note("also failed meanwhile: " + "; ".join(others))
    return first


def _headline(error: BaseException) -> str:
    return str(error).partition("\n")[0]


def _iterations(first: int, count: int) -> str:
    """``5`` for one iteration, ``5..7`` for three."""
    return f"{first}" if count == 1 else f"{first}..{first + count - 1}"


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned task's outcome as seen (no "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()


def _mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over the ranks that reported it (identical values stay as they are)."""
    keys = {key for metrics in per_rank for key in metrics}
    out = {}
    for key in sorted(keys):
        values = [metrics[key] for metrics in per_rank if key in metrics]
        out[key] = sum(values) / len(values)
    return out
