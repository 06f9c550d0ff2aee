"""Megatron's distributed (`torch_dist`) checkpoints, read and written by megatron-core.

A torch_dist checkpoint stores every tensor once, whole (its global shape), with the offsets of
the shards each rank wrote: it is independent of the tensor- and pipeline-parallel sizes, so a
model saved at TP 2 loads at TP 1 and the other way round. Reading and writing go through
`megatron.core.dist_checkpointing` with the GPTModel's own `sharded_state_dict()`; the layout on
disk is Megatron-LM's (`--ckpt-format torch_dist`):

    <root>/latest_checkpointed_iteration.txt     "release" or the iteration number
    <root>/release/ or <root>/iter_0000100/      metadata.json (sharded_backend: torch_dist),
                                                 common.pt, .metadata, __<rank>_<i>.distcp

The model's tensors are under the state-dict key `model`, as Megatron-LM writes them, with
megatron-core's checkpoint names (the local layer spec uses TransformerEngine's names on disk,
`decoder.layers.self_attention.linear_qkv.layer_norm_weight` and so on, with the layers stacked),
so checkpoints of Megatron-LM GPT models with the same architecture load too.

    save_dist_checkpoint(model, "/ckpt", iteration=100, hf_config=config)   # every rank calls
    common = load_dist_checkpoint(model, "/ckpt")                           # every rank calls

Writing: megatron-core's own torch_dist writer (`FileSystemWriterAsync`) starts a
multiprocessing manager and forks one writer process per file, and calls CUDA on the way
(`torch.cuda.synchronize`, a failure flag on `torch.cuda.current_device()`), so it cannot run on
CPU and would leave helper processes in an actor. `SyncTorchDistSaveStrategy` writes the same
format in the calling process with torch.distributed.checkpoint's plain `FileSystemWriter`,
reusing megatron-core's translation of its sharded tensors (`mcore_to_pyt_state_dict`,
`MCoreSavePlanner`); it is used on GPU too. Reading uses megatron-core's default torch_dist
loader unchanged.

A torch_dist checkpoint holds weights, not the architecture (Megatron-LM takes that from its
command line). Checkpoints written here from a model that started from an HF directory record
that HF config in the common state (`chatlearn_hf_config`), so they can be rebuilt and saved back
to HF without further input (`MegatronModule.load_pretrained_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatlearn.megatron.requirement import require_megatron

__all__ = [
    "HF_CONFIG_KEY",
    "TRACKER_FILE",
    "DistCheckpointError",
    "SyncTorchDistSaveStrategy",
    "find_dist_checkpoint",
    "is_dist_checkpoint",
    "load_dist_checkpoint",
    "read_common_state",
    "save_dist_checkpoint",
    "saved_hf_config",
]

TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's name
HF_CONFIG_KEY = "chatlearn_hf_config"  # common-state key: the HF config as a JSON string
_MODEL_KEY = "model"  # Megatron-LM keeps the (first) model chunk's tensors under this key
_CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


class DistCheckpointError(ValueError):
    """A path that is not a loadable torch_dist checkpoint, or one that does not fit the model."""


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint directory


def _is_torch_dist_dir(path: Path) -> bool:
    try:
        metadata = json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("sharded_backend") == "torch_dist"


def _iteration_dir(root: Path, iteration: int | None) -> Path:
    return root / ("release" if iteration is None else f"iter_{iteration:07d}")


def find_dist_checkpoint(path: str | Path) -> Path:
    """The torch_dist directory `path` names: itself, or the one its tracker file points to.

    `path` is either a checkpoint directory (with a `metadata.json` whose sharded backend is
    torch_dist) or a Megatron-LM checkpoint root with `latest_checkpointed_iteration.txt`.
    """
    directory = Path(path)
    if _is_torch_dist_dir(directory):
        return directory
    tracker = directory / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise DistCheckpointError(f"{tracker} holds {text!r}, not 'release' or an iteration")
        chosen = _iteration_dir(directory, None if text == "release" else int(text))
        if _is_torch_dist_dir(chosen):
            return chosen
        raise DistCheckpointError(
            f"{tracker} names {chosen.name}, which is not a torch_dist checkpoint directory "
            "(no metadata.json with sharded_backend torch_dist)"
        )
    if (directory / "metadata.json").is_file():
        raise DistCheckpointError(
            f"{directory} is a Megatron distributed checkpoint of another backend; only "
            "torch_dist is supported (Megatron-LM's default --ckpt-format)"
        )
    raise DistCheckpointError(
        f"{directory} is not a Megatron torch_dist checkpoint (no metadata.json, no {TRACKER_FILE})"
    )


def is_dist_checkpoint(path: str | Path) -> bool:
    """Whether `find_dist_checkpoint(path)` would find a torch_dist directory."""
    try:
        find_dist_checkpoint(path)
    except DistCheckpointError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Writing


def _sync_save_strategy_class() -> type:
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed import checkpoint as dcp

    class SyncTorchDist(TorchDistSaveShardedStrategy):  # type: ignore[misc, valid-type]
        """torch_dist format (backend 'torch_dist', version 1), written in this process."""

        def __init__(self) -> None:
            super().__init__("torch_dist", 1, thread_count=1)

        def save(self, sharded_state_dict: Any, checkpoint_dir: Path) -> None:
            # What TorchDistSaveShardedStrategy.async_save does before handing the tensors to
            # its asynchronous writer; the write itself is torch's synchronous one.
            sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            dcp.save(
                mcore_to_pyt_state_dict(sharded, False),
                storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                planner=MCoreSavePlanner(
                    dedup_replicated_tensors=not self.keep_only_main_replica,
                    flatten_state_dict=False,
                ),
            )

    return SyncTorchDist


def SyncTorchDistSaveStrategy() -> Any:  # noqa: N802  (a class built on first use)
    """A megatron-core save strategy writing torch_dist synchronously (see the module docstring).

    The class derives from megatron-core's TorchDistSaveShardedStrategy, so it is built when
    first needed: importing this module does not import megatron-core.
    """
    require_megatron("chatlearn.megatron.dist_ckpt")
    global _SYNC_CLASS
    if _SYNC_CLASS is None:
        _SYNC_CLASS = _sync_save_strategy_class()
    return _SYNC_CLASS()


_SYNC_CLASS: type | None = None


def save_dist_checkpoint(
    model: Any,
    root: str | Path,
    *,
    iteration: int | None = None,
    hf_config: Any = None,
    common: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a torch_dist checkpoint under `root`; returns the checkpoint directory.

    Collective over the default process group (every rank of the model calls; each writes its
    own shards, data-parallel replicas are written once). The directory is `root/release`, or
    `root/iter_<iteration:07d>` with an iteration, and `root/latest_checkpointed_iteration.txt`
    names it, as Megatron-LM does. `hf_config` (the transformers config the model was built
    from) is recorded so the checkpoint can go back to HF later; `common` adds entries of
    your own to the common (non-sharded) state, equal on every rank.
    """
    require_megatron("chatlearn.megatron.dist_ckpt")
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    root = Path(root)
    directory = _iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state: dict[str, Any] = {
        **(common or {}),
        _MODEL_KEY: model.sharded_state_dict(),
        "checkpoint_version": _CHECKPOINT_VERSION,
        "iteration": 0 if iteration is None else int(iteration),
    }
    if hf_config is not None:
        state[HF_CONFIG_KEY] = hf_config.to_json_string(use_diff=False)
    dist_checkpointing.save(state, str(directory), sharded_strategy=SyncTorchDistSaveStrategy())
    if dist.get_rank() == 0:
        (root / TRACKER_FILE).write_text("release" if iteration is None else str(iteration))
    dist.barrier()
    return directory


