"""``chatlearn inspect RUN_DIR``: what a run directory holds, without starting anything.

Runs in the ``chatlearn inspect`` command, apart from any run: it only reads files.

    chatlearn inspect ./output/CHATLEARN            # checkpoints and the last metrics
    chatlearn inspect ./output/CHATLEARN --verify   # also check every file's sha256
    chatlearn inspect ./output/CHATLEARN --json     # the same, as one JSON object

``RUN_DIR`` is the run's ``output_dir/exp_name``. Checkpoints are looked for in
``RUN_DIR/checkpoints`` (``--checkpoints DIR`` when ``data_checkpoint_path`` put them elsewhere;
a checkpoint root given as ``RUN_DIR`` works too). Each is listed with its iteration, how far
training had got (episodes done, steps into the next), why it was written, and whether it is
complete or broken (and why), and where its trainer is as a Hugging Face directory (its
``hf_model``, or the one ``chatlearn export`` wrote in ``hf/``); unfinished saves are listed
apart. The checkpoint a new run would resume from is named, and so are the last train, eval and
episode records of ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from chatlearn.actors.checkpoint_paths import export_dir
from chatlearn.engine.checkpoint import COORDINATOR, CheckpointInfo, CheckpointManager
from chatlearn.engine.metrics import iter_lines
from chatlearn.engine.run_lock import RunLock

_SHOWN_KINDS = ("train", "eval", "episode")
_MAX_VALUES = 8  # metrics shown per record line
_EPISODE_KEYS = ("episode_s", "overlap", "span_s")


def locate(run_dir: Path, checkpoints: Path | None) -> tuple[Path, Path]:
    """(checkpoint root, metrics.jsonl path) for a run directory."""
    if checkpoints is not None:
        return checkpoints, run_dir / "metrics.jsonl"
    if (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file():
        return run_dir / "checkpoints", run_dir / "metrics.jsonl"
    if any(p.name.startswith("iter_") for p in run_dir.iterdir()):  # given the root itself
        return run_dir, run_dir.parent / "metrics.jsonl"
    return run_dir / "checkpoints", run_dir / "metrics.jsonl"


def _coordinator_fields(info: CheckpointInfo) -> dict[str, Any]:
    """The state's counters; read even from a broken checkpoint when its state is readable."""
    state: Any = info.state
    if state is None:
        try:
            state = json.loads((info.path / COORDINATOR).read_text("utf-8"))
        except (OSError, ValueError):
            return {}
    get = state.get if isinstance(state, dict) else lambda key: getattr(state, key, None)
    keys = ("episode", "step_in_episode", "consumed_samples", "reason", "created")
    return {key: get(key) for key in keys}


def _hf_directory(checkpoint: Path) -> str | None:
    """Where the checkpoint's trainer is a Hugging Face directory: its ``hf_model`` (every
    checkpoint of a one-process or DDP trainer of chatlearn.hf, an FSDP2 one's last and
    requested ones), else the one ``chatlearn export`` wrote beside the checkpoints
    (``hf/iter_...``); None: neither."""
    for config in sorted(checkpoint.glob("*/rank_0/hf_model/config.json")):
        return str(config.parent)
    beside = export_dir(checkpoint)
    return str(beside) if (beside / "config.json").is_file() else None


def _adapter_directory(checkpoint: Path) -> str | None:
    """A LoRA trainer's adapter (``PeftModel.from_pretrained``) in the checkpoint, if any."""
    for config in sorted(checkpoint.glob("*/rank_0/hf_model/adapter/adapter_config.json")):
        return str(config.parent)
    return None


def summarize(run_dir: Path, checkpoints: Path | None = None, verify: bool = False) -> dict:
    """Everything ``inspect`` shows, as plain data."""
    root, metrics_path = locate(run_dir, checkpoints)
    manager = CheckpointManager(root)
    found = manager.scan(verify=verify)
    rows = [
        {
            "iteration": info.iteration,
            "path": str(info.path),
            "status": info.status,
            "problem": info.problem,
            **_coordinator_fields(info),
            "hf": _hf_directory(info.path),
            "adapter": _adapter_directory(info.path),
            # what `chatlearn export` writes an HF directory from: chatlearn.hf's trainer's
            # sharded state (FSDP2) or adapters (LoRA)
            "exportable": any(info.path.glob("*/sharded/.metadata"))
            or any(info.path.glob("*/rank_0/adapters.pt")),
        }
        for info in found
    ]
    complete = [info for info in found if info.complete]
    metrics: dict[str, Any] = {"path": str(metrics_path), "records": 0, "last": {}}
    if metrics_path.is_file():  # a line at a time: a long run's file is hundreds of MB
        counts = {"records": 0, "unreadable_lines": 0, "resumes": 0, "restarts": 0}
        for record in iter_lines(metrics_path):
            if record is None:
                counts["unreadable_lines"] += 1
                continue
            counts["records"] += 1
            kind = record.get("kind")
            if kind in (*_SHOWN_KINDS, "resume", "restart"):
                metrics["last"][kind] = record
            if kind == "resume":
                counts["resumes"] += 1
            elif kind == "restart":
                counts["restarts"] = max(counts["restarts"], int(record.get("restarts", 0) or 0))
        metrics.update(counts)
    return {
        "run_dir": str(run_dir),
        # a run in progress holds the directory (engine/run_lock.py): what is shown is moving
        "running_pid": RunLock.holder(run_dir),
        "checkpoint_root": str(root),
        "checkpoints": rows,
        "unfinished": [str(p) for p in manager.staging()],
        "resume_from": complete[-1].iteration if complete else None,
        "verified": verify,  # without it a file of the right size with other bytes passes
        "metrics": metrics,
    }


