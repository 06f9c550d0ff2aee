"""Small modules for engine tests: rows are integers, every call is logged to a JSON-lines file.

The log path is `runtime.echo_log`; `runtime.echo_cost` (seconds) is the busy time of every
forward chunk and train step (spent spinning, not sleeping, so it really occupies a core).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from chatlearn.actors import BaseModule, TorchModule


def io_thread_policies() -> list[int]:
    """The scheduling policies of this process's ZeroMQ I/O threads (transport/sockets.py)."""
    policies = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                if comm.read().startswith("ZMQbg/IO"):
                    policies.add(os.sched_getscheduler(int(tid)))
        except OSError:  # a thread that has ended meanwhile
            continue
    return sorted(policies)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Logged(BaseModule):
    def log(self, **record) -> None:
        path = self.runtime_args.get("echo_log")
        if path:
            record.update(model=self.name, replica=self.replica_id, rank=self.rank, pid=os.getpid())
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def onload(self) -> None:
        self.log(event="onload", time=time.time())

    def offload(self) -> None:
        self.log(event="offload", time=time.time())

    def after_episode(self) -> None:
        self.log(
            event="after_episode",
            episode=self._episode_id,
            iteration=self._iteration,
            train_iteration=self._train_iteration,
        )


class EchoReference(_Logged):
    def build_dataset(self, samples, is_eval=False):
        return [
            {"row": torch.tensor(int(s)), "tokens": torch.arange(int(s) % 3 + 1)} for s in samples
        ]

    def forward_step(self, data, iteration):
        start = time.time()
        _spin(self.runtime_args.get("echo_cost", 0.0))
        rows = data["row"].tolist()
        self.log(
            event="forward",
            rows=rows,
            iteration=iteration,
            start=start,
            end=time.time(),
            io_threads=io_thread_policies(),
        )
        return {"row": data["row"], "tokens": data["tokens"], "double": data["row"] * 2}


class EchoPaddingReference(EchoReference):
    """Registers the padding of "tokens" where ChatLearn's programs do: on the model that
    produces the data."""

    def setup(self) -> None:
        self.add_padding_config("tokens", -7)


class EchoPositionalReference(EchoReference):
    """Names build_dataset's flag its own way: ChatLearn passes it by position."""

    def build_dataset(self, samples, evaluation=False):
        self.log(event="build", evaluation=evaluation, size=len(samples))
        return super().build_dataset(samples, evaluation)


