"""Stopping on signals (escalation, handler install/restore, exit codes, a second signal) and
checkpoints taken on request from a custom flow, resumed mid-episode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import chatlearn
from chatlearn.config import reset_args
from chatlearn.engine.checkpoint import COORDINATOR, CheckpointManager, CoordinatorState
from chatlearn.engine.engine import DPOEngine
from chatlearn.engine.interrupts import (
    Interrupts,
    SignalGuard,
    TrainingInterrupted,
    interrupted,
)

sys.path.insert(0, str(Path(__file__).parent))
from echo_modules import EchoReference, EchoSpawningReference, EchoTrainer  # noqa: E402
from resume_trials import GATE, Trial, assert_all_exit, stop  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_interrupted_is_a_system_exit_with_the_shell_exit_code() -> None:
    sigint, sigterm = interrupted(signal.SIGINT), interrupted(signal.SIGTERM)
    assert isinstance(sigint, SystemExit) and sigint.code == 130
    assert isinstance(sigint, KeyboardInterrupt)  # `except KeyboardInterrupt` still catches it
    assert isinstance(sigterm, TrainingInterrupted) and sigterm.code == 143
    assert not isinstance(sigterm, KeyboardInterrupt)


async def test_first_signal_is_graceful_then_the_watchdog_or_a_second_one_is_not() -> None:
    calls: list[str] = []

    def graceful() -> bool:
        calls.append("graceful")
        return True

    interrupts = Interrupts(graceful=graceful, hard=calls.append, stop_timeout=0.05)
    interrupts.handle(signal.SIGTERM)
    assert calls == ["graceful"]
    await asyncio.sleep(0.3)
    assert calls[1].startswith("no graceful stop within")
    interrupts.handle(signal.SIGINT)
    assert calls[2] == "interrupted by SIGINT"
    assert interrupts.signum == signal.SIGTERM  # the first signal decides the exit code
    interrupts.close()

    calls.clear()
    nothing_to_save = Interrupts(graceful=lambda: False, hard=calls.append, stop_timeout=5)
    nothing_to_save.handle(signal.SIGINT)
    assert calls == ["interrupted by SIGINT"]
    nothing_to_save.close()


async def test_a_graceful_stops_checkpoint_gets_its_own_stop_timeout(caplog) -> None:
    """The steps' allowance cut off the save the graceful stop is for: the run ended at its
    previous checkpoint (a large model's save takes minutes)."""
    calls: list[str] = []
    interrupts = Interrupts(graceful=lambda: True, hard=calls.append, stop_timeout=1.0)
    interrupts.saving()  # a save outside a stop: nothing to time
    interrupts.handle(signal.SIGTERM)
    await asyncio.sleep(0.5)  # the running steps finish; the checkpoint starts
    interrupts.saving()
    await asyncio.sleep(0.7)  # past the steps' second, within the save's
    assert calls == []
    await asyncio.sleep(1.3)
    assert calls == ["checkpoint not written within 1 s"]
    assert "writing the checkpoint (at most 1 s)" in caplog.text
    interrupts.close()

    # once written, the rest of the stop is timed as the steps were, not blamed on the save
    calls.clear()
    interrupts = Interrupts(graceful=lambda: True, hard=calls.append, stop_timeout=1.0)
    interrupts.handle(signal.SIGTERM)
    interrupts.saving()
    await asyncio.sleep(0.2)
    interrupts.saved()
    await asyncio.sleep(1.5)
    assert calls == ["no graceful stop within 1 s"]
    interrupts.close()


async def _send_and_wait(signum: int, seen: list[int]) -> None:
    """Send `signum` to this process; wait (bounded) until the guard's callback saw something."""
    os.kill(os.getpid(), signum)
    for _ in range(100):  # the loop runs the handler on its next iteration
        if seen:
            return
        await asyncio.sleep(0.01)


async def test_signal_guard_routes_signals_and_restores_the_previous_handler() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    seen: list[int] = []
    with SignalGuard(seen.append):
        await _send_and_wait(signal.SIGTERM, seen)
    assert seen == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is previous


async def test_sighup_stops_gracefully_unless_it_is_ignored() -> None:
    """`chatlearn launch` forwards SIGHUP as a stop: it met the default action, and the
    coordinator died at once with the steps since its last checkpoint. Under nohup (SIGHUP
    ignored) the program is to outlive its terminal: that stays."""
    seen: list[int] = []
    with SignalGuard(seen.append):
        await _send_and_wait(signal.SIGHUP, seen)
    assert seen == [signal.SIGHUP]
    assert interrupted(signal.SIGHUP).code == 129
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with SignalGuard(seen.append):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.05)
        assert seen == [signal.SIGHUP] and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_signal_guard_gives_the_loops_own_handler_back(loop_kind: str) -> None:
    """An embedding program (a web server) with loop.add_signal_handler(SIGTERM) ignored SIGTERM
    for good after learn_async(): remove_signal_handler deleted the program's handler."""
    import uvloop

    async def main() -> tuple[list, list, list]:
        loop = asyncio.get_running_loop()
        theirs: list[str] = []
        ours: list[int] = []
        loop.add_signal_handler(signal.SIGTERM, theirs.append, "program")
        try:
            with SignalGuard(ours.append):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(200):  # bounded: the loop runs the handler soon
                    if ours:
                        break
                    await asyncio.sleep(0.01)
            during = list(theirs)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(200):
                if len(theirs) > len(during):
                    break
                await asyncio.sleep(0.01)
            return ours, during, theirs
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    run = asyncio.run if loop_kind == "asyncio" else uvloop.run
    previous = signal.getsignal(signal.SIGTERM)
    ours, during, theirs = run(main())
    assert ours == [signal.SIGTERM]
    # asyncio's loop shows its handler: replaced for the guard's duration; uvloop's runs too
    assert during == ([] if loop_kind == "asyncio" else ["program"])
    assert theirs == [*during, "program"]  # the program's handler is back afterwards
    assert signal.getsignal(signal.SIGTERM) is previous


