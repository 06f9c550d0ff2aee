"""Reference outputs computed once, ever: an on-disk store (``runtime.reference_store: path``).

Runs in the actor processes of the reference replicas.

A reference replica (``worker_services.py``) looks up every sample of a work order before it runs
``forward_step``: samples found are served from the store, only the others are computed, and
their outputs are added. A second run over the same data — a beta sweep, another loss type, a
restart — then skips the reference for every sample it has seen.

An entry is keyed by what decides the output, and nothing else:

- the reference model's *fingerprint*: its class, a hash of every tensor of its ``torch.nn``
  modules (weights and buffers, those left out of the state too: the dtype is in the bytes;
  modules kept in lists, tuples or dicts included; a module holding none cannot use the store),
  their configs' plain values (heads, theta, epsilons: the same weights under another
  architecture compute other outputs), and what the module says changes its forward
  (``reference_store_key()``, if it defines one: the Hugging Face modules name their
  precision, packing and log-prob settings). One SQLite file per fingerprint,
  ``<path>/reference-<fingerprint>.sqlite``: a changed model never sees another model's entries.
- the sample as the reference receives it: the dataset row after ``build_dataset`` (token ids
  after the tokenizer and truncation), hashed from its exact bytes on the wire. A changed tokenizer
  or truncation changes the rows, so their keys.

Each entry holds the sample's output (our codec's frames, no pickle) and a BLAKE2b digest of
them: an entry that does not match its digest or does not decode (truncated, bit-flipped) is
deleted and computed again, never used. A store file SQLite cannot read is moved aside
(``.corrupt-<time>``) and a new one started. Replicas of a run share the file (SQLite's locking,
WAL journal); every access runs on the replica's compute thread.

A replica of several processes (a sharded or model-parallel reference) uses the store through
`ReplicaStore`: its last rank, the one that sends the outputs, looks samples up and stores them,
and tells the other ranks which samples it found (a broadcast over the replica's process group),
so that every rank runs ``forward_step`` on the same samples (their collectives must match). Its
fingerprint covers the whole model: each rank hashes the shards it holds (the local part of a
DTensor), and the fingerprint hashes every rank's digest in rank order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chatlearn.config.errors import ConfigError
from chatlearn.transport.codec import decode, encode

logger = logging.getLogger("chatlearn.engine")

_DIGEST = 32  # bytes of the BLAKE2b digests (keys, fingerprints, entries)
_FRAME_COUNT = struct.Struct("<I")
_FRAME_SIZE = struct.Struct("<Q")


def fingerprint(module: Any) -> str:
    """The reference module's fingerprint (module docstring), as hex. On a replica of several
    processes this is a collective: every rank of the replica must call it.

    Every tensor is hashed on its own, on as many threads as the process may use (BLAKE2b
    releases the GIL; a 70B model's shard on one of 8 GPUs is ~17 GB, 25 s on one core), and
    the fingerprint hashes their names, dtypes, shapes and digests in order."""
    import torch

    from chatlearn.algorithms.collectives import collective_device

    digest = hashlib.blake2b(digest_size=_DIGEST)
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    extras = getattr(module, "reference_store_key", None)
    if callable(extras):
        digest.update(json.dumps(extras(), sort_keys=True, default=str).encode())
    keys: list[str] = []
    tensors: list[Any] = []
    for name, value in _weights(module):
        keys.append(name)
        tensors.append(value)
    for name, config in _configs(module):
        digest.update(f"{name}:config:{config}".encode())
    if not tensors and not callable(extras):
        raise ConfigError(
            f"the reference module {type(module).__qualname__} holds no torch.nn.Module or "
            "Parameter in its attributes (nor in lists, tuples or dicts of them): the store "
            "cannot tell its weights from another checkpoint's",
            key="runtime.reference_store",
            fix="keep the model in an attribute (self.model = ...), define "
            "reference_store_key() returning what identifies the weights, or remove "
            "reference_store",
        )
    with ThreadPoolExecutor(_hash_threads(), thread_name_prefix="fingerprint") as pool:
        digests = pool.map(_tensor_digest, tensors)  # in order; a few tensors at a time
        for key, (dtype, shape, tensor_digest) in zip(keys, digests, strict=True):
            digest.update(f"{key}:{dtype}:{shape}:".encode() + tensor_digest)
    dist = _replica_group()
    if dist is None:
        return digest.hexdigest()
    world_size = dist.get_world_size()
    local = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8).to(collective_device())
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    combined = hashlib.blake2b(f"{world_size} ranks".encode(), digest_size=_DIGEST)
    for rank_digest in gathered:
        combined.update(rank_digest.cpu().numpy().tobytes())
    return combined.hexdigest()


_BROKEN_SAID = 5  # broken entries said one by one (400 bit-flipped rows were 400 lines)
_CONTAINER_DEPTH = 4  # lists of model chunks (Megatron's), dicts of models, one in the other
_CONTAINER_ITEMS = 1024  # longer ones are data, not models: not searched


def _models(module: Any) -> list[tuple[str, Any]]:
    """Every ``torch.nn.Module`` and ``Parameter`` among the module's attributes, also inside
    lists, tuples and dicts of them (a Megatron reference keeps its model as a list of chunks),
    named, in a fixed order; an object met twice counts once."""
    import torch

    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def visit(name: str, value: Any, depth: int) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, torch.nn.Module | torch.nn.Parameter):
            found.append((name, value))
        elif (
            depth < _CONTAINER_DEPTH
            and isinstance(value, list | tuple | dict)
            and len(value) <= _CONTAINER_ITEMS
        ):
            if isinstance(value, dict):
                items = [(f"{name}[{key!r}]", value[key]) for key in sorted(value, key=repr)]
            else:
                items = [(f"{name}[{i}]", item) for i, item in enumerate(value)]
            for item_name, item in items:
                visit(item_name, item, depth + 1)

    for name, value in sorted(vars(module).items()):
        visit(name, value, 0)
    return found


def _weights(module: Any) -> list[tuple[str, Any]]:
    """The tensors that decide the module's outputs, named, in a fixed order: each model's
    state (its tensors; a megatron-core model's ``_extra_state`` entries are None or bytes: the
    bytes are hashed, None is nothing) and the buffers the state leaves out (RoPE's
    ``inv_freq``, made from the config's theta and head size), and each bare ``Parameter``."""
    import torch

    found: list[tuple[str, Any]] = []
    for name, value in _models(module):
        if isinstance(value, torch.nn.Parameter):
            found.append((name, value))
            continue
        state = value.state_dict()
        for key, item in state.items():
            if isinstance(item, io.BytesIO):
                item = item.getvalue()
            if isinstance(item, bytes | bytearray) and item:
                item = torch.frombuffer(bytearray(item), dtype=torch.uint8)
            if isinstance(item, torch.Tensor):
                found.append((f"{name}.{key}", item))
        found.extend(
            (f"{name}.{key}", buffer)
            for key, buffer in value.named_buffers()
            if key not in state and buffer is not None
        )
    return found


def _configs(module: Any) -> list[tuple[str, str]]:
    """Each model's configuration as canonical JSON of its plain values (sizes, heads, theta,
    epsilons, ...), named: what changes the outputs without changing a weight's bytes, e.g.
    ``num_attention_heads`` at the same hidden size, or ``rope_theta``. A config's private
    entries (``_name_or_path``: where it was read from) and the library version are left out:
    the same model copied elsewhere is the same model."""
    import torch

    found: list[tuple[str, str]] = []
    seen: set[int] = set()
    for name, value in _models(module):
        if not isinstance(value, torch.nn.Module):
            continue
        for sub, part in value.named_modules():
            config = getattr(part, "config", None)
            if config is None or id(config) in seen:
                continue
            seen.add(id(config))
            plain = _plain_config(config)
            if plain:
                found.append((f"{name}.{sub}" if sub else name, json.dumps(plain, sort_keys=True)))
    return found


def _plain_config(config: Any) -> dict[str, Any]:
    """A config object's entries that are plain data (numbers, strings, booleans, None, lists
    and dicts of them): functions, dtype objects and process groups (a megatron-core
    TransformerConfig holds some) print differently in every process, so they are left out."""
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        values = to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        values = {f.name: getattr(config, f.name, None) for f in dataclasses.fields(config)}
    else:
        values = dict(getattr(config, "__dict__", {}))

    def plain(value: Any) -> bool:
        if value is None or isinstance(value, bool | int | float | str):
            return True
        if isinstance(value, list | tuple):
            return all(plain(item) for item in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return False

    return {
        key: value
        for key, value in values.items()
        if isinstance(key, str)
        and not key.startswith("_")
        and key != "transformers_version"
        and plain(value)
    }


def _tensor_digest(tensor: Any) -> tuple[Any, tuple[int, ...], bytes]:
    """A tensor's dtype, shape and the digest of its bytes (this rank's shard of a DTensor)."""
    import torch

    if hasattr(tensor, "to_local"):  # a DTensor (FSDP2): the shard this rank holds
        tensor = tensor.to_local()
    data = tensor.detach().to("cpu").contiguous()
    raw = data.view(-1).view(torch.uint8).numpy()  # no copy: hashed where it lies
    return data.dtype, tuple(data.shape), hashlib.blake2b(raw, digest_size=_DIGEST).digest()


def _hash_threads() -> int:
    """Threads for hashing: the cores this process may run on (its pinning), at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


def _replica_group() -> Any:
    """``torch.distributed`` when this process is one of several of its replica (the worker
    makes the replica's ranks the default process group), else None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return dist


def sample_key(sample: Any) -> bytes:
    """The key of one dataset row: a digest of its bytes as the codec encodes them."""
    digest = hashlib.blake2b(digest_size=_DIGEST)
    for frame in encode(sample):
        digest.update(frame)
    return digest.digest()


def _pack(value: Any) -> bytes:
    frames = [bytes(frame) for frame in encode(value)]
    parts = [_FRAME_COUNT.pack(len(frames))]
    for frame in frames:
        parts += [_FRAME_SIZE.pack(len(frame)), frame]
    return b"".join(parts)


def _unpack(blob: bytes) -> Any:
    view = memoryview(bytearray(blob))  # writable: tensors decoded from it own their memory
    (count,) = _FRAME_COUNT.unpack_from(view, 0)
    offset, frames = _FRAME_COUNT.size, []
    for _ in range(count):
        (size,) = _FRAME_SIZE.unpack_from(view, offset)
        offset += _FRAME_SIZE.size
        if offset + size > len(view):
            raise ValueError("truncated entry")
        frames.append(view[offset : offset + size])
        offset += size
    if offset != len(view):
        raise ValueError("trailing bytes in entry")
    return decode(frames)


class ReferenceStore:
    """The store of one reference model (module docstring); used from one thread."""

    def __init__(self, directory: str | Path, model_fingerprint: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"reference-{model_fingerprint[:32]}.sqlite"
        self.hits = 0
        self.computed = 0
        self.corrupted = 0
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        for attempt in range(2):
            try:
                # used on the replica's compute thread only; closed by whoever closes it
                db = sqlite3.connect(
                    self.path, timeout=60.0, isolation_level=None, check_same_thread=False
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS outputs "
                    "(key BLOB PRIMARY KEY, digest BLOB NOT NULL, value BLOB NOT NULL)"
                )
                db.execute("SELECT COUNT(*) FROM outputs").fetchone()
                return db
            except sqlite3.DatabaseError as exc:
                if attempt:
                    raise
                aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
                logger.warning(
                    "reference store %s cannot be read (%s): moved to %s, starting a new one",
                    self.path,
                    exc,
                    aside.name,
                )
                self.path.rename(aside)
                for suffix in ("-wal", "-shm"):
                    self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def get(self, keys: Sequence[bytes]) -> dict[bytes, Any]:
        """The stored outputs of these keys (the valid ones; broken entries are deleted)."""
        found: dict[bytes, Any] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite's limit on bound parameters
            batch = unique[start : start + 500]
            marks = ",".join("?" * len(batch))
            rows = self._db.execute(
                f"SELECT key, digest, value FROM outputs WHERE key IN ({marks})", batch
            ).fetchall()
            for key, digest, value in rows:
                try:
                    if hashlib.blake2b(value, digest_size=_DIGEST).digest() != digest:
                        raise ValueError("digest mismatch")
                    found[key] = _unpack(value)
                except Exception as exc:  # a broken entry is computed again, never used
                    self.corrupted += 1
                    if self.corrupted <= _BROKEN_SAID:  # the rest: the store's summary line
                        logger.warning(
                            "reference store %s: a broken entry (%s) is computed again%s",
                            self.path.name,
                            exc,
                            "; further ones are counted in the store's summary"
                            if self.corrupted == _BROKEN_SAID
                            else "",
                        )
                    self._db.execute("DELETE FROM outputs WHERE key = ?", (key,))
        self.hits += sum(1 for key in keys if key in found)
        return found

    def put(self, items: Mapping[bytes, Any]) -> None:
        """Store these outputs (one transaction)."""
        rows = []
        for key, value in items.items():
            blob = _pack(value)
            rows.append((key, hashlib.blake2b(blob, digest_size=_DIGEST).digest(), blob))
        self.computed += len(rows)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO outputs (key, digest, value) VALUES (?, ?, ?)", rows
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


class ReplicaStore:
    """The store as the ranks of a replica of several processes use it (module docstring): the
    rank that sends the replica's outputs holds the `ReferenceStore`, ``store`` is None on the
    others. Making one and every `get` are collectives: every rank calls them, with the same
    keys, in the same order."""

    def __init__(self, store: ReferenceStore | None) -> None:
        import torch

        from chatlearn.algorithms.collectives import collective_device

        dist = _replica_group()
        assert dist is not None, "ReplicaStore is for a replica of several processes"
        self.store = store
        self._dist = dist
        # which rank owns the store, and so decides: agreed by the ranks rather than assumed
        # (one sum: how many own one, and the owner's rank when exactly one does)
        owns = int(store is not None)
        counts = torch.tensor([owns, owns * dist.get_rank()], device=collective_device())
        dist.all_reduce(counts)
        owners, self._owner = (int(count) for count in counts.tolist())
        if owners != 1:
            raise ValueError(
                f"the reference store needs exactly one rank of the replica to send its outputs "
                f"(is_last_rank), {owners} do"
            )

    def get(self, keys: Sequence[bytes]) -> dict[bytes, Any]:
        """The owner's lookup. Every rank learns which keys were found; only the owner gets
        their outputs (the others map them to None: they send nothing)."""
        import torch

        from chatlearn.algorithms.collectives import collective_device

        found = self.store.get(keys) if self.store is not None else {}
        hits = [key in found for key in keys]
        mask = torch.tensor(hits, dtype=torch.uint8).to(collective_device())
        self._dist.broadcast(mask, src=self._owner)
        if self.store is not None:
            return found
        return {key: None for key, hit in zip(keys, mask.tolist(), strict=True) if hit}

    def put(self, items: Mapping[bytes, Any]) -> None:
        if self.store is not None:
            self.store.put(items)
