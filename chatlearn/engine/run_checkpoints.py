"""The coordinator's side of checkpoints during one ``learn()``: save, find, restore.

Runs in the coordinator; the trainer ranks' side is ``TrainerService`` (``worker_services.py``).

``DPOEngine`` builds one :class:`RunCheckpoints` per run, once the models are up and the datasets
are built. To save, it asks every trainer rank to run its module's ``save_checkpoint`` into a
staging directory (``protocol.SaveCheckpoint``), then writes the coordinator's state beside it and
commits the directory atomically (``checkpoint.CheckpointManager.commit``), then checks that the
disk has room for the checkpoints still to come (``_check_room``). To resume, it picks
the checkpoint (the newest complete one, or ``load_data_checkpoint_iteration``), checks that the
data settings did not change (the sampler refuses otherwise; other rows of the same number are
warned about, by the datasets' fingerprints) and warns about changed training settings (refused
for a checkpoint in the middle of an episode whose steps they change) and model arguments
(refused for the trainer's architecture), has every trainer rank load its part
(``protocol.LoadCheckpoint``) and every reference replica set ``resume_training``, and only then
rewinds ``metrics.jsonl`` to the checkpoint and moves newer checkpoints aside (a resume that
fails leaves both as they were).

The state saved is the run's ``RunState`` between two steps (``state.py``), recorded as a
``checkpoint.CoordinatorState`` and restored into a ``RunState``. The sampler's own position is
ahead of it (the reference runs ahead), so the sampler state is written with the state's
``consumed_samples``, which rebuilds the sampler at the episode in progress.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from chatlearn.actors.errors import ActorError
from chatlearn.config.errors import (
    ConfigError,
    StorageError,
    disk_usage,
    located_error,
    one_line,
    split_fix,
    storage_error,
)
from chatlearn.engine.checkpoint import (
    CheckpointInfo,
    CheckpointManager,
    CoordinatorState,
    checkpoint_bytes,
    describe_changes,
    rewind_metrics,
    room_for_checkpoints,
)
from chatlearn.engine.counters import reference_iteration
from chatlearn.engine.pipeline import PipelineSettings
from chatlearn.engine.protocol import ReferenceGroup, TrainerGroup
from chatlearn.engine.sampler import DataSettingsChanged, Episode, EpisodeSampler, SampleIndex
from chatlearn.engine.schedule import EpisodeLayout
from chatlearn.engine.state import RunState, first_and_last
from chatlearn.engine.training_plan import plan_episode

logger = logging.getLogger("chatlearn.engine")


def training_settings(
    settings: PipelineSettings, trainer_dp: list[tuple[int, int]], reference_replicas: int
) -> dict:
    """The settings that decide which samples every step trains on, and in which order."""
    return {
        # an episode's samples reach the trainer in an order made of the replicas' shares
        "reference_replicas": reference_replicas,
        "sample_per_episode": settings.sample_per_episode,
        "train_micro_batch_size": settings.micro_batch_size,
        "train_global_batch_size": settings.global_batch_size,
        "num_training_epoch": settings.num_training_epoch,
        "training_shuffle_mode": settings.training_shuffle_mode,
        "seed": settings.seed,  # the training-pass shuffles are seeded from it
        "generation_batch_size": settings.generation_batch_size,
        "data_parallel_size": trainer_dp[0][1] if trainer_dp else 1,
        # the length of the run: a learning-rate schedule over all steps is built from it
        "num_episode": settings.num_episode,
    }


class RunCheckpoints:
    """Saves and restores one run's checkpoints (module docstring)."""

    def __init__(
        self,
        manager: CheckpointManager,
        *,
        reference: ReferenceGroup,
        trainer: TrainerGroup,
        sampler: EpisodeSampler,
        settings: PipelineSettings,
        trainer_dp: list[tuple[int, int]],
        config: Any,
    ) -> None:
        self.manager = manager
        self.reference = reference
        self.trainer = trainer
        self.sampler = sampler
        self.settings = settings
        self.trainer_dp = trainer_dp
        self.config = config
        self.metrics_path: Path | None = None
        self.flush_metrics: Callable[[], None] | None = None  # the sink's, before its size is read
        self.last: Path | None = None  # the newest complete checkpoint of this run
        self.last_iteration: int | None = None
        self.on_saved: Callable[[RunState], None] | None = None  # after each checkpoint
        # the iteration the run was started from explicitly (CoordinatorState.started_from)
        self.started_from: int | None = None
        self._lock = asyncio.Lock()
        # the checkpoint being committed in the background (`save(wait=False)`): its iteration
        self._pending: tuple[int, asyncio.Future[Path]] | None = None
        self.on_commit_failed: Callable[[BaseException], None] | None = None  # stops the run
        self._room_said = False  # `_check_room`'s warning, once a run

    # -- saving ---------------------------------------------------------------------------
    async def save(
        self,
        state: RunState,
        reason: str,
        eval_history: list[dict[str, Any]] | None = None,
        *,
        wait: bool = True,
    ) -> Path:
        """Checkpoint ``state`` (trainer ranks, then the coordinator); returns the directory.

        Returns once the trainer ranks wrote their part; with ``wait`` (the default) also once
        the checkpoint is committed (every file fsynced and hashed into the manifest, the
        directory renamed: ``CheckpointManager.commit``). Without it the commit goes on in the
        background while training continues (fsyncing and hashing a 7B DDP checkpoint's 84 GB
        takes a minute or two on one thread): `committed` waits for it; the next save, a
        trainer's restart (`DPOEngine._rewind`) and the run's end do. A commit that fails stops
        the run (``on_commit_failed``) with the storage error; the previous checkpoint stays
        the one to resume from. A state already saved (same iteration) is not written again.
        """
        async with self._lock:
            pending = self._pending
            if pending is not None and pending[0] == state.iteration:
                if not wait:
                    return self.manager.path(state.iteration)
                return await asyncio.shield(pending[1])
            await self.committed()  # checkpoints are committed in order
            if self.last is not None and self.last_iteration == state.iteration:
                return self.last
            started = time.time()
            try:
                staging = await asyncio.to_thread(self.manager.begin, state.iteration)
            except OSError as exc:
                self._raise_storage_error(exc, self.manager.root, state.iteration)
            try:
                extra = await self.trainer.save_checkpoint(str(staging), state.iteration, reason)
            except BaseException as exc:  # a trainer lost while saving (self-healing goes on)
                await asyncio.to_thread(shutil.rmtree, staging, True)
                if isinstance(exc, ActorError) and exc.type_name.endswith("StorageError"):
                    head, _ = split_fix(exc.message)  # the coordinator knows the fix better
                    self._raise_storage_error(exc, staging, state.iteration, head)
                raise
            try:
                coordinator = self.coordinator_state(state, reason, eval_history or [])
            except OSError as exc:
                await asyncio.to_thread(shutil.rmtree, staging, True)
                self._raise_storage_error(exc, self.metrics_path or staging, state.iteration)
            # the run's state goes on changing while the commit runs: what it saved, as it was
            commit = asyncio.ensure_future(
                self._commit(staging, coordinator, state.copy(), reason, started, extra)
            )
            self._pending = (state.iteration, commit)
            commit.add_done_callback(self._commit_done)
        if not wait:
            return self.manager.path(state.iteration)
        return await asyncio.shield(commit)  # a cancelled caller leaves the commit going

    @property
    def newest_iteration(self) -> int | None:
        """The iteration of the newest checkpoint written: committed, or being committed."""
        return self._pending[0] if self._pending is not None else self.last_iteration

    @property
    def committing(self) -> int | None:
        """The iteration of the checkpoint being committed now (not one whose commit ended)."""
        pending = self._pending
        return pending[0] if pending is not None and not pending[1].done() else None

    async def committed(self) -> Path | None:
        """Wait for the checkpoint being committed in the background, if any (its error
        raises); its directory, or None when none was."""
        pending = self._pending
        if pending is None:
            return None
        return await asyncio.shield(pending[1])

    async def _commit(
        self, staging: Path, coordinator: CoordinatorState, state: RunState, reason: str,
        started: float, final_extra: int = 0,
    ) -> Path:  # fmt: skip
        try:
            path = await asyncio.to_thread(self.manager.commit, staging, coordinator)
        except OSError as exc:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            where = getattr(exc, "filename", None) or staging
            self._raise_storage_error(exc, where, state.iteration)
        self.last, self.last_iteration = path, state.iteration
        if not self._room_said:
            await asyncio.to_thread(self._check_room, path, state, final_extra)
        if self.on_saved is not None:
            self.on_saved(state)
        where = (
            f"episode {state.episode + 1} step {state.step_in_episode}"
            if state.step_in_episode
            else f"end of episode {state.episode}"
        )
        logger.info(
            "checkpoint of iteration %d (%s, %s) saved in %.1fs: %s",
            state.iteration,
            where,
            reason,
            time.time() - started,
            path,
        )
        return path

    def _check_room(self, path: Path, state: RunState, final_extra: int = 0) -> None:
        """After a commit: whether the checkpoint root's file system has room for the
        checkpoints the run will still write, said once as a warning where it has not (a run
        of days learns at its first checkpoint, not when the disk fills at its tenth and the
        run stops). ``final_extra``: what the run's last checkpoint writes beyond this one
        (the trainer's export for inference, e.g. a LoRA model's merged weights)."""
        size = checkpoint_bytes(path)
        usage = disk_usage(path)
        if usage is None or size <= 0:
            return
        held = sum(1 for info in self.manager.scan() if info.complete)
        keep = self.manager.keep_last
        saves = self.settings.saves_after(state.iteration)
        room = room_for_checkpoints(
            size, usage.free, held=held, keep_last=keep, saves=saves, final_extra=final_extra
        )
        if room >= saves:
            return
        self._room_said = True
        kept = f"the newest {keep}" if keep > 0 else "every one"
        end = (
            f" (the last one {(size + final_extra) / 2**30:.3g} GiB, with the trainer's export "
            "for inference)"
            if final_extra > 0
            else ""
        )
        last = f"checkpoint {room + 1} from now" + (
            " (the run's last)" if room + 1 == saves else ""
        )
        logger.warning(
            "checkpoints of this run take %.3g GiB each%s and %s has %.3g GiB free: room for %d "
            "more, where the run writes %d more and keeps %s (runtime.save_keep_last): "
            "%s would stop the run with a full disk. Free space there, keep fewer "
            "(runtime.save_keep_last) or save less often (runtime.save_episode_interval, "
            "save_step_interval)",
            size / 2**30,
            end,
            self.manager.root,
            usage.free / 2**30,
            room,
            saves,
            kept,
            last,
        )

    def _commit_done(self, commit: asyncio.Future[Path]) -> None:
        """A commit ended: no longer pending, unless it failed (then `committed` raises its
        error), which stops the run."""
        failure = None if commit.cancelled() else commit.exception()  # retrieved here
        if failure is None:
            if self._pending is not None and self._pending[1] is commit:
                self._pending = None
        elif self.on_commit_failed is not None:
            self.on_commit_failed(failure)

    def _layout_changes(self, saved: CoordinatorState, current: dict[str, Any]) -> list[str]:
        """How the trainer's processes and sharding differ from those of the checkpoint."""
        changes = []
        ranks = (saved.trainer or {}).get("num_ranks")
        if ranks is not None and ranks != len(self.trainer):
            changes.append(f"{ranks} process(es) then, {len(self.trainer)} now")
        name = self.trainer.name
        saved_model, current_model = (
            (config.get("models") or {}).get(name) or {} for config in (saved.config, current)
        )
        before, after = (model.get("model_args") or {} for model in (saved_model, current_model))
        for key in _LAYOUT_KEYS:
            if before.get(key) != after.get(key):
                changes.append(
                    f"models.{name}.model_args.{key}: saved {before.get(key)!r}, "
                    f"now {after.get(key)!r}"
                )
        if saved_model.get("lora") != current_model.get("lora"):  # ChatLearn's LoRA section
            changes.append(
                f"models.{name}.lora: saved {saved_model.get('lora')!r}, "
                f"now {current_model.get('lora')!r}"
            )
        return changes

    def _check_episode_plan(self, info: CheckpointInfo, saved: CoordinatorState) -> None:
        """Refuse a mid-episode checkpoint whose trained steps are not the first steps of this
        run's plan of the episode: continuing after them would skip or repeat samples.

        The pipeline resumes after ``step_in_episode`` steps of the plan it builds now; that is
        exact when those steps train the samples the checkpoint's steps trained, in that order
        (e.g. after a change of ``num_training_epoch`` or the shuffle within the first pass)."""
        now = training_settings(self.settings, self.trainer_dp, len(self.reference.replicas))
        then = {key: saved.training.get(key, now[key]) for key in now}
        changed = [key for key in _PLAN_KEYS if then[key] != now[key]]
        if not changed:
            return
        episode = copy.deepcopy(self.sampler).next_episode()  # the one in progress
        steps = saved.step_in_episode
        if _first_steps(episode, then, steps) == _first_steps(episode, now, steps):
            return
        key = changed[0]
        values = ", ".join(f"{k} {then[k]!r} (now {now[k]!r})" for k in changed)
        raise self._error(
            f"models.{self.trainer.name}" if key == "data_parallel_size" else f"runtime.{key}",
            f"the checkpoint {info.path.name} is in the middle of episode {saved.episode + 1} "
            f"(after its step {steps}), written with {values}: this run's steps of that episode "
            f"differ, so continuing after its first {steps} would leave some of the episode's "
            "samples untrained and train others twice",
            f"resume with {', '.join(f'{k}: {then[k]!r}' for k in changed)} (change it at an "
            "episode's end), or from a checkpoint at an episode's end "
            "(runtime.load_data_checkpoint_iteration)",
        )

    def _error(self, key: str, problem: str, fix: str) -> ConfigError:
        return located_error(self.config, key, problem, fix)

    def _raise_storage_error(
        self, exc: BaseException, where: str | Path, iteration: int, said: str | None = None
    ) -> NoReturn:
        """A save that failed for want of storage as one line: where, why (``said``: the
        trainer's words), and the checkpoint a rerun resumes from; ``exc`` as it is when the
        storage is not the cause."""
        resumes = f"it resumes from {self.last.name}" if self.last is not None else "it starts over"
        then = (
            " (or set runtime.data_checkpoint_path to another file system) and run the same "
            f"command again: {resumes}"
        )
        if said is None:
            what = f"writing the checkpoint of iteration {iteration}"
            error = storage_error(exc, where, what, then=then)
            if error is None:
                raise exc
            raise error from exc
        # the trainer named the staging directory, gone now: the checkpoints' root instead
        problem = said.partition(": ")[2] if said.startswith(str(where)) else said
        raise StorageError(
            f"{problem}; the checkpoint was not written and the run stopped",
            where=str(self.manager.root),
            fix=f"free space there{then}",
        ) from exc

    def coordinator_state(
        self, state: RunState, reason: str, eval_history: list[dict[str, Any]]
    ) -> CoordinatorState:
        sampler = self.sampler.state_dict()
        sampler["consumed_samples"] = state.consumed_samples  # not the sampler's (it is ahead)
        metrics: dict[str, Any] = {}
        if self.flush_metrics is not None:
            self.flush_metrics()  # the checkpoint records how far metrics.jsonl goes
        if self.metrics_path is not None and self.metrics_path.is_file():
            size = self.metrics_path.stat().st_size
            metrics = {"path": str(self.metrics_path.resolve()), "size": size}
        return CoordinatorState.of(
            state,
            sampler=sampler,
            training=training_settings(
                self.settings, self.trainer_dp, len(self.reference.replicas)
            ),
            trainer={
                "model": self.trainer.name,
                "num_ranks": len(self.trainer),
                "data_parallel": [list(x) for x in self.trainer_dp],
            },
            reason=reason,
            metrics=metrics,
            eval_history=first_and_last(eval_history),
            config=_plain_config(self.config),
            started_from=self.started_from,
        )

    # -- resuming -------------------------------------------------------------------------
    async def find(self, iteration: int | None, *, start: bool = False) -> CheckpointInfo | None:
        """The checkpoint to resume from (verifying hashes off the event loop), or None;
        ``start``: ``iteration`` is the run's ``load_data_checkpoint_iteration``, whose
        continuation is taken when there is one (`find_checkpoint`)."""
        return await find_checkpoint(self.manager, iteration, self.config, start=start)

    async def restore(self, info: CheckpointInfo, metrics_path: Path) -> RunState:
        """Continue from ``info``: sampler, modules, metrics file; returns the run state."""
        saved = info.state
        assert saved is not None, "only complete checkpoints are restored"
        replicas = len(self.reference.replicas)
        refuse_before_start(
            info,
            self.config,
            reference=self.reference.name,
            replicas=replicas,
            trainer=self.trainer.name,
        )
        changed = describe_changes(
            saved.training, training_settings(self.settings, self.trainer_dp, replicas)
        )
        # as the checkpoint wrote it (coordinator.json): lists for tuples, str for the rest
        current = json.loads(json.dumps(_plain_config(self.config), default=str))
        try:
            self.sampler.load_state_dict(saved.sampler)  # raises if the data settings changed
        except DataSettingsChanged as exc:
            raise self._error(
                _SAMPLER_KEYS.get(exc.changed[0], "runtime.data_path"),
                f"the checkpoint {info.path} was written with other data settings "
                f"({exc.details}): the samples of every later step would differ",
                "restore those settings, or train a new run in another output_dir (or with "
                "enable_resume_training: false)",
            ) from None
        if saved.step_in_episode:
            self._check_episode_plan(info, saved)
        # refused by nothing above: what changed is said
        if changed:
            logger.warning(
                "resuming from %s with changed training settings, so the run will not repeat "
                "an uninterrupted one exactly: %s",
                info.path,
                "; ".join(changed),
            )
        args_changed = model_args_changes(saved.config, current)
        if args_changed:
            logger.warning(
                "resuming from %s with changed model arguments: %s; the weights, optimizer "
                "moments and schedule position are the checkpoint's, the new values apply from "
                "here on (e.g. beta; the HF trainer's learning rate, weight decay and betas too)",
                info.path,
                "; ".join(args_changed),
            )
        other = self.sampler.other_rows(saved.sampler)
        if other:
            logger.warning(
                "resuming from %s with other data than it was trained on (runtime.data_path: "
                "the rows of %s differ, their number is the same): the later steps train these "
                "rows, at the positions the run's sampler reached; restore the data if that is "
                "not meant",
                info.path,
                "the dataset" if len(self.sampler.dataset_sizes) == 1 else f"dataset(s) {other}",
            )
        try:
            await self.trainer.load_checkpoint(str(info.path), saved.iteration, saved.episode)
        except ActorError as exc:
            layout = self._layout_changes(saved, current)
            if not layout:
                mine = [c for c in args_changed if c.startswith(f"models.{self.trainer.name}.")]
                if not mine:
                    raise  # the module's own failure
                raise self._error(
                    mine[0].split(":", 1)[0],
                    f"the checkpoint {info.path.name} was written with other model arguments "
                    f"({'; '.join(mine)}) and this trainer cannot load it: "
                    f"{one_line(exc.message).splitlines()[0][:300]}",
                    "resume with the saved values, or start a new run (another output_dir, or "
                    "enable_resume_training: false)",
                ) from None
            raise self._error(
                f"models.{self.trainer.name}",
                f"the checkpoint {info.path.name} was written by another trainer layout "
                f"({'; '.join(layout)}) and this one cannot load it: "
                f"{one_line(exc.message).splitlines()[0][:300]}",
                "resume with the layout it was written with, or start a new run (another "
                "output_dir, or enable_resume_training: false)",
            ) from None
        forward_calls = reference_iteration(
            saved.episode,
            self.settings.sample_per_episode,
            len(self.reference.replicas),
            self.settings.generation_batch_size,
        )
        await self.reference.resume(saved.episode, forward_calls)
        # only now that every model holds the checkpoint: a resume that failed before left the
        # run's newer checkpoints and its metrics as they were, for a corrected rerun
        aside = await asyncio.to_thread(self.manager.set_aside_newer, saved.iteration)
        if aside is not None:
            logger.warning(
                "resuming from %s, older than the run's newest checkpoints: those are the "
                "steps this run replaces, moved to %s (not deleted; remove them when no longer "
                "needed)",
                info.path.name,
                aside,
            )
        previous = saved.metrics.get("path")
        if previous and "size" in saved.metrics and _same_metrics(previous, metrics_path, info):
            moved = await asyncio.to_thread(
                rewind_metrics, metrics_path, int(saved.metrics["size"])
            )
            if moved:
                logger.info(
                    "metrics.jsonl rewound to the checkpoint; %d bytes of later records moved "
                    "to metrics.superseded.jsonl",
                    moved,
                )
        rewind = info.path == self.last  # a trainer restart back to this run's checkpoint
        self.last, self.last_iteration = info.path, saved.iteration
        self.started_from = started_from(
            info.requested, saved.started_from, self.started_from, rewind=rewind
        )
        logger.info(
            "resuming from %s: iteration %d, consumed_samples %d; continuing %s",
            info.path,
            saved.iteration,
            saved.consumed_samples,
            f"episode {saved.episode + 1} after its step {saved.step_in_episode}"
            if saved.step_in_episode
            else f"with episode {saved.episode + 1}"
            if saved.episode < self.settings.num_episode
            else "with nothing: every episode is trained",
        )
        return saved.copy()


