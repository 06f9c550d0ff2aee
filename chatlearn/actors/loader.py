"""Finding the user's module class again inside an actor process.

Runs on both sides: the coordinator describes the class, the actor process loads it.

The coordinator describes a class by a `ClassRef`: the module to import and the class's qualified
name. A class defined in the user's `__main__` script cannot be imported by the name `__main__`
in another interpreter, so its ref carries the script's path instead, and the actor runs that file
under the module name `__chatlearn_main__`: its top level runs (defining the class), while its
`if __name__ == "__main__":` block does not. (A script started with `python -m pkg.mod` is simply
imported as `pkg.mod`.) As with multiprocessing's spawn mode, whatever the script does at top
level also happens in every actor, so keep side effects under the `__main__` guard.

Services are named the same way, as `"package.module:Class"` strings.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MAIN_ALIAS", "ClassRef", "load_object", "running_script"]

# The module name under which the user's main script runs inside an actor.
MAIN_ALIAS = "__chatlearn_main__"
# The user's script while this (actor) process runs its top level to find its classes
_running_script: str | None = None


def running_script() -> str | None:
    """The user's script while this actor process runs its top level (`_run_script`), else
    None: what runs then is the script's top level, once in every actor."""
    return _running_script


@dataclass(frozen=True)
class ClassRef:
    """Where a class lives: an importable module, or a script file run under `MAIN_ALIAS`."""

    module: str
    qualname: str
    path: str | None = None

    @classmethod
    def of(cls, klass: type) -> ClassRef:
        qualname = klass.__qualname__
        if "<locals>" in qualname:
            raise ValueError(
                f"class {qualname} is defined inside a function, so an actor process cannot find "
                "it; define it at the top level of a module or of your script"
            )
        if klass.__module__ != "__main__":
            return cls(module=klass.__module__, qualname=qualname)
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name and spec.name != "__main__":
            return cls(module=spec.name, qualname=qualname)  # `python -m pkg.mod`
        path = getattr(main, "__file__", None)
        # `python - < script.py` names its __main__ "<stdin>": no file an actor could run
        if not path or not Path(path).is_file():
            raise ValueError(
                f"class {qualname} is defined in an interactive session (or a script read from "
                "standard input), so an actor process cannot find it; define it in a .py file"
            )
        return cls(module=MAIN_ALIAS, qualname=qualname, path=str(Path(path).resolve()))

    def to_payload(self) -> dict[str, Any]:
        return {"module": self.module, "qualname": self.qualname, "path": self.path}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ClassRef:
        return cls(module=payload["module"], qualname=payload["qualname"], path=payload.get("path"))

    @classmethod
    def parse(cls, spec: str) -> ClassRef:
        """`"package.module:Class"` (or `"package.module.Class"`) as a `ClassRef`."""
        module, sep, qualname = spec.partition(":")
        if not sep:
            module, _, qualname = spec.rpartition(".")
        if not module or not qualname:
            raise ValueError(f"expected 'package.module:Class', got {spec!r}")
        return cls(module=module, qualname=qualname)

    def __str__(self) -> str:
        where = self.path if self.path else self.module
        return f"{where}:{self.qualname}"

    def load(self) -> Any:
        """Import (or run) the module and return the named object."""
        if self.path is not None:
            module = _run_script(self.path)
        else:
            module = importlib.import_module(self.module)
        obj: Any = module
        for part in self.qualname.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ImportError(f"{self}: {part!r} not found in {obj!r}") from None
        return obj


def _run_script(path: str) -> Any:
    """Execute the user's script as module `MAIN_ALIAS` (once; later calls reuse it)."""
    existing = sys.modules.get(MAIN_ALIAS)
    if existing is not None and getattr(existing, "__file__", None) == path:
        return existing
    spec = importlib.util.spec_from_file_location(MAIN_ALIAS, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the script {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running, like any import: dataclasses and typing look the module up.
    sys.modules[MAIN_ALIAS] = module
    script_dir = str(Path(path).parent)
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)  # as when the script itself was run
    global _running_script
    _running_script = path
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(MAIN_ALIAS, None)
        raise
    finally:
        _running_script = None
    return module


def load_object(spec: str | ClassRef) -> Any:
    """Load `"package.module:Class"` or a `ClassRef`."""
    ref = spec if isinstance(spec, ClassRef) else ClassRef.parse(spec)
    return ref.load()
