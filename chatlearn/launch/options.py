"""Option types of the command line shared by `chatlearn launch` and `chatlearn bench`."""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloat(click.FloatRange):
    """A `click.FloatRange` that also refuses nan and ±inf: nan passes every comparison of a
    range (``--restart-window nan`` made the restart limit count no restart at all)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number
