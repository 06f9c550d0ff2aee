"""The one error type of configuration problems, and the shared logger.

Every user-facing config problem is a `ConfigError`: one line saying where (file and line when
the value came from YAML, else "config built in code"), which key (a dotted path such as
`runtime.train_global_batch_size`) and what is wrong, then a second line saying what to change.
It subclasses `ValueError` so code written against ChatLearn's asserts/ValueErrors still catches it.
What the user sees at the end of a run is `one_line()`: `where: key: problem (fix: ...)`.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("chatlearn.config")

# Used as the location of values that did not come from a file.
IN_CODE = "config built in code"


class ConfigError(ValueError):
    """A configuration problem: where it is, which key, what is wrong and how to fix it."""

    def __init__(
        self,
        problem: str,
        *,
        where: str | None = None,
        key: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.where = where
        self.key = key
        self.fix = fix
        head = ": ".join(part for part in (where, key, problem) if part)
        super().__init__(f"{head}\n  fix: {fix}" if fix else head)

    def one_line(self) -> str:
        """`file:line: key: what is wrong (fix: ...)`, the form printed when a run stops."""
        return one_line(str(self))


def one_line(message: str) -> str:
    """A ConfigError's two-line text (`head` + `  fix: ...`) as one line; other text joined."""
    head, sep, fix = message.partition("\n  fix: ")
    head = " ".join(head.split())
    return f"{head} (fix: {' '.join(fix.split())})" if sep else head


class ValueProblem(Exception):
    """Raised by value checkers; the caller turns it into a ConfigError with location and key."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def located_error(config: object, key: str, problem: str, fix: str) -> ConfigError:
    """The ConfigError of key path ``key``, at the file and line where ``config`` (a `Config`)
    has it written; unlocated for anything else (a config built in code by other means)."""
    error = getattr(config, "error", None)
    if callable(error):
        located: ConfigError = error(key, problem, fix)
        return located
    return ConfigError(problem, key=key, fix=fix)
