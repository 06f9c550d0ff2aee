"""In-process mode: the same handles, services and errors, with the module in this process."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import actors_testlib as lib
import pytest

from chatlearn.actors import ActorError, ActorSystem, ActorSystemClosedError, ActorTimeoutError
from chatlearn.transport import EncodeError

pytestmark = pytest.mark.timeout(30)

SERVICES = {"echo": "actors_testlib:EchoService"}


async def test_in_process_calls_run_here_on_a_compute_thread(tmp_path):
    events = tmp_path / "events.txt"
    cfg = lib.make_config(
        {"m": {"num_cpu": 2, "cpu_per_process": 1, "model_args": {"events_file": str(events)}}}
    )
    system = ActorSystem(cfg, in_process=True)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg), services={"m": SERVICES})
        assert (len(group), group.num_replica) == (2, 2)
        assert group[0].pid == os.getpid()
        assert await group.call(0, "forward_step", {"x": [1]}) == {"x": [2], "iteration": 0}
        assert await group.call(0, "forward_step", {"x": [1]}, iteration=9) == {
            "x": [2],
            "iteration": 9,
        }
        assert await group.scatter("add", [1, 2]) == [1, 2]
        thread = await group.call(1, "thread_name")
        assert (
            thread.startswith("chatlearn-inproc-m-1") and thread != threading.current_thread().name
        )
        pong = await group.call(0, "echo.ping", 1)
        assert pong["in_process"] is True and pong["thread"] == threading.current_thread().name
        assert await group.call(0, "echo.offload", 5) == 6
        wheres = await group.call_all("where")
        assert [w["replica_id"] for w in wheres] == [0, 1]
    assert system.event_kinds() == ["ready", "ready", "shutdown", "stopped", "closed"]
    lines = lib.read_events(events)
    assert lines.count("m 0 init") == 3  # the template, then one live instance per replica
    assert lines.count("m 0 setup") == 2
    assert lines[-2:] == ["m 0 forward_step 0", "m 0 forward_step 9"]


async def test_in_process_values_cross_a_wire_copy():
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    async with ActorSystem(cfg, in_process=True, fail_fast=False) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        payload = {"x": [1, 2]}
        out = await group.call(0, "echo", payload)
        assert out == {"args": [payload], "kwargs": {}}
        assert out["args"][0] is not payload  # the actor got a copy, as over a socket
        with pytest.raises(ActorError) as info:
            await group.call(0, "unsendable")
        assert info.value.type_name == "EncodeError"
        with pytest.raises(EncodeError):
            await group.call(0, "echo", threading.Lock())  # arguments are checked too


async def test_in_process_errors_match_remote_errors():
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    system = ActorSystem(cfg, in_process=True)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        with pytest.raises(ActorError) as info:
            await group.call(0, "fail", "inproc bad")
        err = info.value
        assert (err.type_name, err.method, err.model, err.rank) == ("ValueError", "fail", "m", 0)
        assert "actors_testlib.py" in err.remote_traceback.splitlines()[1]
        with pytest.raises(ActorError):
            await group.call(0, "noop")  # fail-fast: the run is stopped
    assert "failure" in system.event_kinds()


async def test_in_process_sys_exit_in_a_hook_is_an_actor_error_as_in_a_process():
    """asyncio re-raises a SystemExit that ends a task out of the event loop: `sys.exit(5)` in
    a hook ended the user's program with exit code 5 and no message."""
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    system = ActorSystem(cfg, in_process=True)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        with pytest.raises(ActorError) as info:
            await group.call(0, "sys_exit", 5)
    err = info.value
    assert (err.type_name, err.method, err.model) == ("SystemExit", "sys_exit", "m")
    assert str(err).startswith("SystemExit: 5 [model=m")
    assert "failure" in system.event_kinds()


async def test_in_process_close_waits_for_the_running_call_and_drops_queued_ones():
    """A compute thread left inside torch when the interpreter exits can abort it ("terminate
    called without an active exception", exit 134)."""
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    async with ActorSystem(cfg, in_process=True) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        running = asyncio.ensure_future(group.call(0, "sleep", 0.5))
        queued = asyncio.ensure_future(group.call(0, "sleep", 60))
        await asyncio.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name.startswith("chatlearn-inproc-m")]
    assert await running == "slept"
    with pytest.raises(ActorSystemClosedError):
        await queued


