"""`chatlearn chaos -- COMMAND...`: kill random actors of a run and compare it with a clean one.

The harness behind self-healing (issue 15): it runs COMMAND (a chatlearn run, e.g.
``python -m examples.dpo.train_dpo -c examples/dpo/dpo.yaml``) once uninterrupted, then once more
while a :class:`ChaosMonkey` sends SIGKILL or SIGSTOP to random actor processes of the run at
random moments, and then compares the two runs with :func:`compare_runs`: every training
iteration exactly once with the same metrics, and bit-identical final trainer weights. A run that
heals itself correctly passes; one that loses or repeats a step, or drifts, fails and says where.

What it relies on, and nothing more:

- Actors are the processes of the run's tree whose argv holds ``--label MODEL.REPLICA.RANK``
  (``chatlearn.actors.remote`` puts it there; the identity itself travels on stdin).
- The run writes into the directory named by one environment variable (``--output-env``,
  default ``OUTPUT_DIR``, which ``examples/dpo/dpo.yaml`` reads): ``metrics.jsonl`` (records of
  ``"kind": "train"`` carry the iteration as ``"step"``, see ``engine/metrics.py``) and
  ``checkpoints/iter_NNNNNNN/`` with ``MANIFEST.json`` written last (``engine/checkpoint.py``),
  the trainer's files under ``<model>/rank_<r>/`` (``model.pt``, ``optimizer.pt``, ``rng.pt``,
  ..., and ``hf_model/*.safetensors`` for the Hugging Face modules).

Every wait is bounded: the monkey stops at its deadline, a run is killed at ``--timeout``, and a
killed run's whole process tree goes (SIGSTOP to freeze it, then SIGKILL and SIGCONT), stopped
actors included, so nothing is left behind, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import click
import psutil

from chatlearn.engine.checkpoint import CheckpointManager
from chatlearn.engine.metrics import read_metrics

__all__ = [
    "Actor",
    "ChaosEvent",
    "ChaosMonkey",
    "ChaosPlan",
    "Comparison",
    "PlanError",
    "RunResult",
    "command",
    "compare_runs",
    "find_actors",
    "kill_tree",
    "run_command",
]

REFERENCE = "reference"  # target kinds of a plan
TRAINER = "trainer"
_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
_STOPPED = {psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP}
_TENSOR_SUFFIXES = (".pt", ".safetensors")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- actors ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Actor:
    """One live actor process of a run, as its ``--label MODEL.REPLICA.RANK`` names it."""

    pid: int
    model: str
    replica: int
    rank: int
    create_time: float  # psutil's, seconds since the epoch: with pid, the process's identity
    status: str  # psutil's (running, sleeping, stopped, ...)
    started: float  # seconds after boot it started (exact to a clock tick; see age())

    @property
    def label(self) -> str:
        return f"{self.model}.{self.replica}.{self.rank}"

    @property
    def stopped(self) -> bool:
        return self.status in _STOPPED

    def age(self) -> float:
        """Seconds it has lived. Measured on the boot clock: ``create_time`` is off by up to a
        second (the kernel gives the boot time in whole seconds)."""
        return _since_boot() - self.started


def _since_boot() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _started(proc: psutil.Process) -> float:
    """When ``proc`` started, in seconds after boot (``starttime`` of /proc/PID/stat)."""
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            stat = f.read().rsplit(b")", 1)[1].split()
        return int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):  # not Linux's procfs: the coarser clock
        return _since_boot() - (time.time() - proc.create_time())


def parse_label(argv: Sequence[str]) -> tuple[str, int, int] | None:
    """(model, replica, rank) of ``--label MODEL.REPLICA.RANK`` (or ``--label=...``) in argv;
    None when there is none or it is not of that form. The model name may contain dots."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--label" and i + 1 < len(argv):
            value = argv[i + 1]
            break
        if arg.startswith("--label="):
            value = arg.split("=", 1)[1]
            break
    if not value:
        return None
    parts = value.rsplit(".", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def find_actors(root_pid: int) -> list[Actor]:
    """The live actor processes in the process tree of ``root_pid`` (root included), ordered by
    (model, replica, rank, pid). Processes without a valid label and zombies are left out;
    stopped ones are in (``Actor.stopped``). Empty when the root is gone."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    actors = []
    for proc in procs:
        try:
            with proc.oneshot():
                status = proc.status()
                if status == psutil.STATUS_ZOMBIE:
                    continue
                parsed = parse_label(proc.cmdline())
                if parsed is None:
                    continue
                actors.append(Actor(proc.pid, *parsed, proc.create_time(), status, _started(proc)))
        except psutil.Error:  # gone (or not ours to read) between the listing and now
            continue
    return sorted(actors, key=lambda a: (a.model, a.replica, a.rank, a.pid))


# -- the plan and the monkey -------------------------------------------------------------------
class PlanError(ValueError):
    """A plan setting out of range; ``field`` names it (the CLI shows it as ``--field``)."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name} {problem}")
        self.field = field_name
        self.problem = problem


