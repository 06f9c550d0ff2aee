"""`chatlearn chaos`: both runs, the comparison and one line per outcome."""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from chatlearn.chaos.compare import Comparison, compare_runs, find_run_dir
from chatlearn.chaos.monkey import ChaosPlan, PlanError
from chatlearn.chaos.runs import RunResult, Terminated, run_command

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _OneLineErrors(click.Command):
    """A command whose usage errors are one line (``Error: ...``), without the usage text."""

    def make_context(self, info_name: str | None, args: list[str], parent=None, **extra: Any):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            exc.ctx = None  # shown without a context: no usage text
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.ctx = None
            raise


def _usage(message: str) -> click.UsageError:
    return click.UsageError(message)  # no ctx: shown as one line


def _check_command(argv: Sequence[str]) -> None:
    program = argv[0]
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise _usage(f"cannot run {program!r}: not an executable file")
    elif shutil.which(program) is None:
        raise _usage(f"cannot run {program!r}: not found on PATH")


def _tail(path: Path | None, count: int = 15) -> list[str]:
    if path is None or not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 16384))
        return f.read().decode("utf-8", "replace").splitlines()[-count:]


@click.command(
    "chaos",
    cls=_OneLineErrors,
    context_settings={"allow_interspersed_args": False},
)
@click.option(
    "--reference-kills", default=1, show_default=True, help="SIGKILLs of reference actors"
)
@click.option("--trainer-kills", default=1, show_default=True, help="SIGKILLs of trainer ranks")
@click.option(
    "--reference-stops", default=0, show_default=True, help="SIGSTOPs (hangs) of references"
)
@click.option(
    "--trainer-stops", default=0, show_default=True, help="SIGSTOPs (hangs) of trainer ranks"
)
@click.option("--seed", default=0, show_default=True, help="seeds the order, moments and victims")
@click.option("--min-gap", default=2.0, show_default=True, help="seconds between events, at least")
@click.option("--max-gap", default=10.0, show_default=True, help="seconds between events, at most")
@click.option("--warmup", default=5.0, show_default=True, help="seconds before the first gap")
@click.option(
    "--min-age", default=1.0, show_default=True, help="seconds a victim has lived, at least"
)
@click.option(
    "--timeout", default=1800.0, show_default=True, help="seconds per run before it is killed"
)
@click.option(
    "--output-env",
    default="OUTPUT_DIR",
    show_default=True,
    help="environment variable naming the run's output directory",
)
@click.option("--work-dir", type=click.Path(file_okay=False), help="default: output/chaos-<time>")
@click.option("--reference-model", default="reference", show_default=True)
@click.option("--trainer-model", default="policy_trainer", show_default=True)
@click.option(
    "--no-baseline",
    is_flag=True,
    help="skip the uninterrupted run (compare with <work-dir>/baseline if an earlier one is there)",
)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND...")
def command(
    reference_kills: int,
    trainer_kills: int,
    reference_stops: int,
    trainer_stops: int,
    seed: int,
    min_gap: float,
    max_gap: float,
    warmup: float,
    min_age: float,
    timeout: float,
    output_env: str,
    work_dir: str | None,
    reference_model: str,
    trainer_model: str,
    no_baseline: bool,
    argv: tuple[str, ...],
) -> None:
    """Run COMMAND uninterrupted, then under a chaos monkey, and compare the two runs.

    \b
    chatlearn chaos --trainer-kills 1 -- python -m examples.dpo.train_dpo -c examples/dpo/dpo.yaml

    Each run gets <work-dir>/baseline or <work-dir>/chaos in the variable --output-env, and logs
    to <work-dir>/<run>.log. Exits 0 only if both runs exited 0, the monkey did not fail and
    the chaos run's metrics and final trainer weights equal the baseline's; 1 otherwise, 2 for
    bad input, 130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP (the run is killed).
    """
    if not argv:
        raise _usage("no command to run: chatlearn chaos [OPTIONS] -- COMMAND...")
    try:
        plan = ChaosPlan(
            reference_kills=reference_kills,
            reference_stops=reference_stops,
            trainer_kills=trainer_kills,
            trainer_stops=trainer_stops,
            seed=seed,
            min_gap=min_gap,
            max_gap=max_gap,
            warmup=warmup,
            min_age=min_age,
            reference_model=reference_model,
            trainer_model=trainer_model,
        )
    except PlanError as exc:
        raise _usage(f"--{exc.field.replace('_', '-')} {exc.problem}") from None
    if not (math.isfinite(timeout) and timeout > 0):
        raise _usage(f"--timeout must be a number of seconds > 0, got {timeout}")
    if not _ENV_NAME.match(output_env):
        raise _usage(f"--output-env must be an environment variable name, got {output_env!r}")
    _check_command(argv)
    work = Path(work_dir or f"output/chaos-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    baseline_dir, chaos_dir = work / "baseline", work / "chaos"
    if chaos_dir.exists():
        raise _usage(f"{chaos_dir} exists (from an earlier run?); give another --work-dir")
    if baseline_dir.exists() and not no_baseline:
        raise _usage(
            f"{baseline_dir} exists; give another --work-dir, or --no-baseline to compare with it"
        )
    work.mkdir(parents=True, exist_ok=True)

    # SIGHUP too (the terminal closed, an ssh session lost): its default action ended the
    # harness alone, and the run, in a process group of its own, went on without its timeout
    stops = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in stops}
    if threading.current_thread() is threading.main_thread():
        for sig in stops:
            signal.signal(sig, _raise_terminated)
    try:
        code = _run_both(argv, plan, timeout, output_env, work, no_baseline)
    except KeyboardInterrupt:
        click.echo("chaos: interrupted (Ctrl-C); the run was killed", err=True)
        code = 130
    except Terminated as stop:
        name = signal.Signals(stop.signum).name
        click.echo(f"chaos: terminated ({name}); the run was killed", err=True)
        code = 128 + stop.signum
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                if handler is not None:  # None: not set from Python, nothing to put back
                    signal.signal(sig, handler)
    sys.exit(code)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _run_both(
    argv: Sequence[str],
    plan: ChaosPlan,
    timeout: float,
    output_env: str,
    work: Path,
    no_baseline: bool,
) -> int:
    """The baseline run (unless ``no_baseline``), the chaos run, the report; the exit code."""
    click.echo(f"chaos: work directory {work}")
    click.echo(f"chaos: command {shlex.join(argv)}")
    runs: list[RunResult] = []
    for name in ("chaos",) if no_baseline else ("baseline", "chaos"):
        directory = work / name
        directory.mkdir()
        log = work / f"{name}.log"
        click.echo(f"{name}: running with {output_env}={directory} (output in {log})")
        if name == "chaos":
            click.echo(
                "chaos: plan "
                + ", ".join(f"{f.name} {getattr(plan, f.name)}" for f in fields(plan))
            )
        result = run_command(
            argv,
            env={**os.environ, output_env: str(directory)},
            timeout=timeout,
            plan=plan if name == "chaos" else None,
            log=log,
            name=name,
        )
        runs.append(result)
        click.echo(f"{name}: {result.describe()}")
        if not result.ok:
            for line in _tail(log):
                click.echo(f"  | {line}")
            if name == "baseline":
                click.echo(
                    "chaos: FAIL (the uninterrupted run failed; the chaos run was not started)"
                )
                return 1
    chaos = runs[-1]
    ended = f"; the monkey ended: {chaos.monkey_outcome}" if chaos.planned else ""
    click.echo(f"events: {len(chaos.events)} of {chaos.planned} planned{ended}")
    for event in chaos.events:
        click.echo(f"  {event.line()}")
    baseline_dir = work / "baseline"
    have_baseline = not no_baseline or _find_run_dir_quiet(baseline_dir) is not None
    if not have_baseline and _find_run_dir_quiet(work / "chaos") is None:
        click.echo("comparison: none (no baseline, and the chaos run wrote no metrics.jsonl)")
        comparison = Comparison()
    else:
        comparison = compare_runs(
            baseline_dir if have_baseline else None,
            work / "chaos",
            trainer_model=plan.trainer_model,
        )
        click.echo("comparison:" + ("" if have_baseline else " (no baseline: the chaos run alone)"))
        for line in comparison.lines():
            click.echo(f"  {line}")
    monkey_failed = chaos.monkey_outcome.startswith("failed")
    # a run that ended before the plan's events were all injected tested less than it claims
    # (none at all, if it ended before the warm-up): not a pass
    incomplete = len(chaos.events) < chaos.planned
    if incomplete and chaos.actors_seen is False:
        click.echo(
            f"incomplete: {len(chaos.events)} of {chaos.planned} planned events: no actor of the "
            "run ever showed in its process tree on this machine (actors that chatlearn launch "
            "starts on other hosts are not in it); run chaos on a run with its actors here"
        )
    elif incomplete:
        click.echo(
            f"incomplete: {len(chaos.events)} of {chaos.planned} planned events happened before "
            "the run ended; make the run longer (more episodes or samples) or the plan shorter "
            "(fewer kills and stops, a shorter --warmup or --max-gap)"
        )
    passed = all(r.ok for r in runs) and comparison.ok and not monkey_failed and not incomplete
    click.echo(f"chaos: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


def _find_run_dir_quiet(directory: Path) -> Path | None:
    """:func:`find_run_dir`, or None where it has no single answer."""
    try:
        return find_run_dir(directory)
    except ValueError:
        return None
