"""The `chatlearn` command line: benchmarks, launching, and run inspection.

Each subcommand lives in its own module and is imported lazily, so `chatlearn --help` stays fast
and a subcommand's heavy imports (torch, transformers) happen only when it runs.
"""

from __future__ import annotations

import importlib
import signal

import click

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


@click.group(
    cls=_LazyGroup,
    lazy={
        "chaos": "chatlearn.chaos:command",
        "inspect": "chatlearn.engine.inspect_cli:command",
        "gpu-check": "chatlearn.gpu_check:command",
        "launch": "chatlearn.launch.cli:command",
    },
)
def main() -> None:
    """chatlearn: DPO training on an asyncio + ZeroMQ actor runtime."""


@main.group(cls=_LazyGroup, lazy=_BENCH_COMMANDS)
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
