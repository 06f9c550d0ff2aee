"""A tiny real torch DPO pair for checkpoint tests: deterministic on CPU, every RNG in use.

Samples are integers; sample ``s`` becomes a feature vector drawn from a generator seeded with
``s`` and a "chosen" class ``s % CLASSES`` (the "rejected" one is the next class). The reference
is a frozen ``nn.Linear`` initialised from ``runtime.seed``; the policy starts as the same layer
and trains with dropout, AdamW and a LambdaLR schedule on a DPO loss against the reference's
log-probabilities. The loss is also scaled by draws from Python's and numpy's RNGs, so a resumed
run matches the uninterrupted one only if all three RNG states were restored.

Test hooks (``runtime`` keys): ``probe_dir`` gets one JSON line per event (``setup`` with the pid,
``first_step`` with ``resume_training``); at ``gate_iteration`` the trainer writes
``probe_dir/waiting`` (its pid) and waits until ``probe_dir/go`` exists (60 s at most); at
``fail_iteration`` its ``train_step`` raises, every time (a bug, or a bad sample). The policy's
``model_args.width`` (or ``model_args.model_config.hidden_size``), when set, is the size of a
buffer of its model: a checkpoint written with another value does not load.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatlearn.actors import TorchModule

FEATURES = 6
CLASSES = 3
BETA = 0.5


class _Probed(TorchModule):
    def probe(self, **record) -> None:
        directory = self.runtime_args.get("probe_dir", None)
        if directory:
            record.update(model=self.name, rank=self.rank, pid=os.getpid())
            with open(Path(directory) / "events.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def die_once(self, iteration: int, world: int) -> None:
        """At ``kill_rank_at``, the last of ``world`` ranks kills itself, once a run
        (``probe_dir/killed``), while the other ranks go on into a collective."""
        if iteration != self.runtime_args.get("kill_rank_at", None) or self.rank != world - 1:
            return
        marker = Path(self.runtime_args.probe_dir) / "killed"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def build_layer(self) -> torch.nn.Linear:
        torch.manual_seed(int(self.runtime_args.seed))
        return torch.nn.Linear(FEATURES, CLASSES)


class TinyReference(_Probed):
    def setup(self) -> None:
        self.model = self.build_layer().eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.probe(event="setup")

    def build_dataset(self, samples, is_eval=False):
        rows = []
        for s in samples:
            generator = torch.Generator().manual_seed(int(s))
            x = torch.randn(FEATURES, generator=generator)
            rows.append({"x": x, "chosen": torch.tensor(int(s) % CLASSES)})
        return rows

    def forward_step(self, data, iteration):
        with torch.no_grad():
            return self.outputs(data, self.model(data["x"]))

    @staticmethod
    def outputs(data, logits):
        logp = F.log_softmax(logits, dim=-1)
        chosen = data["chosen"]
        rejected = (chosen + 1) % CLASSES
        return {
            "x": data["x"],
            "chosen": chosen,
            "ref_chosen": logp.gather(1, chosen[:, None])[:, 0],
            "ref_rejected": logp.gather(1, rejected[:, None])[:, 0],
        }


class TinyOpaqueReference(TinyReference):
    """`TinyReference` whose weights are out of the reference store's sight: its forward is a
    closure over the layer, no attribute holds a module or a parameter."""

    def setup(self) -> None:
        super().setup()
        layer = self.model
        del self.model
        self.run_layer = lambda x: layer(x)

    def forward_step(self, data, iteration):
        with torch.no_grad():
            return self.outputs(data, self.run_layer(data["x"]))


class TinyShardedReference(TinyReference):
    """`TinyReference` split over the processes of its replica (``zero_size``): rank r holds the
    rows of classes r, r + world, ... and ``forward_step`` gathers every rank's logits, a
    collective that needs every rank to run it on the same samples. The logits are the same
    numbers as the whole layer's (each is one row's dot product)."""

    def setup(self) -> None:
        import torch.distributed as dist

        super().setup()
        self.world, rank = dist.get_world_size(), dist.get_rank()
        rows = list(range(rank, CLASSES, self.world))
        whole, self.model = self.model, torch.nn.Linear(FEATURES, len(rows)).eval()
        with torch.no_grad():
            self.model.weight.copy_(whole.weight[rows])
            self.model.bias.copy_(whole.bias[rows])
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def forward_step(self, data, iteration):
        import torch.distributed as dist

        self.die_once(iteration, self.world)  # the others then fail in the all-gather
        with torch.no_grad():
            local = self.model(data["x"])
            width = -(-CLASSES // self.world)  # gloo gathers equal shapes: pad to the widest
            padded = F.pad(local, (0, width - local.shape[1]))
            shards = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(shards, padded)
            logits = torch.empty(len(data["x"]), CLASSES)
            for r, shard in enumerate(shards):
                columns = len(range(r, CLASSES, self.world))
                logits[:, r :: self.world] = shard[:, :columns]
            return self.outputs(data, logits)


class TinyTrainer(_Probed):
    def setup(self) -> None:
        self.model = self.build_layer()
        args = self.model_args
        width = args.get("width") or (args.get("model_config") or {}).get("hidden_size")
        if width:  # the model's size: a checkpoint of another one does not load
            self.model.register_buffer("width", torch.zeros(width))
        self.dropout = torch.nn.Dropout(0.2)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _decay)
        torch.manual_seed(int(self.runtime_args.seed) + 1)  # the dropout stream
        random.seed(11)
        np.random.seed(12)
        self._stepped = False
        resume = {"resume": self.resume_training, "train_iteration": self._train_iteration}
        self.probe(event="setup", **resume)

    def train_step(self, data, iteration):
        if not self._stepped:
            self._stepped = True
            self.probe(event="first_step", iteration=iteration, resume=self.resume_training)
        self._gate(iteration)
        if iteration == self.runtime_args.get("fail_iteration", None):
            raise RuntimeError(f"a bug at iteration {iteration}")
        self.optimizer.zero_grad()
        losses, margins = [], []
        for mb in data:
            logp = F.log_softmax(self.model(self.dropout(mb["x"])), dim=-1)
            chosen = mb["chosen"]
            rejected = (chosen + 1) % CLASSES
            pc = logp.gather(1, chosen[:, None])[:, 0]
            pr = logp.gather(1, rejected[:, None])[:, 0]
            margin = BETA * ((pc - mb["ref_chosen"]) - (pr - mb["ref_rejected"]))
            losses.append(-F.logsigmoid(margin).mean())
            margins.append(margin.mean())
        noise = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        loss = torch.stack(losses).mean() * noise
        loss.backward()
        self.reduce_gradients(iteration)
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.item(), "rewards/margins": torch.stack(margins).mean().item()}

    def reduce_gradients(self, iteration: int) -> None:
        """One process: nothing to reduce."""

    def save_checkpoint(self, iteration: int) -> None:
        """At ``kill_at_save`` the trainer kills itself while saving, once a run
        (``probe_dir/killed``), its files half written."""
        super().save_checkpoint(iteration)
        if iteration == self.runtime_args.get("disk_full_at_save", None):
            # as a full disk answers the next write (the files so far half a checkpoint)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.checkpoint_dir()))
        if iteration == self.runtime_args.get("kill_at_save", None):
            marker = Path(self.runtime_args.probe_dir) / "killed"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    def _gate(self, iteration: int) -> None:
        directory = self.runtime_args.get("probe_dir", None)
        if directory is None or iteration != self.runtime_args.get("gate_iteration", None):
            return
        (Path(directory) / "waiting").write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not (Path(directory) / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


class TinyDataParallelTrainer(TinyTrainer):
    """`TinyTrainer` over the processes of the trainer, averaging gradients (an all-reduce: a
    collective). At ``kill_rank_at`` its last rank kills itself (once a run) while the others
    are in the all-reduce, which then fails for them."""

    def reduce_gradients(self, iteration: int) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        self.die_once(iteration, world)  # the others then fail in the all-reduce
        for parameter in self.model.parameters():
            dist.all_reduce(parameter.grad)
            parameter.grad /= world


def _decay(step: int) -> float:
    return 1.0 / (1.0 + 0.1 * step)
