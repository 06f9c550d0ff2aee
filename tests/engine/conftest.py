"""Shared by the checkpoint and self-healing trials: one uninterrupted run to compare with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from resume_trials import Trial  # noqa: E402


@pytest.fixture(scope="session")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Trial:
    """The uninterrupted run of ``resume_script.py``."""
    trial = Trial(tmp_path_factory.mktemp("baseline"))
    trial.run()
    return trial