class _LazyRows:
    """EchoReference's rows, each made when it is read: a data set of 600k samples, of which a
    run reads a few, without 1.2M tensors made up front (4 s of the process's time)."""

    def __init__(self, samples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        s = int(self.samples[index])
        return {"row": torch.tensor(s), "tokens": torch.arange(s % 3 + 1)}


class EchoLazyReference(EchoReference):
    """EchoReference whose datasets make their rows when read (a torch Dataset's way); logs
    each build with the number of samples it was given."""

    def build_dataset(self, samples, is_eval=False):
        self.log(event="build", evaluation=is_eval, size=len(samples), last=samples[-1])
        return _LazyRows(samples)


class EchoListReference(EchoReference):
    """Per-token values as Python lists: 4 rows of 200k ints are more values than a message
    may hold (transport/codec.py's Limits)."""

    def forward_step(self, data, iteration):
        output = super().forward_step(data, iteration)
        return {**output, "per_token": [[0] * 200_000 for _ in data["row"].tolist()]}


class EchoNumberReference(EchoReference):
    """Samples of plain numbers, its dataset without a collate_fn: ChatLearn's default_collate
    makes tensors of them, which a ChatLearn program's forward_step uses as such."""

    def build_dataset(self, samples, is_eval=False):
        return [{"row": int(s), "tokens": torch.arange(int(s) % 3 + 1)} for s in samples]


class EchoStringReference(EchoReference):
    """A dataset of plain strings without a collate_fn: ChatLearn's default_collate gives its
    forward_step the list of them."""

    def build_dataset(self, samples, is_eval=False):
        return [str(s) for s in samples]

    def forward_step(self, data, iteration):
        rows = torch.tensor([int(s) for s in data])
        return super().forward_step({"row": rows, "tokens": rows[:, None]}, iteration)


class EchoSpawningReference(EchoReference):
    """Starts a `sleep` child in setup (a module's own helper process) and logs its pid."""

    def setup(self) -> None:
        super().setup()
        self.child = subprocess.Popen(["sleep", "1000"])
        self.log(event="child", child=self.child.pid)


class EchoFailingReference(EchoReference):
    """forward_step raises on the sample `runtime.echo_fail_row`."""

    def forward_step(self, data, iteration):
        if self.runtime_args.get("echo_fail_row") in data["row"].tolist():
            raise ValueError("a bug in forward_step")
        return super().forward_step(data, iteration)


class EchoTrainer(_Logged):
    def setup(self) -> None:
        self.add_padding_config("tokens", -1)

    def train_step(self, data, iteration):
        start = time.time()
        if iteration == self.runtime_args.get("echo_die_at", None):
            # once a run: the restarted trainer finds the marker
            marker = Path(self.runtime_args.output_dir) / "echo_died"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        gate = self.runtime_args.get("echo_gate", None)
        if gate is not None and iteration == 0:  # held until the test opens it (30 s at most)
            Path(f"{gate}.entered").touch()
            for _ in range(3000):
                if Path(gate).exists():
                    break
                time.sleep(0.01)
        _spin(self.runtime_args.get("echo_cost", 0.0))
        batches = [mb["row"].tolist() for mb in data]
        for mb in data:
            assert torch.equal(mb["double"], mb["row"] * 2)
        widths = [list(mb["tokens"].shape) for mb in data]
        self.log(
            event="train",
            batches=batches,
            widths=widths,
            iteration=iteration,
            start=start,
            end=time.time(),
            io_threads=io_thread_policies(),
        )
        return {"rows": float(sum(sum(b) for b in batches)), "num_micro_batches": len(data)}

    def eval_step(self, data):
        return {"mean_row": float(data["row"].float().mean())}

    def save_checkpoint(self, iteration):
        self.log(event="save", iteration=iteration, reason=self.checkpoint_reason)


class EchoSetupTrainer(EchoTrainer):
    """Logs the counters its ``setup()`` sees (a restarted process's, from the coordinator)."""

    def setup(self) -> None:
        super().setup()
        self.log(
            event="setup",
            resume=self.resume_training,
            train_iteration=self._train_iteration,
            consumed_samples=self._start_consumed_samples,
        )


class ExportingEchoTrainer(EchoTrainer):
    """An EchoTrainer whose run's last save would write ``echo_export_bytes`` more than its
    periodic ones (an export for inference, as chatlearn.hf's FSDP2 and LoRA trainers)."""

    def final_checkpoint_extra_bytes(self):
        if self.checkpoint_reason in ("end", "request"):
            return 0
        return self.runtime_args.get("echo_export_bytes", 0)  # as given (a test gives None)


class EchoTokensTrainer(EchoTrainer):
    """Logs the "tokens" it is given; registers their padding only with `runtime.echo_pad`."""

    def setup(self) -> None:
        if self.runtime_args.get("echo_pad", None) is not None:
            self.add_padding_config("tokens", self.runtime_args.echo_pad)

    def train_step(self, data, iteration):
        self.log(event="tokens", tokens=[mb["tokens"].tolist() for mb in data])
        return {"loss": 0.0}


class EchoIterationEvalTrainer(EchoTrainer):
    """An eval_step that declares `iteration` (docs/chatlearn-compat.md: passed when declared)."""

    def eval_step(self, data, iteration):
        self.log(event="eval", rows=data["row"].tolist())
        return {"mean_row": float(data["row"].float().mean()), "at": float(iteration)}


class _HookedWeights(TorchModule):
    """Keeps its weights with ChatLearn's memory hooks, which take them away while offloaded (as
    a module that frees its device memory does)."""

    def setup(self) -> None:
        self.weights: torch.Tensor | None = torch.ones(2)

    def offload_weights(self) -> None:
        self._stash, self.weights = self.weights, None

    def onload_weights(self) -> None:
        self.weights = self._stash


class HookedTrainer(_HookedWeights):
    """Its steps and saves need the weights its memory hooks take away."""

    def train_step(self, data, iteration):
        if self.weights is None:
            raise RuntimeError("a step while the weights were offloaded")
        return {"loss": 0.0}

    def save_checkpoint(self, iteration):
        if self.weights is None:
            raise RuntimeError("a save while the weights were offloaded")


class HookedReference(_HookedWeights):
    """EchoReference's rows; its forwards need the weights its memory hooks take away."""

    build_dataset = EchoReference.build_dataset

    def forward_step(self, data, iteration):
        if self.weights is None:
            raise RuntimeError("a forward while the weights were offloaded")
        return {"row": data["row"], "tokens": data["tokens"]}
