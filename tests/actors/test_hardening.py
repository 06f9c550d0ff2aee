"""A run against its surroundings: clean and quick shutdowns, same-user intruders, secrets in
command lines and environment blocks, directories left behind by a killed coordinator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import actors_testlib as lib
import psutil
import pytest

import chatlearn
from chatlearn.actors import ActorSystem
from chatlearn.config import reset_args
from chatlearn.engine import engine as engine_module
from chatlearn.engine.engine import DPOEngine
from chatlearn.transport import RuntimeDir
from chatlearn.transport.endpoints import remove_if_abandoned, sweep_stale

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "engine"))
from echo_modules import EchoReference, EchoTrainer  # noqa: E402

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def systems(monkeypatch: pytest.MonkeyPatch) -> list[ActorSystem]:
    """The ActorSystems the engine creates during the test (its own is dropped at the end)."""
    created: list[ActorSystem] = []

    class Recorded(ActorSystem):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(engine_module, "ActorSystem", Recorded)
    return created


def _init(tmp_path: Path, **runtime) -> None:
    chatlearn.init(
        {
            "models": {
                "reference": {"num_cpu": 1},
                "policy_trainer": {"num_cpu": 1, "trainable": True},
            },
            "runtime": {
                "output_dir": str(tmp_path),
                "echo_log": str(tmp_path / "log.jsonl"),
                "data_shuffle": False,
                "train_micro_batch_size": 2,
                "train_global_batch_size": 4,
                **runtime,
            },
        }
    )


def _trained_rows(tmp_path: Path) -> list[int]:
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    return sorted(r for t in log if t["event"] == "train" for b in t["batches"] for r in b)


async def test_a_healthy_run_exits_0_within_a_second_of_its_end(tmp_path, systems):
    _init(tmp_path, num_episode=1, sample_per_episode=8)
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engine.set_dataset(list(range(8)))
        await engine.learn_async()
    finally:
        reset_args()
    events = list(systems[0].events)
    shutdown = next(e.time for e in events if e.kind == "shutdown")
    exits = [e for e in events if e.kind == "exit"]
    assert [e.detail for e in exits] == ["exit code 0", "exit code 0"]
    assert max(e.time for e in exits) - shutdown < 1.0, [(e.kind, e.time) for e in events]


async def test_a_same_user_process_without_the_run_secret_changes_nothing(tmp_path, systems):
    # runs until the intruder has tried everything (then it is asked to stop), however long
    # the intruder takes to start on a busy machine
    _init(tmp_path, num_episode=1000, sample_per_episode=16, echo_cost=0.1)
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engine.set_dataset(list(range(16)))
        run = asyncio.ensure_future(engine.learn_async())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not run.done():
            system = systems[0] if systems else None
            if system is not None and system.runtime_dir is not None:
                names = os.listdir(system.runtime_dir.path)
                if any(n.startswith("inbox") for n in names) and "control" in names:
                    break
            await asyncio.sleep(0.02)
        system = systems[0]
        assert system.runtime_dir is not None
        (identity,) = system.identities()["reference"]
        intruder = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "intruder.py"),
            str(system.runtime_dir.path),
            identity.decode(),
            stdout=subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(intruder.communicate(), 30)
        came_in_time = not run.done()
        engine.pipeline.request_stop()
        await asyncio.wait_for(run, 60)
    finally:
        reset_args()
    report = json.loads(out)
    assert came_in_time, "the run ended before the intruder was done"
    assert report["sockets"] >= 2  # the control socket and the trainer's inbox at least
    assert report["connected"] == 0 and report["refused"] == report["sockets"], report
    assert system.failure is None
    steps = engine.state.iteration
    assert steps >= 1  # the run trained while the intruder tried
    # no fake sample trained: in order (no shuffle), step k trains samples 4k..4k+3 mod 16
    assert _trained_rows(tmp_path) == sorted(g % 16 for g in range(4 * steps))


async def test_secrets_are_in_no_command_line_or_environment_block(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-456")
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        assert await group.call(0, "env", "HF_TOKEN") == "hf_secret_value_123"
        assert await group.call(0, "env", "WANDB_API_KEY") == "wandb-secret-456"
        (identity,) = system.identities()["m"]
        secrets = [
            b"hf_secret_value_123",
            b"wandb-secret-456",
            identity,
            system.security.secret.hex().encode(),
        ]
        pid = group[0].pid
        for name in ("cmdline", "environ"):
            block = Path(f"/proc/{pid}/{name}").read_bytes()
            assert not [s for s in secrets if s in block], name


async def test_a_run_member_that_breaks_the_protocol_stops_the_run_naming_it(tmp_path):
    """Garbage from inside the run (this process holds the run's secret) is not dropped: the
    run stops, naming the actor whose identity sent it."""
    import zmq

    from chatlearn.actors import ActorDeadError
    from chatlearn.transport import security

    cfg = lib.make_config({"m": {"num_cpu": 1}})
    system = ActorSystem(cfg)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        (identity,) = system.identities()["m"]
        assert system.runtime_dir is not None
        ctx = zmq.Context.instance()
        impostor = ctx.socket(zmq.DEALER)
        try:
            for option, value in security.socket_options("ipc://x", bind=False).items():
                impostor.setsockopt(option, value)
            impostor.setsockopt(zmq.ROUTING_ID, identity)
            impostor.setsockopt(zmq.LINGER, 0)
            impostor.connect(system.server.endpoint)
            impostor.send(b"not a chatlearn message")
            deadline = time.monotonic() + 10
            while system.failure is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            impostor.close(0)
    assert isinstance(system.failure, ActorDeadError)
    assert system.failure.model == "m" and "broke the protocol" in str(system.failure)


async def test_a_broken_batch_from_inside_the_run_fails_the_trainer_naming_the_sender(
    tmp_path, systems
):
    from chatlearn.actors import ActorError
    from chatlearn.transport import DataSender

    _init(tmp_path, num_episode=8, sample_per_episode=16, echo_cost=0.1)
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engine.set_dataset(list(range(16)))
        run = asyncio.ensure_future(engine.learn_async())
        inbox = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and inbox is None and not run.done():
            directory = systems[0].runtime_dir if systems else None
            names = os.listdir(directory.path) if directory is not None else []
            inbox = next((directory.path / n for n in names if n.startswith("inbox")), None)
            await asyncio.sleep(0.02)
        assert inbox is not None
        sender = DataSender(f"ipc://{inbox}")  # this process holds the run's secret
        try:
            await sender.send({"hello": 1})
            with pytest.raises(ActorError, match="sent by coordinator"):
                await asyncio.wait_for(run, 60)
        finally:
            sender.close(0)
    finally:
        reset_args()


def _workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "chatlearn.actors.worker" in cmdline:
            found.append(proc)
    return found


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_kill9_of_the_coordinator_during_startup_leaves_nothing(tmp_path, delay):
    """Killed while its actors are still starting: they remove the run's directory and exit."""
    base = os.environ["XDG_RUNTIME_DIR"]
    before = set(os.listdir(base))
    already = {p.pid for p in _workers()}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "coordinator_script.py"), "--slow-setup"],
        stdout=subprocess.DEVNULL,
    )
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = [p for p in _workers() if p.pid not in already]
            if len(workers) == 2:
                break
            time.sleep(0.01)
        assert len(workers) == 2
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and set(os.listdir(base)) - before:
            time.sleep(0.05)
        assert not set(os.listdir(base)) - before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for worker in workers:
            if worker.is_running():
                worker.kill()


