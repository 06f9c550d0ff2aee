"""The `chatlearn` command line: benchmarks, launching, and run inspection.

Each subcommand lives in its own module and is imported lazily, so `chatlearn --help` stays fast
and a subcommand's heavy imports (torch, transformers) happen only when it runs.
"""

from __future__ import annotations

import importlib
import signal
from typing import Any

import click

from chatlearn.config.report import shell_exit_code

# name -> "module:attribute" of a click command; imported only when the command is used.
_BENCH_COMMANDS: dict[str, str] = {
    "transport": "chatlearn.benchmarks.transport:command",
    "pipeline": "chatlearn.benchmarks.pipeline:command",
    "dpo": "chatlearn.benchmarks.dpo:command",
    "memory": "chatlearn.benchmarks.memory:command",
}


class _LazyGroup(click.Group):
    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module_name, attr = self._lazy[cmd_name].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, cmd_name)


class _RootGroup(_LazyGroup):
    """Every command: Ctrl-C before the command has its own handling (while it starts, or in
    a command that has none) ends it with the shell's 130 and no output; click turned it into
    "Aborted!" and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise SystemExit(128 + signal.SIGINT) from None


@click.group(
    cls=_RootGroup,
    lazy={
        "chaos": "chatlearn.chaos.cli:command",
        "export": "chatlearn.hf.export:command",
        "inspect": "chatlearn.engine.inspect_cli:command",
        "gpu-check": "chatlearn.gpu_check:command",
        "launch": "chatlearn.launch.cli:command",
    },
)
def main() -> None:
    """chatlearn: DPO training on an asyncio + ZeroMQ actor runtime."""


class _BenchGroup(_LazyGroup):
    """The benchmarks' group: an interrupted benchmark ends with the shell's code for its
    signal (130 for Ctrl-C) and at most one line, whichever benchmark it was: a run stopped in
    the middle of training raised the engine's TrainingStopped through the benchmark (a
    40-line traceback, exit code 1), and click turned a KeyboardInterrupt into "Aborted!" and
    exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, Exception) as exc:
            code = shell_exit_code(exc)
            if code is None:
                raise
            if not isinstance(exc, KeyboardInterrupt):  # the engine's TrainingStopped
                click.echo(f"chatlearn bench: {str(exc).partition(';')[0]}", err=True)
            raise SystemExit(code) from None


@main.group(cls=_BenchGroup, lazy=_BENCH_COMMANDS)
def bench() -> None:
    """Throughput benchmarks (figures are ratios measured side by side in one run)."""
    # SIGTERM (a scheduler's, `timeout`'s) ends a benchmark like Ctrl-C does: by an exception,
    # so its temporary directories are removed and its actors stopped on the way out (a run in
    # progress has the engine's own handler meanwhile: a graceful stop, then exit code 143)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
