"""Module classes and services used by the actor tests (imported by name inside actors).

Kept free of a top-level torch import so that most test actors start in a fraction of a second;
`DistModule` imports torch in its methods. Setting ACTORS_TEST_BREAK_IMPORT in an actor's
environment (via `runtime_env.env_vars`) makes importing this file fail there, like a user module
with a missing dependency, while the coordinator (without the variable) imports it fine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

from chatlearn.actors import BaseModule, TorchModule

if os.environ.get("ACTORS_TEST_BREAK_IMPORT"):
    import chatlearn_test_no_such_dependency  # noqa: F401


class Recorder(BaseModule):
    """Appends one line per lifecycle event to `model_args["events_file"]` (if set)."""

    def __init__(self, name: str, args: Any = None, replica_id: int = 0) -> None:
        super().__init__(name, args, replica_id)
        self._record("init")

    def _record(self, event: str) -> None:
        path = self.model_args.get("events_file")
        if path:
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {self.name} {self.rank} {event}\n")

    def setup(self) -> None:
        self._record("setup")
        self.state = 0

    def forward_step(self, data: dict[str, Any], iteration: int) -> dict[str, Any]:
        self._record(f"forward_step {iteration}")
        return {"x": [v * 2 for v in data["x"]], "iteration": iteration}

    def train_step(self, data: list[dict[str, Any]]) -> dict[str, float]:
        self._record("train_step")
        return {"num_micro_batches": float(len(data)), "train_iteration": self._train_iteration}

    def noop(self) -> None:
        return None

    def env(self, name: str) -> str | None:
        return os.environ.get(name)

    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return {"args": list(args), "kwargs": kwargs}

    def add(self, value: int) -> int:
        self.state += value
        return self.state

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def exit_now(self, code: int) -> None:
        os._exit(code)

    def sys_exit(self, code: int) -> None:
        sys.exit(code)

    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    def hold_lock(self, seconds: float) -> str:
        """Compute for about ``seconds`` in one C call that never releases the interpreter lock
        (the builtin sum over a range), so that the actor's event loop cannot heartbeat."""
        start = time.perf_counter()
        sum(range(1_000_000))
        per_item = (time.perf_counter() - start) / 1_000_000
        sum(range(int(seconds / per_item)))
        return "held"

    def unsendable(self) -> Any:
        return threading.Lock()  # no wire form: the call fails, the actor does not

    def thread_name(self) -> str:
        return threading.current_thread().name

    def where(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "rank": self.rank,
            "world_size": self.world_size,
            "replica_id": self.replica_id,
            "num_replica": self.num_replica,
            "affinity": sorted(os.sched_getaffinity(0)),
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "module": type(self).__module__,
            "argv0": sys.argv[0] if sys.argv else "",
        }


class FailingSetup(Recorder):
    def setup(self) -> None:
        self._record("setup")
        raise RuntimeError("boom in setup")


class CrashingSetup(Recorder):
    def setup(self) -> None:
        print("crashing setup: about to os._exit(9)", file=sys.stderr, flush=True)
        os._exit(9)


class DistModule(TorchModule):
    """Forms part of a gloo group; setup() all-reduces rank + 1 across the group."""

    def setup(self) -> None:
        import torch
        import torch.distributed as dist

        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        self.setup_sum = float(value.item())

    def all_reduce(self, x: float) -> float:
        import torch
        import torch.distributed as dist

        value = torch.tensor([x])
        dist.all_reduce(value)
        return float(value.item())

    def report(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        return {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "setup_sum": self.setup_sum,
            "cpus": sorted(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
            "is_last_rank": self.is_last_rank(),
            "data_parallel": [self.data_parallel_rank, self.data_parallel_size],
        }


class SelfInitDistModule(TorchModule):
    """Forms its torch.distributed group itself in setup() (env://), as ChatLearn's FSDP and
    DeepSpeed modules do, at whatever world size it has."""

    def setup(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        self.group = [dist.get_rank(), dist.get_world_size()]

    def report(self) -> dict[str, Any]:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
        return {"group": self.group, "env": {k: os.environ.get(k) for k in keys}}


class EchoService:
    """A worker service: `async` methods run on the actor's loop, plain ones on compute."""

    def __init__(self, module: BaseModule, ctx: Any) -> None:
        self.module = module
        self.ctx = ctx

    async def ping(self, x: Any) -> dict[str, Any]:
        return {
            "x": x,
            "thread": threading.current_thread().name,
            "model": self.ctx.identity.model,
            "rank": self.ctx.identity.rank,
            "in_process": self.ctx.in_process,
        }

    def compute(self, x: int) -> dict[str, Any]:
        return {"x": x * 3, "thread": threading.current_thread().name}

    def add_to_module(self, x: int) -> int:
        return self.module.add(x)  # a plain method: on the compute thread, in arrival order

    async def offload(self, x: int) -> int:
        return await self.ctx.run_compute(self.module.add, x)


def make_config(
    models: dict[str, dict[str, Any]],
    runtime: dict[str, Any] | None = None,
    env_vars: dict[str, str] | None = None,
) -> Any:
    """A validated `chatlearn.config.Config` built in code, as a test program would."""
    from chatlearn.config import Config

    data: dict[str, Any] = {"models": models, "runtime": dict(runtime or {})}
    if env_vars:
        data["runtime_env"] = {"env_vars": env_vars}
    return Config(data)


class Spawner(Recorder):
    """Starts a `sleep` child in setup, as a module with a helper process of its own would."""

    def setup(self) -> None:
        super().setup()
        self.child = subprocess.Popen(["sleep", "1000"])

    def child_pid(self) -> int:
        return self.child.pid


class SlowSetup(Recorder):
    def setup(self) -> None:
        self._record("setup")
        time.sleep(60)


class AllowedSlowSetup(Recorder):
    """`setup()` takes `model_args["setup_s"]` seconds, and says it may take
    `model_args["allowance_s"]` beyond startup_timeout (to read a checkpoint, say)."""

    def setup(self) -> None:
        self._record("setup")
        time.sleep(float(self.model_args["setup_s"]))

    def setup_allowance(self) -> tuple[float, str]:
        return float(self.model_args["allowance_s"]), "to read its checkpoint"


class SlowOnceMarked(Recorder):
    """`setup()` takes 60 s while the file `model_args["slow_marker"]` exists."""

    def setup(self) -> None:
        super().setup()
        if os.path.exists(self.model_args["slow_marker"]):
            time.sleep(60)


def read_events(path: Any) -> list[str]:
    """The `Recorder` event lines of a file, without pids: "name rank event"."""
    try:
        with open(path) as f:
            return [line.split(" ", 1)[1].strip() for line in f if line.strip()]
    except FileNotFoundError:
        return []


class GpuModule(TorchModule):
    """Reports the CUDA device it was given (and all-reduces on it when it has peers)."""

    def report(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        value = torch.ones(1, device="cuda")
        if dist.is_initialized():
            dist.all_reduce(value)
        return {
            "rank": self.rank,
            "device": torch.cuda.current_device(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "sum": float(value.item()),
        }
