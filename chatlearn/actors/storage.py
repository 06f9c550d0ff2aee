"""ChatLearn's `put(key, data)` / `get(key)`: a key/value store shared by every module of a run.

Runs in the actor processes, where modules call it (inside the coordinator in in-process
mode).

In ChatLearn one storage actor serves all models, so a value one model puts, another model gets.
Here the store is a directory in the run's private runtime directory (on the coordinator's
host, mode 0700, removed when the run ends): `put` writes the value encoded by the transport
codec (msgpack and raw tensor frames, no pickle) to a temporary file and renames it into place,
so `get` in any process sees either the old value or the whole new one. Values are what
messages can carry: tensors, numbers, strings, lists, tuples and dicts of them.

Processes on other hosts have no access to that directory; there `put`/`get` raise an error
that says so.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["RunStorage", "StorageUnavailableError"]


class StorageUnavailableError(RuntimeError):
    """put/get called where the run's shared directory cannot be reached."""


class RunStorage:
    """The store in `<runtime_dir>/storage`: one file per key."""

    def __init__(self, runtime_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(runtime_dir) / "storage"

    def _path(self, key: str) -> Path:
        if not isinstance(key, str):
            raise TypeError(f"put/get keys are strings, got {type(key).__name__}")
        # hashed: any key is a safe file name
        return self.directory / hashlib.sha256(key.encode()).hexdigest()

    def put(self, key: str, data: Any) -> None:
        import msgpack

        from chatlearn.transport.codec import encode

        path = self._path(key)
        frames = encode({"key": key, "data": data})
        blob = msgpack.packb([bytes(frame) for frame in frames], use_bin_type=True)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_bytes(blob)
        os.replace(temporary, path)

    def get(self, key: str) -> Any:
        import msgpack

        from chatlearn.transport.codec import decode

        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(
                f"nothing was put under {key!r} in this run (call put({key!r}, data) first, "
                "in this model or another one)"
            ) from None
        record = decode(msgpack.unpackb(blob, raw=False))
        return record["data"]