def test_second_signal_stops_at_once_without_a_new_checkpoint(tmp_path: Path) -> None:
    trial = Trial(tmp_path)
    proc, log = trial.start(gate=GATE)
    try:
        trial.wait_at_gate(proc)  # the step at the gate never finishes: only a hard stop ends it
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(20)
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 143, text  # SIGTERM came first
    assert "SIGINT received (a second signal): stopping at once" in text
    assert_all_exit(trial.worker_pids())
    assert trial.complete() == [4]


def _config(tmp_path: Path, **runtime) -> dict:
    return {
        "models": {
            "reference": {"num_cpu": 1},
            "policy_trainer": {"num_cpu": 1, "trainable": True},
        },
        "runtime": {
            "output_dir": str(tmp_path),
            "echo_log": str(tmp_path / "log.jsonl"),
            "data_shuffle": False,
            "num_episode": 2,
            "sample_per_episode": 8,
            "generation_batch_size": 4,
            "train_micro_batch_size": 2,
            "train_global_batch_size": 2,
            **runtime,
        },
    }


def _trains(tmp_path: Path) -> list[dict]:
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


async def test_checkpoint_on_request_from_a_custom_flow_resumes_mid_episode(tmp_path: Path):
    chatlearn.init(_config(tmp_path, echo_cost=0.05))
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engine.set_dataset(range(16))
        training = asyncio.create_task(engine.learn_async())
        try:
            for _ in range(3000):  # bounded (60 s) wait for the second step: start-up included
                if engine.pipeline is not None and engine.state.iteration >= 2 or training.done():
                    break
                await asyncio.sleep(0.02)
            assert engine.trainer.iteration == engine.state.iteration >= 2  # live, mid-run
            path = await engine.save_checkpoint(episode_id=7)  # ChatLearn's argument: warned
            await training
        finally:  # a failed assertion must not leave the run's processes behind
            training.cancel()
            await asyncio.gather(training, return_exceptions=True)
        with pytest.raises(RuntimeError, match="needs a running training"):
            await engine.save_checkpoint()
        summary = engine.logging_summary()  # ChatLearn's: the run's figures so far
        assert summary["steps"] == 8 and summary["samples"] == 16 and summary["restarts"] == 0
    finally:
        reset_args()
    saved = CoordinatorState.from_json((path / COORDINATOR).read_text())
    assert saved.reason == "request" and 2 <= saved.iteration < 8
    assert saved.episode == saved.iteration // 4 and saved.step_in_episode == saved.iteration % 4
    assert saved.consumed_samples == 8 * saved.episode
    checkpoints = CheckpointManager(tmp_path / "CHATLEARN" / "checkpoints").scan(verify=True)
    assert [c.iteration for c in checkpoints] == [saved.iteration]  # no interval: no others
    first_run = _trains(tmp_path)
    assert [t["iteration"] for t in first_run] == list(range(8))

    chatlearn.init(_config(tmp_path))  # same output path: resumes from the request checkpoint
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engine.set_dataset(range(16))
        await engine.learn_async()
    finally:
        reset_args()
    resumed = _trains(tmp_path)[len(first_run) :]
    assert [t["iteration"] for t in resumed] == list(range(saved.iteration, 8))
    assert [t["batches"] for t in resumed] == [t["batches"] for t in first_run[saved.iteration :]]
    assert engine.trainer.iteration == 8