def test_a_compute_thread_fails_what_is_submitted_after_its_stop():
    # queued behind the end of the thread, it would wait for ever
    from chatlearn.actors.worker_core import ComputeThread

    compute = ComputeThread("stopped")
    reason = RuntimeError("closed")
    compute.stop(reason)
    assert compute.join(10)
    assert compute.submit("late", print).exception(timeout=1) is reason


def test_a_compute_thread_reports_the_hook_it_runs_within_a_call():
    # a service call runs several hooks; heartbeats name the one running and time it alone
    from chatlearn.actors.module import BaseModule, invoke
    from chatlearn.actors.worker_core import ComputeThread

    seen: list[tuple[str, float] | None] = []
    compute = ComputeThread("labels")

    class Steps(BaseModule):
        def train_step(self, data, iteration):
            seen.append(compute.clock.reading())

    def service_call(module):
        time.sleep(0.2)
        invoke(module, "train_step", ([],))
        seen.append(compute.clock.reading())

    try:
        module = Steps("m", lib.make_config({"m": {"num_cpu": 1}}))
        compute.submit("train", service_call, (module,)).result(timeout=10)
    finally:
        compute.stop(RuntimeError("done"))
    inner, outer = seen
    assert inner is not None and inner[0] == "train_step (iteration 0)" and inner[1] < 0.1
    assert outer is not None and outer[0] == "train" and outer[1] < 0.1  # its clock restarted
    assert compute.current is None


async def test_in_process_setup_error_and_call_timeout():
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    async with ActorSystem(cfg, in_process=True) as system:
        with pytest.raises(ActorError) as info:
            await system.launch(lib.FailingSetup("m", cfg))
        assert info.value.method == "setup"
    async with ActorSystem(cfg, in_process=True) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        with pytest.raises(ActorTimeoutError):
            await group[0].options(timeout=0.2).call("sleep", 1.0)


class _SlowSetup(lib.Recorder):
    """Counts the setups running at once (they share this interpreter and its imports)."""

    running = 0
    most = 0
    lock = threading.Lock()

    def setup(self) -> None:
        with self.lock:
            type(self).running += 1
            type(self).most = max(type(self).most, type(self).running)
        time.sleep(0.2)
        with self.lock:
            type(self).running -= 1
        super().setup()


async def test_in_process_setups_run_one_at_a_time():
    # two HF modules set up at once raced on transformers' lazy imports ("cannot import name
    # 'PreTrainedTokenizerFast'"): in-process mode failed for the DPO example
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 2, "cpu_per_process": 1}})
    async with ActorSystem(cfg, in_process=True) as system:
        groups = await system.launch(_SlowSetup("a", cfg), _SlowSetup("b", cfg))
        assert [len(g) for g in groups] == [1, 2]
    assert _SlowSetup.most == 1


async def test_in_process_rejects_multi_rank_replicas():
    cfg = lib.make_config(
        {"d": {"num_cpu": 2, "cpu_per_process": 1, "trainable": True}},
        {"train_micro_batch_size": 1, "train_global_batch_size": 2},
    )
    async with ActorSystem(cfg, in_process=True) as system:
        with pytest.raises(ValueError, match="in-process mode runs single-rank"):
            await system.launch(lib.Recorder("d", cfg))


async def test_dpo_engine_runs_end_to_end_in_process(tmp_path):
    """What a user debugging a module with pdb runs: no processes, the whole DPO flow."""
    import json
    import sys
    from pathlib import Path

    import chatlearn
    from chatlearn.config import reset_args
    from chatlearn.engine.engine import DPOEngine

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from echo_modules import EchoReference, EchoTrainer

    chatlearn.init(
        {
            "models": {
                "reference": {"num_cpu": 1},
                "policy_trainer": {"num_cpu": 1, "trainable": True},
            },
            "runtime": {
                "output_dir": str(tmp_path),
                "echo_log": str(tmp_path / "log.jsonl"),
                "num_episode": 2,
                "sample_per_episode": 8,
                "train_micro_batch_size": 2,
                "train_global_batch_size": 4,
                "data_shuffle": False,
                "in_process": True,
            },
        }
    )
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engine.set_dataset(list(range(8)))
        await engine.learn_async()
    finally:
        reset_args()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {r["pid"] for r in log} == {os.getpid()}  # everything ran in this process
    trained = sorted(r for t in log if t["event"] == "train" for b in t["batches"] for r in b)
    assert trained == sorted(list(range(8)) * 2)
