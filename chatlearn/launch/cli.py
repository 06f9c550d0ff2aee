"""`chatlearn launch [--hostfile FILE] [--include/--exclude SPEC] script.py [args]`.

Runs the user's script as the coordinator, in this process (``python script.py args`` as far as
the script can tell). Without a host file it is exactly that: one machine, ipc sockets. With one,
the hosts are parsed and selected (hostfile.py), the run's CURVE keys are generated, and the
script runs in this process with the resulting `Cluster` (no file holds the keys: nothing is left
behind whatever kills the run); the `ActorSystem` of the script then places and starts actors over
the hosts (cluster.py).

A config error of the script (a `ConfigError` it does not catch, also one raised in an actor) is
printed as one line, `file:line: key: what is wrong (fix: ...)`, and the command exits with code
2; `--debug` (or ``CHATLEARN_DEBUG=1``) shows the traceback instead. A stop on SIGINT exits with
130 (not click's "Aborted!" and 1).

With ``--max-restarts N`` (default 3) this process prepares the same and then supervises: the
script runs in a forked child, which is run again, resuming from its newest checkpoint, when it
is killed by a signal such as SIGKILL or SIGSEGV (supervise.py). ``--max-restarts 0`` runs the
script in this process, as described above.
"""

from __future__ import annotations

import os
import runpy
import shlex
import sys
from pathlib import Path

import click

from chatlearn.actors.hosts import set_default_hosts
from chatlearn.config.report import (
    DEBUG_ENV_VAR,
    config_error_line,
    debug_enabled,
    report_and_exit,
    shell_exit_code,
)
from chatlearn.launch.cluster import (
    DEFAULT_SSH_COMMAND,
    LAUNCH_ENV_VAR,
    LAUNCHERS,
    Cluster,
    LaunchSpec,
    check_master_addr,
    is_local_host,
    local_address_towards,
)
from chatlearn.launch.curve import generate_keys
from chatlearn.launch.env import exported_environment
from chatlearn.launch.hostfile import HostfileError, read_hostfile, select_hosts
from chatlearn.launch.options import FiniteFloat, ScriptPath
from chatlearn.launch.supervise import supervise

__all__ = ["command", "prepare_launch"]


def prepare_launch(
    hostfile: str,
    *,
    include: str | None = None,
    exclude: str | None = None,
    master_addr: str | None = None,
    launcher: str = "ssh",
    ssh_command: str | None = None,
    env_file: str | None = None,
    export: tuple[str, ...] = (),
    slots_are: str = "auto",
) -> Cluster:
    """The hosts, new CURVE keys and the `LaunchSpec` of a multi-host run (kept in memory: no
    file holds the keys, so no kill can leave them behind)."""
    hosts = select_hosts(read_hostfile(hostfile), include, exclude)
    if master_addr is None:
        remote = [h.name for h in hosts if not is_local_host(h.name)]
        master_addr = local_address_towards(remote[0]) if remote else "127.0.0.1"
    else:
        check_master_addr(master_addr)
    spec = LaunchSpec(
        hosts=hosts,
        master_addr=master_addr,
        launcher=launcher,
        ssh_command=shlex.split(ssh_command) if ssh_command else list(DEFAULT_SSH_COMMAND),
        env=exported_environment(prefixes=export, env_file=env_file),
        cwd=os.getcwd(),
        slots_are=slots_are,
    )
    return Cluster(spec, generate_keys())


