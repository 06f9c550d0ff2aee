"""The live module inside an actor: startup, the compute thread, and dispatch by method name.

Runs in the actor, either way an actor runs: in its worker process (worker.py, behind a socket)
or inside the coordinator in in-process mode (inprocess.py, no sockets); `ActorCore` serves both.
Given an `ActorSpec` it loads the user's class, installs the config, builds the module, sets its
rank and world size, pins torch's thread count, forms the torch.distributed group, runs
`setup()`, then builds the worker services.

Calls are dispatched by name. `"forward_step"` etc. go to the module through `invoke` (which
passes `iteration` only if declared); `"svc.method"` goes to service `svc`: an `async def` method
runs on the event loop, a plain one in the compute thread. All compute runs on one thread, in the
order the calls arrived, so the event loop stays free to receive the next request and send
finished results while a step computes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from chatlearn.actors.identity import ActorIdentity
from chatlearn.actors.loader import ClassRef, load_object
from chatlearn.actors.module import (
    BaseModule,
    CallClock,
    construct_module,
    invoke,
    set_call_clock,
)
from chatlearn.actors.placement import config_value

__all__ = [
    "USER_CODE_ERRORS",
    "ActorCore",
    "ActorSpec",
    "ComputeThread",
    "WorkerContext",
    "add_error_context",
    "apply_priority",
    "user_error",
]

# What user code may raise and the runtime reports as an error of the call (`sys.exit()` in a
# step must not end the actor's event loop); CancelledError is ours and is never caught as such.
USER_CODE_ERRORS = (Exception, SystemExit, KeyboardInterrupt)

# Frames from these directories at the start of a call's traceback are the runtime's plumbing.
_PLUMBING_DIRS = tuple(
    str(Path(p).resolve().parent) for p in (__file__, asyncio.__file__, concurrent.futures.__file__)
)


# Where `add_error_context` keeps its keys on an exception.
_CONTEXT_ATTR = "__chatlearn_context__"


def add_error_context(exc: BaseException, **keys: Any) -> None:
    """Keys for the error report of ``exc`` besides where it happened, e.g. which step of a
    call of several raised it (`user_error` adds them to the `RemoteError`'s context)."""
    try:
        setattr(exc, _CONTEXT_ATTR, {**getattr(exc, _CONTEXT_ATTR, {}), **keys})
    except (AttributeError, TypeError):  # an exception that refuses attributes (frozen dataclass)
        pass


def user_error(exc: BaseException, context: dict[str, Any]) -> Any:
    """A `RemoteError` for `exc` whose traceback starts at the user's code.

    The runtime's own frames (worker loop, compute thread, dispatch) come first in the traceback
    of every failed call and say nothing about the bug, so they are dropped. Keys given to
    `add_error_context` join ``context``.
    """
    import traceback

    from chatlearn.transport import RemoteError

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_PLUMBING_DIRS):
            break
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    extra = getattr(exc, _CONTEXT_ATTR, None)
    if isinstance(extra, dict):
        context = {**context, **extra}
    return RemoteError(type(exc).__qualname__, str(exc), text, context)


