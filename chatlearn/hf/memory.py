"""What a model's training state costs per rank, counted from the tensors' storage.

    report = memory_report(network, optimizer)   # {"num_parameters": ..., "param_bytes": ...}
    print(format_memory_report(report, layout))

Bytes are those of the storages this process holds: a rank's own shards under FSDP2 (padded as
FSDP2 pads them), the whole model under DDP (whose gradients are views of its all-reduce buckets,
`Layout.wrap`: they are all it holds for them). Before the first step gradients and AdamW's moments
do not exist yet; they are then estimated from the trainable parameters (same shapes; AdamW keeps
two fp32 moments), and ``estimated`` says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from chatlearn.transport.allocator import set_malloc_thresholds

GIB = 1024**3
RECOMMENDED_MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, before its dynamic adjustment


def return_freed_memory(threshold: int = RECOMMENDED_MMAP_THRESHOLD) -> bool:
    """Make glibc give the memory of freed tensors back to the system (process-wide).

    Torch's CPU tensors come from `malloc`. glibc serves blocks above its mmap threshold with
    their own mappings, unmapped when freed; but after each such free it raises the threshold to
    the freed size (up to 32 MiB), so later blocks of up to 32 MiB (a layer's weights and
    activations: 1-30 MB for a 0.5B model) come from its heaps instead, where freed memory stays
    with the process. Training frees and reallocates such blocks every step, and the resident
    size drifts GiBs above what torch holds (2 GiB for the 0.49B model of `chatlearn bench
    memory`, a quarter of its peak). Fixing both thresholds (mmap and trim) at `threshold` bytes
    stops the adjustment: every block above it is unmapped when freed, and the next one is
    mapped afresh, which costs page faults: measured side by side, `chatlearn bench dpo`'s small
    model trained 35-45 % slower on CPU with it, so the modules apply it only when asked
    (``malloc_mmap_threshold``). Returns False where there is no glibc (the call is then a
    no-op) or for `threshold` 0 (the process's thresholds kept: an actor process's are those of
    `chatlearn.transport.allocator.keep_receive_buffers`).
    """
    # and what was retained before goes back now
    return threshold > 0 and set_malloc_thresholds(threshold, threshold, release=True)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # a DTensor: this rank's shard
    return to_local() if callable(to_local) else tensor


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights and views count once)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        storage = _local(tensor).untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def memory_report(network: nn.Module, optimizer: Any = None) -> dict[str, Any]:
    """Parameters (global counts) and per-rank bytes of parameters, gradients, optimizer state."""
    params = list({id(p): p for p in network.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    grads = [p.grad for p in trainable if p.grad is not None]
    states = [
        value
        for state in (optimizer.state.values() if optimizer is not None else ())
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0  # not AdamW's scalar `step`
    ]
    trainable_bytes = storage_bytes(trainable)
    fp32_trainable = sum(_local(p).numel() for p in trainable) * 4
    estimated = not grads or (optimizer is not None and not states)
    return {
        "num_parameters": sum(p.numel() for p in params),
        "num_trainable_parameters": sum(p.numel() for p in trainable),
        "param_bytes": storage_bytes(params),
        "grad_bytes": storage_bytes(grads) if grads else trainable_bytes,
        "optimizer_bytes": storage_bytes(states) if states else 2 * fp32_trainable,
        "estimated": estimated,
    }


def total_bytes(report: dict[str, Any]) -> int:
    return int(report["param_bytes"] + report["grad_bytes"] + report["optimizer_bytes"])


def format_memory_report(report: dict[str, Any], layout: str) -> str:
    """One log line: counts, bytes per rank, the layout."""
    parts = ", ".join(
        f"{key.removesuffix('_bytes')} {report[key] / GIB:.3f} GiB"
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes")
    )
    return (
        f"{report['num_parameters']:,} parameters ({report['num_trainable_parameters']:,} "
        f"trainable); per rank: {parts}, total {total_bytes(report) / GIB:.3f} GiB"
        f"{' (estimated before the first step)' if report.get('estimated') else ''}; "
        f"layout: {layout}"
    )


OOM_KNOBS = (
    "parallel: fsdp (shard parameters, gradients and optimizer state over the model's ranks)",
    "lora: {r: 16} (train adapters only)",
    "mixed_precision: bf16",
    "gradient_checkpointing: true",
    "a smaller train_micro_batch_size",
    "a smaller logps_chunk_size",
)


def out_of_memory_message(error: BaseException, report: dict[str, Any], layout: str) -> str:
    """The message of an out-of-memory error, with the estimate and what would help."""
    knobs = "; ".join(OOM_KNOBS)
    return (
        f"out of memory in train_step: {error}\n"
        f"training state: {format_memory_report(report, layout)}\n"
        f"what would help: {knobs}"
    )
