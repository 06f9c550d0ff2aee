"""``Engine`` and ``DPOEngine``: what a ChatLearn program drives.

Runs in the coordinator: the user's script.

    chatlearn.init()
    engine = DPOEngine(PolicyReference("reference"), PolicyTrainer("policy_trainer"))
    engine.set_dataset(samples)
    engine.learn()

``Engine`` owns the actor system of a run: it launches one process per model rank (templates in,
:class:`~chatlearn.actors.ModelGroup` handles out), and stops them all however the run ends. It is
also the embedding API: ``async with engine:`` starts the models inside any asyncio program,
``engine.group(name)`` calls any method on any replica, and :func:`stream` pipes inputs through a
model with bounded in-flight calls.

``DPOEngine`` adds the DPO flow: reference replicas build the datasets, the coordinator's sampler
draws episodes, and the pipeline (``pipeline.py``) overlaps reference inference with training.
``learn()`` runs it on a uvloop event loop; ``await learn_async()`` runs it inside an existing one.

Checkpoints (``run_checkpoints.py``, layout in ``checkpoint.py``): every
``save_episode_interval`` episodes and ``save_step_interval`` steps, at the end of training and
on a graceful stop when either is set, and whenever ``await engine.save_checkpoint()`` asks. A
new run with the same output path resumes from the newest complete checkpoint
(``enable_resume_training``, default on) and repeats the uninterrupted run exactly.
SIGINT/SIGTERM/SIGHUP (``interrupts.py``): the first stops after the running steps and saves, a
second stops at once; ``learn()`` then raises ``TrainingInterrupted`` (exit code 130 / 143 / 129),
``learn_async()`` ``TrainingStopped``.

Self-healing (docs/self-healing.md): the engine asks the runtime to restart lost actors under the
restart policy (``runtime.max_restarts`` per ``restart_window_minutes``, per model
``models.<name>.max_restarts``). A restarted reference replica is primed here (connected to the
trainer inboxes, datasets built) and the pipeline replays its orders. A lost trainer rank restarts
the trainer; the engine then rewinds the run to the last checkpoint of this run (or to its start)
— counters, sampler, metrics.jsonl — has the new trainer load it, and runs a new pipeline from
there. Every restart is a log line and a ``restart`` record in metrics.jsonl.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

from chatlearn.actors import (
    ActorDeadError,
    ActorError,
    ActorLostError,
    ActorSystem,
    BaseModule,
    ModelGroup,
    RestartPolicy,
)
from chatlearn.actors.checkpoint_paths import checkpoint_name, checkpoint_root
from chatlearn.actors.hosts import COORDINATOR_RESTARTS_ENV_VAR
from chatlearn.actors.loader import running_script
from chatlearn.actors.timers import Timers as UserTimers
from chatlearn.config.errors import ConfigError, located_error
from chatlearn.engine.checkpoint import CheckpointInfo, CheckpointManager, rewind_metrics
from chatlearn.engine.counters import reference_iteration
from chatlearn.engine.interrupts import Interrupts, SignalGuard, TrainingStopped
from chatlearn.engine.metrics import MetricsSink, Timers
from chatlearn.engine.pipeline import DPOPipeline, PipelineSettings
from chatlearn.engine.progress import Progress, setup_logging
from chatlearn.engine.protocol import EVAL, ReferenceGroup, TrainerGroup
from chatlearn.engine.reference_cache import repeats_samples
from chatlearn.engine.run_checkpoints import (
    RunCheckpoints,
    find_checkpoint,
    refuse_before_start,
)
from chatlearn.engine.run_lock import RunLock
from chatlearn.engine.sample_errors import located_sample_error, unsendable_sample_error
from chatlearn.engine.sampler import (
    DropLast,
    EpisodeLongerThanData,
    EpisodeSampler,
    dataset_fingerprint,
    empty_dataset_error,
)
from chatlearn.engine.state import RunState
from chatlearn.transport.errors import EncodeError

logger = logging.getLogger("chatlearn.engine")

T = TypeVar("T")

REFERENCE_SERVICE = "chatlearn.engine.worker_services:ReferenceService"
TRAINER_SERVICE = "chatlearn.engine.worker_services:TrainerService"


class Engine:
    """A run's models as processes: start, call, stop (module docstring)."""

    #: whether the run writes its output directory (metrics, checkpoints): then ``start()`` takes
    #: its run lock (engine/run_lock.py); an engine that only calls its models creates nothing
    writes_output: ClassVar[bool] = False

    def __init__(self, *models: BaseModule) -> None:
        if not models:
            raise ValueError("an engine needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        # one config per run: the first model's is the run's, and every actor gets it
        stale = [m.name for m in models if m.global_args is not models[0].global_args]
        if stale:
            raise ValueError(
                f"the models {names} were not all built under the same chatlearn.init() config "
                f"({', '.join(stale)} under another one than {names[0]}): build every module "
                "after the last chatlearn.init(), which the run then uses"
            )
        self.models = list(models)
        self.global_args = models[0].global_args
        self.system: ActorSystem | None = None
        self._run_locks = contextlib.ExitStack()  # the run locks, held from start() to stop()
        self.groups: dict[str, ModelGroup] = {}
        self._services: dict[str, dict[str, str]] = {}

    @property
    def runtime_args(self) -> Any:
        """The config's ``runtime`` section (ChatLearn's ``engine.runtime_args``)."""
        return self.global_args.runtime_args

    def get_model(self, name: str) -> BaseModule:
        """The module object the engine was given under ``name`` (ChatLearn's
        ``engine.get_model``; the running processes are ``group(name)``)."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(
            f"no model {name!r} in this engine (models: {[m.name for m in self.models]})"
        )

    def group(self, name: str) -> ModelGroup:
        """The running processes of model ``name`` (after ``start()``)."""
        if name not in self.groups:
            raise KeyError(f"model {name!r} is not running (running: {sorted(self.groups)})")
        return self.groups[name]

    async def start(self) -> None:
        """Launch every model's processes (validating the config first)."""
        if self.system is not None:
            return
        script = running_script()
        if script is not None:
            # an actor loading the user's script for its classes ran the script's top level,
            # a run included: it met the coordinator's run lock ("in use by another run")
            raise ConfigError(
                "the script starts a run at its top level, which every actor process runs when "
                "it loads the script to find its module classes",
                where=script,
                fix='start the run under if __name__ == "__main__": (as ChatLearn\'s examples do)',
            )
        validate = getattr(self.global_args, "validate", None)
        if callable(validate):
            validate()
        for model in self.models:  # each module's own checks of its settings
            check_args = getattr(model, "check_args", None)
            if callable(check_args):
                check_args()
        # one run at a time in the output directory, taken before any process starts
        runtime = getattr(self.global_args, "runtime_args", None)
        output = getattr(runtime, "output_path", None)
        if self.writes_output and output:
            error = functools.partial(located_error, self.global_args)
            checkpoints = Path(checkpoint_root(runtime))
            with contextlib.ExitStack() as locks:  # all taken, or none held
                locks.enter_context(RunLock(Path(output), error))
                if not checkpoints.resolve().is_relative_to(Path(output).resolve()):
                    locks.enter_context(RunLock(checkpoints, error, "runtime.data_checkpoint_path"))
                self._run_locks = locks.pop_all()
        self.system = ActorSystem(self.global_args)
        self._prepare(self.system)
        try:
            await self._before_launch()
            groups = await self.system.launch(*self.models, services=self._services)
        except BaseException:
            await self.stop()
            raise
        self.groups = {g.name: g for g in groups}

    def _prepare(self, system: ActorSystem) -> None:
        """Before the processes start: what a subclass asks of the runtime (restarts, say)."""

    async def _before_launch(self) -> None:
        """Right before the processes start (the run lock held): what a subclass must know
        first, such as the checkpoint a run resumes from."""

    def stop(self) -> Awaitable[None]:
        """Stop every process of the run (idempotent); then the output directory is free.

        Inside a running event loop: ``await engine.stop()``. Called without one, as ChatLearn
        programs call it after ``learn()``, it stops them before it returns (on an event loop of
        its own, if anything runs) and returns an awaitable that is already done.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self.system is not None:
                from chatlearn.transport import run

                run(self._stop())
            else:  # nothing runs: only the run locks may be held
                self.groups = {}
                self._run_locks.close()
            return _Done()
        return self._stop()

    async def _stop(self) -> None:
        system, self.system = self.system, None
        self.groups = {}
        try:
            if system is not None and system.loop_closed:
                # started on a loop that ended without stop() (an earlier asyncio.run)
                await asyncio.to_thread(system.stop_abandoned)
            elif system is not None:
                await system.shutdown()
        finally:
            self._run_locks.close()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class _Done:
    """An awaitable that is already done: what ``stop()`` returns after stopping synchronously."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


async def stream(
    group: ModelGroup, method: str, items: Sequence[Any], *, max_inflight: int = 2
) -> AsyncIterator[Any]:
    """Yield ``group.<method>(item)`` for every item, in order, spread over the replicas.

    Each replica gets up to ``max_inflight`` calls at once, so it never idles between items.
    """
    replicas = group.replicas
    limits = [asyncio.Semaphore(max_inflight) for _ in replicas]

    async def one(index: int, item: Any) -> Any:
        replica = index % len(replicas)
        async with limits[replica]:
            results = await asyncio.gather(*(h.call(method, item) for h in replicas[replica]))
            return results[-1]  # the last rank holds a model-parallel replica's output

    tasks: list[asyncio.Task[Any]] = []
    try:
        for index, item in enumerate(items):
            tasks.append(asyncio.ensure_future(one(index, item)))
        for task in tasks:
            yield await task
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True, kw_only=True, frozen=True)
class LearnResult:
    """What ``learn()`` returns: the run's figures, without reading the engine's internals.

    ``steps`` and ``samples`` count the whole run (a resumed run includes what was trained
    before the restart); ``throughput`` and ``overlap`` measure this process's training only
    (None when nothing was left to train). ``train_first`` / ``train_last``: the metrics of the
    run's first and last steps (empty if none); ``eval_first`` / ``eval_last`` likewise for the
    evaluations.
    """

    steps: int
    samples: int
    train_first: dict[str, float] = field(default_factory=dict)
    train_last: dict[str, float] = field(default_factory=dict)
    eval_first: dict[str, float] = field(default_factory=dict)
    eval_last: dict[str, float] = field(default_factory=dict)
    samples_trained: int = 0  # by this process (steps it ran × global batch size)
    seconds: float | None = None  # from the first reference chunk to the last step
    throughput: float | None = None  # samples trained per second
    overlap: float | None = None  # fraction of reference time hidden behind training
    stopped: bool = False  # ended early on request_stop / a signal
    restarts: int = 0  # actors restarted by self-healing during this learn()
    checkpoint: Path | None = None  # the newest complete checkpoint of the run
    output_path: Path | None = None
    metrics_path: Path | None = None

    @property
    def train_loss_first(self) -> float | None:
        return self.train_first.get("loss")

    @property
    def train_loss_last(self) -> float | None:
        return self.train_last.get("loss")


