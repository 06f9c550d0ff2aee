"""Package-wide promises: a light `import chatlearn`, no pickle anywhere in the package, and a
Ctrl-C that ends any command with 130."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "chatlearn"
FORBIDDEN = {"pickle", "cPickle", "cloudpickle", "dill", "_pickle"}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_pickle_in_package() -> None:
    # No exception: the naive pickle baseline of `chatlearn bench transport` lives outside the
    # package (benchmarks/pickle_baseline.py at the repository root).
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if _imported_modules(path) & FORBIDDEN
    ]
    assert offenders == []


def test_import_chatlearn_does_not_import_torch() -> None:
    # Actor processes import chatlearn before they are pinned to their devices.
    code = "import sys, chatlearn; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lazy_exports_resolve_and_are_listed() -> None:
    """Each package's public names (``_lazy.lazy_exports``) are listed by ``dir()``, each
    resolves in the module the package names for it, and any other name is an AttributeError
    naming the package."""
    for name in ("chatlearn", "chatlearn.actors", "chatlearn.megatron"):
        package = importlib.import_module(name)
        assert package.__all__ and set(package.__all__) <= set(dir(package))
        for public in package.__all__:
            assert getattr(package, public) is not None
        with pytest.raises(AttributeError, match=f"module '{name}' has no attribute 'nope'"):
            package.nope  # noqa: B018


def test_cli_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "chatlearn.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "bench" in out.stdout


@pytest.mark.parametrize(
    "where", ["chatlearn.launch.cli:prepare_launch", "chatlearn.cli:_LazyGroup.get_command"]
)
def test_ctrl_c_while_a_command_starts_is_exit_130_without_output(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before `chatlearn launch` runs the script (reading the host file, making the keys) or
    while a command is imported: click said "Aborted!" and exited 1."""
    from click.testing import CliRunner

    from chatlearn.cli import main

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    module, attribute = where.split(":")
    owner = importlib.import_module(module)
    for name in attribute.split(".")[:-1]:
        owner = getattr(owner, name)
    monkeypatch.setattr(owner, attribute.split(".")[-1], interrupted)
    hosts, script = tmp_path / "hosts", tmp_path / "train.py"
    hosts.write_text("localhost slots=2\n")
    script.write_text("raise SystemExit('the script ran')\n")
    result = CliRunner().invoke(main, ["launch", "--hostfile", str(hosts), str(script)])
    assert result.exit_code == 130, result.output
    assert result.output == ""
