"""Checkpoints of the Hugging Face trainer: sharded (FSDP2) state and consolidated exports.

- ``save_sharded`` / ``load_sharded``: model and optimizer with ``torch.distributed.checkpoint``
  (every rank writes its own shards into one directory shared by the model's ranks, rank 0 the
  metadata); loading restores the exact tensors, so a resumed run continues bit for bit.
- ``full_state_dict``: the whole model gathered parameter by parameter onto rank 0's CPU memory
  (other ranks get an empty dict), so no process ever holds more than one full copy.
- ``export_hf``: rank 0 writes a ``from_pretrained``-loadable directory from that state dict; with
  LoRA, the peft adapter (``PeftModel.from_pretrained``) and, on request, merged weights.
- ``export_holds_state`` / ``load_exported_state``: whether such a directory holds a model's
  whole state dict, bit for bit, and reading it back into the model tensor by tensor. A
  replicated (one-process or DDP) trainer's checkpoint then keeps its weights once, in the
  export, rather than a second time in ``model.pt`` (HFDPOTrainer.save_checkpoint).
- ``optimizer_share`` / ``load_optimizer_state``: a replicated (DDP) optimizer's state written
  in shares, one a rank, balanced by bytes, and merged again at a load: every rank writes an
  N-th of the moments in parallel rather than one rank all of them.
- ``trainable_state`` / ``frozen_digest``: what of a LoRA model a checkpoint needs (its trainable
  tensors: the adapters), and a digest of the rest (the frozen base, which ``setup`` builds
  again) that tells at a resume whether the base is the one the adapters were trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatlearn.hf.lora import is_peft_model, merged_state_dict, unmergeable
from chatlearn.hf.memory import storage_bytes

logger = logging.getLogger("chatlearn.hf")


def save_sharded(directory: Path, network: nn.Module, optimizer: Any) -> None:
    """Collective: every rank of the model calls it with the same `directory`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(network, optimizer)
    with plain_failures():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(directory: Path, network: nn.Module, optimizer: Any) -> None:
    """Collective inverse of `save_sharded` (the shards may be laid out differently)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"no sharded checkpoint in {directory} (no .metadata)")
    model_state, optimizer_state = get_state_dict(network, optimizer)
    # dcp.load fills the tensors of these dicts in place
    with plain_failures():
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
    set_state_dict(
        network, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state
    )


@contextlib.contextmanager
def plain_failures() -> Iterator[None]:
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
    dtype: torch.dtype | None = None,
) -> None:
    """Write `model` (its weights taken from `state`) as a Hugging Face directory at `target`.

    A peft model writes its adapter to `target/adapter` and, if `merge_lora`, the merged weights
    to `target` itself; any other model writes its weights to `target`. `dtype`: the floating
    weights written in it (tied ones still one tensor); merged weights are merged from `state`
    as it is and cast after (cast first, base and adapters would each be rounded, then the sum).
    """
    if is_peft_model(model):
        model.save_pretrained(
            str(target / "adapter"), state_dict=cast_state(state, dtype), safe_serialization=True
        )
        refused = unmergeable(model) if merge_lora else []
        if refused:
            logger.warning(
                "the merged weights are not written, only the adapter: %s cannot be merged "
                "here (set merge_lora: false to say so)",
                ", ".join(refused[:3]),
            )
        elif merge_lora:
            base = model.get_base_model()
            merged = cast_state(merged_state_dict(model, state), dtype)
            base.save_pretrained(str(target), state_dict=merged, safe_serialization=True)
    else:
        model.save_pretrained(
            str(target), state_dict=cast_state(state, dtype), safe_serialization=True
        )
    if dtype is not None:
        _config_says_dtype(target, dtype)
    save_tokenizer = getattr(tokenizer, "save_pretrained", None)
    if callable(save_tokenizer):
        save_tokenizer(str(target))


def _config_says_dtype(target: Path, dtype: torch.dtype) -> None:
    """``target/config.json`` names the dtype the weights were written in: ``save_pretrained``
    writes the model's own (the trainer's fp32 masters, say), with which ``from_pretrained``
    (``dtype="auto"``) and inference servers would load bf16 weights as fp32 again."""
    path = target / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text("utf-8"))
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
    for key in keys:
        config[key] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No transformers progress bars meanwhile (a bar per save would clutter a run's log)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def cast_state(
    state: dict[str, torch.Tensor], dtype: torch.dtype | None, *, in_place: bool = False
) -> dict[str, torch.Tensor]:
    """`state` with its floating tensors in `dtype` (None: `state` itself); a tensor under
    several names (tied weights) is cast once, still one tensor. ``in_place``: `state` itself,
    its entries replaced one by one, so that each tensor as it was goes as its cast comes (one
    full copy at most, where a new dict holds both)."""
    if dtype is None:
        return state
    cast: dict[int, torch.Tensor] = {}
    out = state if in_place else {}
    for name, value in state.items():
        if value.is_floating_point():
            value = cast.setdefault(id(value), value.to(dtype))
        out[name] = value
    return out


# safetensors' names of the dtypes a state dict holds (its header says "F32", "BF16", ...)
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def safetensors_files(target: Path) -> list[Path]:
    """The weight files of an HF directory: ``model.safetensors``, or the shards its index
    names; [] if it has neither."""
    single = target / "model.safetensors"
    if single.is_file():
        return [single]
    index = target / "model.safetensors.index.json"
    if not index.is_file():
        return []
    weight_map = json.loads(index.read_text("utf-8")).get("weight_map", {})
    return [target / name for name in sorted(set(weight_map.values()))]


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (name → dtype, shape, offsets), read without its data."""
    with path.open("rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        if size > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: a header of {size} bytes is not safetensors'")
        header: dict[str, Any] = json.loads(file.read(size))
    header.pop("__metadata__", None)
    return header