async def test_a_request_at_an_episodes_end_is_served_before_its_periodic_save(tmp_path: Path):
    # One step an episode, a checkpoint every episode, a request made during the first step:
    # it is served at the episode's end, before the periodic save of the same iteration, so
    # the checkpoint there is the requested one (a sharded trainer writes its hf_model only on
    # request and at the end); the trainer is told why it saves (`checkpoint_reason`)
    gate = tmp_path / "gate"
    runtime = {"num_episode": 3, "sample_per_episode": 2, "generation_batch_size": 2}
    async with _training(
        tmp_path, samples=6, started=lambda _: Path(f"{gate}.entered").exists(),
        save_episode_interval=1, echo_gate=str(gate), **runtime,
    ) as (engine, training):  # fmt: skip
        try:
            assert engine.state.iteration == 0, "the first step was not held"
            request = asyncio.ensure_future(engine.save_checkpoint())
            await asyncio.sleep(0.2)  # the request reaches the pipeline while the step is held
            gate.touch()
            path = await request
            await training
        finally:
            gate.touch()
    saved = CoordinatorState.from_json((path / COORDINATOR).read_text())
    assert (saved.iteration, saved.reason) == (1, "request")
    checkpoints = CheckpointManager(tmp_path / "CHATLEARN" / "checkpoints").scan(verify=True)
    reasons = [
        CoordinatorState.from_json((c.path / COORDINATOR).read_text()).reason for c in checkpoints
    ]
    assert [c.iteration for c in checkpoints] == [1, 2, 3]
    assert reasons == ["request", "interval", "end"]  # the last episode's is the end's
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    saves = [r for r in map(json.loads, lines) if r["event"] == "save"]
    assert [(r["iteration"], r["reason"]) for r in saves] == [
        (1, "request"), (2, "interval"), (3, "end")
    ]  # fmt: skip


async def test_a_graceful_stop_of_a_run_that_never_saves_does_not_promise_a_checkpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the message said "then saving and stopping" when no interval was set and nothing was saved
    for saves, said in ((True, "then saving and stopping"), (False, "without a checkpoint")):
        interrupts = Interrupts(graceful=lambda: True, hard=print, stop_timeout=5, saves=saves)
        with caplog.at_level("WARNING", logger="chatlearn.engine"):
            interrupts.handle(signal.SIGTERM)
        assert said in caplog.text, caplog.text
        caplog.clear()
        interrupts.close()


@contextlib.asynccontextmanager
async def _training(
    tmp_path: Path,
    reference: type = EchoReference,
    samples: int = 16,
    started: Callable[[DPOEngine], bool] | None = None,
    **runtime: Any,
) -> AsyncIterator[tuple[DPOEngine, asyncio.Task]]:
    """learn_async() of the echo models over `samples` samples, in a task, once `started` says
    so (by default: once its first step is done); the task is cancelled and awaited, and the
    config reset, however the test ends."""
    chatlearn.init(_config(tmp_path, **runtime))

    def first_step_done(engine: DPOEngine) -> bool:
        return engine.pipeline is not None and engine.state.iteration >= 1

    ready = started or first_step_done
    try:
        engine = DPOEngine(reference("reference"), EchoTrainer("policy_trainer"))
        engine.set_dataset(range(samples))
        training = asyncio.create_task(engine.learn_async())
        try:
            for _ in range(3000):  # bounded (60 s): start-up included
                if ready(engine) or training.done():
                    break
                await asyncio.sleep(0.02)
            assert not training.done() and ready(engine)
            yield engine, training
        finally:
            training.cancel()
            await asyncio.gather(training, return_exceptions=True)
    finally:
        reset_args()


def _pids(tmp_path: Path) -> list[int]:
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    return sorted({r["pid"] for r in map(json.loads, lines)})


async def test_a_second_learn_async_is_refused_and_the_first_trains_on(tmp_path: Path) -> None:
    """It started a second pipeline on the same processes: every episode twice, the live run's
    metrics moved aside, and both failed on each other's checkpoint staging."""
    async with _training(tmp_path, echo_cost=0.02) as (engine, training):
        with pytest.raises(RuntimeError, match="learn_async\\(\\) is already running"):
            await engine.learn_async()
        result = await training
    assert result.steps == 8 and [t["iteration"] for t in _trains(tmp_path)] == list(range(8))


async def test_cancelling_again_while_it_stops_still_stops_everything(tmp_path: Path) -> None:
    """A second cancel during the stop interrupted the runtime's close: an actor outlived the
    call and the runtime directory (its sockets) stayed until the interpreter exited."""
    async with _training(tmp_path, echo_cost=0.05, num_episode=40) as (engine, training):
        system = engine.system
        assert system is not None and system.runtime_dir is not None
        runtime_dir = system.runtime_dir.path
        for _ in range(4):  # the first cancel, then again while it stops
            training.cancel()
            await asyncio.sleep(0.02)
        with pytest.raises(asyncio.CancelledError):
            await training
    assert not runtime_dir.exists()
    assert_all_exit(_pids(tmp_path), within=0.5)  # gone when the cancelled call returned


