"""Checkpoints of a run on disk: layout, atomic commit, verification, retention, and resume.

Runs in the coordinator (and in ``chatlearn inspect``); the trainer ranks only write into the
directory they are given (``chatlearn.actors.checkpoint_paths`` names it for both sides).

One checkpoint is one directory under the *checkpoint root* (``runtime.data_checkpoint_path``, or
``output_dir/exp_name/checkpoints`` when that is not set)::

    <root>/iter_0000008/               the checkpoint of trainer iteration 8
        coordinator.json               the coordinator's state (CoordinatorState)
        policy_trainer/rank_0/...      what each trainer rank's save_checkpoint wrote
        MANIFEST.json                  written last: every file with its size and sha256
    <root>/.staging-iter_0000012-PID/  a checkpoint being written (never resumed from)
    <root>/../hf/iter_0000008/         not a checkpoint: `chatlearn export`'s HF directory

A checkpoint is written in a staging directory, every file is fsynced, the manifest goes in last,
and only then is the directory renamed to its final name (and the root fsynced). A directory named
``iter_*`` therefore always held a manifest when it appeared; a checkpoint whose files no longer
match it (truncated, edited, missing) is *broken*: resume warns naming it and takes the previous
complete one. Staging directories of dead processes are removed at the next save.

The coordinator's state is the run's state (``state.RunState``: its counters at a point between
two optimizer steps, and the recent steps' metrics) extended with what resuming also needs: the
sampler's state, the settings that shape the steps, the trainer's layout, the evaluations, the
size of metrics.jsonl, the iteration the run was explicitly started from. ``coordinator.json``
holds its fields as top-level keys.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from chatlearn.actors.checkpoint_paths import (
    COORDINATOR,
    FORMAT,
    MANIFEST,
    check_manifest,
    checkpoint_iteration,
    checkpoint_name,
    export_dir,
    file_sha256,
    pid_alive,
)
from chatlearn.engine.state import RunState

logger = logging.getLogger("chatlearn.engine")

VERSION = 1
_STAGING_PREFIX = ".staging-"


@dataclass(slots=True, kw_only=True)
class CoordinatorState(RunState):
    """What the coordinator needs to continue a run exactly (``coordinator.json``): the run's
    state (its counters and recent metrics, declared by ``RunState``) and the checkpoint's
    context. Written by :meth:`of`; ``copy()`` gives the live ``RunState`` back."""

    sampler: dict[str, Any]
    training: dict[str, Any]  # the settings that shape the steps (batch sizes, seed, ...)
    trainer: dict[str, Any]  # model name, ranks, data-parallel layout
    reason: str = "interval"  # interval, end, signal, request
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.jsonl path and its size
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    # the checkpoint iteration the run was started from by runtime.load_data_checkpoint_iteration
    # (None: from the beginning, or the newest checkpoint): a later start asking for the same
    # iteration continues this run (run_checkpoints.find_checkpoint)
    started_from: int | None = None
    created: float = field(default_factory=time.time)
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def of(cls, run: RunState, **context: Any) -> CoordinatorState:
        """The record of ``run`` (a copy of its counters and history) with ``context`` (the
        fields this class adds)."""
        live = run.copy()
        return cls(**{f.name: getattr(live, f.name) for f in fields(RunState)}, **context)

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["history"] = list(self.history)
        return json.dumps(data, indent=1, default=str, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> CoordinatorState:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a chatlearn coordinator state")
        if data.get("version") != VERSION:
            raise ValueError(f"unsupported coordinator state version {data.get('version')!r}")
        counters = [f.name for f in fields(RunState) if f.type in ("int", int)]
        missing = [name for name in counters if not isinstance(data.get(name), int)]
        if missing:
            raise ValueError(f"{', '.join(missing)}: missing or not an integer")
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if not state.first_step and state.history:  # written before first_step was kept
            state.first_step = state.history[0]
        return state


@dataclass(slots=True)
class CheckpointInfo:
    """One checkpoint directory as found on disk."""

    path: Path
    iteration: int
    status: str  # complete, broken
    problem: str = ""
    state: CoordinatorState | None = None
    # the runtime.load_data_checkpoint_iteration that led to it (None: the newest was taken)
    requested: int | None = None

    @property
    def complete(self) -> bool:
        return self.status == "complete"


# -- durable writes --------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """Flush a file's or directory's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