def refuse_before_start(
    info: CheckpointInfo, config: Any, *, reference: str, replicas: int, trainer: str
) -> None:
    """The refusals of a resume from ``info`` that the config and the checkpoint decide alone,
    as a `ConfigError`: a checkpoint in the middle of an episode written with another number of
    reference replicas, and a trainer of another model architecture. `DPOEngine` checks them
    before the models start (a resume that cannot be stops at once, not once every model has
    started and loaded its weights), and `RunCheckpoints.restore` again."""
    saved = info.state
    if saved is None:
        return
    saved_replicas = saved.training.get("reference_replicas", replicas)
    if saved.step_in_episode and saved_replicas != replicas:
        raise located_error(
            config,
            f"models.{reference}",
            f"the checkpoint {info.path.name} is in the middle of episode "
            f"{saved.episode + 1} (after its step {saved.step_in_episode}), written with "
            f"{saved_replicas} reference replica(s); this run has {replicas}, and the "
            "order of an episode's samples depends on their number: its remaining steps "
            "would train other samples than the interrupted run's",
            f"resume with {saved_replicas} replica(s) (change it at an episode's end), or "
            "from a checkpoint at an episode's end (runtime.load_data_checkpoint_iteration)",
        )
    # as the checkpoint wrote it (coordinator.json): lists for tuples, str for the rest
    current = json.loads(json.dumps(_plain_config(config), default=str))
    architecture = architecture_changes(saved.config, current, trainer)
    if architecture:  # checked before loading: the load would fail, or load nonsense
        values = "; ".join(f"{key}: saved {a!r}, now {b!r}" for key, a, b in architecture)
        saved_values = ", ".join(f"{key.split('.', 3)[3]}: {a!r}" for key, a, _ in architecture)
        raise located_error(
            config,
            architecture[0][0],
            f"the checkpoint {info.path.name} was written for another model architecture "
            f"({values}): its weights do not fit this model",
            f"resume with {saved_values}, or start a new run (another output_dir, or "
            "enable_resume_training: false)",
        )


