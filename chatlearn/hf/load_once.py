"""A model's first rank loads its checkpoint; its other ranks receive the weights from it
(``model_args.load_once``, on by default).

Loaded by every rank, a checkpoint is read N times and held whole in host memory N times over
before each rank's layout takes its copy over (8 GPUs and a 70B in bf16: 1.1 TB at once; in
turns, 8 loads one after another). Here rank 0 alone loads it (or builds it from its config);
every other rank builds the same model on the meta device (no memory, no reading), applies what
setup applies to it (LoRA, gradient checkpointing), and gets its weights once its layout has
laid it out: the meta tensors become empty ones on the rank's device (its shards only, under
FSDP2), and rank 0 broadcasts each parameter and buffer, one tensor at a time, of which each rank
keeps its part. Host memory holds one whole copy, on rank 0's host; the model is read once; the
broadcast runs at the interconnect's speed (NVLink or InfiniBand with NCCL).

The ranks first agree that they built the same model: rank 0 broadcasts each tensor's name,
shape and dtype (JSON bytes: nothing is unpickled), the others adopt its dtypes (a checkpoint's
dtype is known only once loaded) and every rank stops with the same ConfigError where names or
shapes differ. Where rank 0 works alone (reading the checkpoint, its logits check, its sharding),
the others wait for it on the process group's store, not in a collective, which gives up after
``runtime.dist_timeout`` (600 s; NCCL's watchdog then aborts the process): reading a 70B can take
longer, and ``runtime.startup_timeout`` bounds the whole setup.

``load_once: false`` has every rank load (in turns where their copies would not fit in a host's
memory: ``chatlearn.hf.load_turns``), e.g. where each host reads a local copy faster than the
network carries it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from chatlearn.algorithms.collectives import collective_device
from chatlearn.config.errors import ConfigError


class LoadOnce:
    """One model's load by its first rank. ``builds_empty``: this rank builds on the meta device;
    ``agree(model)`` once built, ``sources(network)`` on rank 0 before the layout wraps it, then
    ``receive(network, sources)`` (after wrapping under FSDP2, before otherwise)."""

    _loads = 0  # this process's loads so far: each one's store keys are its own

    def __init__(self, rank: int = 0, world_size: int = 1, wait_limit: float = 0.0) -> None:
        self.rank = rank
        self.world_size = world_size
        self.wait_limit = wait_limit  # seconds the other ranks wait for rank 0 at most, each time
        self._pending = world_size > 1
        self._waits = 0
        if self.active:
            LoadOnce._loads += 1
        self._load = LoadOnce._loads

    @classmethod
    def for_model(cls, model_args: Mapping[str, Any], wait_limit: float) -> LoadOnce:
        """This process's part in loading its model (inactive without a process group);
        ``wait_limit``: how long the setup may take (the runtime stops it then)."""
        import torch.distributed as dist

        if model_args.get("load_once") is False:
            return cls()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), wait_limit)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def pending(self) -> bool:
        """Built, not yet received (`receive` not called)."""
        return self.active and self._pending

    @property
    def builds_empty(self) -> bool:
        """This rank builds the model on the meta device (its weights come from rank 0)."""
        return self.active and self._pending and self.rank != 0

    def agree(self, model: nn.Module, where: str) -> None:
        """Rank 0's names, shapes and dtypes: adopted where only dtypes differ (and its config's
        ``dtype``, which from_pretrained sets to the checkpoint's), one ConfigError (``where``:
        the model args' key path) on every rank where more does. A collective."""
        import torch.distributed as dist

        if not (self.active and self._pending):
            return
        self._wait_for_rank_0()  # its checkpoint read
        device = collective_device()
        mine = [[name, list(t.shape), str(t.dtype)] for name, t in _tensors(model)]
        size = torch.tensor([0], dtype=torch.int64, device=device)
        if self.rank == 0:
            data = json.dumps({"tensors": mine, "config_dtype": _config_dtype(model)}).encode()
            size[0] = len(data)
        dist.broadcast(size, 0)
        payload = torch.empty(int(size[0]), dtype=torch.uint8, device=device)
        if self.rank == 0:
            payload.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(payload, 0)
        problem = ""
        if self.rank != 0:
            received = json.loads(bytes(payload.cpu().numpy()).decode())
            theirs = received["tensors"]
            problem = _difference(theirs, mine)
            if not problem:
                _adopt_dtypes(model, {name: dtype for name, _, dtype in theirs})
                _adopt_config_dtype(model, received["config_dtype"])
        failed = torch.tensor([1 if problem else 0], dtype=torch.int64, device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if int(failed[0]):
            raise ConfigError(
                "the model rank 0 loaded is not the one the other ranks build from its config "
                f"({problem or 'on another rank'})",
                key=f"{where}.load_once",
                fix="set load_once: false (every rank loads the checkpoint)",
            )

    def share_check(self, network: Any, model: Any) -> None:
        """Rank 0's verdict on whether the head's log-probs are the model's (``SequenceLogps``'s
        check, a forward that an empty model cannot run) for every rank. A collective."""
        import torch.distributed as dist

        if not (self.active and self._pending):
            return
        self._wait_for_rank_0()  # its logits check, a forward of the whole model
        verdict = torch.tensor([1 if network.full_logits else 0], device=collective_device())
        dist.broadcast(verdict, 0)
        if self.rank != 0 and int(verdict[0]):
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            network.use_model_forward(base, "found by rank 0")

    def sources(self, network: nn.Module) -> dict[str, torch.Tensor] | None:
        """Rank 0's tensors by name, taken before the layout shards or wraps them."""
        if not (self.active and self._pending) or self.rank != 0:
            return None
        return dict(_tensors(network))

    def receive(
        self,
        network: nn.Module,
        sources: dict[str, torch.Tensor] | None,
        *,
        device: torch.device,
        name: str,
        log: logging.Logger,
    ) -> None:
        """Rank 0 broadcasts every tensor; the other ranks allocate theirs on ``device`` (their
        shards under FSDP2) and keep their part. Then this object is spent."""
        import torch.distributed as dist

        if not (self.active and self._pending):
            return
        self._wait_for_rank_0()  # its layout (FSDP2 moves its shards to the GPU)
        self._pending = False
        if self.rank != 0:
            with _swapping_params():  # to_empty keeps each Parameter object: tied stay tied
                network.to_empty(device=device)
        started, sent = time.perf_counter(), 0
        comm = collective_device()
        with torch.no_grad():
            for key, local in _tensors(network):
                if self.rank == 0:
                    assert sources is not None
                    # its last reference (sharded): freed once sent
                    full = sources.pop(key).detach().to(comm).contiguous()
                else:
                    full = torch.empty(local.shape, dtype=local.dtype, device=comm)
                dist.broadcast(full, 0)
                sent += full.numel() * full.element_size()
                if self.rank != 0:
                    _keep_part(local, full)
                del full
        if self.rank == 0:
            log.info(
                "%s: rank 0 sent the model (%.1f MiB) to %d more rank(s) in %.2f s (load_once)",
                name,
                sent / 2**20,
                self.world_size - 1,
                time.perf_counter() - started,
            )

    def _wait_for_rank_0(self) -> None:
        """The other ranks wait until rank 0 is here, on the store, for as long as the setup
        may take (`wait_limit`; a lost rank 0 is the store's network error at once), so that
        the collective that follows does not wait for it."""
        import torch.distributed as dist

        try:  # private; without it the collective waits, within runtime.dist_timeout
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, ValueError):
            return
        self._waits += 1
        key = f"chatlearn/load_once/{self._load}/{self._waits}"
        if self.rank == 0:
            store.set(key, "1")
            return
        deadline = time.monotonic() + self.wait_limit
        while time.monotonic() < deadline:
            try:
                store.wait([key], timedelta(seconds=min(60.0, self.wait_limit)))
                return
            except dist.DistStoreError:  # not yet (a lost rank 0 is a DistNetworkError)
                continue
        raise RuntimeError(
            f"rank {self.rank} waited {self.wait_limit:.0f} s for rank 0 to load the model "
            "(load_once), as long as its setup may take (runtime.startup_timeout and the time "
            "to read the checkpoint)"
        )


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters (a tied one once) then buffers (those not in the state dict too: a rotary
    embedding's inv_freq), in the module's order, the same on every rank."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def _difference(theirs: list[Any], mine: list[Any]) -> str:
    """Where rank 0's tensors and this rank's first differ ("" where they do not)."""
    for (name, shape, dtype), (my_name, my_shape, _) in zip(theirs, mine, strict=False):
        if name != my_name or shape != my_shape:
            return f"rank 0 has {name} {shape} where this rank has {my_name} {my_shape}"
        if not isinstance(getattr(torch, str(dtype).removeprefix("torch."), None), torch.dtype):
            return f"rank 0 has {name} in {dtype!r}, not a torch dtype"
    if len(theirs) != len(mine):
        longer, who = (theirs, "rank 0") if len(theirs) > len(mine) else (mine, "this rank")
        first = longer[min(len(theirs), len(mine))][0]
        return f"{who} has {abs(len(theirs) - len(mine))} more tensors, from {first}"
    return ""


def _adopt_dtypes(model: nn.Module, dtypes: Mapping[str, str]) -> None:
    """Rank 0's dtypes on this rank's meta tensors (free: nothing is allocated)."""
    for name, tensor in list(_tensors(model)):
        dtype = getattr(torch, dtypes[name].removeprefix("torch."))  # `_difference` checked
        if tensor.dtype == dtype:
            continue
        if isinstance(tensor, nn.Parameter):
            tensor.data = tensor.data.to(dtype)  # the same Parameter: tied stay tied
        else:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            module._buffers[attr] = tensor.to(dtype)


def _config_dtype(model: nn.Module) -> str | None:
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    return str(dtype) if isinstance(dtype, torch.dtype) else None


def _adopt_config_dtype(model: nn.Module, dtype: str | None) -> None:
    """Rank 0's ``config.dtype``: with ``dtype`` unset, from_pretrained sets it to the
    checkpoint's, from_config leaves None, and the reference store's fingerprint (which hashes
    the config) differed from every rank loading: each of its entries missed."""
    config = getattr(model, "config", None)
    if config is not None and _config_dtype(model) != dtype:
        config.dtype = None if dtype is None else getattr(torch, dtype.removeprefix("torch."))


def _keep_part(local: torch.Tensor, full: torch.Tensor) -> None:
    """``full`` into this rank's tensor: whole, or its shard of a DTensor (FSDP2's layout)."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(local, DTensor):
        mesh = local.device_mesh
        whole = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
        local.to_local().copy_(whole.redistribute(mesh, local.placements).to_local())
    else:
        local.copy_(full)


@contextlib.contextmanager
def _swapping_params() -> Iterator[None]:
    """``nn.Module._apply`` swaps each tensor into its Parameter object instead of registering
    a new Parameter on every module that holds it (which unties tied embeddings)."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
