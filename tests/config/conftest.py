"""Fixtures of the config tests: a clean process-wide config and a YAML file writer."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatlearn.config import reset_args

WriteYaml = Callable[[str, str], Path]


@pytest.fixture(autouse=True)
def _clean_global_config() -> Iterator[None]:
    reset_args()
    yield
    reset_args()


@pytest.fixture
def write_yaml(tmp_path: Path) -> WriteYaml:
    """write_yaml("name.yaml", text) writes dedented text under tmp_path and returns the path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write
