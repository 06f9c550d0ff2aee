"""Comparing a chaos run with an uninterrupted one: every training iteration once with the same
metrics, and the final checkpoint's trainer weights bit for bit."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatlearn.engine.checkpoint import CheckpointManager
from chatlearn.engine.metrics import read_metrics

_TENSOR_SUFFIXES = (".pt", ".safetensors")


@dataclass(slots=True)
class Comparison:
    """The verdict of :func:`compare_runs`: checks that passed and problems found."""

    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return (
            [f"ok    {text}" for text in self.passed]
            + [f"FAIL  {text}" for text in self.problems]
            + [f"note  {text}" for text in self.notes]
        )


def find_run_dir(directory: str | Path) -> Path | None:
    """The run directory (holding ``metrics.jsonl``) at or below ``directory``: itself, or its
    only descendant with one (e.g. ``$OUTPUT_DIR/dpo_example``); None if there is none.
    Raises ValueError when there are several."""
    directory = Path(directory)
    if (directory / "metrics.jsonl").is_file():
        return directory
    found = sorted(p.parent for p in directory.rglob("metrics.jsonl")) if directory.is_dir() else []
    if len(found) > 1:
        raise ValueError(
            f"{directory} holds {len(found)} runs ({', '.join(map(str, found))}); "
            "give the run directory itself"
        )
    return found[0] if found else None


def compare_runs(
    baseline_dir: str | Path | None,
    chaos_dir: str | Path,
    *,
    trainer_model: str = "policy_trainer",
    ignore: Iterable[str] = ("time",),
    skip_files: Iterable[str] = ("rng.pt",),
) -> Comparison:
    """Compare the chaos run in ``chaos_dir`` with the uninterrupted one in ``baseline_dir``.

    Each is a run directory (with ``metrics.jsonl`` and ``checkpoints/``) or a directory with
    exactly one below it. Checks: (a) the ``train`` records of ``metrics.jsonl``: every
    iteration once in each run, no gap, the same iterations in both, every value equal (floats
    exactly; the keys in ``ignore``, wall-clock time, are left out); (b) the newest complete
    checkpoint of each (``iter_*`` whose ``MANIFEST.json`` matches its files): the same
    iteration, the same ``.pt``/``.safetensors`` files of ``trainer_model``, every tensor
    bit-identical and every other value equal. The first difference is reported.
    Files named in ``skip_files`` are not compared: by default ``rng.pt``, the random
    generators' state, which is not weights and differs between two clean runs of the example
    (its trainer draws nothing from torch's global generator, which no one seeds).
    Without a baseline only the chaos run's own metrics are checked (once each, no gap).
    """
    result = Comparison()
    runs: dict[str, Path] = {}
    for name, directory in (("baseline", baseline_dir), ("chaos", chaos_dir)):
        if directory is None:
            continue
        try:
            found = find_run_dir(directory)
        except ValueError as exc:
            result.problems.append(f"{name}: {exc}")
            continue
        if found is None:
            result.problems.append(
                f"{name}: no metrics.jsonl under {directory} (does the command write its "
                "output where --output-env points?)"
            )
        else:
            runs[name] = found
    if result.problems:
        return result
    records = {}
    for name, run in runs.items():
        everything = read_metrics(run / "metrics.jsonl")
        records[name] = [r for r in everything if r.get("kind") == "train"]
        _check_once_each(name, records[name], result)
        resumes = sum(1 for r in everything if r.get("kind") == "resume")
        if resumes:
            result.notes.append(f"{name}: the run resumed from a checkpoint {resumes} time(s)")
    if "baseline" in runs:
        _compare_metrics(records["baseline"], records["chaos"], set(ignore), result)
        _compare_weights(runs["baseline"], runs["chaos"], trainer_model, set(skip_files), result)
    return result


def _iteration(record: Mapping[str, Any]) -> int:
    return int(record["step"])


def _check_once_each(name: str, records: list[dict[str, Any]], result: Comparison) -> None:
    if not records:
        result.problems.append(f"{name}: metrics.jsonl has no train record")
        return
    counts = Counter(_iteration(r) for r in records)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    first, last = min(counts), max(counts)
    missing = sorted(set(range(first, last + 1)) - set(counts))
    if repeated:
        result.problems.append(
            f"{name}: iteration {repeated[0]} recorded {counts[repeated[0]]} times "
            f"({len(repeated)} iteration(s) recorded more than once)"
        )
    if missing:
        result.problems.append(
            f"{name}: iteration {missing[0]} missing between {first} and {last} "
            f"({len(missing)} missing)"
        )
    if not repeated and not missing:
        result.passed.append(f"{name}: iterations {first}..{last}, each recorded once")


def _compare_metrics(
    baseline: list[dict[str, Any]],
    chaos: list[dict[str, Any]],
    ignored: set[str],
    result: Comparison,
) -> None:
    if not baseline or not chaos:
        return  # reported by _check_once_each
    base: dict[int, dict[str, Any]] = {}
    for record in baseline:
        base.setdefault(_iteration(record), record)
    other: dict[int, dict[str, Any]] = {}
    for record in chaos:
        other.setdefault(_iteration(record), record)
    only_base = sorted(set(base) - set(other))
    only_chaos = sorted(set(other) - set(base))
    if only_base:
        result.problems.append(
            f"metrics: iteration {only_base[0]} is in the baseline, not in the chaos run "
            f"({len(only_base)} such)"
        )
    if only_chaos:
        result.problems.append(
            f"metrics: iteration {only_chaos[0]} is in the chaos run, not in the baseline "
            f"({len(only_chaos)} such)"
        )
    differing = []
    for iteration in sorted(set(base) & set(other)):
        difference = _record_difference(base[iteration], other[iteration], ignored)
        if difference:
            differing.append((iteration, difference))
    if differing:
        iteration, difference = differing[0]
        result.problems.append(
            f"metrics: iteration {iteration}: {difference} ({len(differing)} iteration(s) differ)"
        )
    elif not only_base and not only_chaos:
        keys = sorted(set().union(*(r.keys() for r in base.values())) - ignored - {"kind"})
        result.passed.append(
            f"metrics: {len(base)} train records equal to the baseline's ({', '.join(keys)})"
        )


def _record_difference(a: Mapping[str, Any], b: Mapping[str, Any], ignored: set[str]) -> str:
    for key in sorted(set(a) | set(b)):
        if key in ignored:
            continue
        if key not in b:
            return f"{key} is only in the baseline"
        if key not in a:
            return f"{key} is only in the chaos run"
        if not _same_value(a[key], b[key]):
            return f"{key} is {a[key]!r} in the baseline, {b[key]!r} in the chaos run"
    return ""


def _same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type; floats bit for bit (repr round-trips them exactly: NaN
    equals NaN, 0.0 differs from -0.0)."""
    if type(a) is not type(b):
        return False
    return repr(a) == repr(b) if isinstance(a, float) else bool(a == b)


def _newest_complete(run_dir: Path) -> Any:
    complete = [c for c in CheckpointManager(run_dir / "checkpoints").scan() if c.complete]
    return complete[-1] if complete else None


def _compare_weights(
    baseline: Path, chaos: Path, model: str, skip: set[str], result: Comparison
) -> None:
    newest = {"baseline": _newest_complete(baseline), "chaos": _newest_complete(chaos)}
    if newest["baseline"] is None and newest["chaos"] is None:
        result.notes.append("weights: neither run has a complete checkpoint; not compared")
        return
    for name, info in newest.items():
        if info is None:
            result.problems.append(f"weights: the {name} run has no complete checkpoint")
    if newest["baseline"] is None or newest["chaos"] is None:
        return
    a, b = newest["baseline"], newest["chaos"]
    if a.iteration != b.iteration:
        result.problems.append(
            f"weights: the newest complete checkpoint is {a.path.name} in the baseline, "
            f"{b.path.name} in the chaos run"
        )
        return
    files = {}
    skipped: set[str] = set()
    for name, info in newest.items():
        directory = info.path / model
        if not directory.is_dir():
            result.problems.append(f"weights: {info.path} has no {model} directory")
            return
        tensor_files = [
            p for p in directory.rglob("*") if p.is_file() and p.name.endswith(_TENSOR_SUFFIXES)
        ]
        skipped |= {p.name for p in tensor_files if p.name in skip}
        files[name] = {p.relative_to(directory).as_posix() for p in tensor_files}
        files[name] = {f for f in files[name] if Path(f).name not in skip}
    if files["baseline"] != files["chaos"]:
        only_a = sorted(files["baseline"] - files["chaos"])
        only_b = sorted(files["chaos"] - files["baseline"])
        which = f"{only_a[0]} only in the baseline" if only_a else f"{only_b[0]} only in chaos"
        result.problems.append(f"weights: {a.path.name}/{model}: {which}")
        return
    if skipped:
        names = ", ".join(sorted(skipped))
        result.notes.append(f"weights: {names} not compared (random generator state, not weights)")
    if not files["baseline"]:
        result.problems.append(f"weights: {a.path}/{model} has no .pt or .safetensors file")
        return
    tensors = 0
    differing = []
    for relative in sorted(files["baseline"]):
        left = _load_tensor_file(a.path / model / relative)
        right = _load_tensor_file(b.path / model / relative)
        counter = [0]
        difference = _first_difference(left, right, "", counter)
        tensors += counter[0]
        if difference:
            differing.append(f"{model}/{relative}: {difference}")
    if differing:
        result.problems.append(
            f"weights: {a.path.name}/{differing[0]} ({len(differing)} of {len(files['baseline'])} "
            "file(s) differ)"
        )
    else:
        result.passed.append(
            f"weights: {a.path.name}/{model}: {len(files['baseline'])} file(s), {tensors} "
            "tensors, bit-identical"
        )


def _load_tensor_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _first_difference(a: Any, b: Any, where: str, counter: list[int]) -> str:
    """Where ``a`` and ``b`` first differ (``""`` if nowhere); ``counter[0]`` counts tensors."""
    import torch

    at = where or "the top level"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            other = type(b if isinstance(a, torch.Tensor) else a).__name__
            return f"{at}: a tensor in one run, {other} in the other"
        counter[0] += 1
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{at}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if not _bit_identical(a, b):
            return f"{at}: tensor values differ"
        return ""
    if type(a) is not type(b):
        return f"{at}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Mapping):
        if set(a) != set(b):
            key = next(iter(sorted(set(a) ^ set(b), key=repr)))
            side = "baseline" if key in a else "chaos run"
            return f"{at}: key {key!r} only in the {side}"
        for key in a:
            found = _first_difference(
                a[key], b[key], f"{where}.{key}" if where else str(key), counter
            )
            if found:
                return found
        return ""
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return f"{at}: {len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{where}[{i}]", counter)
            if found:
                return found
        return ""
    if not _same_value(a, b):
        return f"{at}: {a!r} vs {b!r}"
    return ""


def _bit_identical(a: Any, b: Any) -> bool:
    """Tensors equal bit for bit (NaN payloads and signed zeros included), on the CPU."""
    import torch

    a, b = a.detach().cpu(), b.detach().cpu()
    if a.layout != torch.strided or a.is_quantized:
        return bool(torch.equal(a, b))
    return bool(
        torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8),
            b.contiguous().reshape(-1).view(torch.uint8),
        )
    )