async def test_a_signal_stops_learn_async_in_a_task_with_an_exception_it_can_catch(
    tmp_path: Path,
) -> None:
    """learn_async() raised a SystemExit; asyncio re-raises those out of the event loop itself
    when they end a task, so an embedding program's loop died whatever caught the task."""
    runtime = {"echo_cost": 0.05, "num_episode": 40, "save_episode_interval": 100}
    async with _training(tmp_path, **runtime) as (_, training):
        os.kill(os.getpid(), signal.SIGTERM)  # the engine's handler: a graceful stop
        with pytest.raises(chatlearn.TrainingStopped) as stopped:
            await training
    assert stopped.value.code == 143 and stopped.value.checkpoint is not None
    assert not isinstance(stopped.value, SystemExit)
    assert stopped.value.checkpoint.name == f"iter_{len(_trains(tmp_path)):07d}"
    exit_code = stopped.value.as_exit()
    assert isinstance(exit_code, TrainingInterrupted) and exit_code.code == 143
    # it crosses process boundaries (a learn_async() in a worker process): by its arguments
    import pickle

    again = pickle.loads(pickle.dumps(stopped.value))
    assert (again.signum, again.checkpoint, str(again)) == (
        stopped.value.signum,
        stopped.value.checkpoint,
        str(stopped.value),
    )
    assert_all_exit(_pids(tmp_path))


async def test_a_graceful_stop_ends_the_processes_a_module_started(tmp_path: Path) -> None:
    """They were looked for once the actors had exited after SHUTDOWN: re-parented to init by
    then, they ran on after the run."""
    runtime = {"echo_cost": 0.05, "num_episode": 40, "save_episode_interval": 100}
    async with _training(tmp_path, EchoSpawningReference, **runtime) as (_, training):
        lines = (tmp_path / "log.jsonl").read_text().splitlines()
        (pid,) = [r["child"] for r in map(json.loads, lines) if r["event"] == "child"]
        child = psutil.Process(pid)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the engine's handler: a graceful stop
            with pytest.raises(chatlearn.TrainingStopped):
                await training
            with contextlib.suppress(psutil.TimeoutExpired):
                child.wait(3.0)
            assert not child.is_running(), f"the module's child process {pid} outlived the run"
        finally:
            with contextlib.suppress(psutil.Error):
                child.kill()  # psutil refuses if the pid was reused meanwhile


def test_stop_called_without_an_event_loop_stops_before_it_returns(tmp_path: Path) -> None:
    # ChatLearn programs call engine.stop() after learn(); as a coroutine function it only
    # made a "coroutine was never awaited" warning and stopped nothing
    chatlearn.init(_config(tmp_path))
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
    finally:
        reset_args()
    loops: list[asyncio.AbstractEventLoop] = []

    class System:  # what stop() shuts down: the run's processes
        loop_closed = False  # started on a loop that still runs

        async def shutdown(self) -> None:
            loops.append(asyncio.get_running_loop())

    engine.system = System()  # type: ignore[assignment]
    done = engine.stop()
    assert len(loops) == 1 and engine.system is None
    engine.stop()  # nothing runs any more: nothing to do

    async def in_a_loop() -> None:
        await done  # what stop() returned is an awaitable that is already done
        engine.system = System()  # type: ignore[assignment]
        stopping = engine.stop()  # inside a running loop: the stop to await
        assert engine.system is not None
        await stopping
        assert len(loops) == 2 and engine.system is None

    asyncio.run(in_a_loop())


def test_stop_after_the_loop_the_engine_started_on_has_closed(tmp_path: Path) -> None:
    # asyncio.run(engine.start()) and later engine.stop(): the stop awaited the first loop's
    # tasks on a new loop and raised "Event loop is closed"; the actor and the runtime
    # directory stayed until the script ended
    from chatlearn.actors import BaseModule
    from chatlearn.engine.engine import Engine

    chatlearn.init({"models": {"reference": {"num_cpu": 1}}})
    engine = Engine(BaseModule("reference"))
    try:
        asyncio.run(engine.start())
        assert engine.system is not None and engine.system.runtime_dir is not None
        runtime_dir = engine.system.runtime_dir.path
        actors = [psutil.Process(h.popen.pid) for h in engine.system._actors]
        assert actors and runtime_dir.is_dir()
        engine.stop()
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in actors)
        assert not runtime_dir.exists() and engine.system is None
    finally:
        if engine.system is not None:
            engine.system.stop_abandoned()
        reset_args()
