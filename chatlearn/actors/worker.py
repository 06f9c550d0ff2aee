"""The actor process: `python -m chatlearn.actors.worker --endpoint ... --coordinator-pid ...`.

Runs in the actor process: it is its main program.

One process per model rank, started by the coordinator from a clean interpreter. Its life:

1. Read its start-up line from stdin (bootstrap.py: identity, the run's credentials, forwarded
   variables, the directory to remove if orphaned; none of it is on the command line), pin
   itself to the cores in `CHATLEARN_CPU_AFFINITY` before importing anything heavy, ignore
   Ctrl-C (the coordinator stops us in order), and ask the kernel for a signal when the
   coordinator dies (`PARENT_DEATH_SIGNAL`; the end of stdin says the same): then we stop our
   own children, remove the run's ipc directory, exit.
2. HELLO → wait for CONFIG → start the module on the compute thread (import, construct, dist
   group, `setup()`, services) → READY. A startup failure is answered with ERROR (traceback and
   the failing step) and the process exits with `EXIT_STARTUP_FAILED`.
3. Serve CALLs by method name until SHUTDOWN, which closes the services' sockets and exits 0 at
   once. The coordinator stops us with `TERMINATE_SIGNAL` (we leave at once); SIGTERM from
   anyone else asks the coordinator to stop the whole run gracefully (STOP, `_on_sigterm`).
   The socket loop keeps receiving and replying while the compute thread works, and sends a
   HEARTBEAT every interval; a parent-watch loop exits if the coordinator is gone
   (re-parented, or silent for `--orphan-timeout` when set).

`serve` is the one entry function that owns the process's try/except/finally: any fatal error is
reported to the coordinator as DEAD with its traceback before the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from chatlearn.actors.process import (
    PARENT_DEATH_SIGNAL,
    TERMINATE_SIGNAL,
    CpuAffinityError,
    apply_cpu_affinity_from_env,
    kill_own_children,
    set_parent_death_signal,
)
from chatlearn.actors.worker_core import USER_CODE_ERRORS
from chatlearn.transport.allocator import keep_receive_buffers
from chatlearn.transport.endpoints import remove_if_abandoned

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_STARTUP_FAILED = 3
EXIT_ORPHANED = 4

_FLUSH_LINGER_MS = 1000

logger = logging.getLogger("chatlearn.actors.worker")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chatlearn.actors.worker")
    parser.add_argument("--endpoint", required=True, help="the coordinator's control endpoint")
    parser.add_argument("--coordinator-pid", type=int, default=0)
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument(
        "--label",
        default="",
        help="model.replica.rank, for people and tools that look at the process list (not "
        "secret: the actor's identity is given on stdin)",
    )
    parser.add_argument(
        "--network-host",
        default=None,
        help="bind this actor's endpoints with tcp on this address instead of ipc (multi-host)",
    )
    parser.add_argument(
        "--orphan-timeout",
        type=float,
        default=0.0,
        help="exit after this long without a message from the coordinator (0: off; for actors "
        "whose coordinator is not their parent process)",
    )
    return parser.parse_args(argv)


class Worker:
    """The actor's socket side: handshake, call serving, heartbeats, parent watch."""

    def __init__(self, client: Any, opts: argparse.Namespace, zmq_context: Any) -> None:
        from chatlearn.actors.worker_core import ComputeThread

        self.client = client
        self.zmq_context = zmq_context
        self.opts = opts
        self.routing_id = opts.bootstrap.identity.encode()
        self.host = socket.gethostname()
        self.compute = ComputeThread("chatlearn-compute")
        self.core: Any = None
        self.fatal: BaseException | None = None  # a helper task's failure, reported as DEAD
        self._main_task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_heard = time.monotonic()
        self._connected = False  # HELLO sent: a SIGTERM can be handed to the coordinator
        self._stop_asked = False  # a SIGTERM was (`_on_sigterm`)

    def where(self, method: str | None = None) -> dict[str, Any]:
        """Location keys of every error this actor reports."""
        if self.core is not None:
            ctx = self.core.ctx.describe()
        else:
            ctx = {"identity": self.opts.bootstrap.identity, "host": self.host, "pid": os.getpid()}
        if method is not None:
            ctx["method"] = method
        return ctx

    async def run(self) -> int:
        from chatlearn.transport import Message, MessageKind

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        if TERMINATE_SIGNAL != signal.SIGTERM:
            loop.add_signal_handler(TERMINATE_SIGNAL, self._exit_on_terminate)
        if PARENT_DEATH_SIGNAL != signal.SIGTERM:
            loop.add_signal_handler(PARENT_DEATH_SIGNAL, _exit_orphaned, EXIT_ORPHANED)
        hello = {"pid": os.getpid(), "host": self.host, "ppid": os.getppid()}
        await self.client.send(Message(kind=MessageKind.HELLO, payload=hello))
        self._connected = True
        self._spawn(self._heartbeat_loop())
        self._spawn(self._parent_watch_loop())
        if not await self._startup():
            return EXIT_STARTUP_FAILED
        return await self._serve_loop()

    async def _startup(self) -> bool:
        from chatlearn.actors.worker_core import ActorCore, ActorSpec, WorkerContext
        from chatlearn.transport import Message, MessageKind

        msg = await asyncio.wait_for(
            self._next_message(MessageKind.CONFIG), self.opts.startup_timeout
        )
        if self.opts.pin_error is not None:
            # Said as a config error, the answer to CONFIG: the run stops with its one line,
            # where a crash at start-up was restarted as if it could go better next time.
            from chatlearn.config.errors import ConfigError

            pin = self.opts.pin_error
            error = ConfigError(pin.problem, fix=pin.fix)
            _print_startup_failure(error, "pinning")
            await self._send_error(msg.request_id, error, "pinning")
            return False
        try:
            spec = ActorSpec.from_payload(msg.payload)
            who = spec.identity
            _configure_logging(f"{who.model} r{who.replica_id}.{who.rank}")
            ctx = WorkerContext(
                spec,
                routing_id=self.routing_id,
                loop=asyncio.get_running_loop(),
                compute=self.compute,
                zmq_context=self.zmq_context,
                in_process=False,
            )
            self.core = ActorCore(spec, ctx)
            info = await asyncio.wrap_future(self.compute.submit("setup", self.core.start))
            self.core.build_services()
            info["services"] = sorted(self.core.services)
        except USER_CODE_ERRORS as exc:
            phase = self.core.phase if self.core is not None else "config"
            _print_startup_failure(exc, phase)
            await self._send_error(msg.request_id, exc, phase)
            return False
        await self.client.send(
            Message(kind=MessageKind.READY, request_id=msg.request_id, payload=info)
        )
        return True

    async def _next_message(self, kind: Any) -> Any:
        """The next message of `kind`, answering PINGs meanwhile (bounded by the caller)."""
        while True:
            msg = await self.client.recv()
            self._last_heard = time.monotonic()
            if msg.kind == kind:
                return msg
            await self._answer_ping(msg)

    async def _answer_ping(self, msg: Any) -> None:
        from chatlearn.transport import Message, MessageKind

        if msg.kind == MessageKind.PING and msg.request_id:
            await self.client.send(Message(kind=MessageKind.REPLY, request_id=msg.request_id))
        elif msg.kind != MessageKind.PING:
            logger.warning("ignoring unexpected %s message", msg.kind.name)

    async def _serve_loop(self) -> int:
        """Consumes CALL / PING / SHUTDOWN from the coordinator until SHUTDOWN."""
        from chatlearn.transport import DecodeError, Message, MessageKind

        while True:
            try:
                msg = await self.client.recv()
            except DecodeError as exc:
                # Only the coordinator reaches this socket (it connects to the coordinator's):
                # a message of its that cannot be decoded is a call that would never be
                # answered. Dropped, the run waited for the reply forever; this actor's death
                # report stops it, naming why.
                raise RuntimeError(
                    f"a message from the coordinator cannot be decoded: {exc}"
                ) from exc
            self._last_heard = time.monotonic()
            if msg.kind == MessageKind.CALL:
                self._start_call(msg)
            elif msg.kind == MessageKind.SHUTDOWN:
                await self._close_core()
                await self.client.send(Message(kind=MessageKind.REPLY, request_id=msg.request_id))
                return EXIT_OK
            else:
                await self._answer_ping(msg)

    def _start_call(self, msg: Any) -> None:
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        method = str(payload.get("method", ""))
        try:
            args = list(payload.get("args") or ())
            kwargs = dict(payload.get("kwargs") or {})
            # Queued on the compute thread here, synchronously, so calls run in arrival order.
            pending = self.core.submit_in_order(method, args, kwargs)
        except Exception as exc:
            pending = _raise_later(exc)
        self._spawn(self._finish_call(msg.request_id, method, pending))

    async def _finish_call(self, request_id: int, method: str, pending: Any) -> None:
        """Waits for one call's result and sends it back as REPLY (or ERROR)."""
        from chatlearn.transport import EncodeError, Message, MessageKind

        try:
            result = await pending
        except USER_CODE_ERRORS as exc:
            await self._send_error(request_id, exc, method)
            return
        try:
            await self.client.send(
                Message(kind=MessageKind.REPLY, request_id=request_id, payload=result)
            )
        except EncodeError as exc:
            err = EncodeError(f"the return value of {method!r} cannot be sent back: {exc}")
            await self._send_error(request_id, err, method)

    async def _send_error(self, request_id: int, exc: BaseException, method: str) -> None:
        from chatlearn.actors.worker_core import user_error
        from chatlearn.transport import Message, MessageKind

        payload = user_error(exc, self.where(method)).to_payload()
        await self.client.send(
            Message(kind=MessageKind.ERROR, request_id=request_id, payload=payload)
        )

    async def _heartbeat_loop(self) -> None:
        """Sends a HEARTBEAT every interval, saying what the compute thread is running and for
        how long (runtime.py warns of a call that runs for long with nothing to bound it)."""
        from chatlearn.transport import Message, MessageKind

        while True:
            await asyncio.sleep(self.opts.heartbeat_interval)
            reading = self.compute.clock.reading()
            payload: dict[str, Any] = {"busy": None}
            if reading is not None:
                payload = {"busy": reading[0], "busy_s": round(reading[1], 3)}
            await self.client.send(Message(kind=MessageKind.HEARTBEAT, payload=payload))

    async def _parent_watch_loop(self) -> None:
        """Exits the process when the coordinator is gone (backs up PR_SET_PDEATHSIG)."""
        while True:
            await asyncio.sleep(0.25)
            orphaned = self.opts.coordinator_pid and os.getppid() != self.opts.coordinator_pid
            silent = (
                self.opts.orphan_timeout > 0
                and time.monotonic() - self._last_heard > self.opts.orphan_timeout
            )
            if orphaned or silent:
                with contextlib.suppress(OSError):  # stderr is a pipe to the dead coordinator
                    print("chatlearn actor: coordinator is gone; exiting", file=sys.stderr)
                _exit_orphaned(EXIT_ORPHANED)

    def _orphaned(self) -> bool:
        return bool(self.opts.coordinator_pid) and os.getppid() != self.opts.coordinator_pid

    def _exit_on_terminate(self) -> None:
        """`TERMINATE_SIGNAL`: the coordinator stops us; leave at once."""
        if self._orphaned():
            _exit_orphaned(128 + signal.SIGTERM)
        _hard_exit(128 + signal.SIGTERM)

    def _on_sigterm(self) -> None:
        """SIGTERM from outside the run (the coordinator stops us with `TERMINATE_SIGNAL`). A
        scheduler or service manager stopping a job signals every process of it: SLURM at a
        scancel, a preemption or the time limit, systemd at a stop. An actor that left at once
        took the run's graceful stop with it: the run ended without the checkpoint of its last
        steps. Once connected we ask the coordinator to stop the run (STOP), as a SIGTERM of
        its own would, and go on serving until it stops us; a second SIGTERM, one before we are
        connected, or an orphan's leaves at once."""
        if self._orphaned():
            _exit_orphaned(128 + signal.SIGTERM)
        if self._stop_asked or not self._connected:
            _hard_exit(128 + signal.SIGTERM)
        self._stop_asked = True
        self._spawn(self._ask_to_stop(signal.SIGTERM))

    async def _ask_to_stop(self, signum: int) -> None:
        from chatlearn.transport import Message, MessageKind

        # our own pid and host: a remote actor's process the coordinator knows is its launcher
        payload = {"signal": signum, "pid": os.getpid(), "host": self.host}
        try:
            await asyncio.wait_for(
                self.client.send(Message(kind=MessageKind.STOP, payload=payload)), 2.0
            )
        except Exception:  # the coordinator cannot be told: leave, as before
            _hard_exit(128 + signum)

    async def _close_core(self) -> None:
        if self.core is None:
            return
        await self._close_services()
        # Bounded: a step may still be running (we stop anyway) or a peer may be gone.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.wrap_future(self.compute.submit("close", self.core.close)), 2.0
            )

    async def _close_services(self) -> None:
        """Close the services' sockets (inboxes, senders) on the event loop that owns them:
        an open socket would keep the final context termination waiting."""
        for name, service in list(self.core.services.items()):
            close = getattr(service, "close", None)
            if close is None:
                continue
            try:
                result = close()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, 1.0)
            except Exception as exc:  # closing is best effort; the process exits next
                logger.warning("closing service %s failed: %r", name, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A helper loop failed (e.g. the socket broke): that is fatal for the actor.
            exc = task.exception()
            logger.error("actor task failed: %r", exc)
            self.fatal = exc
            if self._main_task is not None and not self._main_task.done():
                self._main_task.cancel()

    def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _print_startup_failure(exc: BaseException, phase: str) -> None:
    """The failure on our stderr (the coordinator's log): a config error as its one line (the
    coordinator reports it that way too), anything else with its traceback."""
    from chatlearn.config.errors import ConfigError
    from chatlearn.config.report import debug_enabled

    if isinstance(exc, ConfigError) and not debug_enabled():
        print(f"chatlearn actor: startup failed in {phase}: {exc.one_line()}", file=sys.stderr)
        return
    print(f"chatlearn actor: startup failed in {phase}:", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


async def _raise_later(exc: BaseException) -> Any:
    raise exc


def _terminate_contexts(contexts: list[Any], timeout: float) -> None:
    """`term()` of each context, together, returning after at most `timeout` seconds (the
    process exits next)."""
    threads = [
        threading.Thread(target=context.term, name="chatlearn-zmq-term", daemon=True)
        for context in contexts
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _hard_exit(code: int) -> None:
    """Exit now, however we leave (SHUTDOWN, SIGTERM, orphaned, a fatal error, a failed start):
    the processes the module started go first (once we are gone they are init's, and nothing
    can find them); os._exit, as the compute thread may still be inside user code, and
    interpreter shutdown must not wait for it (or for atexit handlers of libraries whose peers
    are gone)."""
    kill_own_children(grace=0.5)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


# Directories to remove if the coordinator dies without removing them (from the bootstrap).
_cleanup_dirs: list[str] = []
# How long an orphan waits for its coordinator to be seen dead (`remove_if_abandoned`).
_OWNER_EXIT_WAIT = 5.0


def _exit_orphaned(code: int = EXIT_ORPHANED) -> None:
    """The coordinator seems gone (our parent died): stop our children, remove the run's ipc
    directory if its coordinator is indeed dead (every actor tries; the first one wins; a
    parent that is a shell of a live coordinator's, stopped by it, leaves it be), exit."""
    for path in _cleanup_dirs:
        remove_if_abandoned(path, wait=_OWNER_EXIT_WAIT)
    _hard_exit(code)


def _read_bootstrap() -> Any:
    """The start-up line from stdin (bootstrap.py); then watch stdin for its end."""
    from chatlearn.actors.bootstrap import Bootstrap

    try:
        boot = Bootstrap.read(sys.stdin.buffer)
    except ValueError as exc:
        print(f"chatlearn actor: {exc}; exiting", file=sys.stderr)
        _hard_exit(EXIT_FATAL)
    _cleanup_dirs[:] = boot.cleanup
    # Before user code or torch is imported: they read variables like HF_TOKEN at import time.
    # Set here, they never appear in this process's /proc/<pid>/environ.
    os.environ.update(boot.env)
    threading.Thread(target=_stdin_watch, name="chatlearn-stdin-watch", daemon=True).start()
    return boot


def _stdin_watch() -> None:
    """Blocks on stdin; its end means our coordinator (or the ssh link to it) is gone."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    with contextlib.suppress(OSError):
        print("chatlearn actor: coordinator connection closed; exiting", file=sys.stderr)
    _exit_orphaned(EXIT_ORPHANED)


def _configure_logging(label: str) -> None:
    level = os.environ.get("CHATLEARN_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{label}] %(name)s: %(message)s",
    )


async def serve(opts: argparse.Namespace) -> int:
    """The actor's life, owning its try/except/finally: returns the process exit code.

    A fatal error (a broken socket, a bug here, an unexpected exception) is reported as DEAD with
    its traceback before the process exits; user errors in calls are not fatal (ERROR replies).
    """
    from chatlearn.transport import (
        ControlClient,
        Message,
        MessageKind,
        RemoteError,
        existing_sending_context,
        process_context,
    )

    zmq_context = process_context()
    boot = opts.bootstrap
    if boot.security is not None:
        from chatlearn.transport import security

        # Before any socket: every connection of this process presents the run's credentials.
        security.configure(boot.security, zmq_context, identity=boot.identity.encode())
    if opts.network_host:
        from chatlearn.transport.endpoints import set_network_host

        set_network_host(opts.network_host)
    client = ControlClient(
        opts.endpoint, boot.identity.encode(), context=zmq_context, drop_malformed=False
    )
    worker: Worker | None = None
    try:
        worker = Worker(client, opts, zmq_context)
        worker._main_task = asyncio.current_task()
        return await worker.run()
    except BaseException as caught:
        # If a helper loop failed, the main task was cancelled for it: report the real cause.
        exc = worker.fatal if worker is not None and worker.fatal is not None else caught
        traceback.print_exception(exc, file=sys.stderr)
        where = worker.where() if worker is not None else {"identity": boot.identity}
        payload = RemoteError.from_exception(exc, where).to_payload()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(
                client.send(Message(kind=MessageKind.DEAD, payload=payload)), 1.0
            )
        return EXIT_FATAL
    finally:
        if worker is not None:
            worker.cancel_tasks()
        # The last ERROR, REPLY or DEAD is still queued: closing a socket does not wait for it,
        # terminating the context does, up to the linger. Every other socket is closed by now
        # (services on SHUTDOWN); one that is not (a user module's own) must not keep the
        # process alive, so the termination itself is bounded too.
        client.close(linger=_FLUSH_LINGER_MS)
        # with the data senders' context, whose last outputs may still be queued likewise
        sending = existing_sending_context()
        contexts = [zmq_context] if sending is None else [zmq_context, sending]
        _terminate_contexts(contexts, _FLUSH_LINGER_MS / 1000 + 0.5)


def main(argv: list[str] | None = None) -> None:
    """Process entry: pin, arm the parent-death signal, run `serve`, exit with its code."""
    opts = _parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A remote actor's shell ignores SIGTERM (launch/cluster.py, `_IGNORE_SIGTERM`), and we
    # inherit that: until our handler is in place, a SIGTERM ends us, as the one before we are
    # connected does (`Worker._on_sigterm`).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The start-up line is in the pipe even if the coordinator died since writing it: read it
    # first, so that an orphan knows which directories to remove. It also sets variables the
    # pinning reads (a remote actor gets its CHATLEARN_CPU_AFFINITY there).
    opts.bootstrap = _read_bootstrap()
    opts.pin_error = None
    try:
        # before torch (or anything that starts threads) is imported
        apply_cpu_affinity_from_env(opts.network_host)
    except CpuAffinityError as exc:  # answered to CONFIG (Worker._startup): no crash, no restart
        opts.pin_error = exc
    keep_receive_buffers()  # received micro-batches reuse freed memory (transport/allocator.py)
    # Until the event loop's handler replaces it, the parent-death signal's default action
    # would kill us without removing anything.
    signal.signal(PARENT_DEATH_SIGNAL, lambda *_: _exit_orphaned())
    set_parent_death_signal(PARENT_DEATH_SIGNAL)
    if opts.coordinator_pid and os.getppid() != opts.coordinator_pid:
        _exit_orphaned()  # the coordinator died before the signal was armed
    from chatlearn.transport.loop import run

    code = EXIT_FATAL
    try:
        code = run(serve(opts))
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        _hard_exit(code)


if __name__ == "__main__":
    main()
