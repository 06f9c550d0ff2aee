"""Batch surgery on both sides of the data plane: chunking, joining, per-sample split, collation.

Runs in the actor processes (reference replicas and trainer ranks, for ``worker_services.py``);
the coordinator uses :func:`chunk_sizes` only (``schedule.py``).

Reference side (inside a reference replica, for one work order):

1. the replica collates its share (the dataset's ``collate_fn``, else :func:`collate_inputs`,
   ChatLearn's ``default_collate`` as far as a program can tell) into one batch dict;
2. :func:`split_into_chunks` cuts it into ``generation_batch_size`` rows per ``forward_step`` call
   (:func:`chunk_sizes` gives the sizes alone);
3. :func:`concat_outputs` joins the chunk outputs (tensors on dim 0, moved to CPU; lists extended);
4. :func:`split_per_sample` turns the joined output into one dict per sample, which travel to the
   trainer keyed by buffer position.

Trainer side: :func:`collate_samples` builds a micro-batch from per-sample dicts, padding tensors
to the longest in every per-sample dim (usually only the first differs; right with 0, or per key
by a
:class:`PaddingSpec` from ``add_padding_config``), stacking 0-dim tensors and listing the rest.

Behaviour follows ChatLearn: ``split_along_batch`` / ``concat_along_batch`` in
``chatlearn/runtime/decorator.py``, and ``split_batch`` / ``batching`` in
``chatlearn/data/data.py``.
Deliberate deviations, all about errors: ChatLearn takes the batch size from the first value and
slices everything else blindly; here every batch-first value (tensor with a dim, numpy array,
list, tuple) must have the same length, and a mismatch is a ``ValueError`` naming the keys. A
``generation_batch_size`` <= 0 means no split (ChatLearn loops forever on -2 and treats 0 as a
training call). Values without a batch dim (numbers, strings, 0-dim tensors) are copied to every
chunk of an input and to every sample of a split, where ChatLearn slices them or crashes; forward
outputs must still be batch-first (the spec), so :func:`concat_outputs` rejects them by name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import default_collate

PaddingType = Literal["right", "left"]


# -- classification --------------------------------------------------------------------------


def is_batch_first(value: Any) -> bool:
    """A value whose first dim (or length) is the batch: tensors with >=1 dim, arrays, lists."""
    if isinstance(value, torch.Tensor):
        return value.dim() >= 1
    if isinstance(value, np.ndarray):
        return value.ndim >= 1
    return isinstance(value, (list, tuple))


def batch_size_of(batch: Mapping[str, Any], *, what: str = "batch") -> int | None:
    """The common length of the batch-first values; None if there is none.

    Raises ``ValueError`` naming two keys whose lengths differ, or a key holding a dict.
    """
    # exact type checks first: isinstance against the Mapping ABC is slow, and this runs for
    # every chunk and sample
    if type(batch) is not dict and not isinstance(batch, Mapping):
        raise ValueError(f"{what} must be a dict of tensors and lists, got {type(batch).__name__}")
    size: int | None = None
    first_key: str | None = None
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                continue
            length = value.shape[0]
        elif isinstance(value, (list, tuple)):
            length = len(value)
        elif isinstance(value, np.ndarray):
            if value.ndim == 0:
                continue
            length = len(value)
        elif isinstance(value, Mapping):
            raise ValueError(
                f"{what}: key {key!r} holds a dict; values must be batch-first tensors or lists "
                f"(flatten nested dicts into top-level keys)"
            )
        else:
            continue
        if size is None:
            size, first_key = length, key
        elif length != size:
            raise ValueError(
                f"{what}: key {key!r} has batch size {length} but key {first_key!r} has {size}; "
                f"every tensor (dim 0) and list in it must have one row per sample"
            )
    return size


# -- reference side --------------------------------------------------------------------------


def chunk_sizes(batch_size: int, generation_batch_size: int | None) -> list[int]:
    """Rows of each ``forward_step`` call for a batch of ``batch_size`` (last may be shorter)."""
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if (
        not generation_batch_size
        or generation_batch_size <= 0
        or batch_size <= generation_batch_size
    ):
        return [batch_size]
    full, rest = divmod(batch_size, generation_batch_size)
    return [generation_batch_size] * full + ([rest] if rest else [])


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, tuple):
        return list(value[start:stop])
    return value[start:stop]


def split_into_chunks(
    batch: Mapping[str, Any], generation_batch_size: int | None, *, what: str = "forward_step input"
) -> list[dict[str, Any]]:
    """Cut a collated batch into consecutive chunks of ``generation_batch_size`` rows.

    Batch-first values are sliced (tensors stay views); other values are copied to every chunk.
    One chunk (the batch itself, as a new dict) when no split is needed.
    """
    size = batch_size_of(batch, what=what)
    if size is None:
        return [dict(batch)]
    chunks: list[dict[str, Any]] = []
    start = 0
    for rows in chunk_sizes(size, generation_batch_size):
        chunks.append(
            {
                key: _slice(value, start, start + rows) if is_batch_first(value) else value
                for key, value in batch.items()
            }
        )
        start += rows
    return chunks


def _to_cpu(value: torch.Tensor) -> torch.Tensor:
    return value.detach().cpu()


def concat_outputs(
    outputs: Sequence[Mapping[str, Any] | None], *, what: str = "forward_step output"
) -> dict[str, Any]:
    """Join chunk outputs: tensors concatenated on dim 0 (on CPU), arrays likewise, lists extended.

    Every chunk must return a dict with the same keys and batch-first values of one kind per key.
    """
    if not outputs:
        raise ValueError(f"{what}: nothing to concatenate")
    checked: list[Mapping[str, Any]] = []
    for i, out in enumerate(outputs):
        if out is None:
            raise ValueError(
                f"{what} of chunk {i} is None: forward_step must return a dict of batch-first "
                f"tensors or lists (its output is not merged with its input)"
            )
        batch_size_of(out, what=f"{what} of chunk {i}")
        checked.append(out)
    keys = common_keys(
        checked,
        lambda i, keys: (
            f"{what} of chunk {i} has other keys than chunk 0 (missing "
            f"{sorted(set(keys) - set(checked[i]))}, extra {sorted(set(checked[i]) - set(keys))}"
            "): every forward_step call must return the same keys"
        ),
    )
    joined: dict[str, Any] = {}
    for key in keys:
        values = [out[key] for out in checked]
        joined[key] = _concat_key(key, values, what)
    return joined


def _concat_key(key: str, values: list[Any], what: str) -> Any:
    first = values[0]
    for i, value in enumerate(values):
        if not is_batch_first(value):
            raise ValueError(
                f"{what}: key {key!r} of chunk {i} is a {_describe(value)}; every output value "
                f"must be a batch-first tensor (one row per sample) or a list"
            )
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ValueError(f"{what}: key {key!r} is a tensor in some chunks and not in others")
        tensors = [_to_cpu(v) for v in values]
        if len(tensors) == 1:
            return tensors[0]
        try:
            return torch.cat(tensors, dim=0)
        except RuntimeError as exc:
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(
                f"{what}: key {key!r} cannot be concatenated across chunks (shapes {shapes}); "
                f"pad it to a fixed length inside forward_step or return a list: {exc}"
            ) from None
    if isinstance(first, np.ndarray):
        if not all(isinstance(v, np.ndarray) for v in values):
            raise ValueError(f"{what}: key {key!r} is an array in some chunks and not in others")
        try:
            return np.concatenate(values, axis=0)
        except ValueError as exc:
            raise ValueError(f"{what}: key {key!r} cannot be concatenated: {exc}") from None
    joined: list[Any] = []
    for i, value in enumerate(values):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{what}: key {key!r} is a list in chunk 0 but not in chunk {i}")
        joined.extend(value)
    return joined


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "0-dim tensor"
    if isinstance(value, np.ndarray):
        return "0-dim array"
    return type(value).__name__


def split_per_sample(
    batch: Mapping[str, Any], *, expected_size: int | None = None, what: str = "forward_step output"
) -> list[dict[str, Any]]:
    """One dict per sample: row ``i`` of every tensor/array, item ``i`` of every list.

    Values without a batch dim are shared by every sample. ``expected_size`` (the number of
    samples of the work order) is checked when given.
    """
    size = batch_size_of(batch, what=what)
    if size is None:
        raise ValueError(
            f"{what} has no batch-first value (keys {sorted(batch)}): it must hold tensors with "
            f"one row per sample or lists with one item per sample"
        )
    if expected_size is not None and size != expected_size:
        raise ValueError(
            f"{what} has {size} rows for {expected_size} input samples: forward_step must return "
            f"one row per input sample"
        )
    return [
        {key: value[i] if is_batch_first(value) else value for key, value in batch.items()}
        for i in range(size)
    ]


# -- trainer side ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaddingSpec:
    """How one key is padded in a micro-batch (``add_padding_config(key, value, padding_type)``)."""

    value: float = 0.0
    padding_type: PaddingType = "right"

    def __post_init__(self) -> None:
        if self.padding_type not in ("right", "left"):
            raise ValueError(f"padding_type must be 'right' or 'left', got {self.padding_type!r}")

    def to_dict(self) -> dict[str, Any]:
        """ChatLearn's stored form (plain types; travels to trainer actors)."""
        return {"padding_value": self.value, "padding_type": self.padding_type}