async def find_checkpoint(
    manager: CheckpointManager, iteration: int | None, config: Any, *, start: bool = True
) -> CheckpointInfo | None:
    """The checkpoint a run resumes from: ``iteration``'s, or the newest complete one
    (verifying hashes off the event loop); None when there is none. A missing or broken
    ``iteration`` is a `ConfigError` naming ``runtime.load_data_checkpoint_iteration``.

    At a ``start`` (``iteration`` is ``load_data_checkpoint_iteration``), a run that was
    started from that iteration before and has checkpoints since is continued from its newest
    one: a rerun with the same config, or a coordinator that ``chatlearn launch`` restarted, goes
    on with the run that iteration began instead of beginning it again (and setting the steps it
    trained aside)."""
    if start and iteration is not None:
        newer = await asyncio.to_thread(_continuation, manager, iteration)
        if newer is not None:
            logger.warning(
                "runtime.load_data_checkpoint_iteration is %d, and the run started from it has "
                "checkpoints since: resuming from its newest, %s (to begin again from %d, move "
                "them out of %s)",
                iteration,
                newer.path.name,
                iteration,
                manager.root,
            )
            newer.requested = iteration
            return newer
    try:
        info = await asyncio.to_thread(manager.find_resume, iteration)
    except ValueError as exc:  # the iteration asked for is missing or broken
        if iteration is None:
            raise
        raise located_error(
            config,
            "runtime.load_data_checkpoint_iteration",
            str(exc),
            "set it to the iteration of a complete checkpoint (chatlearn inspect lists them)",
        ) from None
    if info is None and manager.scan():
        logger.warning(
            "no complete checkpoint in %s: training starts from the beginning", manager.root
        )
    if info is not None and start:
        info.requested = iteration
    return info


