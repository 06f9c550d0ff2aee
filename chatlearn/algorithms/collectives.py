"""Where a process group's collectives take their tensors."""

from __future__ import annotations

from typing import Any

import torch


def collective_device(group: Any = None) -> torch.device:
    """This process's GPU for an NCCL group (the default group without one), else the CPU
    (gloo, or no process group yet)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