def test_a_new_coordinator_sweeps_directories_of_dead_ones(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    stale = tmp_path / "chatlearn-stale"
    stale.mkdir(mode=0o700)
    (stale / ".owner").write_text(f"{dead} 1")
    (stale / "control").write_text("")
    reused = tmp_path / "chatlearn-reused"  # a live pid, but started at another time: reused
    reused.mkdir(mode=0o700)
    (reused / ".owner").write_text(f"{os.getpid()} 1")
    kept = []
    for name, mode in (("chatlearn-no-owner-file", 0o700), ("chatlearn-shared", 0o755)):
        kept.append(tmp_path / name)
        kept[-1].mkdir(mode=mode)
    (kept[1] / ".owner").write_text(f"{dead} 1")  # not private: not one of ours
    (tmp_path / "other-stale").mkdir(mode=0o700)  # not our prefix
    (tmp_path / "other-stale" / ".owner").write_text(f"{dead} 1")
    live = RuntimeDir(base=tmp_path)  # sweeps before it creates its own
    try:
        assert not stale.exists() and not reused.exists()
        assert all(p.is_dir() for p in kept) and (tmp_path / "other-stale").is_dir()
        assert sweep_stale(tmp_path) == []  # a live coordinator's directory stays
        assert live.path.is_dir()
    finally:
        live.close()


def test_an_orphan_removes_the_runs_directory_only_once_its_coordinator_is_dead(
    tmp_path: Path,
) -> None:
    """An actor whose parent dies takes its coordinator for dead and removes the run's
    directory. Under ``chatlearn launch --launcher local`` (and on a remote host) that parent
    is a shell, which the coordinator stops while it restarts the actor: the live coordinator's
    directory, its sockets with it, went. Now it goes only when its creator is dead; a zombie
    (a killed coordinator not yet reaped) is dead."""
    live = RuntimeDir(base=tmp_path)  # this process's: alive
    script = (
        "import sys\n"
        "from chatlearn.actors import worker\n"
        "worker._cleanup_dirs[:] = [sys.argv[1]]\n"
        "worker._OWNER_EXIT_WAIT = 0.3\n"
        "worker._exit_orphaned()\n"
    )
    try:
        orphan = subprocess.run([sys.executable, "-c", script, str(live.path)], timeout=60)
        assert orphan.returncode == 4  # EXIT_ORPHANED
        assert live.path.is_dir()  # its coordinator lives: left alone
    finally:
        live.close()
    # a creator that exited but is not reaped yet (a zombie), then one that is gone
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(500):  # bounded: 10 s
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            if fields[0] == "Z":
                break
            time.sleep(0.02)
        assert fields[0] == "Z"
        started = fields[19]  # its own start time, as its owner file would say
        zombie = tmp_path / "chatlearn-zombie"
        zombie.mkdir(mode=0o700)
        (zombie / ".owner").write_text(f"{child.pid} {started}")
        assert remove_if_abandoned(zombie)
        assert not zombie.exists()
    finally:
        child.wait()


async def test_a_stop_cancelled_from_outside_does_not_cancel_its_other_callers() -> None:
    """The stop runs as one task every shutdown() call waits for; when that task itself is
    cancelled (the loop closing), a caller nobody cancelled returns instead of getting the
    CancelledError, and a caller that was cancelled gets its own."""
    system = ActorSystem(lib.make_config({"a": {"num_cpu": 1}}))
    release = asyncio.Event()

    async def slow_stop() -> None:
        await release.wait()

    system._shutdown = slow_stop  # type: ignore[method-assign]
    calm = asyncio.create_task(system.shutdown())
    cancelled = asyncio.create_task(system.shutdown())
    try:
        await asyncio.sleep(0.05)
        cancelled.cancel()  # a caller cancelled while the stop runs: it waits for the stop
        await asyncio.sleep(0.05)
        assert not cancelled.done()
        assert system._shutdown_task is not None
        system._shutdown_task.cancel()  # the stop itself, from outside
        await asyncio.wait_for(calm, 5)  # returns: nobody cancelled it
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(cancelled, 5)
    finally:  # no task left pending when an assertion fails
        release.set()
        await asyncio.gather(calm, cancelled, return_exceptions=True)