class ComputeThread:
    """One daemon thread that runs submitted callables strictly in submission order.

    Daemon, so that an actor can exit (os._exit after SHUTDOWN, or on a fatal error) while user
    code is still running in it: a hung step must never keep a process alive.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.clock = CallClock()  # what runs now, since when (reported in heartbeats)
        self._stopped: BaseException | None = None  # why `stop` ended it
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def current(self) -> str | None:
        """What runs now: the call, or the hook of it that `invoke` runs (None: idle)."""
        now = self.clock.now
        return None if now is None else now[0]

    def _run(self) -> None:
        set_call_clock(self.clock)
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, label, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            self.clock.now = (label, None, time.monotonic())
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # delivered to the caller, never kills the thread
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                self.clock.now = None
                del item, fn, args, kwargs

    def submit(
        self,
        label: str,
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> concurrent.futures.Future[Any]:
        """Queue `fn(*args, **kwargs)`; `label` is what heartbeats report while it runs. After
        `stop`, the future fails at once with its reason (queued behind the end, it would never
        run)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._stopped is not None:
            future.set_exception(self._stopped)
        else:
            self._queue.put((future, label, fn, tuple(args), dict(kwargs or {})))
        return future

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` on this thread and wait for its result."""
        label = getattr(fn, "__name__", "?")
        return await asyncio.wrap_future(self.submit(label, fn, args, kwargs))

    def stop(self, reason: BaseException) -> None:
        """Run nothing more: queued callables fail with `reason`; the thread ends after the
        running one (`join` waits for that); later ones fail with it too (`submit`)."""
        self._stopped = reason
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._queue.get_nowait()
                if item is not None and item[0].set_running_or_notify_cancel():
                    item[0].set_exception(reason)
        self._queue.put(None)

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the thread to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def apply_priority(nice: int, *, idle: bool = False, threads: Iterable[int] | None = None) -> None:
    """Lower the CPU priority of ``threads`` (native ids; default: the calling thread), best
    effort: a failure is printed.

    ``nice``: a nice offset. ``idle``: the SCHED_IDLE policy, under which a thread runs only on
    CPU time that no other thread wants, and a waking normal thread takes its core at once (the
    kernel treats a core running only idle-policy threads as free when it places a waking
    thread). Measured with `bench dpo` (2 cores, reference colocated with the trainer): the
    pipelined run gets 8.2 samples/s with the reference under SCHED_IDLE against 7.6 at nice 19
    (4 interleaved runs each): the trainer's threads, which sleep between torch operations, get
    their cores back faster. Where SCHED_IDLE does not exist, ``idle`` falls back to nice 19.

    Both belong to threads on Linux, and a thread inherits them from the thread that starts it.
    An actor lowers its compute thread and the threads its start-up created (torch's pools), not
    the event loop's thread, which keeps answering requests and sending heartbeats at full
    priority: a lowered compute thread yields the cores to the other actors, a lowered heartbeat
    would let the actor be declared dead under load.

    With autogroup scheduling (``sched_autogroup_enabled``, the default of most distributions)
    the kernel first shares the cores between sessions, and priorities only rank threads inside
    one. Local actors stay in the coordinator's session (`spawn_worker` gives them their own
    process group, not their own session), so their threads are ranked against each other as
    set. A process that leads its own session (an actor started over ssh) has the autogroup to
    itself: then the autogroup gets the nice value too (19 for ``idle``), or the lowered actor
    would still get an equal share of the host's cores.
    """
    tids = [0] if threads is None else sorted(threads)
    if idle:
        nice = 19
    value = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        for tid in tids:
            try:
                if idle and hasattr(os, "SCHED_IDLE"):
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                value = max(-20, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
                os.setpriority(os.PRIO_PROCESS, tid, value)
            except ProcessLookupError:
                continue  # a start-up thread that has exited since
    except OSError as exc:  # raising priority needs privileges; not worth failing for
        print(f"chatlearn: cannot change the priority by {nice}: {exc}", file=sys.stderr)
        return
    if not nice or os.getsid(0) != os.getpid():
        return  # nothing to rank, or the autogroup is shared with the coordinator and actors
    try:
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write(str(value))
    except OSError:
        pass  # no autogroups (then nice alone ranks the actors), or not allowed to raise it


def _seed_process(args: Any, offset: int) -> None:
    """Seed the process's global generators (Python, numpy, torch) from ``runtime.seed`` plus
    the process's index in its model, before ``setup()``: a module that draws from them without
    seeding them itself (dropout, say) gets the same numbers in every run, and a process
    restarted by self-healing the same as the one it replaces. Modules may seed again."""
    runtime = config_value(args, "runtime_args", None)
    seed = config_value(runtime, "seed", None) if runtime is not None else None
    if seed is None:
        return
    value = (int(seed) + offset) % 2**32
    random.seed(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(value)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(value)


def _thread_ids() -> set[int]:
    """Native ids of this process's threads (Linux; elsewhere only the calling thread's)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return {threading.get_native_id()}


@dataclass(kw_only=True)
class ActorSpec:
    """Everything an actor needs to become its model's rank (the CONFIG message's payload)."""

    identity: ActorIdentity
    class_ref: ClassRef | None
    config: dict[str, Any] | None = None  # Config.to_dict(); None in-process (shared object)
    argv: list[str] = field(default_factory=list)
    sys_path: list[str] = field(default_factory=list)
    pinning: dict[str, Any] = field(default_factory=dict)
    services: dict[str, str] = field(default_factory=dict)
    runtime_dir: str | None = None
    dist_timeout: float = 600.0
    nice: int = 0
    idle_priority: bool = False
    # the module's counters before setup() (`BaseModule._start_state`): a resumed run's
    # resume_training, episode and iteration, as ChatLearn sets them before setup()
    runtime_state: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        payload = dict(self.__dict__)
        payload["identity"] = self.identity.to_payload()
        payload["class_ref"] = self.class_ref.to_payload() if self.class_ref else None
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ActorSpec:
        data = dict(payload)
        data["identity"] = ActorIdentity.from_payload(data["identity"])
        ref = data.get("class_ref")
        data["class_ref"] = ClassRef.from_payload(ref) if ref is not None else None
        return cls(**data)


class WorkerContext:
    """What a worker service gets next to the module: where it runs and how to compute."""

    def __init__(
        self,
        spec: ActorSpec,
        *,
        routing_id: bytes,
        loop: asyncio.AbstractEventLoop,
        compute: ComputeThread,
        zmq_context: Any,
        in_process: bool,
    ) -> None:
        self.identity = spec.identity  # which actor this is: model, replica, rank, ...
        self.local_rank = spec.identity.rank
        self.routing_id = routing_id  # its socket's identity on the control channel
        self.runtime_dir = Path(spec.runtime_dir) if spec.runtime_dir else None
        self.cpus = tuple(spec.pinning.get("cpus") or ())
        self.gpus = tuple(spec.pinning.get("gpus") or ())
        self.loop = loop
        self.zmq_context = zmq_context
        self.in_process = in_process
        self._compute = compute

    async def run_compute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the actor's compute thread (after the calls queued before it)."""
        return await self._compute.run(fn, *args, **kwargs)

    def submit_compute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """Queue `fn` on the compute thread now (not when the caller is next scheduled, as
        `run_compute` does); await the result to get what `fn` returned."""
        label = getattr(fn, "__name__", "?")
        return asyncio.wrap_future(self._compute.submit(label, fn, args, kwargs))

    def ipc_endpoint(self, name: str) -> str:
        """An endpoint private to the run: `ipc://` in its runtime directory, or in a multi-host
        run tcp on this host's address with the run's CURVE keys (`private_endpoint`)."""
        from chatlearn.transport.endpoints import private_endpoint

        return private_endpoint(self.runtime_dir, name)

    def describe(self) -> dict[str, Any]:
        """Where this actor is (model, replica, rank, host, pid), for its errors."""
        return self.identity.where(os.getpid())


class ActorCore:
    """Builds the live module from an `ActorSpec` and runs calls on it by name."""

    def __init__(
        self,
        spec: ActorSpec,
        ctx: WorkerContext,
        *,
        config_args: Any = None,
        klass: type | None = None,
    ) -> None:
        """`config_args`/`klass`: the config object and class to use as they are (in-process)."""
        self.spec = spec
        self.ctx = ctx
        self.phase = "starting"  # names the startup step in an error
        self.module: BaseModule | None = None
        self.services: dict[str, Any] = {}
        self._config_args = config_args
        self._klass = klass
        self._dist_initialized = False

    # -- startup (compute thread) ----------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Load, construct, pin threads, form the dist group, `setup()`. Returns READY info."""
        spec = self.spec
        self.phase = "import"
        threads_before = _thread_ids()
        args = self._config_args
        if spec.config is not None:
            args = self._install_config(spec.config)
        if spec.argv:
            sys.argv = list(spec.argv)  # as multiprocessing's spawn does for the main script
        for entry in reversed(spec.sys_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        if self._klass is not None:
            klass = self._klass
        else:
            assert spec.class_ref is not None, "an actor process needs its class reference"
            klass = spec.class_ref.load()
        if spec.config is not None:
            args = self._install_config(spec.config)  # again: the script may have run init()
        self.phase = "__init__"
        identity = spec.identity
        module = construct_module(klass, identity.model, args, identity.replica_id)
        module._runtime_dir = self.ctx.runtime_dir  # put/get's shared store (None off-host)
        module._rank = identity.rank
        module._world_size = identity.world_size
        module._num_replica = identity.num_replica
        self.module = module
        self.phase = "init_process_group"
        self._init_torch()
        if not self.ctx.in_process:
            _seed_process(args, identity.replica_id * identity.world_size + identity.rank)
        self.phase = "init"
        invoke(module, "init")  # ChatLearn's hook before setup (its MegatronModule's env init)
        if spec.runtime_state:
            module._set_runtime_state(**spec.runtime_state)
        consumed = module._start_consumed_samples
        if consumed is not None and not self.ctx.in_process:
            # ChatLearn's data checkpoint restores it before setup(); in-process modules share
            # the coordinator's config, where it is the run's starting position
            module.runtime_args.consumed_samples = consumed
        if hasattr(module.global_args, "active_module_args"):
            # ChatLearn's model_setup does this: get_args().active_module_args in the process
            # is the section of the model being set up (a Config given as a dict has none)
            module.global_args.active_module_args = module.module_args
        self.phase = "setup"
        invoke(module, "setup")
        self.phase = "validate"
        invoke(module, "validate")  # ChatLearn's checks after setup, on every process
        if (spec.nice or spec.idle_priority) and not self.ctx.in_process:
            # After start-up, which runs at full priority (a starved start-up would hit the
            # startup timeout): this thread and the threads start-up created (torch's pools);
            # threads it starts later inherit the priority.
            threads = {threading.get_native_id()} | (_thread_ids() - threads_before)
            apply_priority(spec.nice, idle=spec.idle_priority, threads=threads)
        self.phase = "ready"
        return self.ready_info()

    def _install_config(self, config: dict[str, Any]) -> Any:
        from chatlearn.config import Config, set_args

        cfg = Config.from_dict(config)
        set_args(cfg)
        return cfg

    def _init_torch(self) -> None:
        spec = self.spec
        world_size = spec.identity.world_size
        num_threads = spec.pinning.get("num_threads")
        gpus = spec.pinning.get("gpus") or []
        if world_size <= 1 and not gpus and "torch" not in sys.modules:
            return  # a module that does not use torch does not pay for importing it
        import torch

        if num_threads:
            torch.set_num_threads(int(num_threads))
        if gpus:
            visible = list(spec.pinning.get("visible_gpus") or gpus)
            torch.cuda.set_device(visible.index(gpus[0]))
        if world_size > 1:
            import torch.distributed as dist

            dist.init_process_group(
                backend="nccl" if gpus else "gloo",
                init_method="env://",
                rank=spec.identity.rank,
                world_size=world_size,
                timeout=timedelta(seconds=spec.dist_timeout),
            )
            self._dist_initialized = True

    def ready_info(self) -> dict[str, Any]:
        torch = sys.modules.get("torch")
        return {
            "pid": os.getpid(),
            "host": self.spec.identity.host,
            "cpus": sorted(os.sched_getaffinity(0)) if self.spec.pinning.get("cpus") else [],
            "gpus": list(self.spec.pinning.get("gpus") or []),
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "services": sorted(self.services),
        }

    def build_services(self) -> None:
        """Build `Class(module, ctx)` for each service (on the event loop thread, after setup)."""
        self.phase = "services"
        for name, target in self.spec.services.items():
            if not name or "." in name:
                raise ValueError(f"service name must be a plain identifier, got {name!r}")
            self.services[name] = load_object(target)(self.module, self.ctx)
        self.phase = "ready"

    # -- calls -----------------------------------------------------------------------------
    async def call(self, method: str, args: Any, kwargs: Any) -> Any:
        """Run one call: a service coroutine on the loop, anything else on the compute thread."""
        return await self.submit_in_order(method, args, kwargs)

    def submit_in_order(self, method: str, args: Any, kwargs: Any) -> Awaitable[Any]:
        """Start one call *now* and return what to await for its result.

        Compute-thread work (module methods, plain service methods) is queued here, at once, so
        it runs in the order the calls arrived; an `async def` service method is returned as a
        coroutine for the caller to run on the event loop.
        """
        assert self.module is not None, "call before the actor started"
        kwargs = kwargs or {}
        service_name, dot, attr = method.partition(".")
        if not dot:
            future = self.ctx._compute.submit(method, invoke, (self.module, method, args, kwargs))
            return asyncio.wrap_future(future)
        service = self.services.get(service_name)
        if service is None:
            raise AttributeError(
                f"no service {service_name!r} in this actor (services: "
                f"{', '.join(sorted(self.services)) or 'none'})"
            )
        if not attr or attr.startswith("_"):
            raise AttributeError(f"service method {method!r} is private or empty")
        fn = getattr(service, attr)
        if inspect.iscoroutinefunction(fn):
            return fn(*args, **kwargs)
        return asyncio.wrap_future(self.ctx._compute.submit(method, fn, args, kwargs))

    def close(self) -> None:
        """Leave the torch.distributed group (best effort; called on the compute thread)."""
        if self._dist_initialized:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._dist_initialized = False