PaddingConfig = Mapping[str, "PaddingSpec | Mapping[str, Any]"]


def normalize_padding_config(config: PaddingConfig | None) -> dict[str, PaddingSpec]:
    """Accept :class:`PaddingSpec` values or ChatLearn's ``{"padding_value", "padding_type"}``."""
    result: dict[str, PaddingSpec] = {}
    for key, spec in (config or {}).items():
        if isinstance(spec, PaddingSpec):
            result[key] = spec
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"padding config for key {key!r} must be a dict, got {spec!r}")
        unknown = set(spec) - {"padding_value", "value", "padding_type"}
        if unknown:
            raise ValueError(f"padding config for key {key!r} has unknown fields {sorted(unknown)}")
        value = spec.get("padding_value", spec.get("value", 0.0))
        ptype = spec.get("padding_type", "right")
        try:
            result[key] = PaddingSpec(value, ptype)
        except ValueError as exc:
            raise ValueError(f"padding config for key {key!r}: {exc}") from None
    return result


def pad_stack(
    tensors: Sequence[torch.Tensor], value: float = 0.0, padding_type: PaddingType = "right"
) -> torch.Tensor:
    """Stack tensors padded to the longest in every dim (on their first dim alone, this is
    ``pad_sequence``'s result): right pads at the end of each dim, left at its start.

    Dtype and device of the first tensor, as ``torch.nn.utils.rnn.pad_sequence``; every tensor
    must have the same number of dims. Samples of shape ``[1, L]`` (a tokenizer's output kept
    2-d) pad on their ``L``.
    """
    first = tensors[0]
    if first.dim() == 0:
        return torch.stack(list(tensors))
    if any(t.dim() != first.dim() for t in tensors):
        raise ValueError(
            f"cannot pad shapes {[tuple(x.shape) for x in tensors]}: their numbers of dims differ"
        )
    longest = [max(t.shape[d] for t in tensors) for d in range(first.dim())]
    out = first.new_full((len(tensors), *longest), value)
    for i, t in enumerate(tensors):
        if padding_type == "right":
            where = tuple(slice(0, size) for size in t.shape)
        else:
            sizes = zip(longest, t.shape, strict=True)
            where = tuple(slice(full - size, full) for full, size in sizes)
        out[i][where] = t
    return out


