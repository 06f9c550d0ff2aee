"""The monkey: a run's actors as its process tree shows them, the plan of what to do to them,
and the thread that does it (SIGKILL, SIGSTOP at random moments, bounded in count and time)."""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

REFERENCE = "reference"  # target kinds of a plan
TRAINER = "trainer"
_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
_STOPPED = {psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP}


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