def started_from(
    requested: int | None, saved: int | None, current: int | None, *, rewind: bool
) -> int | None:
    """The iteration a run restored from a checkpoint records as the one it started from:
    the one a start asked for (``requested``), else the checkpoint's (``saved``); but a trainer
    restart going back (``rewind``) to the checkpoint an explicit start began from, written
    before that start recorded anything, keeps the run's (``current``): its later checkpoints
    would lose their lineage, and the next start would begin that run again."""
    if requested is not None:
        return requested
    if rewind and saved is None:
        return current
    return saved


def _continuation(manager: CheckpointManager, iteration: int) -> CheckpointInfo | None:
    """The newest complete checkpoint of a run started from ``iteration`` explicitly, newer
    than it (hashes verified; a broken one is skipped with a warning), or None. Checkpoints
    written before runs recorded where they started never qualify."""

    def same_run(candidate: CheckpointInfo) -> bool:  # unreadable state: skipped below
        state = candidate.state
        return candidate.iteration > iteration and (
            state is None or state.started_from == iteration
        )

    # newest first, up to a checkpoint of another start: an older branch of this iteration
    # under a newer run is not the run to continue
    newer = itertools.takewhile(same_run, reversed(manager.scan()))
    return manager.first_verified(c for c in newer if c.state is not None)