def collate_samples(
    samples: Sequence[Mapping[str, Any]], padding: PaddingConfig | None = None
) -> dict[str, Any]:
    """A micro-batch dict from per-sample dicts (ChatLearn's ``batching``).

    Tensors with >=1 dim are padded to the longest sample in every dim (right with 0 unless
    ``padding`` says otherwise for the key), 0-dim tensors are stacked, other values become lists
    (0-dim tensors among them as their numbers).
    """
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    specs = normalize_padding_config(padding)
    keys = common_keys(
        samples,
        lambda i, keys: (
            f"sample {i} of the micro-batch has keys {sorted(samples[i])} but sample 0 has "
            f"{sorted(keys)}: every reference output must have the same keys"
        ),
    )
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if _numbers_in_some(values):
            # a number a reference passed through from its input, which collate_inputs made a
            # tensor in one chunk (all numbers) and left in another (a None, a string there):
            # the list of the numbers it was before, not an error that depends on the draw
            batch[key] = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        elif isinstance(values[0], torch.Tensor):
            if not all(isinstance(v, torch.Tensor) for v in values):
                raise ValueError(f"key {key!r} is a tensor in some samples and not in others")
            spec = specs.get(key, PaddingSpec())
            if any(v.dim() != values[0].dim() for v in values):
                raise ValueError(
                    f"key {key!r}: samples have tensors of different ranks "
                    f"{[tuple(v.shape) for v in values]}"
                )
            try:
                batch[key] = pad_stack(values, spec.value, spec.padding_type)
            except (ValueError, RuntimeError) as exc:
                raise ValueError(f"key {key!r}: {exc}") from None
        else:
            batch[key] = values
    return batch


