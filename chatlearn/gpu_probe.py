"""The actor side of `chatlearn gpu-check`: a module whose methods report what its process sees.

`chatlearn.gpu_check` (the coordinator side) starts it as a reference and a trainer and calls:

- ``where()``: the process's GPU as CUDA numbers it (``CUDA_VISIBLE_DEVICES``, current device,
  UUID), so the coordinator can compare it with the placement it asked for;
- ``cuda_payload(num_bytes)``: a CUDA tensor returned as the call's result, so the worker's codec
  stages it to the host (``chatlearn.transport.codec._to_host``, through pinned memory); also
  reports whether that staging buffer is pinned and how fast the copy ran;
- ``checksum(tensor)``: the tensor moved onto this process's GPU and summed there;
- ``all_reduce_check(num_bytes)``: an all-reduce over the model's process group (NCCL across
  GPUs), its result and bus bandwidth.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from chatlearn.actors.module import TorchModule


def payload(num_bytes: int) -> torch.Tensor:
    """A deterministic uint8 pattern (not constant, so a shifted or truncated copy differs)."""
    return (torch.arange(num_bytes, dtype=torch.int64) % 251).to(torch.uint8)


class GPUProbe(TorchModule):
    """Nothing to set up: every method works on the process's current CUDA device."""

    def where(self) -> dict[str, Any]:
        device = torch.cuda.current_device()
        marker = torch.ones(1, device="cuda")  # allocates on the device, so CUDA really works
        return {
            "pid": os.getpid(),
            "rank": self.rank,
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device_count": torch.cuda.device_count(),
            "device": device,
            "uuid": str(torch.cuda.get_device_properties(device).uuid),
            "name": torch.cuda.get_device_name(device),
            "allocated_on_cuda": marker.is_cuda,
        }

    def cuda_payload(self, num_bytes: int) -> dict[str, Any]:
        from chatlearn.transport.codec import _to_host

        tensor = payload(num_bytes).cuda()
        _to_host(tensor, torch)  # warm-up: the first pinned allocation is slow
        torch.cuda.synchronize()
        started = time.perf_counter()
        staged = _to_host(tensor, torch)
        seconds = time.perf_counter() - started
        return {
            "tensor": tensor,  # the worker's codec stages this through _to_host too
            "device": str(tensor.device),
            "staged_pinned": bool(staged.is_pinned()),
            "staged_equal": bool(torch.equal(staged, tensor.cpu())),
            "staging_gb_per_s": num_bytes / seconds / 1e9,
        }

    def offload_check(self, hidden: int) -> dict[str, Any]:
        """``free_memory``'s turn on this GPU: a model with AdamW state (one step taken) is
        offloaded (``TorchModule.offload``: parameters, gradients, buffers and optimizer state
        to CPU, cached memory released) and onloaded again; device bytes at each stage, and
        whether the weights came back bit for bit."""
        self.model = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, hidden)
        ).cuda()
        self.optimizer = torch.optim.AdamW(self.model.parameters())
        self.model(torch.randn(8, hidden, device="cuda")).sum().backward()
        self.optimizer.step()
        before = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        self.offload()
        torch.cuda.synchronize()
        offloaded = torch.cuda.memory_allocated()
        self.onload()
        torch.cuda.synchronize()
        onloaded = torch.cuda.memory_allocated()
        after = self.model.state_dict()
        same = all(torch.equal(before[k], after[k].cpu()) for k in before)
        on_device = all(p.is_cuda for p in self.model.parameters()) and all(
            t.is_cuda
            for state in self.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )
        del self.model, self.optimizer
        torch.cuda.empty_cache()
        return {
            "loaded": loaded,
            "offloaded": offloaded,
            "onloaded": onloaded,
            "weights_equal": same,
            "on_device": on_device,
        }

    def checksum(self, tensor: torch.Tensor) -> dict[str, Any]:
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        return {"device": str(on_gpu.device), "sum": int(on_gpu.sum(dtype=torch.int64))}

    def all_reduce_check(self, num_bytes: int) -> dict[str, Any]:
        import torch.distributed as dist

        world = dist.get_world_size()
        rank = dist.get_rank()
        values = torch.full((num_bytes // 4,), float(rank + 1), device="cuda")
        dist.all_reduce(values)  # warm-up: NCCL builds its communicator on the first call
        values.fill_(float(rank + 1))
        torch.cuda.synchronize()
        started = time.perf_counter()
        dist.all_reduce(values)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        expected = world * (world + 1) / 2
        return {
            "backend": dist.get_backend(),
            "world_size": world,
            "correct": bool(torch.all(values == expected)),
            # NCCL's bus bandwidth of an all-reduce: bytes × 2(n-1)/n per second
            "bus_gb_per_s": num_bytes * 2 * (world - 1) / world / seconds / 1e9,
        }
