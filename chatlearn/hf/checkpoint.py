"""Checkpoints of the Hugging Face trainer: sharded (FSDP2) state and consolidated exports.

- ``save_sharded`` / ``load_sharded``: model and optimizer with ``torch.distributed.checkpoint``
  (every rank writes its own shards into one directory shared by the model's ranks, rank 0 the
  metadata); loading restores the exact tensors, so a resumed run continues bit for bit.
- ``full_state_dict``: the whole model gathered parameter by parameter onto rank 0's CPU memory
  (other ranks get an empty dict), so no process ever holds more than one full copy.
- ``export_hf``: rank 0 writes a ``from_pretrained``-loadable directory from that state dict; with
  LoRA, the peft adapter (``PeftModel.from_pretrained``) and, on request, merged weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatlearn.hf.lora import is_peft_model, merged_state_dict, unmergeable

logger = logging.getLogger("chatlearn.hf")


def save_sharded(directory: Path, network: nn.Module, optimizer: Any) -> None:
    """Collective: every rank of the model calls it with the same `directory`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(network, optimizer)
    with _plain_failures():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(directory: Path, network: nn.Module, optimizer: Any) -> None:
    """Collective inverse of `save_sharded` (the shards may be laid out differently)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"no sharded checkpoint in {directory} (no .metadata)")
    model_state, optimizer_state = get_state_dict(network, optimizer)
    # dcp.load fills the tensors of these dicts in place
    with _plain_failures():
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
    set_state_dict(
        network, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state
    )


@contextlib.contextmanager
def _plain_failures() -> Iterator[None]:
    """A failed ``dcp.save``/``dcp.load`` as the exception of the rank that failed (this one's,
    else the lowest's: a key missing from the checkpoint, a full disk), not torch's
    ``CheckpointException``: that one is a BaseException, which the actor took for a fatal error
    of its own, so a sharded checkpoint of another layout (LoRA's target_modules or r changed)
    restarted the trainer max_restarts times and ended in an 800-line log, not the one line
    naming the change; and a full disk was not said as such."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as failed:
        failures = failed.failures
        if not failures:
            raise
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        cause, _ = failures.get(rank) or failures[min(failures)]
        if not isinstance(cause, Exception):
            raise
        raise cause.with_traceback(None) from failed


def full_state_dict(model: nn.Module, *, sharded: bool) -> dict[str, torch.Tensor]:
    """The model's full state dict on rank 0's CPU (collective when sharded; {} on other ranks)."""
    if not sharded:
        return {key: value.detach().cpu() for key, value in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Any] = get_model_state_dict(model, options=options)
    return state


def export_hf(
    model: Any,
    state: dict[str, torch.Tensor],
    target: Path,
    *,
    tokenizer: Any = None,
    merge_lora: bool = True,
) -> None:
    """Write `model` (its weights taken from `state`) as a Hugging Face directory at `target`.

    A peft model writes its adapter to `target/adapter` and, if `merge_lora`, the merged weights
    to `target` itself; any other model writes its weights to `target`.
    """
    if is_peft_model(model):
        model.save_pretrained(str(target / "adapter"), state_dict=state, safe_serialization=True)
        refused = unmergeable(model) if merge_lora else []
        if refused:
            logger.warning(
                "the merged weights are not written, only the adapter: %s cannot be merged "
                "here (set merge_lora: false to say so)",
                ", ".join(refused[:3]),
            )
        elif merge_lora:
            base = model.get_base_model()
            base.save_pretrained(
                str(target), state_dict=merged_state_dict(model, state), safe_serialization=True
            )
    else:
        model.save_pretrained(str(target), state_dict=state, safe_serialization=True)
    save_tokenizer = getattr(tokenizer, "save_pretrained", None)
    if callable(save_tokenizer):
        save_tokenizer(str(target))