# the training settings that decide an episode's steps (training_plan.plan_episode) and the
# sample at each buffer position (schedule.EpisodeLayout)
_PLAN_KEYS = (
    "train_global_batch_size",
    "train_micro_batch_size",
    "num_training_epoch",
    "training_shuffle_mode",
    "seed",
    "data_parallel_size",
    "generation_batch_size",
    "reference_replicas",
)


def _first_steps(
    episode: Episode, training: dict[str, Any], steps: int
) -> list[tuple[SampleIndex, ...]]:
    """The samples of the episode's first ``steps`` optimizer steps under ``training`` (a
    `training_settings` dict), each step's in rank order."""
    layout = EpisodeLayout(
        episode, training["reference_replicas"], training["generation_batch_size"]
    )
    sample = {
        position: index
        for chunks in layout.chunks
        for chunk in chunks
        for position, index in zip(chunk.positions, chunk.indices, strict=True)
    }
    plan = plan_episode(
        layout.num_samples,
        train_micro_batch_size=training["train_micro_batch_size"],
        train_global_batch_size=training["train_global_batch_size"],
        data_parallel_size=training["data_parallel_size"],
        num_training_epoch=training["num_training_epoch"],
        training_shuffle_mode=training["training_shuffle_mode"],
        seed=training["seed"],
        episode_id=episode.episode_id,
    )
    return [tuple(sample[p] for p in step.global_batch()) for step in plan.steps[:steps]]


