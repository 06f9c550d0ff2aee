"""The actor runtime: ChatLearn's module API, and model processes the coordinator drives.

- `BaseModule`, `TorchModule`: what user models subclass (module.py).
- `ActorSystem`: spawns one pinned process per model rank, supervises, stops (runtime.py);
  `ActorHandle` / `ModelGroup`: async handles to one process / one model (handles.py).
- Errors: `ActorError` (user code raised; remote traceback), `ActorDeadError` (a process died or
  hung), `ActorTimeoutError`, `PlacementError`, `ModuleError` (errors.py).
- The actor process itself is `python -m chatlearn.actors.worker` (worker.py).

Names are imported lazily: the worker imports this package before it pins itself to its cores,
so importing it must not start threads (numpy, torch) or import anything heavy.

Layer 2 (docs/architecture.md, "Layers"): may import `transport`, `config` and `algorithms`;
what it needs from above (where processes start) it defines as interfaces (`hosts.Hosts`).

Where each module runs (its docstring says so too):
- the coordinator: runtime.py, remote.py, handles.py, inprocess.py (the actors inside the
  coordinator), placement.py, hosts.py, errors.py;
- the actor process: worker.py (its main program), worker_core.py (in in-process mode inside
  the coordinator), storage.py;
- both sides: module.py (templates; live modules), loader.py, bootstrap.py, process.py,
  checkpoint_paths.py, timers.py.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "BaseModule": "chatlearn.actors.module",
    "TorchModule": "chatlearn.actors.module",
    "ActorSystem": "chatlearn.actors.runtime",
    "ActorEvent": "chatlearn.actors.runtime",
    "SupervisionOptions": "chatlearn.actors.runtime",
    "ActorHandle": "chatlearn.actors.handles",
    "ModelGroup": "chatlearn.actors.handles",
    "WorkerContext": "chatlearn.actors.worker_core",
    "ActorError": "chatlearn.actors.errors",
    "ActorDeadError": "chatlearn.actors.errors",
    "ActorTimeoutError": "chatlearn.actors.errors",
    "ActorLostError": "chatlearn.actors.errors",
    "RestartPolicy": "chatlearn.actors.runtime",
    "ActorSystemClosedError": "chatlearn.actors.errors",
    "ModuleError": "chatlearn.actors.errors",
    "PlacementError": "chatlearn.actors.errors",
    "HostResources": "chatlearn.actors.placement",
    "ModelResources": "chatlearn.actors.placement",
    "ProcessAssignment": "chatlearn.actors.placement",
    "plan_placement": "chatlearn.actors.placement",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chatlearn.actors' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
