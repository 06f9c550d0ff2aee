"""Multi-"host" runs on one machine: actors on 127.0.0.2 and 127.0.0.3, started through the
launcher's shell command, connected back to the coordinator over tcp with CURVE."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import time

import actors_testlib as lib
import psutil
import pytest
import zmq
from launch_testlib import HOST_A, HOST_B, make_cluster

from chatlearn.actors import ActorDeadError, ActorLostError, ActorSystem, RestartPolicy
from chatlearn.actors.process import free_tcp_port
from chatlearn.transport import Message, MessageKind
from chatlearn.transport.messages import encode_message
from chatlearn.transport.security import num_refused_connections

pytestmark = pytest.mark.timeout(60)


async def test_models_placed_on_two_hosts_talk_over_tcp(tmp_path):
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 1}})
    cluster = make_cluster(tmp_path / "run")
    async with ActorSystem(cfg, cluster=cluster) as system:
        a, b = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
        assert [a[0].host, b[0].host] == [HOST_A, HOST_B]
        assert system.remote_endpoint.startswith("tcp://127.0.0.1:")
        assert await a.call(0, "add", 2) == 2
        assert await b.call(0, "echo", 1) == {"args": [1], "kwargs": {}}
        secrets = [cluster.keys.client_secret.decode(), cluster.keys.server_secret.decode()]
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                listing = " ".join(proc.cmdline()) + " ".join(proc.environ().values())
                assert not any(secret in listing for secret in secrets)
    assert system.event_kinds().count("exit") == 2


async def test_a_group_spanning_hosts_forms_one_torch_distributed_group(tmp_path):
    cfg = lib.make_config(
        {"d": {"num_cpu": 2, "cpu_per_process": 1, "trainable": True}},
        {"train_micro_batch_size": 1, "train_global_batch_size": 2},
    )
    async with ActorSystem(cfg, cluster=make_cluster(tmp_path / "run")) as system:
        (group,) = await system.launch(lib.DistModule("d", cfg))
        assert [h.host for h in group] == [HOST_A, HOST_B]
        reports = await group.call_all("report")
        assert [r["setup_sum"] for r in reports] == [3.0, 3.0]  # all-reduce across the hosts
        assert [r["env"]["RANK"] for r in reports] == ["0", "1"]
        assert [r["env"]["LOCAL_RANK"] for r in reports] == ["0", "0"]  # one rank per host


async def test_client_without_the_run_keys_gets_nothing_accepted(tmp_path, caplog):
    cfg = lib.make_config({"a": {"num_cpu": 1}})
    async with ActorSystem(cfg, cluster=make_cluster(tmp_path / "run")) as system:
        (group,) = await system.launch(lib.Recorder("a", cfg))
        endpoint = system.remote_endpoint
        keys = system.cluster.keys
        hello = encode_message(Message(kind=MessageKind.HELLO, payload={"pid": 1}))
        attackers = []
        context = zmq.Context()
        try:
            plain = context.socket(zmq.DEALER)  # no CURVE at all
            own_public, own_secret = zmq.curve_keypair()
            impostor = context.socket(zmq.DEALER)  # knows the server key, not the run's keys
            impostor.curve_serverkey = keys.server_public
            impostor.curve_publickey, impostor.curve_secretkey = own_public, own_secret
            attackers = [plain, impostor]
            for sock in attackers:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTING_ID, b"attacker")
                sock.connect(endpoint)
            with caplog.at_level(logging.WARNING):
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    for sock in attackers:
                        with contextlib.suppress(zmq.Again):
                            sock.send_multipart(hello, zmq.DONTWAIT)
                    await asyncio.sleep(0.1)
                assert all(sock.poll(0) == 0 for sock in attackers)  # and nothing comes back
        finally:
            for sock in attackers:
                sock.close(0)
            context.term()
        assert num_refused_connections() >= 1  # the impostor's handshake reached ZAP
        assert "unknown peer" not in caplog.text  # no message got through to the runtime
        assert system.server.num_malformed == 0
        assert system.failure is None
        assert await group.call(0, "add", 5) == 5  # the run is unaffected


async def test_a_client_with_the_run_keys_does_get_through(tmp_path, caplog):
    # The control for the test above: the same attack with the run's keys is seen.
    cfg = lib.make_config({"a": {"num_cpu": 1}})
    async with ActorSystem(cfg, cluster=make_cluster(tmp_path / "run")) as system:
        await system.launch(lib.Recorder("a", cfg))
        keys = system.cluster.keys
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.curve_serverkey = keys.server_public
            sock.curve_publickey, sock.curve_secretkey = keys.client_public, keys.client_secret
            sock.setsockopt(zmq.ROUTING_ID, b"insider")
            sock.connect(system.remote_endpoint)
            sock.send_multipart(encode_message(Message(kind=MessageKind.HEARTBEAT)))
            with caplog.at_level(logging.WARNING):
                deadline = time.monotonic() + 5
                while "unknown peer" not in caplog.text and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            assert "unknown peer" in caplog.text
        finally:
            sock.close(0)
            context.term()


@pytest.mark.serial  # asserts a wall-clock bound: run alone (make test's second part)
async def test_a_killed_remote_actor_is_reported_with_its_host(tmp_path):
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 1}}, {"heartbeat_timeout": 3})
    system = ActorSystem(cfg, cluster=make_cluster(tmp_path / "run"))
    try:
        _, b = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
        pid = (await b.call(0, "where"))["pid"]
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ActorDeadError) as info:
            while time.monotonic() - start < 10:
                await b.call(0, "noop")
                await asyncio.sleep(0.05)
        assert time.monotonic() - start < 3
        assert info.value.host == HOST_B
        assert f"on {HOST_B}" in str(info.value)
    finally:
        await system.shutdown()


@pytest.mark.serial  # asserts a wall-clock bound: run alone (make test's second part)
async def test_an_unreachable_host_fails_the_launch_naming_it(tmp_path):
    # Real ssh to a loopback port nothing listens on: ssh exits 255 at once.
    port = free_tcp_port()
    ssh = ["ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    cluster = make_cluster(tmp_path / "run", [(HOST_A, 1)], launcher="ssh", ssh_command=ssh)
    cfg = lib.make_config({"a": {"num_cpu": 1}})
    start = time.monotonic()
    async with ActorSystem(cfg, cluster=cluster) as system:
        with pytest.raises(ActorDeadError) as info:
            await system.launch(lib.Recorder("a", cfg))
    assert time.monotonic() - start < 10
    assert info.value.host == HOST_A
    assert f"ssh to host {HOST_A} failed" in str(info.value)
    assert "Connection refused" in info.value.stderr_tail


@pytest.mark.serial  # asserts a wall-clock bound: run alone (make test's second part)
async def test_over_ssh_a_dead_remote_actor_stops_the_run_and_its_remote_peers(tmp_path, sshd):
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 1}}, {"heartbeat_timeout": 3})
    cluster = make_cluster(tmp_path / "run", launcher="ssh", ssh_command=sshd.ssh_command())
    system = ActorSystem(cfg, cluster=cluster)
    try:
        a, b = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
        a_pid = (await a.call(0, "where"))["pid"]
        b_pid = (await b.call(0, "where"))["pid"]
        # Remote actors are children of sshd, not of the coordinator: only ssh links them.
        assert psutil.Process(a_pid).ppid() != os.getpid()
        start = time.monotonic()
        os.kill(b_pid, signal.SIGKILL)
        with pytest.raises(ActorDeadError) as info:
            while time.monotonic() - start < 10:
                await b.call(0, "noop")
                await asyncio.sleep(0.05)
        assert time.monotonic() - start < 3
        assert info.value.host == HOST_B and f"on {HOST_B}" in str(info.value)
        # ssh exits 255 for a remote command killed by a signal, as for its own failures: the
        # kill read as a lost host (and a restart that met one moved the model off it)
        assert f"killed by SIGKILL on host {HOST_B} (its shell's exit status 137)" in str(
            info.value
        ), str(info.value)
        assert "ssh to host" not in str(info.value)
    finally:
        await system.shutdown()
    # Stopping a's ssh client ended its remote process (stdin EOF), bounded.
    deadline = time.monotonic() + 5
    while psutil.pid_exists(a_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not psutil.pid_exists(a_pid) or psutil.Process(a_pid).status() == psutil.STATUS_ZOMBIE


async def test_this_machine_in_the_host_file_keeps_ipc_control(tmp_path):
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 1}})
    cluster = make_cluster(tmp_path / "run", [("localhost", 1), (HOST_B, 1)])
    async with ActorSystem(cfg, cluster=cluster) as system:
        a, b = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
        assert [a[0].host, b[0].host] == ["localhost", HOST_B]
        local, remote = system._actors
        assert local.popen.args[local.popen.args.index("--endpoint") + 1].startswith("ipc://")
        assert (await a.call(0, "where"))["pid"] == local.pid  # our own child, no shell
        assert await a.call(0, "add", 1) == 1 and await b.call(0, "add", 2) == 2


async def test_a_killed_remote_actor_is_restarted_on_its_host(tmp_path):
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 1}}, {"heartbeat_timeout": 3})
    async with ActorSystem(cfg, cluster=make_cluster(tmp_path / "run")) as system:
        a, b = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
        system.heal("b")
        pid = (await b.call(0, "where"))["pid"]
        assert await b.call(0, "add", 2) == 2
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ActorLostError) as info:
            for _ in range(500):
                await b.call(0, "noop")
                await asyncio.sleep(0.02)
        assert info.value.host == HOST_B
        await system.wait_ready("b")
        assert b[0].host == HOST_B and (await b.call(0, "where"))["pid"] != pid
        assert await b.call(0, "add", 1) == 1  # a new process (setup() ran again), over tcp
        assert await a.call(0, "add", 1) == 1


@pytest.mark.serial  # asserts a wall-clock bound: run alone (make test's second part)
async def test_a_host_that_can_no_longer_start_actors_ends_the_run_naming_it(tmp_path):
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 1}}, {"heartbeat_timeout": 3})
    cluster = make_cluster(tmp_path / "run")
    async with ActorSystem(cfg, cluster=cluster) as system:
        _, b = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
        system.heal("b", policy=RestartPolicy(max_restarts=2))
        # the host is gone: whatever starts an actor there fails at once
        cluster.spec = dataclasses.replace(cluster.spec, python="/nonexistent/python")
        os.kill((await b.call(0, "where"))["pid"], signal.SIGKILL)
        start = time.monotonic()
        error = None
        for _ in range(1000):  # lost (being restarted) until the restarts are spent
            try:
                await b.call(0, "noop")
            except ActorLostError:
                await asyncio.sleep(0.02)
            except ActorDeadError as exc:
                error = exc
                break
        assert time.monotonic() - start < 20
        assert error is system.failure and not isinstance(error, ActorLostError)
        assert error.host == HOST_B and f"on {HOST_B}" in str(error)
        assert "No such file or directory" in error.stderr_tail
        assert "not restarted again: 2 restart(s)" in "\n".join(error.__notes__)


async def test_a_replica_whose_host_is_lost_moves_to_a_host_with_room(tmp_path):
    host_c = "127.0.0.4"
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 1}}, {"heartbeat_timeout": 3})
    cluster = make_cluster(tmp_path / "run", [(HOST_A, 1), (HOST_B, 1), (host_c, 1)])
    async with ActorSystem(cfg, cluster=cluster) as system:
        a, b = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
        assert [a[0].host, b[0].host] == [HOST_A, HOST_B]
        system.heal("b", policy=RestartPolicy(max_restarts=5))
        spawn = cluster.spawn

        def host_b_is_gone(host, worker_args, extra_env, boot):  # as ssh to a dead host
            if host != HOST_B:
                return spawn(host, worker_args, extra_env, boot)
            return subprocess.Popen(
                ["/bin/sh", "-c", f"echo 'ssh: connect to host {HOST_B}: No route' >&2; exit 255"],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                process_group=0,
            )

        cluster.spawn = host_b_is_gone  # type: ignore[method-assign]
        os.kill((await b.call(0, "where"))["pid"], signal.SIGKILL)
        with pytest.raises(ActorLostError):
            for _ in range(500):
                await b.call(0, "noop")
                await asyncio.sleep(0.02)
        await system.wait_ready("b")
        assert b[0].host == host_c and await b.call(0, "add", 1) == 1
        assert "moved" in system.event_kinds("b")
        (restart,) = system.restarts
        assert restart.tries == 3  # two that could not start on HOST_B, one on host_c


def test_a_remote_actor_killed_by_a_signal_does_not_blame_its_host(tmp_path) -> None:
    """A restarted remote actor killed while starting (ssh said 255) moved the model's processes
    off its healthy host; its shell now reports 128 + signal, which is a kill, not the host."""
    from chatlearn.actors.runtime import _host_failure

    cluster = make_cluster(tmp_path / "run")

    def dead(code: int) -> ActorDeadError:
        return ActorDeadError("b", 0, HOST_B, exit_code=code)

    assert not _host_failure(cluster, dead(137))  # SIGKILL, through the remote shell
    assert not _host_failure(cluster, dead(-9))  # a local one
    assert _host_failure(cluster, dead(255))  # ssh's own failure
    assert _host_failure(cluster, dead(127))  # no such interpreter there


async def _sigterm_every_process_of_the_remote_actor(cluster) -> None:
    """SIGTERM to the remote actor's launcher (ssh client or shell), its shell and the actor, as
    a scheduler or service manager stopping a job sends it to every process of the job: the
    actor hands it to the coordinator (STOP) and goes on serving; nothing of it exits."""
    cfg = lib.make_config({"b": {"num_cpu": 1}}, {"heartbeat_timeout": 3})
    async with ActorSystem(cfg, cluster=cluster) as system:
        (b,) = await system.launch(lib.Recorder("b", cfg))
        asked: list[str] = []
        system.on_stop_request = lambda signum, who: asked.append(who) or True
        worker = psutil.Process((await b.call(0, "where"))["pid"])
        launcher = psutil.Process(system._actors[0].popen.pid)
        shell = worker.parent()
        for proc in {launcher, *launcher.children(recursive=True), shell, worker}:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not asked and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the supervisor's tick and exit grace: a death would be seen
        assert len(asked) == 1, asked
        assert await b.call(0, "add", 1) == 1
        assert launcher.is_running() and shell.is_running()
        assert system.event_kinds("b").count("exit") == 0
    deadline = time.monotonic() + 5
    while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the remote actor outlived the run"
        await asyncio.sleep(0.05)


async def test_sigterm_to_every_process_of_a_run_keeps_its_remote_actors(tmp_path):
    """The shell that runs a remote actor (`Cluster.remote_command`) died of a SIGTERM sent to
    every process of the job: the actor was lost ("exited unexpectedly; killed by SIGTERM"),
    and with it the graceful stop the SIGTERM asked for (restarted, or the run failed)."""
    await _sigterm_every_process_of_the_remote_actor(make_cluster(tmp_path / "run", [(HOST_B, 1)]))


async def test_sigterm_to_every_process_of_a_run_keeps_its_actors_over_ssh(tmp_path, sshd):
    """The ssh client of a remote actor left on SIGTERM (exit 255: "ssh to host ... failed or
    the connection was lost"), and the run's graceful stop with it."""
    cluster = make_cluster(
        tmp_path / "run", [(HOST_B, 1)], launcher="ssh", ssh_command=sshd.ssh_command()
    )
    await _sigterm_every_process_of_the_remote_actor(cluster)
