"""Where checkpoints live on disk: the names both sides of the process boundary agree on.

Runs on both sides: the module in its actor process (``BaseModule.checkpoint_dir``) and the
coordinator (``chatlearn.engine.checkpoint``) import it. A leaf (standard library only), so
neither imports the other.
The layout itself is described in ``chatlearn/engine/checkpoint.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# in every complete checkpoint: its files' hashes (written last), and the coordinator's state
# (counters, the run's config)
MANIFEST = "MANIFEST.json"
COORDINATOR = "coordinator.json"


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


def module_checkpoint_dir(checkpoint: Path, model: str, rank: int) -> Path:
    """The directory one model rank saves to inside a checkpoint (see ``checkpoint_dir()``)."""
    return checkpoint / model / f"rank_{rank}"