def _tensor_groups(model: nn.Module) -> list[list[str]]:
    """The model's state-dict names grouped by the tensor they name: a tied weight's names are
    one group (an export writes one of them, and loading it sets them all)."""
    groups: dict[Any, list[str]] = {}
    for name, tensor in model.state_dict().items():
        # an empty tensor has no storage to share: a group of its own
        key = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.numel() else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def export_holds_state(target: Path, model: nn.Module) -> bool:
    """Whether the HF directory at `target` holds `model`'s whole state dict under its own
    names, dtypes and shapes (a tied weight under one of its names), and nothing else: loaded
    back (`load_exported_state`) it restores the model bit for bit. Reads the files' headers
    only. False where ``save_pretrained`` wrote another layout (renamed, converted or cast
    tensors)."""
    files = safetensors_files(target)
    if not files:
        return False
    written: dict[str, Any] = {}
    for path in files:
        written.update(_header(path))
    state = model.state_dict()
    for group in _tensor_groups(model):
        names = [name for name in group if name in written]
        if not names:
            return False
        for name in names:
            entry, tensor = written.pop(name), state[name]
            if entry.get("dtype") != _SAFETENSORS_DTYPES.get(tensor.dtype):
                return False
            if list(entry.get("shape", ())) != list(tensor.shape):
                return False
    return not written


def load_exported_state(target: Path, model: nn.Module) -> None:
    """Copy the tensors of the HF directory at `target` into `model`'s, one tensor in memory at
    a time (never a second copy of the model). Raises ``ValueError`` naming a tensor the
    directory lacks or one of another shape or dtype: it was not written for this model."""
    from safetensors import safe_open

    files = safetensors_files(target)
    if not files:
        raise FileNotFoundError(f"no model.safetensors (or index) in {target}")
    state = model.state_dict()
    loaded: set[str] = set()
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt") as file:
                for name in file.keys():
                    into = state.get(name)
                    tensor = file.get_tensor(name)
                    if into is None or into.shape != tensor.shape or into.dtype != tensor.dtype:
                        raise ValueError(
                            f"{path}: {name} is not a tensor of this model's state "
                            f"({_described(tensor)}, the model's: {_described(into)})"
                        )
                    into.copy_(tensor)
                    loaded.add(name)
    missing = [group[0] for group in _tensor_groups(model) if loaded.isdisjoint(group)]
    if missing:
        raise ValueError(f"{target}: no {', '.join(missing[:3])} in its safetensors files")