# ---------------------------------------------------------------------------------------------
# Reading


def read_common_state(path: str | Path) -> dict[str, Any]:
    """The common (non-sharded) state of the checkpoint `path` names (no process group needed)."""
    require_megatron("chatlearn.megatron.dist_ckpt")
    from megatron.core import dist_checkpointing

    return dict(dist_checkpointing.load_common_state_dict(str(find_dist_checkpoint(path))))


def saved_hf_config(common: dict[str, Any]) -> Any:
    """The transformers config `save_dist_checkpoint` recorded, or None."""
    text = common.get(HF_CONFIG_KEY)
    if not text:
        return None
    from transformers import CONFIG_MAPPING

    values = json.loads(text)
    return CONFIG_MAPPING[values["model_type"]].from_dict(values)


def load_dist_checkpoint(model: Any, path: str | Path) -> dict[str, Any]:
    """Load this rank's shards of the torch_dist checkpoint at `path` into `model`.

    Collective over the default process group (every rank of the model calls). `model` must have
    the checkpoint's architecture; its parallel sizes may differ from the ones it was saved with.
    Returns the checkpoint's common state (`iteration`, `chatlearn_hf_config`, ...). Tensors
    of the model that the checkpoint lacks, or of another global shape, raise
    `DistCheckpointError` naming them; tensors of the checkpoint the model does not have
    (optimizer state, other model chunks) are left alone.
    """
    require_megatron("chatlearn.megatron.dist_ckpt")
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    model = getattr(model, "module", model)
    directory = find_dist_checkpoint(path)
    # `_extra_state` entries are TransformerEngine's (FP8 metadata); the local layer spec has
    # none worth loading, and a TE checkpoint's would not fit it.
    sharded = {
        key: value
        for key, value in model.sharded_state_dict().items()
        if not (isinstance(value, ShardedObject) and key.endswith("_extra_state"))
    }
    try:
        # megatron's naming: "unexpected" = requested but not in the checkpoint, "missing" = in
        # the checkpoint but not requested (optimizer state, other model chunks: fine).
        loaded, _missing, absent = dist_checkpointing.load(
            {_MODEL_KEY: sharded}, str(directory), strict=StrictHandling.RETURN_ALL
        )
    except (CheckpointingException, CheckpointException) as exc:
        raise DistCheckpointError(
            f"{directory}: {_reason(exc)} (does the model config match the checkpoint's "
            "architecture?)"
        ) from exc
    if absent:
        raise DistCheckpointError(
            f"{directory} has no tensor {', '.join(sorted(absent)[:5])}"
            f"{' ...' if len(absent) > 5 else ''} that the model needs (does the model config "
            "match the checkpoint's architecture?)"
        )
    result = model.load_state_dict(loaded.pop(_MODEL_KEY), strict=False)
    not_loaded = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if not_loaded or result.unexpected_keys:
        raise DistCheckpointError(
            f"{directory}: the loaded state does not fit the model (missing {not_loaded[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    return loaded


def _reason(exc: BaseException) -> str:
    """The first underlying error of a load failure (torch wraps each rank's with a traceback)."""
    failures = getattr(exc, "failures", None)  # torch's CheckpointException: rank -> (exc, tb)
    if failures:
        first = next(iter(failures.values()))
        exc = first[0] if isinstance(first, tuple) else first
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
