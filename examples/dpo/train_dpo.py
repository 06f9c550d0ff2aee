"""DPO training in the shape of ChatLearn's DPO main file.

    python -m examples.dpo.train_dpo -c examples/dpo/dpo.yaml

The data (a min/max preference task, `make_data.py`) is generated on first use, in `data/` only:
a data path elsewhere that does not exist is an error, and no existing file is ever written. The
engine logs progress and evaluations; at the end this prints a summary of the run.
"""

from __future__ import annotations

import re
from pathlib import Path

import chatlearn
from chatlearn import DPOEngine
from chatlearn.engine.engine import LearnResult
from chatlearn.hf import load_preference_data
from chatlearn.utils.logger import logger
from examples.dpo.make_data import make_pairs, write_jsonl
from examples.dpo.models import PolicyReference, PolicyTrainer


def resolve(path: str, config_dir: str | None) -> Path:
    """``path`` with ``~`` expanded, relative to the config file's directory."""
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and config_dir:
        candidate = Path(config_dir) / candidate
    return candidate


def data_paths(args: chatlearn.Config) -> tuple[Path, Path | None]:
    """The training data's path and the held-out data's (None without ``eval_data_path``, or
    with it null or empty: no evaluation)."""
    runtime = args.runtime_args
    if not runtime.data_path:
        raise args.error("runtime.data_path", "not set", "set data_path: data/train.jsonl")
    eval_data_path = runtime.get("eval_data_path", None)
    return (
        resolve(str(runtime.data_path), args.config_dir),
        resolve(str(eval_data_path), args.config_dir) if eval_data_path else None,
    )


def data_limit(args: chatlearn.Config, key: str) -> int | None:
    """``runtime.<key>`` (ChatLearn's ``training_data_num_limit`` / ``eval_data_num_limit``): a
    whole number, or None when unset. Anything else is a config error naming the key: ``int()``
    of it turned 1.5 into 1 record silently, and "abc" into an error about ``data_path``; a
    training limit of 0 stopped the run with "the dataset is empty", naming neither. An eval
    limit of 0 is no limit (None), with a warning: ChatLearn's entry scripts apply the limit
    only when it is truthy, where 0 here read no eval record and skipped every evaluation
    without a word."""
    value = args.runtime_args.get(key, None)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        value = int(value)  # `"100"`, as the config reads every number written in quotes
    fix = "set it to how many records to read (-1 or unset: all of them)"
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise args.error(f"runtime.{key}", f"{value!r} is not a whole number", fix)
    if value == 0 and key == "training_data_num_limit":
        raise args.error(f"runtime.{key}", "0 keeps no training record", fix)
    if value == 0:
        logger.warning(
            "%s: runtime.%s: 0 is no limit, as in ChatLearn's entry scripts: every eval record "
            "is read (to evaluate on none, remove eval_data_path)",
            args.where(f"runtime.{key}"),
            key,
        )
        return None
    return value


def load_data(args: chatlearn.Config, key: str, path: Path, limit: int | None = None) -> list[dict]:
    """The records of ``runtime.<key>`` (the first ``limit``: the file is read no further); a
    file that is not preference data is a config error naming the key (one line, exit 2), not a
    traceback."""
    try:
        return load_preference_data(path, limit)
    except ValueError as exc:
        raise args.error(
            f"runtime.{key}",
            str(exc),
            "point it at a JSONL file of {prompt, chosen, rejected} records",
        ) from None


# The example's own data files, generated on first use (make_data.py); no other file is ever
# written: a user's data path that does not exist is an error, never replaced by the example's.
EXAMPLE_DATA = Path(__file__).resolve().parent / "data"


def ensure_data(args: chatlearn.Config, paths: dict[str, Path]) -> None:
    """Generate the example's data files that are missing; any other missing path is a config
    error naming its key (``paths``: config key -> path)."""
    missing = {key: path for key, path in paths.items() if not path.exists()}
    for key, path in missing.items():
        if path.resolve().parent != EXAMPLE_DATA:
            raise args.error(
                f"runtime.{key}",
                f"{path} does not exist",
                "point it at your JSONL file of {prompt, chosen, rejected} records (the "
                f"example generates its own data only in {EXAMPLE_DATA})",
            )
    if not missing:
        return
    train, held_out = make_pairs("minmax")
    generated = {"data_path": train, "eval_data_path": held_out}
    for key, path in missing.items():
        write_jsonl(generated[key], path)


def summarize(result: LearnResult) -> str:
    lines = [f"trained {result.steps} steps on {result.samples} samples"]
    if result.train_first and result.train_last:
        first, last = result.train_loss_first, result.train_loss_last
        lines.append(f"train loss        {first:.4f} -> {last:.4f}")
    if result.eval_first:
        first, last = result.eval_first, result.eval_last
        lines.append(f"eval loss         {first['loss']:.4f} -> {last['loss']:.4f}")
        lines.append(
            f"eval reward acc.  {first['rewards/accuracies']:.3f} -> "
            f"{last['rewards/accuracies']:.3f}  (held-out; ~0 at first: policy = reference)"
        )
    if result.throughput is None or result.overlap is None:
        lines.append("nothing was left to train: this run had already completed")
    else:
        lines.append(f"throughput        {result.throughput:.1f} samples/s trained")
        lines.append(
            f"overlap           {100 * result.overlap:.0f}% of reference time hidden by training"
        )
    lines.append(f"metrics           {result.metrics_path}")
    if result.checkpoint is not None:
        lines.append(f"checkpoint        {result.checkpoint}")
        for hf_dir in sorted(result.checkpoint.glob("**/hf_model")):
            if (hf_dir / "config.json").is_file():
                lines.append(f"policy (HF)       {hf_dir}  (AutoModelForCausalLM.from_pretrained)")
            if (hf_dir / "adapter").is_dir():  # LoRA
                lines.append(f"LoRA adapter      {hf_dir / 'adapter'}  (PeftModel.from_pretrained)")
    return "\n".join(lines)


if __name__ == "__main__":
    chatlearn.init()
    args = chatlearn.get_args()
    train_path, eval_path = data_paths(args)
    # ChatLearn's entry scripts read these (-1 or unset: every record)
    train_limit = data_limit(args, "training_data_num_limit")
    eval_limit = data_limit(args, "eval_data_num_limit")
    paths = {"data_path": train_path}
    if eval_path is not None:
        paths["eval_data_path"] = eval_path
    ensure_data(args, paths)

    reference = PolicyReference("reference")
    policy = PolicyTrainer("policy_trainer")
    engine = DPOEngine(reference, policy)
    engine.set_dataset(load_data(args, "data_path", train_path, train_limit))
    if eval_path is not None:
        engine.set_eval_dataset(load_data(args, "eval_data_path", eval_path, eval_limit))
    print(summarize(engine.learn()))
