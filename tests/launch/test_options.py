"""Numeric options of `chatlearn launch` and `chatlearn bench` refuse nan, infinities and
out-of-range values with click's usage error (exit 2), before anything starts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from chatlearn.cli import main

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # nan made --max-restarts count no restart at all: a coordinator restarted forever
        (["launch", "--restart-window", "nan", "x.py"], "nan is not a finite number"),
        (["launch", "--restart-window", "inf", "x.py"], "inf is not a finite number"),
        (["launch", "--restart-window", "0", "x.py"], "not in the range"),
        (["bench", "pipeline", "--forward-cost", "nan"], "nan is not a finite number"),
        (["bench", "pipeline", "--train-cost", "-1"], "not in the range"),
        (["bench", "pipeline", "--soak", "--soak-episode", "0"], "not in the range"),
        (["bench", "pipeline", "--micro-batch-size", "0"], "not in the range"),
        (["bench", "dpo", "--cores", "0"], "--cores must be between 1 and"),
    ],
)
def test_bad_numbers_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
