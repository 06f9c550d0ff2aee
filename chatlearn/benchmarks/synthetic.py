"""Synthetic DPO modules with fixed costs, for `chatlearn bench pipeline` and tests.

`forward_step` spins for the reference's ``model_args: {cost: seconds}`` per chunk and
`train_step` for the trainer's per step. They spin rather than sleep so that each really occupies
its core, as model compute does. The costs are in each model's `model_args`, the settings a
module reads itself, not in `runtime:`, where keys the engine does not know are warned about.
"""

from __future__ import annotations

import time
from typing import Any

from chatlearn.actors import BaseModule


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Samples(list):
    """A dataset of integer rows (len() and indexing are all the engine needs)."""


class SpinReference(BaseModule):
    def build_dataset(self, samples: list[Any], is_eval: bool = False) -> _Samples:
        import torch

        return _Samples({"row": torch.tensor(int(s))} for s in samples)

    def forward_step(self, data: dict[str, Any]) -> dict[str, Any]:
        spin(float(self.model_args.get("cost", 0.0)))
        return {"row": data["row"], "logps": data["row"].float()}


class SpinTrainer(BaseModule):
    def train_step(self, data: list[dict[str, Any]]) -> dict[str, float]:
        spin(float(self.model_args.get("cost", 0.0)))
        return {"rows": float(sum(int(mb["row"].sum()) for mb in data))}


class NoOpReference(BaseModule):
    """Returns its input: the soak (`bench pipeline --soak`) measures the coordinator alone."""

    def build_dataset(self, samples: list[Any], is_eval: bool = False) -> _Samples:
        import torch

        return _Samples({"row": torch.tensor(int(s))} for s in samples)

    def forward_step(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"row": data["row"]}


class NoOpTrainer(BaseModule):
    """Trains nothing and reports no metric."""

    def train_step(self, data: list[dict[str, Any]]) -> dict[str, float]:
        return {}