# model arguments that decide how a trainer's checkpoint is laid out (chatlearn.hf)
_LAYOUT_KEYS = ("parallel", "lora", "enable_lora")

# the config key behind each data setting a sampler checkpoint records
_SAMPLER_KEYS = {
    "dataset_sizes": "runtime.data_path",
    "sample_per_episode": "runtime.sample_per_episode",
    "shuffle": "runtime.data_shuffle",
    "seed": "runtime.seed",
    "data_ratio": "runtime.data_ratio",
    "drop_last": "runtime.drop_last",
}


def model_args_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``models.NAME.model_args.KEY: saved a, now b`` for every model argument (nested ones by
    their dotted path) that a saved config and the current one set differently."""
    return [f"{key}: saved {a!r}, now {b!r}" for key, a, b in _model_args_diff(saved, current)]


def architecture_changes(
    saved: dict[str, Any], current: dict[str, Any], model: str
) -> list[tuple[str, Any, Any]]:
    """(key, saved, now) of each of ``model``'s arguments that decide its parameters (their
    names and shapes) and that the two configs set differently: the shape settings of a Hugging
    Face ``model_config`` or of Megatron's arguments (``_ARCHITECTURE_KEYS``), at any depth. A
    changed ``model_path`` is not one (a moved directory, another mount, a local snapshot of a
    hub id): a checkpoint that then does not load is said as a changed model argument."""
    prefix = f"models.{model}.model_args."
    return [
        (key, a, b)
        for key, a, b in _model_args_diff(saved, current)
        if key.startswith(prefix) and key.rsplit(".", 1)[-1] in _ARCHITECTURE_KEYS
    ]


# model arguments that decide a model's parameters: Hugging Face config names (Llama's, GPT-2's)
# and Megatron-LM's (chatlearn/megatron/args.py)
_ARCHITECTURE_KEYS = frozenset(
    (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
        "n_embd",
        "n_layer",
        "n_head",
        "n_inner",
        "n_positions",
        "num_layers",
        "ffn_hidden_size",
        "kv_channels",
        "num_query_groups",
        "group_query_attention",
        "num_experts",
        "swiglu",
        "add_bias_linear",
        "add_qkv_bias",
        "untie_embeddings_and_output_weights",
        "position_embedding_type",
    )
)


def _model_args_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved, now) of every model argument the two configs set differently."""

    def flat(values: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(values, dict):
            return {prefix: values}
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(flat(value, f"{prefix}.{key}"))
        return out

    changes = []
    for name, model in (saved.get("models") or {}).items():
        now = (current.get("models") or {}).get(name)
        if not isinstance(model, dict) or not isinstance(now, dict):
            continue
        prefix = f"models.{name}.model_args"
        before = flat(model.get("model_args") or {}, prefix)
        after = flat(now.get("model_args") or {}, prefix)
        for key in sorted(before.keys() | after.keys()):
            if before.get(key) != after.get(key):
                changes.append((key, before.get(key), after.get(key)))
    return changes


def _plain_config(config: Any) -> dict[str, Any]:
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else {}


def _same_metrics(previous: str, metrics_path: Path, info: CheckpointInfo) -> bool:
    """Whether ``metrics_path`` is the metrics file the checkpoint ``info`` recorded as
    ``previous``: the same file however it is spelled (relative to another working directory,
    absolute, through a link), or the one of the output directory that holds the checkpoint (a
    run directory copied or moved elsewhere). Another run's file is never cut back."""
    here = metrics_path.resolve()
    if Path(previous).resolve() == here:
        return True
    return info.path.resolve().is_relative_to(here.parent)
