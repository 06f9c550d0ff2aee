"""``Engine`` and ``DPOEngine``: what a ChatLearn program drives.

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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from chatlearn.actors import ActorSystem, BaseModule, ModelGroup
from chatlearn.engine.metrics import MetricsSink
from chatlearn.engine.pipeline import DPOPipeline, PipelineSettings, RunState
from chatlearn.engine.progress import Progress, setup_logging
from chatlearn.engine.replica import EVAL
from chatlearn.engine.sampler import EpisodeSampler

logger = logging.getLogger("chatlearn.engine")

REFERENCE_SERVICE = "chatlearn.engine.replica:ReferenceService"
TRAINER_SERVICE = "chatlearn.engine.replica:TrainerService"


class Engine:
    """A run's models as processes: start, call, stop (module docstring)."""

    def __init__(self, *models: BaseModule) -> None:
        if not models:
            raise ValueError("an engine needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        self.models = list(models)
        self.global_args = models[0].global_args
        self.system: ActorSystem | None = None
        self.groups: dict[str, ModelGroup] = {}
        self._services: dict[str, dict[str, str]] = {}

    def group(self, name: str) -> ModelGroup:
        """The running processes of model ``name`` (after ``start()``)."""
        if name not in self.groups:
            raise KeyError(f"model {name!r} is not running (running: {sorted(self.groups)})")
        return self.groups[name]

    async def start(self) -> None:
        """Launch every model's processes (validating the config first)."""
        if self.system is not None:
            return
        validate = getattr(self.global_args, "validate", None)
        if callable(validate):
            validate()
        self.system = ActorSystem(self.global_args)
        try:
            groups = await self.system.launch(*self.models, services=self._services)
        except BaseException:
            await self.stop()
            raise
        self.groups = {g.name: g for g in groups}

    async def stop(self) -> None:
        """Stop every process of the run (idempotent)."""
        system, self.system = self.system, None
        self.groups = {}
        if system is not None:
            await system.shutdown()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


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


class _TrainerView:
    """``engine.trainer.iteration`` as in ChatLearn: optimizer steps so far."""

    def __init__(self) -> None:
        self.iteration = 0


class DPOEngine(Engine):
    """ChatLearn's DPO engine: ``reference`` runs ``forward_step``, ``policy_trainer`` trains."""

    def __init__(self, reference: BaseModule, policy_trainer: BaseModule) -> None:
        super().__init__(reference, policy_trainer)
        self.reference = reference
        self.policy_trainer = policy_trainer
        self.trainer = _TrainerView()
        self._services = {
            reference.name: {"ref": REFERENCE_SERVICE},
            policy_trainer.name: {"train": TRAINER_SERVICE},
        }
        self._datasets: list[list[Any]] | None = None
        self._eval_dataset: list[Any] | None = None
        self.state = RunState()
        self.pipeline: DPOPipeline | None = None

    # -- data ------------------------------------------------------------------------------
    def set_dataset(self, dataset: Sequence[Any]) -> DPOEngine:
        """The training samples (raw; each reference replica turns them into a dataset)."""
        self._datasets = [list(dataset)]
        return self

    def set_multiple_datasets(self, datasets: Sequence[Sequence[Any]]) -> DPOEngine:
        """Several datasets, mixed per ``runtime.data_ratio``."""
        if not datasets:
            raise ValueError("set_multiple_datasets needs at least one dataset")
        self._datasets = [list(d) for d in datasets]
        return self

    def set_eval_dataset(self, dataset: Sequence[Any]) -> DPOEngine:
        """Held-out samples evaluated every ``eval_episode_interval`` episodes (``eval_step``)."""
        self._eval_dataset = list(dataset)
        return self

    # -- training --------------------------------------------------------------------------
    def learn(self) -> None:
        """Train to the end (blocking). Inside a running event loop use ``await learn_async()``."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("learn() called inside a running event loop; use learn_async()")
        from chatlearn.transport import run

        run(self.learn_async())

    async def learn_async(self) -> RunState:
        if self._datasets is None:
            raise ValueError("call engine.set_dataset(samples) before learn()")
        setup_logging()
        runtime = self.global_args.runtime_args
        started = time.time()
        try:
            await self.start()
            return await self._run(runtime, started)
        finally:
            await self.stop()

    async def _run(self, runtime: Any, started: float) -> RunState:
        reference = self.group(self.reference.name)
        trainer = self.group(self.policy_trainer.name)
        endpoints = await trainer.call_all("train.open_inbox")
        await reference.call_all("ref.connect", endpoints)
        sizes = (await reference.call_all("ref.build_datasets", self._datasets))[0]
        eval_size = 0
        if self._eval_dataset:
            eval_size = (await reference.call_all("ref.build_datasets", [self._eval_dataset], EVAL))[0][0]
        dp = [tuple(x) for x in await trainer.call_all("train.data_parallel")]
        if self.state.consumed_samples == 0 and runtime.consumed_samples:
            self.state.consumed_samples = int(runtime.consumed_samples)
        sampler = EpisodeSampler(
            sizes,
            runtime.sample_per_episode,
            shuffle=runtime.data_shuffle,
            data_ratio=runtime.resolve_data_ratio(len(sizes)) if len(sizes) > 1 else None,
            drop_last=runtime.drop_last,
            consumed_samples=self.state.consumed_samples,
        )
        settings = _settings(runtime, self.global_args.model(self.reference.name))
        self.state.episode = self.state.consumed_samples // settings.sample_per_episode
        self.state.iteration = self.state.episode * _steps_per_episode(settings)
        output = Path(runtime.output_path)
        sink = MetricsSink(output, tensorboard=bool(runtime.tensorboard))
        total = (settings.num_episode - self.state.episode) * _steps_per_episode(settings)
        progress = Progress(total * settings.global_batch_size)
        self.pipeline = DPOPipeline(
            settings,
            reference=reference,
            trainer=trainer,
            sampler=sampler,
            state=self.state,
            trainer_dp=dp,  # type: ignore[arg-type]
            sink=sink,
            eval_size=eval_size,
            on_step=progress.update,
        )
        try:
            await self.pipeline.run()
        finally:
            progress.close()
            sink.close()
            self.trainer.iteration = self.state.iteration
        logger.info(
            "training done: %d iterations in %.1fs; metrics in %s",
            self.state.iteration,
            time.time() - started,
            sink.path,
        )
        return self.state


def _steps_per_episode(settings: PipelineSettings) -> int:
    per_pass = -(-settings.sample_per_episode // settings.global_batch_size)
    return per_pass * settings.num_training_epoch


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
    )
