"""Where checkpoints live on disk, and what makes one complete: what every side agrees on.

Runs on both sides: the module in its actor process (``BaseModule.checkpoint_dir``), the
coordinator (``chatlearn.engine.checkpoint``) and ``chatlearn export`` (``chatlearn.hf.export``)
import it. A leaf (standard library only), so none imports another.
The layout itself is described in ``chatlearn/engine/checkpoint.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

# in every complete checkpoint: its files' hashes (written last), and the coordinator's state
# (counters, the run's config)
MANIFEST = "MANIFEST.json"
COORDINATOR = "coordinator.json"
FORMAT = "chatlearn-checkpoint"  # the manifest's and the coordinator state's "format"
_NAME = re.compile(r"^iter_(\d{7,})$")
_HASH_CHUNK = 1 << 20


def checkpoint_root(runtime: Any) -> Path:
    """Where a run's checkpoints live: ``data_checkpoint_path`` or ``output_path/checkpoints``
    (the config's `RuntimeConfig.checkpoint_path`; a plain mapping is read the same way)."""
    if hasattr(runtime, "checkpoint_path"):
        return Path(runtime.checkpoint_path)
    explicit = runtime.get("data_checkpoint_path", None)
    if explicit:
        return Path(explicit)
    output = getattr(runtime, "output_path", None)
    if output is None:  # a plain mapping rather than chatlearn's RuntimeConfig
        output = os.path.join(runtime.get("output_dir", "./"), runtime.get("exp_name", "CHATLEARN"))
    return Path(output) / "checkpoints"


def checkpoint_name(iteration: int) -> str:
    """The directory name of the checkpoint of trainer iteration ``iteration``."""
    return f"iter_{iteration:07d}"


def checkpoint_iteration(name: str) -> int | None:
    """The iteration of a checkpoint directory's name (``iter_0000008``: 8); None for another."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def check_manifest(path: Path, *, hashes: bool = True) -> str:
    """What is wrong with the checkpoint directory ``path`` ("" if nothing): its manifest, and
    each file it lists, by size (and by sha256 with ``hashes``)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text("utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            return f"{MANIFEST} is not a chatlearn manifest"
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable: {exc}"
    if COORDINATOR not in files:
        return f"{COORDINATOR} is not in the manifest"
    for name, entry in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
        if hashes and file_sha256(file) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest"
    return ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (whoever owns it): a leftover named by it is still in use."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def export_dir(checkpoint: Path) -> Path:
    """Where ``chatlearn export`` writes a checkpoint's HF directory by default: ``hf/<name>``
    beside the checkpoints' root (not inside it, where retention would prune it)."""
    return checkpoint.parent.parent / "hf" / checkpoint.name


def module_checkpoint_dir(checkpoint: Path, model: str, rank: int) -> Path:
    """The directory one model rank saves to inside a checkpoint (see ``checkpoint_dir()``)."""
    return checkpoint / model / f"rank_{rank}"