def _numbers_in_some(values: list[Any]) -> bool:
    """0-dim tensors among values that are not all tensors."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    return 0 < len(tensors) < len(values) and all(t.dim() == 0 for t in tensors)


def collate_inputs(samples: Sequence[Any]) -> Any:
    """A reference's ``forward_step`` input from samples of a dataset without a ``collate_fn``.

    ChatLearn's data loader then collates with torch's ``default_collate``, and programs written
    for it rely on what that gives: numbers as tensors (``int`` int64, ``float`` float64,
    ``bool`` bool, numpy's scalars of their own dtype) and numpy arrays as tensors (of the dtype
    their dtypes promote to, as ``torch.stack`` there). Here too; tensors are padded to the
    longest (`collate_samples`), where ``default_collate`` stops at tensors of different lengths,
    and the rest stays a list: a key whose arrays are not all numeric arrays of one number of
    dims (None in some samples, another rank) is the list of them it was before.
    """
    if samples and not any(isinstance(sample, Mapping) for sample in samples):
        # rows that are not dicts (a prompt string, a tuple): default_collate itself, whatever
        # it gives (a list of the strings), as ChatLearn's forward_step gets them; collated key
        # by key, they stopped with "'str' object has no attribute 'keys'"
        return default_collate(list(samples))
    batch = collate_samples(samples)  # numpy arrays are still lists here
    for key, values in batch.items():
        if isinstance(values, list) and values:
            if any(_numeric_array(v) for v in values):
                batch[key] = _arrays_as_tensor(values)
            else:
                batch[key] = _numbers_as_tensor(values)
    return batch


def _numeric_array(value: Any) -> bool:
    """A numpy array torch can take (strings and objects stay as they are)."""
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"


def _arrays_as_tensor(values: list[Any]) -> Any:
    """Numeric arrays (tensors among them too) as one padded tensor of their promoted dtype, as
    ``default_collate`` stacks them (the first one's dtype would truncate a float array after an
    integer one); ``values`` unchanged when they are not all such arrays of one number of dims,
    or of dtypes torch does not promote (uint32 with int64), where ``default_collate`` stops."""
    if not all(_numeric_array(v) or isinstance(v, torch.Tensor) for v in values):
        return values
    if len({(v.shape, v.dtype) for v in values}) == 1 and _numeric_array(values[0]):
        stacked = np.stack(values)  # all arrays of one shape and dtype: default_collate's stack
        return torch.from_numpy(stacked.astype(stacked.dtype.newbyteorder("="), copy=False))
    tensors = [v if isinstance(v, torch.Tensor) else _from_numpy(v) for v in values]
    if any(t.dim() != tensors[0].dim() for t in tensors):
        return values
    try:
        dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors})
    except RuntimeError:
        return values
    return pad_stack([t.to(dtype) for t in tensors])


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """``array`` as a tensor, copied first where ``torch.from_numpy`` would refuse it (negative
    strides: ``x[::-1]``; another byte order: ``>i4`` read from a file) or warn (read-only: a
    memory map). pad_stack copies it anyway, so it is never written through."""
    native = array.dtype.newbyteorder("=")
    return torch.from_numpy(np.require(array, dtype=native, requirements=["C", "W"]))


def _numbers_as_tensor(values: list[Any]) -> Any:
    """``values`` as the tensor ``default_collate`` makes of them when all are numbers, Python's
    or numpy's, mixed too (its dtype follows the first one's type: ``int`` int64, and float32
    with floats after it; ``float`` float64; numpy's its dtype), else unchanged; so are numbers
    beyond int64, where it stops."""
    if all(isinstance(v, np.generic) and v.dtype.kind in "biuf" for v in values):
        return torch.from_numpy(np.stack(values))  # uint64 too, where default_collate stops
    if not all(isinstance(v, (int, float)) or _numpy_number(v) for v in values):
        return values
    try:
        return default_collate(values)
    except (RuntimeError, OverflowError, TypeError, ValueError):
        return values


def _numpy_number(value: Any) -> bool:
    return isinstance(value, np.generic) and value.dtype.kind in "biufc"


def gather_micro_batch(
    buffer: Mapping[int, Mapping[str, Any]],
    positions: Sequence[int],
    padding: PaddingConfig | None = None,
) -> dict[str, Any]:
    """Collate the samples at ``positions`` of an episode buffer (position -> sample dict)."""
    missing = [p for p in positions if p not in buffer]
    if missing:
        raise KeyError(f"buffer positions {missing} have not arrived")
    return collate_samples([buffer[p] for p in positions], padding)


def common_keys(
    items: Sequence[Mapping[str, Any]], mismatch: Callable[[int, list[str]], str]
) -> list[str]:
    """The keys of ``items[0]``, which every item must have exactly; else a ValueError with
    ``mismatch(index of the first item that differs, those keys)``."""
    keys = list(items[0].keys())
    expected = set(keys)
    for i in range(1, len(items)):
        if items[i].keys() != expected:
            raise ValueError(mismatch(i, keys))
    return keys
