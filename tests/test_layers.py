"""The package's layers import only downward (docs/architecture.md, "Layers"), and the modules
of `actors` and `engine` say on which side of the process boundary they run.

transport ← config, algorithms ← actors ← engine, launch, hf, megatron ← benchmarks, cli, gpu
checks. A module may import its own package and packages of lower layers, never a package of its
own layer or of a higher one; imports inside functions count too (they are real dependencies,
only deferred). The test reads the source, so it also holds for code no test imports.

One leaf lies below every layer: `_lazy.py`, the helper through which the packages' `__init__`
files import their public names lazily. It imports only the standard library, so any package
may use it without importing anything of another.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "chatlearn"

LAYERS: dict[str, int] = {
    # Below every layer: the packages' lazy re-exports (`__getattr__`), standard library only.
    "_lazy": -1,
    "transport": 0,
    "config": 1,
    "algorithms": 1,
    "utils": 1,  # ChatLearn's chatlearn.utils helpers for user modules
    # ChatLearn's chatlearn.models: its module classes' paths (re-exports of actors and
    # megatron), the rest an import that says it is not provided
    "models": 4,
    "runtime": 1,  # ChatLearn's chatlearn.runtime: the same
    "data": 1,  # ChatLearn's chatlearn.data: the same
    "actors": 2,
    "engine": 3,
    "launch": 3,
    "hf": 3,
    "megatron": 3,
    "benchmarks": 4,
    "cli": 4,
    "gpu_check": 4,
    "chaos": 4,
    "gpu_probe": 3,  # the modules the GPU check runs in actors
    "__init__": 5,  # the public API re-exports everything
}


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("chatlearn."):
                found.append((node.lineno, name.split(".")[1]))
    return found


def test_every_unit_has_a_layer() -> None:
    units = {_unit(p) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LAYERS), f"add {sorted(units - set(LAYERS))} to LAYERS"


def test_no_module_imports_its_own_layer_or_a_higher_one() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        for line, target in _imports(path):
            if target != unit and LAYERS.get(target, 99) >= LAYERS[unit]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from chatlearn.engine import engine\n")
    assert _imports(bad) == [(2, "engine")]


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""


def test_actors_and_engine_modules_say_where_they_run() -> None:
    """Every module's docstring says in its first lines where it runs ("Runs in the coordinator",
    "Runs in the actor processes", "Runs on both sides", ...), and its package's docstring lists
    it by side and says what the package may import."""
    wrong = []
    for package in ("actors", "engine"):
        listing = _docstring(PACKAGE / package / "__init__.py")
        if "may import" not in listing:
            wrong.append(f"{package}/__init__.py: its docstring does not say what it may import")
        for path in sorted((PACKAGE / package).glob("*.py")):
            if path.name == "__init__.py":
                continue
            opening = "\n\n".join(_docstring(path).split("\n\n")[:2])
            if not re.search(r"\bRuns (in|on) ", opening):
                wrong.append(
                    f"{package}/{path.name}: its docstring's first lines do not say where it runs"
                )
            if not re.search(rf"(?<![\w.]){re.escape(path.name)}", listing):
                wrong.append(f"{package}/__init__.py: its docstring does not list {path.name}")
    assert not wrong, "\n".join(wrong)