@dataclass(slots=True, kw_only=True)
class ChaosPlan:
    """What the monkey does: how many SIGKILLs and SIGSTOPs per target kind, and when.

    The events happen in an order shuffled by ``seed``; before each one the monkey waits a gap
    drawn uniformly from [``min_gap``, ``max_gap``] seconds (after ``warmup`` seconds before the
    first), then signals a random live actor of the target's model that is not stopped and has
    lived at least ``min_age`` seconds (past its start-up; a restarted actor qualifies again
    once it is that old).
    """

    reference_kills: int = 0
    reference_stops: int = 0
    trainer_kills: int = 0
    trainer_stops: int = 0
    seed: int = 0
    min_gap: float = 2.0
    max_gap: float = 10.0
    warmup: float = 5.0
    min_age: float = 1.0
    reference_model: str = "reference"
    trainer_model: str = "policy_trainer"

    def __post_init__(self) -> None:
        for name in ("reference_kills", "reference_stops", "trainer_kills", "trainer_stops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PlanError(name, f"must be a whole number >= 0, got {value!r}")
        for name in ("min_gap", "max_gap", "warmup", "min_age"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise PlanError(name, f"must be a number of seconds >= 0, got {value!r}")
        if self.max_gap < self.min_gap:
            raise PlanError(
                "max_gap", f"({self.max_gap}) must be at least the min gap ({self.min_gap})"
            )
        for name in ("reference_model", "trainer_model"):
            if not getattr(self, name):
                raise PlanError(name, "must not be empty")

    @property
    def total(self) -> int:
        return self.reference_kills + self.reference_stops + self.trainer_kills + self.trainer_stops

    def model(self, target: str) -> str:
        """The model name of a target kind (``reference`` or ``trainer``)."""
        return self.reference_model if target == REFERENCE else self.trainer_model

    def order(self, rng: random.Random) -> list[tuple[str, str]]:
        """Every event as (target kind, ``kill``/``stop``), shuffled with ``rng``."""
        events = (
            [(REFERENCE, "kill")] * self.reference_kills
            + [(REFERENCE, "stop")] * self.reference_stops
            + [(TRAINER, "kill")] * self.trainer_kills
            + [(TRAINER, "stop")] * self.trainer_stops
        )
        rng.shuffle(events)
        return events


@dataclass(frozen=True, slots=True)
class ChaosEvent:
    """One signal the monkey sent."""

    time: float  # time.time() when it was sent
    elapsed: float  # seconds since the monkey started
    target: str  # reference, trainer
    signal: str  # SIGKILL, SIGSTOP
    label: str
    pid: int
    create_time: float  # the victim's, psutil's
    age: float  # the victim's age in seconds when it was signalled

    def line(self) -> str:
        return f"{self.elapsed:8.1f} s  {self.signal:<7}  {self.label}  (pid {self.pid})"


class ChaosMonkey:
    """Carries out a :class:`ChaosPlan` on the actors of the process tree of ``root_pid``.

    ``start()`` runs it in a daemon thread (``run()`` runs it in the caller's). It stops when
    every event of the plan happened (``outcome`` ``done``), the root process exited (``root
    exited``), ``timeout`` seconds passed since it started (``timeout``), or ``stop()`` was
    called (``stopped``). Victims are drawn with ``random.Random(plan.seed)`` from the eligible
    actors ordered by (replica, rank, pid): the same seed makes the same choices among the same
    actors. A SIGSTOPped actor is left stopped (noticing the hang is the run's job) and is not
    chosen again. ``events`` lists what was sent, in order.
    """

    def __init__(
        self,
        root_pid: int,
        plan: ChaosPlan,
        *,
        timeout: float = 1800.0,
        poll: float = 0.05,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.root_pid = root_pid
        self.plan = plan
        self.timeout = timeout
        self.poll = poll
        self.events: list[ChaosEvent] = []
        self.outcome = ""  # set when it ends
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped_by_us: set[tuple[int, float]] = set()
        # once it looked for a victim, whether any actor of the run showed in its process tree
        # (those `chatlearn launch` starts on other hosts never do: they are sshd's children)
        self.actors_seen: bool | None = None

    # -- control -------------------------------------------------------------------------------
    def start(self) -> ChaosMonkey:
        self._thread = threading.Thread(target=self.run, name="chaos-monkey", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask it to stop; it does within ``poll`` seconds, between events."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def done(self) -> bool:
        return self.outcome == "done"

    def __enter__(self) -> ChaosMonkey:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.join(5.0)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        started = time.monotonic()
        wall_started = time.time()
        deadline = started + self.timeout
        rng = random.Random(self.plan.seed)
        try:
            order = self.plan.order(rng)
            pause = self.plan.warmup
            for target, action in order:
                pause += rng.uniform(self.plan.min_gap, self.plan.max_gap)
                if not self._sleep(pause, deadline):
                    return
                pause = 0.0
                sig = _SIGNALS[action]
                while True:
                    victim = self._victim(target, rng, deadline)
                    if victim is None:
                        return
                    actor, proc = victim
                    try:
                        proc.send_signal(sig)  # psutil checks the pid is still this process
                        break
                    except psutil.NoSuchProcess:
                        continue  # it died just now: draw again among the living
                if sig == signal.SIGSTOP:
                    self._stopped_by_us.add((actor.pid, actor.create_time))
                now = time.time()
                self.events.append(
                    ChaosEvent(
                        time=now,
                        elapsed=now - wall_started,
                        target=target,
                        signal=sig.name,
                        label=actor.label,
                        pid=actor.pid,
                        create_time=actor.create_time,
                        age=actor.age(),
                    )
                )
            self.outcome = "done"
        except Exception as exc:  # reported by the caller, never lost in the thread
            self.error = exc
            self.outcome = f"failed: {type(exc).__name__}: {exc}"
        finally:
            if not self.outcome:
                if not self._root_alive():
                    self.outcome = "root exited"
                elif time.monotonic() >= deadline:
                    self.outcome = "timeout"
                else:
                    self.outcome = "stopped"

    def _sleep(self, seconds: float, deadline: float) -> bool:
        """Wait ``seconds``; False if it must stop first (stop(), root gone, deadline)."""
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if self._stop.is_set() or now >= deadline or not self._root_alive():
                return False
            if now >= end:
                return True
            self._stop.wait(min(self.poll, end - now, deadline - now))

    def _victim(
        self, target: str, rng: random.Random, deadline: float
    ) -> tuple[Actor, psutil.Process] | None:
        """A random eligible actor of ``target``'s model, waiting (bounded) until there is one;
        None if it must stop first."""
        model = self.plan.model(target)
        while self._sleep(0.0, deadline):
            actors = find_actors(self.root_pid)
            self.actors_seen = bool(self.actors_seen) or bool(actors)
            eligible = [
                a
                for a in actors
                if a.model == model
                and not a.stopped
                and (a.pid, a.create_time) not in self._stopped_by_us
                and a.age() >= self.plan.min_age
            ]
            eligible.sort(key=lambda a: (a.replica, a.rank, a.pid))
            if eligible:
                actor = eligible[rng.randrange(len(eligible))]
                try:
                    proc = psutil.Process(actor.pid)
                    if proc.create_time() == actor.create_time:
                        return actor, proc
                except psutil.NoSuchProcess:
                    pass
                continue  # it died since the listing: draw again among the living
            self._stop.wait(self.poll)
        return None

    def _root_alive(self) -> bool:
        try:
            return psutil.Process(self.root_pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


# -- running a command -------------------------------------------------------------------------
@dataclass(slots=True)
class RunResult:
    """One run of the command: how it ended and what the monkey did to it."""

    name: str
    pid: int
    exit_code: int | None  # Popen's: negative for a signal; None if it could not be reaped
    seconds: float
    timed_out: bool = False
    interrupted: bool = False
    events: list[ChaosEvent] = field(default_factory=list)
    monkey_outcome: str = ""
    actors_seen: bool | None = None  # ChaosMonkey.actors_seen
    planned: int = 0
    killed: int = 0  # processes of the run's tree or group the harness killed after it
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.interrupted

    def describe(self) -> str:
        if self.exit_code is None:
            how = "did not exit"
        elif self.exit_code < 0:
            how = f"killed by {signal.Signals(-self.exit_code).name}"
        else:
            how = f"exit {self.exit_code}"
        if self.timed_out:
            how += " (timed out: the harness killed it)"
        if self.interrupted:
            how += " (interrupted: the harness killed it)"
        if self.killed and not (self.timed_out or self.interrupted):
            how += f" (it left {self.killed} process(es) behind: killed)"
        return f"{how} after {self.seconds:.1f} s"


class _Terminated(Exception):
    """SIGTERM reached the harness: stop the run as for Ctrl-C."""


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float,
    plan: ChaosPlan | None = None,
    log: Path | None = None,
    name: str = "run",
    poll: float = 0.05,
) -> RunResult:
    """Run ``argv`` in its own process group until it exits, with a :class:`ChaosMonkey` on it
    if ``plan`` has events, and kill its whole tree after ``timeout`` seconds or on Ctrl-C
    (KeyboardInterrupt is re-raised after the cleanup). Output goes to ``log`` if given."""
    out = log.open("ab") if log is not None else None
    started = time.monotonic()
    popen = subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT if out is not None else None,
        process_group=0,
    )
    result = RunResult(name, popen.pid, None, 0.0, log=log, planned=plan.total if plan else 0)
    monkey = None
    if plan is not None and plan.total > 0:
        monkey = ChaosMonkey(popen.pid, plan, timeout=timeout, poll=poll).start()
    try:
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            result.timed_out = True
    except (KeyboardInterrupt, _Terminated):
        result.interrupted = True
        raise
    finally:
        if monkey is not None:
            monkey.stop()
            monkey.join(5.0)
            result.events = list(monkey.events)
            result.monkey_outcome = monkey.outcome
            result.actors_seen = monkey.actors_seen
        # Also after a clean exit: what the run left in its process group goes too.
        result.killed = kill_tree(popen, pgid=popen.pid)
        result.exit_code = popen.returncode
        result.seconds = time.monotonic() - started
        if out is not None:
            out.close()
    return result


def kill_tree(
    popen: subprocess.Popen[Any] | int, *, pgid: int | None = None, grace: float = 5.0
) -> int:
    """Kill a process, its descendants and the process group ``pgid`` (default: the process's
    own group, unless it is ours); returns how many processes it killed, a Popen's root aside.

    The tree is first frozen with SIGSTOP, in bounded passes until no new descendant shows up,
    so that nothing spawns or respawns meanwhile; then every member gets SIGKILL and SIGCONT.
    Waits up to ``grace`` seconds for them to be gone (a zombie counts as gone: its parent, or
    init, reaps it), reaping ``popen`` when it is a Popen. The group of a root that is gone
    can still be killed by its pgid (Linux reuses no pid while its group has members).
    """
    pid = popen if isinstance(popen, int) else popen.pid
    if pgid is None:
        with contextlib.suppress(ProcessLookupError):
            pgid = os.getpgid(pid)
    if pgid == os.getpgid(0):
        pgid = None  # never our own group
    roots: list[psutil.Process] = []
    if isinstance(popen, int) or popen.returncode is None:  # a reaped pid may be someone else's
        with contextlib.suppress(psutil.NoSuchProcess):
            roots.append(psutil.Process(pid))
    members: dict[int, psutil.Process] = {}
    for _ in range(20):
        found = list(roots)
        for proc in [*roots, *members.values()]:
            with contextlib.suppress(psutil.Error):
                found += proc.children(recursive=True)
        added = [p for p in found if p.pid not in members and _alive(p)]
        for proc in added:
            members[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)
        if not added:
            break
    if pgid is not None:
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid not in members and os.getpgid(proc.pid) == pgid and _alive(proc):
                    members[proc.pid] = proc
        for sig in (signal.SIGKILL, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
    for proc in members.values():
        for sig in (signal.SIGKILL, signal.SIGCONT):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)  # psutil checks it is still the same process
    if not isinstance(popen, int):
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=grace)
    deadline = time.monotonic() + grace
    others = [p for p in members.values() if p.pid != pid or isinstance(popen, int)]
    remaining = others
    while remaining and time.monotonic() < deadline:
        remaining = [p for p in remaining if _alive(p)]
        if remaining:
            time.sleep(0.02)
    return len(others)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- comparing two runs ------------------------------------------------------------------------
@dataclass(slots=True)
class Comparison:
    """The verdict of :func:`compare_runs`: checks that passed and problems found."""

    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return (
            [f"ok    {text}" for text in self.passed]
            + [f"FAIL  {text}" for text in self.problems]
            + [f"note  {text}" for text in self.notes]
        )


def find_run_dir(directory: str | Path) -> Path | None:
    """The run directory (holding ``metrics.jsonl``) at or below ``directory``: itself, or its
    only descendant with one (e.g. ``$OUTPUT_DIR/dpo_example``); None if there is none.
    Raises ValueError when there are several."""
    directory = Path(directory)
    if (directory / "metrics.jsonl").is_file():
        return directory
    found = sorted(p.parent for p in directory.rglob("metrics.jsonl")) if directory.is_dir() else []
    if len(found) > 1:
        raise ValueError(
            f"{directory} holds {len(found)} runs ({', '.join(map(str, found))}); "
            "give the run directory itself"
        )
    return found[0] if found else None


def compare_runs(
    baseline_dir: str | Path | None,
    chaos_dir: str | Path,
    *,
    trainer_model: str = "policy_trainer",
    ignore: Iterable[str] = ("time",),
    skip_files: Iterable[str] = ("rng.pt",),
) -> Comparison:
    """Compare the chaos run in ``chaos_dir`` with the uninterrupted one in ``baseline_dir``.

    Each is a run directory (with ``metrics.jsonl`` and ``checkpoints/``) or a directory with
    exactly one below it. Checks: (a) the ``train`` records of ``metrics.jsonl``: every
    iteration once in each run, no gap, the same iterations in both, every value equal (floats
    exactly; the keys in ``ignore``, wall-clock time, are left out); (b) the newest complete
    checkpoint of each (``iter_*`` whose ``MANIFEST.json`` matches its files): the same
    iteration, the same ``.pt``/``.safetensors`` files of ``trainer_model``, every tensor
    bit-identical and every other value equal. The first difference is reported.
    Files named in ``skip_files`` are not compared: by default ``rng.pt``, the random
    generators' state, which is not weights and differs between two clean runs of the example
    (its trainer draws nothing from torch's global generator, which no one seeds).
    Without a baseline only the chaos run's own metrics are checked (once each, no gap).
    """
    result = Comparison()
    runs: dict[str, Path] = {}
    for name, directory in (("baseline", baseline_dir), ("chaos", chaos_dir)):
        if directory is None:
            continue
        try:
            found = find_run_dir(directory)
        except ValueError as exc:
            result.problems.append(f"{name}: {exc}")
            continue
        if found is None:
            result.problems.append(
                f"{name}: no metrics.jsonl under {directory} (does the command write its "
                "output where --output-env points?)"
            )
        else:
            runs[name] = found
    if result.problems:
        return result
    records = {}
    for name, run in runs.items():
        everything = read_metrics(run / "metrics.jsonl")
        records[name] = [r for r in everything if r.get("kind") == "train"]
        _check_once_each(name, records[name], result)
        resumes = sum(1 for r in everything if r.get("kind") == "resume")
        if resumes:
            result.notes.append(f"{name}: the run resumed from a checkpoint {resumes} time(s)")
    if "baseline" in runs:
        _compare_metrics(records["baseline"], records["chaos"], set(ignore), result)
        _compare_weights(runs["baseline"], runs["chaos"], trainer_model, set(skip_files), result)
    return result


def _iteration(record: Mapping[str, Any]) -> int:
    return int(record["step"])


def _check_once_each(name: str, records: list[dict[str, Any]], result: Comparison) -> None:
    if not records:
        result.problems.append(f"{name}: metrics.jsonl has no train record")
        return
    counts = Counter(_iteration(r) for r in records)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    first, last = min(counts), max(counts)
    missing = sorted(set(range(first, last + 1)) - set(counts))
    if repeated:
        result.problems.append(
            f"{name}: iteration {repeated[0]} recorded {counts[repeated[0]]} times "
            f"({len(repeated)} iteration(s) recorded more than once)"
        )
    if missing:
        result.problems.append(
            f"{name}: iteration {missing[0]} missing between {first} and {last} "
            f"({len(missing)} missing)"
        )
    if not repeated and not missing:
        result.passed.append(f"{name}: iterations {first}..{last}, each recorded once")


def _compare_metrics(
    baseline: list[dict[str, Any]],
    chaos: list[dict[str, Any]],
    ignored: set[str],
    result: Comparison,
) -> None:
    if not baseline or not chaos:
        return  # reported by _check_once_each
    base: dict[int, dict[str, Any]] = {}
    for record in baseline:
        base.setdefault(_iteration(record), record)
    other: dict[int, dict[str, Any]] = {}
    for record in chaos:
        other.setdefault(_iteration(record), record)
    only_base = sorted(set(base) - set(other))
    only_chaos = sorted(set(other) - set(base))
    if only_base:
        result.problems.append(
            f"metrics: iteration {only_base[0]} is in the baseline, not in the chaos run "
            f"({len(only_base)} such)"
        )
    if only_chaos:
        result.problems.append(
            f"metrics: iteration {only_chaos[0]} is in the chaos run, not in the baseline "
            f"({len(only_chaos)} such)"
        )
    differing = []
    for iteration in sorted(set(base) & set(other)):
        difference = _record_difference(base[iteration], other[iteration], ignored)
        if difference:
            differing.append((iteration, difference))
    if differing:
        iteration, difference = differing[0]
        result.problems.append(
            f"metrics: iteration {iteration}: {difference} ({len(differing)} iteration(s) differ)"
        )
    elif not only_base and not only_chaos:
        keys = sorted(set().union(*(r.keys() for r in base.values())) - ignored - {"kind"})
        result.passed.append(
            f"metrics: {len(base)} train records equal to the baseline's ({', '.join(keys)})"
        )


def _record_difference(a: Mapping[str, Any], b: Mapping[str, Any], ignored: set[str]) -> str:
    for key in sorted(set(a) | set(b)):
        if key in ignored:
            continue
        if key not in b:
            return f"{key} is only in the baseline"
        if key not in a:
            return f"{key} is only in the chaos run"
        if not _same_value(a[key], b[key]):
            return f"{key} is {a[key]!r} in the baseline, {b[key]!r} in the chaos run"
    return ""


def _same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type; floats bit for bit (repr round-trips them exactly: NaN
    equals NaN, 0.0 differs from -0.0)."""
    if type(a) is not type(b):
        return False
    return repr(a) == repr(b) if isinstance(a, float) else bool(a == b)


def _newest_complete(run_dir: Path) -> Any:
    complete = [c for c in CheckpointManager(run_dir / "checkpoints").scan() if c.complete]
    return complete[-1] if complete else None


def _compare_weights(
    baseline: Path, chaos: Path, model: str, skip: set[str], result: Comparison
) -> None:
    newest = {"baseline": _newest_complete(baseline), "chaos": _newest_complete(chaos)}
    if newest["baseline"] is None and newest["chaos"] is None:
        result.notes.append("weights: neither run has a complete checkpoint; not compared")
        return
    for name, info in newest.items():
        if info is None:
            result.problems.append(f"weights: the {name} run has no complete checkpoint")
    if newest["baseline"] is None or newest["chaos"] is None:
        return
    a, b = newest["baseline"], newest["chaos"]
    if a.iteration != b.iteration:
        result.problems.append(
            f"weights: the newest complete checkpoint is {a.path.name} in the baseline, "
            f"{b.path.name} in the chaos run"
        )
        return
    files = {}
    skipped: set[str] = set()
    for name, info in newest.items():
        directory = info.path / model
        if not directory.is_dir():
            result.problems.append(f"weights: {info.path} has no {model} directory")
            return
        tensor_files = [
            p for p in directory.rglob("*") if p.is_file() and p.name.endswith(_TENSOR_SUFFIXES)
        ]
        skipped |= {p.name for p in tensor_files if p.name in skip}
        files[name] = {p.relative_to(directory).as_posix() for p in tensor_files}
        files[name] = {f for f in files[name] if Path(f).name not in skip}
    if files["baseline"] != files["chaos"]:
        only_a = sorted(files["baseline"] - files["chaos"])
        only_b = sorted(files["chaos"] - files["baseline"])
        which = f"{only_a[0]} only in the baseline" if only_a else f"{only_b[0]} only in chaos"
        result.problems.append(f"weights: {a.path.name}/{model}: {which}")
        return
    if skipped:
        names = ", ".join(sorted(skipped))
        result.notes.append(f"weights: {names} not compared (random generator state, not weights)")
    if not files["baseline"]:
        result.problems.append(f"weights: {a.path}/{model} has no .pt or .safetensors file")
        return
    tensors = 0
    differing = []
    for relative in sorted(files["baseline"]):
        left = _load_tensor_file(a.path / model / relative)
        right = _load_tensor_file(b.path / model / relative)
        counter = [0]
        difference = _first_difference(left, right, "", counter)
        tensors += counter[0]
        if difference:
            differing.append(f"{model}/{relative}: {difference}")
    if differing:
        result.problems.append(
            f"weights: {a.path.name}/{differing[0]} ({len(differing)} of {len(files['baseline'])} "
            "file(s) differ)"
        )
    else:
        result.passed.append(
            f"weights: {a.path.name}/{model}: {len(files['baseline'])} file(s), {tensors} "
            "tensors, bit-identical"
        )


def _load_tensor_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _first_difference(a: Any, b: Any, where: str, counter: list[int]) -> str:
    """Where ``a`` and ``b`` first differ (``""`` if nowhere); ``counter[0]`` counts tensors."""
    import torch

    at = where or "the top level"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            other = type(b if isinstance(a, torch.Tensor) else a).__name__
            return f"{at}: a tensor in one run, {other} in the other"
        counter[0] += 1
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{at}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if not _bit_identical(a, b):
            return f"{at}: tensor values differ"
        return ""
    if type(a) is not type(b):
        return f"{at}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Mapping):
        if set(a) != set(b):
            key = next(iter(sorted(set(a) ^ set(b), key=repr)))
            side = "baseline" if key in a else "chaos run"
            return f"{at}: key {key!r} only in the {side}"
        for key in a:
            found = _first_difference(
                a[key], b[key], f"{where}.{key}" if where else str(key), counter
            )
            if found:
                return found
        return ""
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return f"{at}: {len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{where}[{i}]", counter)
            if found:
                return found
        return ""
    if not _same_value(a, b):
        return f"{at}: {a!r} vs {b!r}"
    return ""


def _bit_identical(a: Any, b: Any) -> bool:
    """Tensors equal bit for bit (NaN payloads and signed zeros included), on the CPU."""
    import torch

    a, b = a.detach().cpu(), b.detach().cpu()
    if a.layout != torch.strided or a.is_quantized:
        return bool(torch.equal(a, b))
    return bool(
        torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8),
            b.contiguous().reshape(-1).view(torch.uint8),
        )
    )


# -- the command -------------------------------------------------------------------------------
class _OneLineErrors(click.Command):
    """A command whose usage errors are one line (``Error: ...``), without the usage text."""

    def make_context(self, info_name: str | None, args: list[str], parent=None, **extra: Any):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            exc.ctx = None  # shown without a context: no usage text
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.ctx = None
            raise


def _usage(message: str) -> click.UsageError:
    return click.UsageError(message)  # no ctx: shown as one line


def _check_command(argv: Sequence[str]) -> None:
    program = argv[0]
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise _usage(f"cannot run {program!r}: not an executable file")
    elif shutil.which(program) is None:
        raise _usage(f"cannot run {program!r}: not found on PATH")


def _tail(path: Path | None, count: int = 15) -> list[str]:
    if path is None or not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 16384))
        return f.read().decode("utf-8", "replace").splitlines()[-count:]


@click.command(
    "chaos",
    cls=_OneLineErrors,
    context_settings={"allow_interspersed_args": False},
)
@click.option(
    "--reference-kills", default=1, show_default=True, help="SIGKILLs of reference actors"
)
@click.option("--trainer-kills", default=1, show_default=True, help="SIGKILLs of trainer ranks")
@click.option(
    "--reference-stops", default=0, show_default=True, help="SIGSTOPs (hangs) of references"
)
@click.option(
    "--trainer-stops", default=0, show_default=True, help="SIGSTOPs (hangs) of trainer ranks"
)
@click.option("--seed", default=0, show_default=True, help="seeds the order, moments and victims")
@click.option("--min-gap", default=2.0, show_default=True, help="seconds between events, at least")
@click.option("--max-gap", default=10.0, show_default=True, help="seconds between events, at most")
@click.option("--warmup", default=5.0, show_default=True, help="seconds before the first gap")
@click.option(
    "--min-age", default=1.0, show_default=True, help="seconds a victim has lived, at least"
)
@click.option(
    "--timeout", default=1800.0, show_default=True, help="seconds per run before it is killed"
)
@click.option(
    "--output-env",
    default="OUTPUT_DIR",
    show_default=True,
    help="environment variable naming the run's output directory",
)
@click.option("--work-dir", type=click.Path(file_okay=False), help="default: output/chaos-<time>")
@click.option("--reference-model", default="reference", show_default=True)
@click.option("--trainer-model", default="policy_trainer", show_default=True)
@click.option(
    "--no-baseline",
    is_flag=True,
    help="skip the uninterrupted run (compare with <work-dir>/baseline if an earlier one is there)",
)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND...")
def command(
    reference_kills: int,
    trainer_kills: int,
    reference_stops: int,
    trainer_stops: int,
    seed: int,
    min_gap: float,
    max_gap: float,
    warmup: float,
    min_age: float,
    timeout: float,
    output_env: str,
    work_dir: str | None,
    reference_model: str,
    trainer_model: str,
    no_baseline: bool,
    argv: tuple[str, ...],
) -> None:
    """Run COMMAND uninterrupted, then under a chaos monkey, and compare the two runs.

    \b
    chatlearn chaos --trainer-kills 1 -- python -m examples.dpo.train_dpo -c examples/dpo/dpo.yaml

    Each run gets <work-dir>/baseline or <work-dir>/chaos in the variable --output-env, and logs
    to <work-dir>/<run>.log. Exits 0 only if both runs exited 0, the monkey did not fail and
    the chaos run's metrics and final trainer weights equal the baseline's; 1 otherwise, 2 for
    bad input, 130 on Ctrl-C (the run is killed).
    """
    if not argv:
        raise _usage("no command to run: chatlearn chaos [OPTIONS] -- COMMAND...")
    try:
        plan = ChaosPlan(
            reference_kills=reference_kills,
            reference_stops=reference_stops,
            trainer_kills=trainer_kills,
            trainer_stops=trainer_stops,
            seed=seed,
            min_gap=min_gap,
            max_gap=max_gap,
            warmup=warmup,
            min_age=min_age,
            reference_model=reference_model,
            trainer_model=trainer_model,
        )
    except PlanError as exc:
        raise _usage(f"--{exc.field.replace('_', '-')} {exc.problem}") from None
    if not (math.isfinite(timeout) and timeout > 0):
        raise _usage(f"--timeout must be a number of seconds > 0, got {timeout}")
    if not _ENV_NAME.match(output_env):
        raise _usage(f"--output-env must be an environment variable name, got {output_env!r}")
    _check_command(argv)
    work = Path(work_dir or f"output/chaos-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    baseline_dir, chaos_dir = work / "baseline", work / "chaos"
    if chaos_dir.exists():
        raise _usage(f"{chaos_dir} exists (from an earlier run?); give another --work-dir")
    if baseline_dir.exists() and not no_baseline:
        raise _usage(
            f"{baseline_dir} exists; give another --work-dir, or --no-baseline to compare with it"
        )
    work.mkdir(parents=True, exist_ok=True)

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = _run_both(argv, plan, timeout, output_env, work, no_baseline)
    except KeyboardInterrupt:
        click.echo("chaos: interrupted (Ctrl-C); the run was killed", err=True)
        code = 130
    except _Terminated:
        click.echo("chaos: terminated (SIGTERM); the run was killed", err=True)
        code = 143
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _run_both(
    argv: Sequence[str],
    plan: ChaosPlan,
    timeout: float,
    output_env: str,
    work: Path,
    no_baseline: bool,
) -> int:
    """The baseline run (unless ``no_baseline``), the chaos run, the report; the exit code."""
    click.echo(f"chaos: work directory {work}")
    click.echo(f"chaos: command {shlex.join(argv)}")
    runs: list[RunResult] = []
    for name in ("chaos",) if no_baseline else ("baseline", "chaos"):
        directory = work / name
        directory.mkdir()
        log = work / f"{name}.log"
        click.echo(f"{name}: running with {output_env}={directory} (output in {log})")
        if name == "chaos":
            click.echo(
                "chaos: plan "
                + ", ".join(f"{f.name} {getattr(plan, f.name)}" for f in fields(plan))
            )
        result = run_command(
            argv,
            env={**os.environ, output_env: str(directory)},
            timeout=timeout,
            plan=plan if name == "chaos" else None,
            log=log,
            name=name,
        )
        runs.append(result)
        click.echo(f"{name}: {result.describe()}")
        if not result.ok:
            for line in _tail(log):
                click.echo(f"  | {line}")
            if name == "baseline":
                click.echo(
                    "chaos: FAIL (the uninterrupted run failed; the chaos run was not started)"
                )
                return 1
    chaos = runs[-1]
    ended = f"; the monkey ended: {chaos.monkey_outcome}" if chaos.planned else ""
    click.echo(f"events: {len(chaos.events)} of {chaos.planned} planned{ended}")
    for event in chaos.events:
        click.echo(f"  {event.line()}")
    baseline_dir = work / "baseline"
    have_baseline = not no_baseline or _find_run_dir_quiet(baseline_dir) is not None
    if not have_baseline and _find_run_dir_quiet(work / "chaos") is None:
        click.echo("comparison: none (no baseline, and the chaos run wrote no metrics.jsonl)")
        comparison = Comparison()
    else:
        comparison = compare_runs(
            baseline_dir if have_baseline else None,
            work / "chaos",
            trainer_model=plan.trainer_model,
        )
        click.echo("comparison:" + ("" if have_baseline else " (no baseline: the chaos run alone)"))
        for line in comparison.lines():
            click.echo(f"  {line}")
    monkey_failed = chaos.monkey_outcome.startswith("failed")
    # a run that ended before the plan's events were all injected tested less than it claims
    # (none at all, if it ended before the warm-up): not a pass
    incomplete = len(chaos.events) < chaos.planned
    if incomplete and chaos.actors_seen is False:
        click.echo(
            f"incomplete: {len(chaos.events)} of {chaos.planned} planned events: no actor of the "
            "run ever showed in its process tree on this machine (actors that chatlearn launch "
            "starts on other hosts are not in it); run chaos on a run with its actors here"
        )
    elif incomplete:
        click.echo(
            f"incomplete: {len(chaos.events)} of {chaos.planned} planned events happened before "
            "the run ended; make the run longer (more episodes or samples) or the plan shorter "
            "(fewer kills and stops, a shorter --warmup or --max-gap)"
        )
    passed = all(r.ok for r in runs) and comparison.ok and not monkey_failed and not incomplete
    click.echo(f"chaos: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


def _find_run_dir_quiet(directory: Path) -> Path | None:
    """:func:`find_run_dir`, or None where it has no single answer."""
    try:
        return find_run_dir(directory)
    except ValueError:
        return None
