"""Option types of the command line shared by `chatlearn launch` and `chatlearn bench`."""

from __future__ import annotations

import difflib
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


class ScriptPath(click.Path):
    """The script of `chatlearn launch`: an existing file. The command leaves unknown options to
    the script (they follow it), so a mistyped option of its own before the script
    (``--max-restart 2``) arrived here and read "File '--max-restart' does not exist"; it is
    click's "No such option" with the near matches instead."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.startswith("-") and ctx is not None:
            name = value.partition("=")[0]
            options = [o for p in ctx.command.get_params(ctx) for o in p.opts if o.startswith("-")]
            raise click.NoSuchOption(
                name, possibilities=difflib.get_close_matches(name, options), ctx=ctx
            )
        return super().convert(value, param, ctx)