def run_script(script: str, args: list[str]) -> None:
    """Run `script` as ``__main__`` with `args`, like ``python script args``; an uncaught config
    error ends it as one line on stderr and exit code 2 (unless debugging), a `KeyboardInterrupt`
    with 130 (or the code of the engine's `TrainingInterrupted`, also a `SystemExit`), an
    uncaught `TrainingStopped` of `learn_async()` with its code."""
    sys.argv = [script, *args]
    script_dir = str(Path(script).resolve().parent)
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)
    try:
        runpy.run_path(script, run_name="__main__")
    except (KeyboardInterrupt, Exception) as exc:
        exit_code = shell_exit_code(exc)
        if exit_code is not None:  # an interrupt, or the engine has said why it stopped
            raise SystemExit(exit_code) from None
        if config_error_line(exc) is None or debug_enabled():
            raise
        report_and_exit(exc)


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--hostfile", type=click.Path(dir_okay=False), help="lines of 'hostname slots=N'")
@click.option("--include", help="only these hosts/slots, e.g. 'host1@host2:0,2'")
@click.option("--exclude", help="all hosts/slots but these, e.g. 'host1:1'")
@click.option("--master-addr", help="the coordinator's address the hosts connect to")
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default="ssh",
    show_default=True,
    help="how actors start on other hosts ('local': this machine's other addresses)",
)
@click.option(
    "--ssh-command",
    help=f"command to reach a host ({{host}} is replaced, else the host is appended); "
    f"default: {shlex.join(DEFAULT_SSH_COMMAND)}",
)
@click.option("--env-file", type=click.Path(dir_okay=False), help="KEY=VALUE lines for actors")
@click.option("--export", multiple=True, help="another variable prefix to pass to actors")
@click.option(
    "--slots-are",
    type=click.Choice(["auto", "gpus", "cpus"]),
    default="auto",
    show_default=True,
    help="what a slot is (auto: GPUs if this machine has any)",
)
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="restart the coordinator this often when a signal kills it (not SIGINT/SIGTERM/SIGHUP);"
    " it resumes from the newest checkpoint. 0: run the script in this process",
)
@click.option(
    "--restart-window",
    type=FiniteFloat(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="MINUTES",
    help="--max-restarts counts the restarts within this many minutes",
)
@click.option(
    "--debug",
    is_flag=True,
    help=f"show the traceback of config errors (also {DEBUG_ENV_VAR}=1)",
)
@click.argument("script", type=ScriptPath())
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def command(
    hostfile: str | None,
    include: str | None,
    exclude: str | None,
    master_addr: str | None,
    launcher: str,
    ssh_command: str | None,
    env_file: str | None,
    export: tuple[str, ...],
    slots_are: str,
    max_restarts: int,
    restart_window: float,
    debug: bool,
    script: str,
    script_args: tuple[str, ...],
) -> None:
    """Run SCRIPT as the coordinator, with actors on the hosts of --hostfile (default: here)."""
    if debug:
        os.environ[DEBUG_ENV_VAR] = "1"  # read by the script's chatlearn.init() hook too
    if hostfile is None:
        if include is not None or exclude is not None:  # also given as '' (an unset variable)
            raise click.UsageError("--include/--exclude need a --hostfile")
        # options of the other hosts' actors: without a host file they were ignored without a
        # word (an --env-file that does not exist included)
        ctx = click.get_current_context()
        remote_only = ("master_addr", "launcher", "ssh_command", "env_file", "export", "slots_are")
        given = [
            f"--{name.replace('_', '-')}"
            for name in remote_only
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} need{'s' if len(given) == 1 else ''} a --hostfile (without "
                "one, actors run on this machine and inherit its environment)"
            )
        _run(script, list(script_args), max_restarts, restart_window)
        return
    try:
        cluster = prepare_launch(
            hostfile,
            include=include,
            exclude=exclude,
            master_addr=master_addr,
            launcher=launcher,
            ssh_command=ssh_command,
            env_file=env_file,
            export=export,
            slots_are=slots_are,
        )
    except (HostfileError, ValueError) as exc:
        # one line, like a config error (the message names the file and line, or the option):
        # not click's usage text around it
        click.echo(f"chatlearn launch: {exc}", err=True)
        raise SystemExit(2) from None
    # The script runs in this process (or a fork of it): its ActorSystem takes the cluster from
    # here; the variable says a launch is in progress.
    set_default_hosts(cluster)
    os.environ[LAUNCH_ENV_VAR] = "1"
    try:
        _run(script, list(script_args), max_restarts, restart_window)
    finally:
        set_default_hosts(None)
        os.environ.pop(LAUNCH_ENV_VAR, None)


def _run(script: str, args: list[str], max_restarts: int, window_minutes: float) -> None:
    """`run_script` in this process, or under a supervisor that restarts it (supervise.py)."""
    if max_restarts == 0:
        run_script(script, args)
        return
    code = supervise(
        lambda: run_script(script, args), max_restarts=max_restarts, window=window_minutes * 60
    )
    sys.exit(code)
