"""The actor runtime: ChatLearn's module API, and model processes the coordinator drives.

- `BaseModule`, `TorchModule`: what user models subclass (module.py).
- `ActorSystem`: spawns one pinned process per model rank, supervises, stops (runtime.py);
  `ActorHandle` / `ModelGroup`: async handles to one process / one model (handles.py).
- `ActorIdentity`: which actor a process is (model, replica, rank, world size, host), made once
  by placement and read by handles, services and errors (identity.py).
- Errors: `ActorError` (user code raised; remote traceback), `ActorDeadError` (a process died or
  hung), `ActorTimeoutError`, `PlacementError`, `ModuleError` (errors.py).
- The actor process itself is `python -m chatlearn.actors.worker` (worker.py).

Names are imported lazily: the worker imports this package before it pins itself to its cores,
so importing it must not start threads (numpy, torch) or import anything heavy.

Layer 2 (docs/architecture.md, "Layers"): may import `transport`, `config` and `algorithms` (and
the leaf `chatlearn._lazy`); what it needs from above (where processes start) it defines as
interfaces (`hosts.Hosts`).

Where each module runs (its docstring says so too):
- the coordinator: runtime.py, remote.py, handles.py, inprocess.py (the actors inside the
  coordinator), placement.py, hosts.py, errors.py;
- the actor process: worker.py (its main program), worker_core.py (in in-process mode inside
  the coordinator), storage.py;
- both sides: module.py (templates; live modules), identity.py, loader.py, bootstrap.py,
  process.py, checkpoint_paths.py, timers.py.
"""

from __future__ import annotations

from chatlearn._lazy import lazy_exports

# module -> the public names it defines
_EXPORTS: dict[str, tuple[str, ...]] = {
    "chatlearn.actors.module": ("BaseModule", "TorchModule"),
    "chatlearn.actors.runtime": (
        "ActorSystem",
        "ActorEvent",
        "SupervisionOptions",
        "RestartPolicy",
    ),
    "chatlearn.actors.handles": ("ActorHandle", "ModelGroup"),
    "chatlearn.actors.identity": ("ActorIdentity",),
    "chatlearn.actors.worker_core": ("WorkerContext",),
    "chatlearn.actors.errors": (
        "ActorError",
        "ActorDeadError",
        "ActorTimeoutError",
        "ActorLostError",
        "ActorSystemClosedError",
        "ModuleError",
        "PlacementError",
    ),
    "chatlearn.actors.placement": (
        "HostResources",
        "ModelResources",
        "ProcessAssignment",
        "plan_placement",
    ),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