def _described(tensor: torch.Tensor | None) -> str:
    return (
        "none"
        if tensor is None
        else f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"
    )


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of `model`'s trainable parameters (with LoRA: the adapters)."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name in trainable}


_DIGEST_THREADS = 4


def frozen_digest(model: nn.Module) -> str:
    """A digest of every state-dict tensor of `model` that does not train (names, dtypes,
    shapes and bytes), hashed tensor by tensor on up to `_DIGEST_THREADS` of the process's cores
    (BLAKE2b releases the GIL), so at most that many tensors in host memory at a time (a GPU
    model's are copied one by one: with 8 ranks of a node hashing at once, one thread a core
    each would have held hundreds of tensors' copies)."""
    trainable = trainable_state(model)
    frozen = [(n, t) for n, t in model.state_dict().items() if n not in trainable]
    digest = hashlib.blake2b(digest_size=16)
    threads = max(1, min(_DIGEST_THREADS, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(threads) as pool:
        for (name, tensor), part in zip(
            frozen, pool.map(_tensor_bytes_digest, frozen), strict=True
        ):
            digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}:".encode() + part)
    return digest.hexdigest()


def _tensor_bytes_digest(item: tuple[str, torch.Tensor]) -> bytes:
    tensor = item[1].detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return hashlib.blake2b(data, digest_size=16).digest()


SHARE_KEY = "chatlearn_share"  # in an optimizer state dict that is one rank's share: [rank, ranks]


def share_owners(sizes: list[int], ranks: int, first_rank_bytes: int = 0) -> list[int]:
    """The rank that writes each parameter's optimizer state: the largest first, each to the
    rank with the fewest bytes so far (the lowest of equals), rank 0 starting with
    ``first_rank_bytes`` (the weights it writes besides); the same on every rank."""
    owners = [0] * len(sizes)
    loads = [first_rank_bytes] + [0] * (ranks - 1)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += sizes[index]
    return owners


def optimizer_share(
    optimizer: Any, rank: int, ranks: int, first_rank_bytes: int = 0
) -> dict[str, Any]:
    """Rank ``rank``'s share of ``optimizer``'s state dict (of ``ranks`` shares): the states
    of its parameters (`share_owners`, by the bytes of each one's state), every param group."""
    state = optimizer.state_dict()
    count = sum(len(group["params"]) for group in state["param_groups"])
    sizes = [_state_bytes(state["state"].get(index, {})) for index in range(count)]
    owners = share_owners(sizes, ranks, first_rank_bytes)
    mine = {index: value for index, value in state["state"].items() if owners[index] == rank}
    return {"state": mine, "param_groups": state["param_groups"], SHARE_KEY: [rank, ranks]}


def _state_bytes(state: dict[str, Any]) -> int:
    return storage_bytes(v for v in state.values() if isinstance(v, torch.Tensor))


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The optimizer state dict saved at ``path``; a share (`optimizer_share`) is merged with
    the other ranks' (``rank_<r>/optimizer.pt`` beside its directory)."""
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    share = state.pop(SHARE_KEY, None)
    if share is None:
        return state
    merged: dict[Any, Any] = {}
    for rank in range(int(share[1])):
        other = path.parent.parent / f"rank_{rank}" / path.name
        if rank == int(share[0]):
            part = state
        elif not other.is_file():
            raise FileNotFoundError(f"no {other}: the optimizer state is in shares, one a rank")
        else:
            part = torch.load(other, map_location="cpu", weights_only=True)
        merged.update(part["state"])
    state["state"] = dict(sorted(merged.items()))
    return state
