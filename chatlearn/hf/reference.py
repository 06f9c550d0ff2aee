"""`HFReference`: the frozen model's summed log-probs of each pair, and the pair tensors the trainer
needs (chatlearn/hf/modules.py describes the modules and their model_args)."""

from __future__ import annotations

from typing import Any

import torch

from chatlearn.algorithms.collectives import collective_device
from chatlearn.algorithms.dpo import REF_CHOSEN_KEY, REF_REJECTED_KEY, reference_outputs
from chatlearn.algorithms.logps import DEFAULT_CHUNK_SIZE
from chatlearn.algorithms.packing import PAIR_KEYS
from chatlearn.hf.base import HFModule
from chatlearn.hf.parallel import unwrap


class HFReference(HFModule):
    """The frozen reference: per-pair summed response log-probs."""

    def reference_store_key(self) -> dict[str, Any]:
        """What changes this module's outputs beyond its weights and the samples' tokens: the
        precision, the packed / prefix-shared forward and the log-prob chunking (the reference
        store keys entries by it; engine/reference_store.py)."""
        return {
            "layout": repr(self.layout),
            "packing": repr(self.packing),
            "logps_chunk_size": int(self.arg("logps_chunk_size", DEFAULT_CHUNK_SIZE)),
            **_logits_key(unwrap(self.network)),
        }

    def setup(self) -> None:
        super().setup()
        self.model.eval()
        self.model.requires_grad_(False)
        self.network = self.build_network(trainable=False)

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, torch.Tensor]:
        with self.layout.autocast():
            if not self.layout.sharded:
                return reference_outputs(
                    self.network,
                    data,
                    pad_token_id=self.pad_token_id,
                    **self.packing.kwargs(),
                    **self.budget_options(),
                )
            return self._sharded_forward(data)

    def _sharded_forward(self, data: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each rank scores its share of the rows (every rank must run the sharded forward),
        then the shares are all-gathered so the rank that sends has them all."""
        rows = int(data["chosen_input_ids"].shape[0])
        world, rank = self.layout.world_size, self.data_parallel_rank
        share = -(-rows // world)
        lo, hi = min(rows, rank * share), min(rows, (rank + 1) * share)
        if hi == lo:  # fewer rows than ranks: this rank scores row 0 again, then drops it
            lo, hi = 0, min(1, rows)
        part = {
            f"{side}_{key}": data[f"{side}_{key}"][lo:hi]
            for side in ("chosen", "rejected")
            for key in PAIR_KEYS
        }
        local = reference_outputs(
            self.network,
            part,
            pad_token_id=self.pad_token_id,
            **self.packing.kwargs(),
            **self.budget_options(),
        )
        out = _pair_tensors(data)
        for key in (REF_CHOSEN_KEY, REF_REJECTED_KEY):
            out[key] = _gather_rows(local[key], share, rows, world)
        return out


def _logits_key(network: Any) -> dict[str, str]:
    """How the log-probs' logits are made from the head's output, for the reference store: {}
    where nothing is done to it (the keys of such models stay as they were), so that entries
    written while a Gemma2/Cohere/Granite model's post-processing was skipped (wrong log-probs)
    are not found."""
    if network.full_logits:
        return {"logits": "model forward"}
    return {"logits": repr(network.post)} if network.post is not None else {}


def _pair_tensors(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        f"{side}_{key}": data[f"{side}_{key}"].cpu()
        for side in ("chosen", "rejected")
        for key in PAIR_KEYS
    }


def _gather_rows(local: torch.Tensor, share: int, rows: int, world: int) -> torch.Tensor:
    """Rank r's rows [r·share, (r+1)·share) of a [rows] tensor, all-gathered (padded to share)."""
    padded = torch.zeros(share, dtype=local.dtype, device=collective_device())
    mine = min(share, max(0, rows - torch.distributed.get_rank() * share))
    padded[:mine] = local[:mine].to(padded.device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat(parts)[:rows].cpu()