def _format_values(record: dict[str, Any]) -> str:
    if record.get("kind") == "resume":
        return f"from {record.get('checkpoint')}"
    if record.get("kind") == "restart":  # self-healing: the run's count and the last one
        where = record.get("model", "?")
        if record.get("replica") is not None:
            where += f" replica {record['replica']}"
        return f"{record.get('restarts')} in this run; the last: {where}, {record.get('reason')}"
    skip = {"kind", "step", "time", "episode", "episodes_done", "checkpoint"}
    values = [(k, v) for k, v in record.items() if k not in skip]
    if record.get("kind") == "episode":  # timers of every model: the headline ones only
        values = [(k, v) for k, v in values if k in _EPISODE_KEYS]
    shown = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values[:_MAX_VALUES]
    )
    more = len(values) - _MAX_VALUES
    return shown + (f", ... ({more} more)" if more > 0 else "")


def render(summary: dict[str, Any]) -> str:
    lines = [f"run directory: {summary['run_dir']}", f"checkpoints: {summary['checkpoint_root']}"]
    rows = summary["checkpoints"]
    if rows:
        header = f"  {'ITERATION':>9}  {'EPISODES':>8}  {'+STEPS':>6}  {'CONSUMED':>8}  "
        lines.append(header + f"{'REASON':<8}  {'SAVED':<19}  {'HF':<8}  STATUS")
        for row in rows:
            created = row.get("created")
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "?"
            status = "complete" if row["status"] == "complete" else f"BROKEN: {row['problem']}"
            hf = row.get("hf")
            where = "hf_model" if hf and hf.endswith("hf_model") else "hf/" if hf else "-"
            if hf is None and row.get("adapter"):
                where = "adapter"  # a LoRA run's periodic checkpoint
            lines.append(
                f"  {row['iteration']:>9}  {_cell(row.get('episode')):>8}  "
                f"{_cell(row.get('step_in_episode')):>6}  {_cell(row.get('consumed_samples')):>8}  "
                f"{_cell(row.get('reason')):<8}  {saved:<19}  {where:<8}  {status}"
            )
        if any(
            row["hf"] is None and row["status"] == "complete" and row.get("exportable")
            for row in rows
        ):
            lines.append(
                "  HF: the trainer as a Hugging Face directory, in the checkpoint (hf_model) or "
                "beside it (hf/); for the others (periodic checkpoints of FSDP2 runs, and of "
                "LoRA runs, which hold the adapter) `chatlearn export <checkpoint>` writes one"
            )
    else:
        lines.append("  none")
    for path in summary["unfinished"]:
        lines.append(f"  unfinished save (never resumed from): {path}")
    resume = summary["resume_from"]
    checked = "" if summary.get("verified") else " (sizes checked; --verify checks the contents)"
    running = summary.get("running_pid")
    if running is not None:
        lines.append(f"a run is in progress here (pid {running}): these figures are moving")
    else:
        lines.append(
            f"a new run resumes from iteration {resume}{checked}"
            if resume is not None
            else "a new run starts from the beginning (no complete checkpoint)"
        )
    metrics = summary["metrics"]
    unreadable = metrics.get("unreadable_lines")
    broken = f", {unreadable} lines that are not records skipped" if unreadable else ""
    lines.append(f"metrics: {metrics['path']} ({metrics['records']} records{broken})")
    for kind in (*_SHOWN_KINDS, "resume", "restart"):
        record = metrics["last"].get(kind)
        if record is None:
            continue
        where = f"iteration {record.get('step')}"
        if record.get("episode") is not None and kind != "resume":
            where += f", episode {record['episode']}"  # 0-based, as the file has it
        elif record.get("episodes_done") is not None:  # an evaluation, between episodes
            where += f", after {record['episodes_done']} episodes"
        lines.append(f"  last {kind:<8} {where}: {_format_values(record)}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "?" if value is None else str(value)


@click.command("inspect")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--checkpoints",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="the checkpoint root, when runtime.data_checkpoint_path put it outside RUN_DIR",
)
@click.option("--verify", is_flag=True, help="check every file's sha256, not only its size")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(run_dir: Path, checkpoints: Path | None, verify: bool, as_json: bool) -> None:
    """Checkpoints (complete or broken) and the last metrics of the run in RUN_DIR."""
    summary = summarize(run_dir, checkpoints, verify)
    if not summary["checkpoints"] and not summary["metrics"]["records"]:
        # the usual slip: the OUTPUT_DIR given, not output_dir/exp_name where the run writes
        try:
            runs = sorted(
                str(sub)
                for sub in run_dir.iterdir()
                if sub.is_dir()
                and ((sub / "metrics.jsonl").is_file() or (sub / "checkpoints").is_dir())
            )
        except OSError:  # an unreadable directory: no hint
            runs = []
        hint = f"; runs below it (output_dir/exp_name): {', '.join(runs)}" if runs else ""
        click.echo(f"{run_dir}: no checkpoints and no metrics.jsonl here{hint}", err=True)
        sys.exit(1)
    click.echo(json.dumps(summary, indent=1, default=str) if as_json else render(summary))