class _TrainerView:
    """``engine.trainer`` as ChatLearn programs read it: ``iteration``, the optimizer steps so
    far, read from the engine's run state (live; no counter of its own)."""

    __slots__ = ("_engine",)

    def __init__(self, engine: DPOEngine) -> None:
        self._engine = engine

    @property
    def iteration(self) -> int:
        return self._engine.state.iteration


class DPOEngine(Engine):
    """ChatLearn's DPO engine: ``reference`` runs ``forward_step``, ``policy_trainer`` trains."""

    writes_output = True

    #: seconds from the first SIGINT/SIGTERM to a forced stop (``runtime.stop_timeout`` wins)
    stop_timeout: float = 120.0

    def __init__(self, reference: BaseModule, policy_trainer: BaseModule) -> None:
        super().__init__(reference, policy_trainer)
        self.reference = reference
        self.policy_trainer = policy_trainer
        self.trainer = _TrainerView(self)
        self._services = {
            reference.name: {"ref": REFERENCE_SERVICE},
            policy_trainer.name: {"train": TRAINER_SERVICE},
        }
        self._datasets: list[list[Any]] | None = None
        self._eval_dataset: list[Any] | None = None
        # where each data set's samples came from (load_preference_data's `origin`), if known
        self._origins: dict[str, Callable[[int], str] | None] = {}
        self.state = RunState()
        self.pipeline: DPOPipeline | None = None
        self.checkpoints: RunCheckpoints | None = None
        self._phase = "idle"  # starting, training, stopping: what a signal may interrupt
        self._interrupts: Interrupts | None = None
        self._cancelled_by_signal = False
        self._stop_error: BaseException | None = None  # what a forced stop fails the run with
        self._last_system: ActorSystem | None = None  # of the last learn(), for its result
        self._endpoints: list[str] = []  # the trainer ranks' inboxes
        self._clients: tuple[ReferenceGroup, TrainerGroup] | None = None
        self._restarts_before = 0  # restarts of this run before this coordinator (resumed)
        self._recorded: list[Any] = []  # the restarts of the last learn() in metrics.jsonl
        self._datasets_built = False
        # the checkpoint found before the models started (`_before_launch`), if it looked
        self._resume_looked = False
        self._resume_info: CheckpointInfo | None = None
        # the sampler's mode and the key it came from, read before the models start
        self._drop_last: tuple[DropLast, str] = ("cycle", "runtime.drop_last")

    # -- data ------------------------------------------------------------------------------
    def set_dataset(self, dataset: Sequence[Any]) -> DPOEngine:
        """The training samples (raw; each reference replica turns them into a dataset)."""
        samples = _samples(dataset, "set_dataset")
        if samples and isinstance(samples[0], list):  # ChatLearn asserts the same
            raise ValueError(
                "engine.set_dataset() takes one dataset, a list of samples, and its first "
                "sample is a list: for several datasets call engine.set_multiple_datasets(lists)"
            )
        self._datasets = [samples]
        self._origins["training"] = getattr(dataset, "origin", None)
        return self

    def set_multiple_datasets(self, datasets: Sequence[Sequence[Any]]) -> DPOEngine:
        """Several datasets, mixed per ``runtime.data_ratio``."""
        if not datasets:
            raise ValueError("set_multiple_datasets needs at least one dataset")
        self._datasets = [_samples(d, "set_multiple_datasets") for d in datasets]
        single = len(datasets) == 1  # a module names sample i of one of them
        self._origins["training"] = getattr(datasets[0], "origin", None) if single else None
        return self

    def set_eval_dataset(self, dataset: Sequence[Any]) -> DPOEngine:
        """Held-out samples evaluated every ``eval_episode_interval`` episodes (``eval_step``)."""
        self._eval_dataset = _samples(dataset, "set_eval_dataset")
        self._origins["eval"] = getattr(dataset, "origin", None)
        return self

    @property
    def evaluator(self) -> None:
        """ChatLearn's ``engine.evaluator``: None, as on its DPOEngine, which builds none (only
        ``set_evaluator``, refused below, gives it one), so a program's ``if engine.evaluator:``
        reads the same; the held-out samples of this runtime go to ``set_eval_dataset``."""
        return None

    def set_evaluator(self, evaluator: Any) -> DPOEngine:
        """ChatLearn's evaluator flow is not provided: say what to use instead."""
        raise NotImplementedError(
            "engine.set_evaluator() is not provided by this runtime: give the held-out samples "
            "to engine.set_eval_dataset(samples); the trainer's eval_step evaluates them every "
            "eval_episode_interval episodes (docs/chatlearn-compat.md)"
        )

    # ChatLearn's engine methods for flows this runtime builds itself: one line each on what
    # to do instead
    def set_relay_sample_manager(self, manager: Any) -> DPOEngine:
        raise _not_provided("set_relay_sample_manager", _RELAY)

    def set_relay_sample_fn(self, fn: Any) -> DPOEngine:
        raise _not_provided("set_relay_sample_fn", _RELAY)

    def set_parameter_sync(self, src_model: Any, dst_model: Any) -> DPOEngine:
        raise _not_provided(
            "set_parameter_sync", "DPO's reference stays frozen, so no weights are synced here"
        )

    def set_trainer(self, trainer: Any) -> DPOEngine:
        raise _not_provided("set_trainer", _OWN_FLOW)

    def set_environment(self, environment: Any) -> DPOEngine:
        raise _not_provided("set_environment", _OWN_FLOW)

    # -- training --------------------------------------------------------------------------
    def learn(self) -> LearnResult:
        """Train to the end (blocking) and return the run's figures. Inside a running event loop
        use ``await learn_async()``.

        Raises ``TrainingInterrupted`` (a ``SystemExit`` with code 130 / 143) after a stop on
        SIGINT / SIGTERM; the event loop is closed by then.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("learn() called inside a running event loop; use learn_async()")
        from chatlearn.engine.interrupts import TrainingStopped
        from chatlearn.transport import run

        async def learn_or_stopped() -> LearnResult | TrainingStopped:
            try:
                return await self.learn_async()
            except TrainingStopped as stop:  # a SystemExit is raised outside the loop
                return stop

        outcome = run(learn_or_stopped())
        if isinstance(outcome, TrainingStopped):
            raise outcome.as_exit() from outcome.__cause__
        return outcome

    async def learn_async(self) -> LearnResult:
        """Train to the end inside the running event loop (see ``learn``).

        After a stop on SIGINT / SIGTERM / SIGHUP it raises ``TrainingStopped``, an ordinary
        exception (``code``: the shell's exit code, ``checkpoint``) that any task can catch: a
        ``SystemExit`` raised in an asyncio task leaves the event loop itself, whatever awaits
        the task. ``sys.exit(stop.code)`` ends a script with the code ``learn()`` would.
        """
        if self._datasets is None:
            raise ValueError("call engine.set_dataset(samples) before learn()")
        for index, samples in enumerate(self._datasets):  # before any model starts
            if not samples:
                raise empty_dataset_error(None if len(self._datasets) == 1 else index)
        if self._phase != "idle":
            raise RuntimeError(
                f"learn_async() is already running on this engine ({self._phase}); await that "
                "call instead of starting another (one engine trains one run at a time)"
            )
        setup_logging()
        runtime = self.global_args.runtime_args
        started = time.time()
        task = asyncio.current_task()
        interrupts = Interrupts(
            graceful=self._stop_gracefully,
            hard=lambda reason: self._stop_at_once(task, reason),
            stop_timeout=float(runtime.get("stop_timeout", None) or self.stop_timeout),
            saves=runtime.saves_checkpoints,
            # under chatlearn launch (which sets the variable for every coordinator it starts)
            dedupe=COORDINATOR_RESTARTS_ENV_VAR in os.environ,
        )
        self._interrupts = interrupts
        self._cancelled_by_signal = False
        self._stop_error = None
        self.pipeline = None
        self.checkpoints = None
        # a run of its own, as a rerun of the script: it resumes from a checkpoint or starts
        # over, never from the counters an earlier learn() of this engine left behind
        self.state = RunState()
        failure: BaseException | None = None
        try:
            with SignalGuard(interrupts.handle):
                try:
                    self._phase = "starting"
                    await self.start()
                    self._phase = "training"
                    await self._run(runtime, started)
                except (Exception, asyncio.CancelledError) as exc:
                    if not interrupts.requested:
                        raise
                    if self._cancelled_by_signal and task is not None:
                        task.uncancel()
                    failure = exc  # usually the stop's own doing (calls failed, task cancelled)
                finally:
                    self._phase = "stopping"
                    await self.stop()
        finally:
            interrupts.close()
            self._phase = "idle"
        if interrupts.signum is not None:
            if isinstance(failure, ActorDeadError):
                logger.warning(
                    "an actor exited during the stop, so no final checkpoint was written "
                    "(killed, or signalled twice): %s",
                    str(failure).splitlines()[0],
                )
            elif failure is not None and not isinstance(failure, asyncio.CancelledError):
                if isinstance(failure, ConfigError):  # a full disk, say: one line, as alone
                    logger.error("the run failed while stopping: %s", failure.one_line())
                elif failure is not self._stop_error:  # not the stop's own doing: say so
                    logger.error("the run failed while stopping", exc_info=failure)
            if self.checkpoints is not None:
                await self._last_commit(self.checkpoints)
            last = self.checkpoints.last if self.checkpoints is not None else None
            stop = TrainingStopped(interrupts.signum, last)
            logger.warning(
                "training stopped by %s at iteration %d (exit code %d); %s",
                stop.signal_name,
                self.state.iteration,
                stop.code,
                f"the newest checkpoint is {last}" if last else "there is no checkpoint",
            )
            raise stop from failure
        return self.result()

    @staticmethod
    async def _last_commit(checkpoints: RunCheckpoints) -> None:
        """After an immediate stop: the checkpoint still being committed in the background
        (it cannot be abandoned halfway: its thread goes on, and its pruning removed the
        checkpoint the stop named as the newest). Its failure is said in one line (the run's
        actors are gone: nothing else says it)."""
        pending = checkpoints.committing  # one that failed already was said
        if pending is None:
            return
        logger.info("waiting for the checkpoint of iteration %d being committed", pending)
        try:
            await checkpoints.committed()
        except Exception as exc:
            logger.error(
                "the checkpoint of iteration %d was not committed: %s",
                pending,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )

    def result(self) -> LearnResult:
        """The figures of the last ``learn()`` (also what it returns)."""
        state, pipeline = self.state, self.pipeline
        runtime = self.global_args.runtime_args
        output = Path(runtime.output_path)
        evals = pipeline.eval_history if pipeline is not None else []
        figures: dict[str, Any] = {}
        span = pipeline.timers.span() if pipeline is not None else None
        if pipeline is not None and span is not None:
            timers = pipeline.timers
            # one interval per step and rank
            steps = timers[pipeline.trainer.name].num_intervals // max(1, len(pipeline.trainer))
            trained = steps * pipeline.settings.global_batch_size
            seconds = span[1] - span[0]
            figures = {
                "samples_trained": trained,
                "seconds": seconds,
                "throughput": trained / seconds if seconds > 0 else None,
                "overlap": timers.overlap(pipeline.reference.name, pipeline.trainer.name),
            }
        system = self._last_system
        return LearnResult(
            restarts=system.num_restarts if system is not None else 0,
            steps=state.iteration,
            samples=state.consumed_samples,
            train_first=_metrics(state.first_step),
            train_last=_metrics(state.history[-1] if state.history else {}),
            eval_first=_metrics(evals[0] if evals else {}),
            eval_last=_metrics(evals[-1] if evals else {}),
            stopped=pipeline is not None and pipeline.stopped,
            checkpoint=self.checkpoints.last if self.checkpoints is not None else None,
            output_path=output,
            metrics_path=output / "metrics.jsonl",
            **figures,
        )

    @property
    def timers(self) -> UserTimers:
        """ChatLearn's engine timers: ``engine.timers("name").start()`` / ``.stop()``, read by
        ``logging_summary()`` (the run's own phases are timed by the pipeline and logged per
        episode; these are for the program's own phases)."""
        timers = self.__dict__.get("_user_timers")
        if timers is None:
            timers = self.__dict__["_user_timers"] = UserTimers()
        return timers

    def logging_summary(self, iteration: int = -1) -> dict[str, float]:
        """ChatLearn's summary line: the engine timers (milliseconds, reset) and the run's
        figures so far (steps, samples, throughput, overlap, restarts); returns them as a dict.
        ``iteration``: shown in the line (default: the run's current iteration)."""
        figures: dict[str, float] = self.timers.log_dict()
        result = self.result()
        figures.update(
            {
                "steps": float(result.steps),
                "samples": float(result.samples),
                "restarts": float(result.restarts),
            }
        )
        if result.throughput is not None:
            figures["samples_per_s"] = result.throughput
        if result.overlap is not None:
            figures["overlap"] = result.overlap
        shown = iteration if iteration >= 0 else self.state.iteration
        logger.info(
            "summary at iteration %d: %s",
            shown,
            " | ".join(f"{k} {v:.4g}" for k, v in figures.items()),
        )
        return figures

    async def save_checkpoint(self, episode_id: int | None = None) -> Path:
        """Write a checkpoint of the running ``learn`` and return its directory.

        During training it is taken at the next boundary between two steps (the running steps
        finish first, training goes on after); the state is exact there, so a run resumed from
        it repeats the uninterrupted one. Needs a running ``learn_async()``. ``episode_id``
        (ChatLearn's argument) is accepted: the checkpoint is always of the position reached,
        and a warning says so when that is not the end of that episode.
        """
        if episode_id is not None and (
            self.state.episode != episode_id + 1 or self.state.step_in_episode != 0
        ):
            logger.warning(
                "save_checkpoint(episode_id=%d): the checkpoint is taken where training is, "
                "iteration %d (episode %d, after its step %d)",
                episode_id,
                self.state.iteration,
                self.state.episode + 1,
                self.state.step_in_episode,
            )
        if self.pipeline is not None and self.pipeline.running:
            return await self.pipeline.request_checkpoint()
        if self.checkpoints is None or self.system is None or self._phase != "training":
            raise RuntimeError(
                "save_checkpoint() needs a running training: call it while learn_async() runs"
            )
        return await self.checkpoints.save(self.state, "request", self._eval_history())

    def _eval_history(self) -> list[dict[str, Any]]:
        return self.pipeline.eval_history if self.pipeline is not None else []

    # -- signals ---------------------------------------------------------------------------
    def _stop_gracefully(self) -> bool:
        """First signal: no new steps, the sent ones finish, save, stop (False: not possible)."""
        if self._phase == "starting":
            return False  # processes still starting: nothing trained, nothing to save
        if self.pipeline is not None:
            self.pipeline.request_stop()
        if self.system is not None:
            # a trainer lost now would restart only to rewind to the checkpoint the run has;
            # a reference replica still heals (the steps that finish may wait for its outputs)
            self.system.stop_healing(self.policy_trainer.name)
        return True

    def _stop_at_once(self, task: asyncio.Task[Any] | None, reason: str) -> None:
        """Second signal (or the stop timeout): kill every process, abandon the run."""
        if self.system is not None:
            self._stop_error = RuntimeError(f"training stopped: {reason}")
            self.system.fail(self._stop_error)
        if self._phase in ("starting", "training") and task is not None and not task.done():
            self._cancelled_by_signal = True
            task.cancel()

    def _free_memory(self, runtime: Any) -> tuple[bool, bool]:
        """(reference, trainer) ``free_memory``, where the two are colocated: they then take
        turns (``pipeline.py``); not colocated, the flag has nothing to free room for."""
        names = {self.reference.name, self.policy_trainer.name}
        if not any(names <= set(group) for group in runtime.colocation):
            return False, False
        flags = (
            bool(self.global_args.model(name).free_memory)
            for name in (self.reference.name, self.policy_trainer.name)
        )
        reference, trainer = flags
        if (reference or trainer) and runtime.pipeline_window != 0:
            logger.info(
                "free_memory with colocation: the models take turns, one episode at a time "
                "(pipeline_window %s is not used)",
                runtime.pipeline_window,
            )
        return reference, trainer

    def _restart_policy(self, runtime: Any, model: str) -> RestartPolicy:
        limit = self.global_args.model(model).max_restarts
        return RestartPolicy(
            max_restarts=int(runtime.max_restarts if limit is None else limit),
            window=60.0 * float(runtime.restart_window_minutes),
            on_error=bool(runtime.restart_on_error),
        )

    def _actor_signalled(self, signum: int, who: str) -> bool:
        """An actor received a stop signal from outside the run (``ActorSystem.on_stop_request``):
        the run's graceful stop, as on a signal to the coordinator, while it starts or trains."""
        interrupts = self._interrupts
        if interrupts is None or self._phase == "idle":
            return False
        if self._phase == "stopping":  # every process is being stopped already
            logger.info("%s received by %s while the run stops", signal.Signals(signum).name, who)
            return True
        return interrupts.forwarded(signum, who)

    def _prepare(self, system: ActorSystem) -> None:
        """Ask the runtime to restart lost actors (module docstring): a reference replica in
        place, primed here; the trainer as a whole, rewound by ``_run``. From the start: a
        process that dies while the models start is restarted too."""
        runtime = self.global_args.runtime_args
        reference_name, trainer_name = self.reference.name, self.policy_trainer.name
        self._clients = None
        self._datasets_built = False
        system.on_stop_request = self._actor_signalled

        async def prime_reference(replica: int | None) -> None:
            if self._clients is None or replica is None or self._datasets is None:
                return  # still starting: the engine connects it and builds its datasets
            reference, _ = self._clients
            if self._endpoints:
                await reference.connect(self._endpoints, replica)
            if self._datasets_built:
                await reference.build_datasets(self._datasets, "train", replica)
                if self._eval_dataset:
                    await reference.build_datasets([self._eval_dataset], EVAL, replica)

        async def prime_trainer(_: int | None) -> None:
            if self._clients is None or not self._endpoints:
                return  # still starting: the engine opens the inboxes
            reference, trainer = self._clients
            self._endpoints = await trainer.open_inbox()
            for replica in range(len(reference.replicas)):
                if reference.available(replica):  # the others connect once back
                    try:
                        await reference.connect(self._endpoints, replica)
                    except ActorLostError:
                        pass  # lost meanwhile: it connects when it is back

        def replay_reference(replica: int | None) -> str:
            return "its orders in flight go to the other replicas or wait for it"

        def replay_trainer(_: int | None) -> str:
            checkpoints = self.checkpoints
            newest = checkpoints.newest_iteration if checkpoints is not None else None
            if checkpoints is None or newest is None:
                since = "the start of this run"
            elif newest == checkpoints.last_iteration:
                since = f"checkpoint {checkpoint_name(newest)}"
            else:
                since = f"checkpoint {checkpoint_name(newest)} once it is committed"
            return f"the trainer restarts from {since} (iteration {self.state.iteration} now)"

        async def trainer_start(_: int | None) -> None:
            # a checkpoint still being committed: the new processes start with its counters
            # (`_trainer_saved`), as their setup() may load it; its failure stops the run
            if self.checkpoints is not None:
                with contextlib.suppress(Exception):
                    await self.checkpoints.committed()

        system.heal(
            reference_name,
            unit="replica",
            policy=self._restart_policy(runtime, reference_name),
            on_restart=prime_reference,
            describe=replay_reference,
        )
        system.heal(
            trainer_name,
            unit="model",
            policy=self._restart_policy(runtime, trainer_name),
            on_restart=prime_trainer,
            describe=replay_trainer,
            before_start=trainer_start,
        )

    async def _before_launch(self) -> None:
        """Find the checkpoint the run resumes from before the models start, so that their
        processes start with its counters (`resume_training`, episode, iteration) set before
        ``setup()``, as ChatLearn does: a module may load its own checkpoint there."""
        runtime = self.global_args.runtime_args
        self._drop_last = _drop_last(self.global_args, self.reference.name)
        _warn_small_shares(self.global_args, self.reference.name)
        self._resume_looked = bool(runtime.enable_resume_training)
        self._resume_info = None
        if self._resume_looked:
            manager = CheckpointManager(checkpoint_root(runtime), keep_last=runtime.save_keep_last)
            iteration = runtime.load_data_checkpoint_iteration
            self._resume_info = await find_checkpoint(manager, iteration, self.global_args)
        if self._resume_info is not None:  # what the config alone refuses: before any start
            refuse_before_start(
                self._resume_info,
                self.global_args,
                reference=self.reference.name,
                replicas=self.reference.num_replica,
                trainer=self.policy_trainer.name,
            )
        saved = self._resume_info.state if self._resume_info is not None else None
        forward_calls = 0
        if saved is not None:
            # a reference replica's forward calls so far (its `_iteration`)
            forward_calls = reference_iteration(
                saved.episode,
                runtime.sample_per_episode,
                self.reference.num_replica,
                self.global_args.model(self.reference.name).forward_chunk_size,
            )
        for template in (self.reference, self.policy_trainer):
            template._set_runtime_state(
                episode_id=saved.episode if saved else 0,
                iteration=forward_calls if template is self.reference else 0,
                train_iteration=saved.iteration if saved else 0,
                resume_training=saved is not None,
                # ChatLearn's data checkpoint restores runtime_args.consumed_samples before
                # setup(); a run that starts over starts at the config's
                consumed_samples=saved.consumed_samples if saved else runtime.consumed_samples,
            )

    def _trainer_saved(self, state: RunState) -> None:
        """A checkpoint is written: a trainer restarted from now on starts with its counters
        (it loads that checkpoint after ``setup()``)."""
        self.policy_trainer._set_runtime_state(
            episode_id=state.episode,
            train_iteration=state.iteration,
            resume_training=True,
            consumed_samples=state.consumed_samples,
        )

    async def _healing(self, call: Callable[[], Awaitable[T]], *groups: Any) -> T:
        """``call()`` again after a restart of ``groups`` (for the idempotent orders that set
        a run up: connect, datasets, inboxes, checkpoint load)."""
        for _ in range(_MAX_TRAINER_RESTARTS):
            try:
                return await call()
            except ActorLostError:
                for group in groups:
                    await group.wait_ready()
        raise RuntimeError("the models did not stay up long enough to set the run up")

    async def _run(self, runtime: Any, started: float) -> RunState:
        system = self.system
        assert system is not None
        self._last_system = system
        self._recorded = []
        reference = ReferenceGroup(self.group(self.reference.name), system)
        trainer = TrainerGroup(self.group(self.policy_trainer.name), system)
        self._clients = (reference, trainer)
        both = (reference, trainer)
        self._endpoints = await self._healing(trainer.open_inbox, trainer)
        await self._healing(lambda: reference.connect(self._endpoints), *both)
        datasets, eval_dataset = self._datasets, self._eval_dataset
        assert datasets is not None
        try:
            sizes = await self._healing(
                lambda: reference.build_datasets(datasets, "train"), reference
            )
            eval_size = 0
            if eval_dataset:
                eval_size = (
                    await self._healing(
                        lambda: reference.build_datasets([eval_dataset], EVAL), reference
                    )
                )[0]
        except ActorError as refused:
            raise located_sample_error(refused, self._origins) from None
        except EncodeError as unsendable:  # the codec's error names no sample or key
            named = [("training", d) for d in datasets] + [("eval", eval_dataset or [])]
            raise unsendable_sample_error(named, self._origins) or unsendable from None
        self._datasets_built = True
        dp = await self._healing(trainer.data_parallel, trainer)
        mode, mode_key = self._drop_last
        try:
            sampler = EpisodeSampler(
                sizes,
                runtime.sample_per_episode,
                shuffle=runtime.data_shuffle,
                data_ratio=runtime.resolve_data_ratio(len(sizes)) if len(sizes) > 1 else None,
                drop_last=mode,
                fingerprints=await asyncio.to_thread(
                    lambda: list(map(dataset_fingerprint, datasets))
                ),
            )
        except EpisodeLongerThanData as short:
            raise located_error(self.global_args, mode_key, short.problem, short.fix) from None
        settings = _settings(runtime, self.global_args.model(self.reference.name))
        settings.reference_free_memory, settings.trainer_free_memory = self._free_memory(runtime)
        output = Path(runtime.output_path)
        checkpoints = RunCheckpoints(
            CheckpointManager(checkpoint_root(runtime), keep_last=runtime.save_keep_last),
            reference=reference,
            trainer=trainer,
            sampler=sampler,
            settings=settings,
            trainer_dp=dp,
            config=self.global_args,
        )
        self.checkpoints = checkpoints
        checkpoints.on_saved = self._trainer_saved
        checkpoints.on_commit_failed = system.fail  # a checkpoint that could not be committed
        resume = None
        if self._resume_looked:  # found before the models started (`_before_launch`)
            resume = self._resume_info
        elif runtime.enable_resume_training:
            resume = await checkpoints.find(runtime.load_data_checkpoint_iteration, start=True)
        self._resume_looked, self._resume_info = False, None
        if resume is not None:
            found = resume
            self.state = await self._healing(
                lambda: checkpoints.restore(found, output / "metrics.jsonl"), *both
            )
        else:
            if self.state.consumed_samples == 0 and runtime.consumed_samples:
                self.state.consumed_samples = int(runtime.consumed_samples)
            position = {**sampler.state_dict(), "consumed_samples": self.state.consumed_samples}
            sampler.load_state_dict(position)
            self.state.episode = self.state.consumed_samples // settings.sample_per_episode
            self.state.iteration = self.state.episode * settings.steps_per_episode
            self.state.step_in_episode = 0
            # a run that starts over (a coordinator restarted before the first checkpoint, or
            # a new run in a used output directory): the records there are not this run's, nor
            # are the checkpoints (left in place, retention counted them as the newest and
            # removed this run's own, and a later resume took them)
            aside = await asyncio.to_thread(checkpoints.manager.set_aside_newer, -1)
            if aside is not None:
                logger.warning(
                    "training starts from the beginning, so the checkpoints of an earlier run "
                    "in %s are not this run's: moved to %s (not deleted; remove them when no "
                    "longer needed)",
                    checkpoints.manager.root,
                    aside,
                )
            moved = await asyncio.to_thread(rewind_metrics, output / "metrics.jsonl", 0)
            if moved:
                logger.warning(
                    "%s held records of an earlier %s: %d bytes moved to metrics.superseded.jsonl",
                    output / "metrics.jsonl",
                    "run (its checkpoints set aside)"
                    if aside is not None
                    else "start without a checkpoint to resume from",
                    moved,
                )
        # TensorBoard hides what earlier starts wrote from the first step this one writes:
        # the steps after the checkpoint, or all of them (metrics.jsonl lost the same records)
        first_step = self.state.iteration + 1 if resume is not None else 0
        # off the loop: a TensorBoard writer may wait up to a second for its file's name to sort
        sink = await asyncio.to_thread(
            MetricsSink, output, tensorboard=bool(runtime.tensorboard), first_step=first_step
        )
        checkpoints.metrics_path = sink.path
        checkpoints.flush_metrics = sink.sync
        sink.flush()
        # where a trainer restart without a checkpoint of this run goes back to
        start = (
            self.state.copy(),
            sampler.state_dict(),
            sink.path.stat().st_size if sink.path.is_file() else 0,
            first_step,
        )

        def restarted(restart: Any) -> None:
            if restart.model != trainer.name:  # the trainer's is written after its rewind
                self._restart_record(sink, restart)

        # `restarts` counts the whole run's: those of coordinators before this one too
        coordinator_restarts = int(os.environ.get(COORDINATOR_RESTARTS_ENV_VAR, "0") or 0)
        same_run = resume is not None or coordinator_restarts > 0
        self._restarts_before = _restarts_recorded(sink.path) if same_run else 0
        if coordinator_restarts:
            # this coordinator's own start, after at least coordinator_restarts - 1 others: a
            # coordinator killed before it wrote its record (while the models started) counts
            self._restarts_before = max(self._restarts_before, coordinator_restarts - 1) + 1
            sink.write(
                "restart",
                self.state.iteration,
                {"restarts": self._restarts_before},
                model="coordinator",
                attempt=coordinator_restarts,
                resumed_from=str(resume.path) if resume is not None else None,
            )
        for restart in system.restarts:  # while the models started
            self._restart_record(sink, restart)
        system.on_restart_event = restarted
        if resume is not None:
            sink.write(
                "resume",
                self.state.iteration,
                {"episode": self.state.episode, "step_in_episode": self.state.step_in_episode},
                checkpoint=str(resume.path),
            )
        steps_per_episode = settings.steps_per_episode
        total = (settings.num_episode - self.state.episode) * steps_per_episode
        progress = Progress(max(0, total - self.state.step_in_episode) * settings.global_batch_size)

        async def save(reason: str) -> Path:
            assert self.pipeline is not None
            # a graceful stop's checkpoint has its own time (a state saved already is not
            # written again)
            interrupts = self._interrupts
            fresh = checkpoints.newest_iteration != self.state.iteration
            timed = interrupts.timing_save() if interrupts and fresh else contextlib.nullcontext()
            # the periodic ones are committed (fsynced, hashed) while the next steps train
            periodic = reason in ("interval", "step")
            with timed:
                return await checkpoints.save(
                    self.state, reason, self.pipeline.eval_history, wait=not periodic
                )

        def new_pipeline(resumed: bool, timers: Timers | None = None) -> DPOPipeline:
            return DPOPipeline(
                settings,
                reference=reference,
                trainer=trainer,
                sampler=sampler,
                state=self.state,
                trainer_dp=dp,
                sink=sink,
                eval_size=eval_size,
                on_step=progress.update,
                checkpoint=save,
                resumed=resumed,
                timers=timers,
            )

        self.pipeline = new_pipeline(resume is not None)
        draws, sizes = self.pipeline.samples_to_draw, sampler.dataset_sizes
        if repeats_samples(sizes, draws):
            # how often: a data set smaller than one episode (a wrong file, a limit of 3) went
            # round many times an episode with no figure said; with several, some come back
            # (the smallest), not all as often: no single figure of passes
            held = ", ".join(f"{size:,}" for size in sizes)
            passes = f" ({draws / sizes[0]:,.1f} passes)" if len(sizes) == 1 else ""
            line = (
                f"the run draws {draws:,} samples from {held} in the data "
                f"set{'s' if len(sizes) > 1 else ''}{passes}: samples come back"
            )
            if self.pipeline.reference_cache.enabled:
                line += (
                    "; their reference outputs are computed once and reused "
                    "(runtime.reference_cache), what forward_step passed through from the "
                    "dataset included; set reference_cache: false if the dataset draws anew at "
                    "every visit"
                )
            logger.info("%s", line)
        if resume is not None and resume.state is not None:
            self.pipeline.eval_history = list(resume.state.eval_history)
        try:
            for _ in range(_MAX_TRAINER_RESTARTS):
                if self._interrupts is not None and self._interrupts.requested:
                    # a signal came while the run was being prepared (or restarted)
                    self.pipeline.request_stop()
                try:
                    await self.pipeline.run()
                    # inside the loop: a trainer lost while writing the run's last checkpoint
                    # heals like one lost mid-run (the steps since the last one run again)
                    if runtime.saves_checkpoints and self.state.iteration > 0:
                        await save("signal" if self.pipeline.stopped else "end")
                    break
                except ActorLostError as lost:
                    if lost.model != trainer.name:
                        raise  # a reference replica's orders are replayed by the pipeline
                    before = self.state.iteration
                    await trainer.wait_ready()  # the run's failure, if the policy says no more
                    history = self.pipeline.eval_history
                    to_checkpoint = await self._healing(
                        lambda: self._rewind(checkpoints, sink, sampler, start), *both
                    )
                    progress.rewind((before - self.state.iteration) * settings.global_batch_size)
                    timers = self.pipeline.timers
                    # back at the start of a new run, its evaluation before training runs again
                    # (its record was rewound with the rest)
                    resumed = to_checkpoint or resume is not None
                    self.pipeline = new_pipeline(resumed, timers)
                    self.pipeline.eval_history = [
                        e
                        for e in history
                        if resumed and e.get("iteration", 0) <= self.state.iteration
                    ]
                    mine = [r for r in system.restarts if r.model == trainer.name]
                    if mine:
                        self._restart_record(sink, mine[-1], redo=before - self.state.iteration)
        finally:
            system.on_restart_event = None
            for restart in system.restarts:
                # a replica still coming back when the run ended (its orders ran elsewhere)
                if not any(restart is r for r in self._recorded):
                    self._restart_record(sink, restart)
            if system.restarts or self._restarts_before:
                summary = _restarts_summary(system.restarts) if system.restarts else "none"
                if self._restarts_before:
                    summary += (
                        f" under this coordinator; {self._restarts_before} before it "
                        "(coordinator restarts included)"
                    )
                logger.info("self-healing: %s", summary)
            progress.close()
            sink.close()
        logger.info(
            "training %s: %d iterations in %.1fs; metrics in %s",
            "stopped" if self.pipeline.stopped else "done",
            self.state.iteration,
            time.time() - started,
            sink.path,
        )
        return self.state

    async def _rewind(
        self,
        checkpoints: RunCheckpoints,
        sink: MetricsSink,
        sampler: EpisodeSampler,
        start: tuple[RunState, dict[str, Any], int, int],
    ) -> bool:
        """After a trainer restart: the run goes back to the last checkpoint of this run (the
        new trainer ranks load it) or, with none, to where this run started; metrics.jsonl
        loses the records of the steps that will run again (kept in metrics.superseded.jsonl).
        Returns whether it went back to a checkpoint."""
        sink.flush()
        await checkpoints.committed()  # the newest checkpoint, if it was still being committed
        info = None
        if checkpoints.last_iteration is not None:
            info = await checkpoints.find(checkpoints.last_iteration)
        await asyncio.sleep(sink.tensorboard_wait())
        if info is not None:
            self.state = await checkpoints.restore(info, sink.path)
            sink.rewind_tensorboard(self.state.iteration + 1)
            return True
        state, sampler_state, metrics_size, first_step = start
        sampler.load_state_dict(sampler_state)
        await asyncio.to_thread(rewind_metrics, sink.path, metrics_size)
        self.state = state.copy()
        sink.rewind_tensorboard(first_step)
        logger.info(
            "no checkpoint of this run yet: training goes back to iteration %d", state.iteration
        )
        return False

    def _restart_record(self, sink: MetricsSink, restart: Any, redo: int | None = None) -> None:
        """One ``restart`` record in metrics.jsonl: ``restarts`` counts the run's so far."""
        system = self._last_system
        count = self._restarts_before + (system.num_restarts if system else 0)
        values: dict[str, Any] = {"restarts": count}
        self._recorded.append(restart)
        if restart.ready is not None:
            values["restart_seconds"] = restart.ready - restart.started
        if redo is not None:
            values["steps_repeated"] = redo
        sink.write(
            "restart",
            self.state.iteration,
            values,
            model=restart.model,
            replica=restart.replica_id,
            attempt=restart.attempt,
            reason=restart.reason,
        )


def _restarts_recorded(metrics_path: Path) -> int:
    """The largest ``restarts`` of the ``restart`` records a run wrote so far (in metrics.jsonl
    and, for the steps a rewind superseded, metrics.superseded.jsonl); 0 if none."""
    from chatlearn.engine.metrics import iter_metrics

    most = 0
    for path in (metrics_path, metrics_path.with_name("metrics.superseded.jsonl")):
        if path.is_file():
            for record in iter_metrics(path, "restart"):
                most = max(most, int(record.get("restarts", 0) or 0))
    return most


_MAX_TRAINER_RESTARTS = 1000  # bounds the healing loop; the restart policy ends it far sooner


def _restarts_summary(restarts: Sequence[Any]) -> str:
    """``3 restarts: reference replica 1 ×2, policy_trainer ×1`` (for the end of a run)."""
    counts: dict[str, int] = {}
    for restart in restarts:
        unit = (
            restart.model
            if restart.replica_id is None
            else (f"{restart.model} replica {restart.replica_id}")
        )
        counts[unit] = counts.get(unit, 0) + restart.tries
    slowest = max((r.ready - r.started for r in restarts if r.ready is not None), default=None)
    parts = ", ".join(f"{unit} ×{n}" for unit, n in counts.items())
    tail = f"; the slowest took {slowest:.1f} s" if slowest is not None else ""
    return f"{sum(counts.values())} restart(s): {parts}{tail}"


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k != "iteration"}


_RELAY = (
    "the reference's forward_step outputs reach train_step as they are, so return what "
    "train_step needs from forward_step"
)
_OWN_FLOW = (
    "DPOEngine(reference, policy_trainer) builds its environment and trainer from the two "
    "modules; pass them there"
)


def _samples(dataset: Any, method: str) -> list[Any]:
    """``dataset``'s samples as a list; a value whose iteration does not give samples (a path's
    characters, a dict's keys, a data frame's column names) is a ``TypeError`` saying what to
    pass instead."""
    kind = type(dataset).__name__
    if isinstance(dataset, str | bytes | os.PathLike):
        problem, fix = "its characters", "load the file's records first and pass them"
    elif isinstance(dataset, Mapping):
        problem, fix = "its keys", "pass a list of records, one per sample"
    elif hasattr(dataset, "columns"):  # pandas and polars data frames
        problem = "its column names"
        fix = "pass its rows as records (pandas: df.to_dict('records'), polars: df.to_dicts())"
    else:
        return list(dataset)
    raise TypeError(
        f"engine.{method}() takes the samples (a list, or any iterable of them) and was given "
        f"a {kind}, whose samples would be {problem}: {fix}"
    )


def _not_provided(method: str, instead: str) -> NotImplementedError:
    return NotImplementedError(
        f"engine.{method}() is not provided by this runtime: {instead} (docs/chatlearn-compat.md)"
    )


def _warn_small_shares(config: Any, reference: str) -> None:
    """Say when the reference's replicas times its ``generation_batch_size`` exceed
    ``sample_per_episode``: each replica's share of an episode (``sample_per_episode`` /
    replicas) then goes through ``forward_step`` in one call of fewer rows than the batch size
    says, every episode (no replica idles, nothing hangs). ChatLearn refuses such a config (its
    replicas take whole batches, so some would idle); here it runs, and was accepted silently."""
    model = config.model(reference)
    size, replicas = model.forward_chunk_size, model.num_replica
    samples = config.runtime_args.sample_per_episode
    if size is None or replicas * size <= samples:
        return
    share = samples // replicas
    logger.warning(
        "%s: runtime.sample_per_episode: %d samples an episode over the %d replicas of model "
        "%r give each %d, so its forward_step runs %d rows, not its generation_batch_size %d "
        "(ChatLearn refuses num_replica × generation_batch_size > sample_per_episode); set "
        "sample_per_episode to %d or more, or generation_batch_size to %d",
        config.where("runtime.sample_per_episode"),
        samples,
        replicas,
        reference,
        share,
        share,
        size,
        replicas * size,
        share,
    )


def _drop_last(config: Any, reference: str) -> tuple[DropLast, str]:
    """The sampler's mode and the key it comes from: ``runtime.drop_last`` when the config sets
    it, else ChatLearn's ``drop_last`` of the reference's model_args (true: "drop", false:
    "cycle"), which ChatLearn's ``BaseModule.build_dataloader`` reads from the model that builds
    the dataset."""
    runtime = config.runtime_args
    model = config.models.get(reference) if hasattr(config, "models") else None
    model_args = getattr(model, "model_args", None) or {}
    if "drop_last" not in model_args:
        return cast(DropLast, runtime.drop_last), "runtime.drop_last"
    key = f"models.{reference}.model_args.drop_last"
    value = model_args["drop_last"]
    if not isinstance(value, bool):
        raise located_error(
            config, key, f"expected true or false, got {value!r}", "write drop_last: true or false"
        )
    mode: DropLast = "drop" if value else "cycle"
    is_set = getattr(runtime, "is_set", None)  # a RuntimeConfig's; a plain section has none
    if not (callable(is_set) and is_set("drop_last")):
        return mode, key
    if runtime.drop_last != mode:
        where = getattr(config, "where", lambda _: "config")
        logger.warning(
            "%s: runtime.drop_last: %s wins over %s: %s (%s, which means %r); set one of them",
            where("runtime.drop_last"),
            runtime.drop_last,
            key,
            value,
            where(key),
            mode,
        )
    return cast(DropLast, runtime.drop_last), "runtime.drop_last"


def _settings(runtime: Any, reference_config: Any) -> PipelineSettings:
    window = runtime.pipeline_window
    micro = runtime.train_micro_batch_size
    if window is None:
        window = 2 * (runtime.train_global_batch_size // micro)
    return PipelineSettings(
        num_episode=runtime.num_episode,
        sample_per_episode=runtime.sample_per_episode,
        micro_batch_size=micro,
        global_batch_size=runtime.train_global_batch_size,
        num_training_epoch=runtime.num_training_epoch,
        training_shuffle_mode=runtime.training_shuffle_mode,
        seed=runtime.seed,
        window_micro_batches=window,
        generation_batch_size=reference_config.forward_chunk_size,
        eval_episode_interval=runtime.eval_episode_interval or 0,
        enable_eval_before_training=bool(runtime.enable_eval_before_training),
        save_episode_interval=runtime.save_episode_interval or 0,
        reference_cache_mb=runtime.max_reference_cache_mb if runtime.reference_cache else 0.0,
        save_step_interval=runtime.save_step_interval or 0,
    )
