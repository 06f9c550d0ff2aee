"""Exact DPO metrics over micro-batches and data-parallel ranks.

A mean of per-micro-batch means is wrong when micro-batches (or ranks) hold different numbers of
samples, e.g. after a short last micro-batch. So each rank keeps sums of per-sample values and a
sample count, one all-reduce adds them across ranks, and only then are they divided:
2 micro-batches × 2 ranks give exactly the numbers of the whole batch at once.

    metrics = DPOMetrics(with_nll=False)
    metrics.update(out)                        # per micro-batch, a DPOOutput
    result = metrics.all_reduce().compute()    # {"loss": ..., "rewards/accuracies": ..., ...}

Every rank must call `all_reduce` (it is a collective when torch.distributed is initialized) and
build its `DPOMetrics` with the same `with_nll`, so the reduced vector has the same layout
everywhere, even on a rank that saw no sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from chatlearn.algorithms.collectives import collective_device
from chatlearn.algorithms.dpo import METRIC_NAMES, NLL_METRIC

if TYPE_CHECKING:
    from chatlearn.algorithms.dpo import DPOOutput


class DPOMetrics:
    """Running per-sample sums of the standard DPO metrics (TRL's names)."""

    def __init__(self, *, with_nll: bool = False, prefix: str = "") -> None:
        self.names: tuple[str, ...] = METRIC_NAMES + ((NLL_METRIC,) if with_nll else ())
        self.prefix = prefix  # e.g. "eval_", as TRL names evaluation metrics
        # float64: sums over many samples stay exact enough to compare with a one-shot mean
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.num_samples = 0

    @property
    def with_nll(self) -> bool:
        return NLL_METRIC in self.names

    def update(self, out: DPOOutput) -> None:
        """Add the per-sample values of one micro-batch."""
        margins = out.chosen_rewards - out.rejected_rewards
        values = {
            "loss": out.losses.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            # strictly greater, as TRL: a tie (e.g. policy == reference) is not a win
            "rewards/accuracies": (margins > 0).to(torch.float64),
            "rewards/margins": margins,
            "logps/chosen": out.chosen_logps,
            "logps/rejected": out.rejected_logps,
        }
        if self.with_nll:
            if out.nll is None:
                raise ValueError("DPOMetrics(with_nll=True) needs outputs computed with rpo_alpha")
            values[NLL_METRIC] = out.nll
        self.add(values)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add per-sample tensors (all the same length) for every metric name."""
        missing = set(self.names) - set(values)
        if missing:
            raise ValueError(f"missing metric values: {sorted(missing)}")
        counts = {int(values[name].numel()) for name in self.names}
        if len(counts) != 1:
            raise ValueError(f"per-sample metric tensors differ in length: {sorted(counts)}")
        row = torch.stack(
            [values[name].detach().to("cpu", torch.float64).sum() for name in self.names]
        )
        self.sums += row
        self.num_samples += counts.pop()

    def merge(self, other: DPOMetrics) -> DPOMetrics:
        """Add another accumulator's sums (e.g. another rank's, in tests or a gather)."""
        if other.names != self.names:
            raise ValueError(f"cannot merge metrics {other.names} into {self.names}")
        self.sums += other.sums
        self.num_samples += other.num_samples
        return self

    def all_reduce(self, group: Any = None) -> DPOMetrics:
        """Sum across the ranks of `group` in place; a no-op without an initialized process group.

        Sums and count travel in one float64 vector on the backend's device (CUDA for NCCL).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = collective_device(group)
        packed = torch.cat(
            [self.sums, torch.tensor([float(self.num_samples)], dtype=torch.float64)]
        )
        packed = packed.to(device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        packed = packed.cpu()
        self.sums = packed[:-1].clone()
        self.num_samples = int(round(packed[-1].item()))
        return self

    def compute(self) -> dict[str, float]:
        """Means over all samples added (and reduced); empty when there were none."""
        if self.num_samples == 0:
            return {}
        means = (self.sums / self.num_samples).tolist()
        return {
            self.prefix + name: float(value) for name, value in zip(self.names, means, strict=True)
        }

    def reset(self) -> None:
        self.sums.zero_()
        self.num_samples = 0
