"""ChatLearn's `chatlearn.utils` helpers that user modules import (`to_device`; `logger` in
`chatlearn.utils.logger`), for programs written for ChatLearn (docs/chatlearn-compat.md).

A leaf of the package (tests/test_layers.py): it imports nothing of chatlearn.
"""

from __future__ import annotations

from typing import Any


def to_device(device: Any, args: Any) -> Any:
    """`args` with every tensor in it moved to `device`: lists and tuples rebuilt, dicts updated
    in place (as ChatLearn's), anything else returned as it is."""
    import torch

    if isinstance(args, list | tuple):
        return type(args)(to_device(device, arg) for arg in args)
    if isinstance(args, dict):
        for key, value in args.items():
            args[key] = to_device(device, value)
        return args
    if isinstance(args, torch.Tensor):
        return args.to(device)
    return args


__all__ = ["to_device"]