# -- the manager -----------------------------------------------------------------------------
class CheckpointManager:
    """Writes, finds, verifies and prunes the checkpoints under one root (module docstring)."""

    def __init__(self, root: str | Path, *, keep_last: int = 0) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def path(self, iteration: int) -> Path:
        return self.root / checkpoint_name(iteration)

    # -- writing ------------------------------------------------------------------------------
    def begin(self, iteration: int) -> Path:
        """A fresh staging directory for the checkpoint of ``iteration``."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_staging()
        staging = self.root / f"{_STAGING_PREFIX}{checkpoint_name(iteration)}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return staging

    def commit(self, staging: Path, state: CoordinatorState) -> Path:
        """Make ``staging`` the complete checkpoint of ``state.iteration`` (blocking IO)."""
        (staging / COORDINATOR).write_text(state.to_json(), encoding="utf-8")
        files = _files(staging)
        for path in files:
            fsync_path(path)
        for directory in sorted({p.parent for p in files}, key=lambda p: -len(p.parts)):
            fsync_path(directory)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "iteration": state.iteration,
            "created": time.time(),
            "files": {
                p.relative_to(staging).as_posix(): {
                    "size": p.stat().st_size,
                    "sha256": file_sha256(p),
                }
                for p in files
            },
        }
        write_durably(staging / MANIFEST, json.dumps(manifest, indent=1))
        final = self.path(state.iteration)
        if final.exists():  # saved again at the same iteration (e.g. a broken one replaced)
            old = self.root / f"{_STAGING_PREFIX}replaced-{final.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, final)
        fsync_path(self.root)
        self.prune()
        return final

    def remove_stale_staging(self) -> None:
        """Remove staging directories of processes that are gone (crashed mid-save)."""
        if not self.root.is_dir():
            return
        for path in self.staging():
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue  # another live run writes here; not ours to touch
            shutil.rmtree(path, ignore_errors=True)

    def staging(self) -> list[Path]:
        """Checkpoints being written, or whose writer died before it finished."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith(_STAGING_PREFIX))

    def prune(self) -> list[Path]:
        """Keep the newest ``keep_last`` complete checkpoints (0: all); returns what was removed.

        Broken checkpoints older than the oldest kept one go too; newer broken ones stay (a
        person may want to look at them; a later save of the same iteration replaces them).
        """
        if self.keep_last <= 0:
            return []
        found = self.scan(verify=False)
        complete = [c for c in found if c.complete]
        if len(complete) <= self.keep_last:
            return []
        oldest_kept = complete[-self.keep_last].iteration
        removed = []
        for info in found:
            if info.iteration < oldest_kept:
                shutil.rmtree(info.path, ignore_errors=True)
                removed.append(info.path)
        return removed

    def set_aside_newer(self, iteration: int) -> Path | None:
        """Move every checkpoint newer than ``iteration`` (complete or broken) into
        ``superseded-<time>/`` beside them, out of the run's sight; returns that directory, or
        None when there was nothing newer.

        A run that resumes from an older checkpoint than the newest replaces the steps after
        it: left in place, the newer checkpoints would count as the newest ones, so pruning
        would remove the new run's own, and a later resume would jump back to the run it
        replaced. Moved, not deleted: they are a person's work. So are their exports in
        ``hf/`` beside the root (``chatlearn export``'s, under the same names), into
        ``hf/superseded-<time>/`` (the same file system): left there, the new run's checkpoint
        of that iteration would be shown with the old one's weights."""
        newer = [info.path for info in self.scan(verify=False) if info.iteration > iteration]
        if not newer:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.root / f"superseded-{stamp}-{os.getpid()}"
        aside.mkdir()
        for path in newer:
            path.rename(aside / path.name)
            exported = export_dir(path)
            if exported.is_dir():
                (exported.parent / aside.name).mkdir(exist_ok=True)
                exported.rename(exported.parent / aside.name / path.name)
        fsync_path(self.root)
        return aside

    # -- reading ------------------------------------------------------------------------------
    def scan(self, *, verify: bool = False) -> list[CheckpointInfo]:
        """Every ``iter_*`` directory, oldest first; ``verify`` also checks the file hashes."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            number = checkpoint_iteration(path.name)
            if number is not None and path.is_dir():
                found.append(self.inspect(path, number, verify=verify))
        return sorted(found, key=lambda c: c.iteration)

    def inspect(self, path: Path, iteration: int, *, verify: bool = False) -> CheckpointInfo:
        problem = check_manifest(path, hashes=verify)
        state = None
        if not problem:
            try:
                state = CoordinatorState.from_json((path / COORDINATOR).read_text("utf-8"))
            except (OSError, ValueError, TypeError) as exc:
                problem = f"{COORDINATOR} is unreadable: {exc}"
        if state is not None and state.iteration != iteration:
            problem = f"{COORDINATOR} is of iteration {state.iteration}, not {iteration}"
        status = "broken" if problem else "complete"
        return CheckpointInfo(path, iteration, status, problem, None if problem else state)

    def find_resume(self, iteration: int | None = None) -> CheckpointInfo | None:
        """The checkpoint to resume from: ``iteration``'s, or the newest complete one.

        Every file is verified against its hash. A broken newer checkpoint is skipped with a
        warning naming it; a requested iteration that is missing or broken is an error.
        """
        if iteration is not None:
            path = self.path(iteration)
            if not path.is_dir():
                known = [c.iteration for c in self.scan()]
                raise ValueError(
                    f"runtime.load_data_checkpoint_iteration is {iteration}, but there is no "
                    f"checkpoint {path} (checkpoints in {self.root}: {known or 'none'}); "
                    f"set it to one of them, or to null for the newest"
                )
            info = self.inspect(path, iteration, verify=True)
            if not info.complete:
                raise ValueError(
                    f"checkpoint {path} (runtime.load_data_checkpoint_iteration) is broken: "
                    f"{info.problem}; pick another iteration, or null for the newest complete one"
                )
            return info
        return self.first_verified(reversed(self.scan(verify=False)))

    def first_verified(self, candidates: Iterable[CheckpointInfo]) -> CheckpointInfo | None:
        """The first of ``candidates`` whose files all match their hashes; each broken one
        before it is said in a warning (a fall-back to the previous one)."""
        for candidate in candidates:
            info = (
                self.inspect(candidate.path, candidate.iteration, verify=True)
                if candidate.complete
                else candidate
            )
            if info.complete:
                return info
            logger.warning(
                "checkpoint %s is broken (%s); falling back to the previous one",
                info.path,
                info.problem,
            )
        return None


def checkpoint_bytes(path: Path) -> int:
    """The bytes of a committed checkpoint's files, from its manifest (0 if unreadable)."""
    try:
        files = json.loads((path / MANIFEST).read_text("utf-8"))["files"]
        return sum(int(entry.get("size", 0)) for entry in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def room_for_checkpoints(
    size: int, free: int, *, held: int, keep_last: int, saves: int, final_extra: int = 0
) -> int:
    """How many of the ``saves`` checkpoints a run will still write, each ``size`` bytes (the
    last ``final_extra`` more), the file system's ``free`` bytes hold before one would not
    fit; ``saves`` when all do. ``held`` are kept now; with ``keep_last`` (0: all kept) the
    oldest is pruned once a new one is committed, so at most ``keep_last`` + 1 are ever on
    disk (the new one staged)."""
    if saves <= 0 or size <= 0:
        return saves
    on_disk = held + saves if keep_last <= 0 else min(keep_last + 1, held + saves)
    extra = max(0, on_disk - held)  # checkpoints' worth of space taken beyond today's
    if free >= extra * size + final_extra:
        return saves
    # all but the last fit where the disk holds as many at their own size
    return min(saves - 1, free // size)


def rewind_metrics(path: Path, offset: int) -> int:
    """Cut ``metrics.jsonl`` back to ``offset`` bytes (its size when the checkpoint was taken).

    Records written after the checkpoint belong to steps that the resumed run trains again; they
    are moved to ``metrics.superseded.jsonl`` beside it rather than lost. Returns the bytes moved.
    """
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size < offset:
        return _cut_torn_line(path, offset - size)
    if size == offset:
        return 0
    with path.open("r+b") as f:
        f.seek(offset)
        tail = f.read()
        with path.with_name("metrics.superseded.jsonl").open("ab") as superseded:
            superseded.write(tail)
        f.truncate(offset)
    return len(tail)


def _cut_torn_line(path: Path, missing: int) -> int:
    """``metrics.jsonl`` shorter than its checkpoint recorded: records of steps before the
    checkpoint never reached the disk (a machine that crashed before writing them back). Say so,
    and move a torn last line to ``metrics.superseded.jsonl``, so that the records this run
    appends start on a line of their own. Returns the bytes moved."""
    logger.warning(
        "%s is %d bytes shorter than the checkpoint recorded: the records of some steps "
        "before it were lost in a crash (the steps themselves are in the checkpoint)",
        path,
        missing,
    )
    with path.open("r+b") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with path.with_name("metrics.superseded.jsonl").open("ab") as superseded:
            superseded.write(data[keep:] + b"\n")
        f.truncate(keep)
    return len(data) - keep


def describe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved a, now b`` for every setting that differs."""
    return [
        f"{key}: saved {saved[key]!r}, now {current.get(key)!r}"
        for key in sorted(saved)
        if key in current and saved[key] != current[key]
    ]
