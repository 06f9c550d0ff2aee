"""`chatlearn export`: the Hugging Face directory of a trainer's weights in any checkpoint.

    chatlearn export output/dpo_fsdp/checkpoints/iter_0000024   # to output/dpo_fsdp/hf/iter_0000024
    chatlearn export output/dpo_fsdp/checkpoints -o best        # the newest complete checkpoint

What the directory holds is what the trainer's own export writes at a run's end
(``HFDPOTrainer.export_hf_model``, ``chatlearn.hf.checkpoint.export_hf``): the weights loadable
with ``AutoModelForCausalLM.from_pretrained`` and the tokenizer; with LoRA the adapter
(``adapter/``, ``PeftModel.from_pretrained``) and, unless ``--no-merge-lora``, the merged weights.

Where it comes from, by what the checkpoint's trainer wrote (``<checkpoint>/<trainer>/``):

- ``sharded/`` (FSDP2, whose periodic checkpoints hold no ``hf_model``): the sharded state read
  in this one process, without a process group (``torch.distributed.checkpoint`` lays the shards
  of any number of ranks out again), into the full state dict: one copy of the weights in host
  memory. The model is built on the meta device, from the run's config in the checkpoint, only
  for its names, its tied weights and its LoRA layers; no weights are read from ``model_path``.
- ``rank_0/hf_model`` with the weights (a one-process or DDP trainer's): already there, copied
  to ``-o`` when given; written again from its weights with ``--dtype`` or ``--merge-lora``.
- ``rank_0/model.pt`` (``save_hf_model: false``): read as it is.
- ``rank_0/adapters.pt`` (LoRA without FSDP2, whose periodic checkpoints' ``hf_model`` holds
  the adapter alone): the adapters on the base model the run's config builds (``model_path``,
  or ``model_config`` and ``seed``), checked against the base's digest the checkpoint holds.

The directory is written beside its final name and renamed into place, so a failed export
leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import torch

from chatlearn.actors.checkpoint_paths import (
    COORDINATOR,
    MANIFEST,
    check_manifest,
    checkpoint_iteration,
    export_dir,
    module_checkpoint_dir,
    pid_alive,
)
from chatlearn.hf.trainer import ADAPTERS_FILE, SHARDED_DIR, HFDPOTrainer


class ExportError(Exception):
    """What stops an export: one line saying what and what to do."""


def find_checkpoint(path: Path) -> Path:
    """`path` if it is a complete checkpoint, else the newest complete one under it."""
    if not path.exists():
        raise ExportError(f"{path}: no such checkpoint or directory")
    if (path / COORDINATOR).is_file():
        if not (path / MANIFEST).is_file():
            raise ExportError(f"{path}: an incomplete checkpoint (no {MANIFEST})")
        problem = check_manifest(path, hashes=False)  # hashes: `chatlearn inspect --verify`
        if problem:
            raise ExportError(
                f"{path}: a broken checkpoint ({problem}); `chatlearn inspect` lists the "
                "complete ones"
            )
        return path
    numbered = [(checkpoint_iteration(p.name), p) for p in path.iterdir() if p.is_dir()]
    # a broken newest one (a file missing or cut short): the one before, as a resume does
    complete = [
        p for n, p in sorted((n, p) for n, p in numbered if n is not None)
        if not check_manifest(p, hashes=False)
    ]  # fmt: skip
    if not complete:
        raise ExportError(
            f"{path}: neither a checkpoint nor a directory of checkpoints (no iter_*/{COORDINATOR}"
            " with its manifest)"
        )
    return complete[-1]


def trainer_module(checkpoint: Path, model: str | None) -> Any:
    """The trainer's module as the run's config in `checkpoint` builds it (`setup` not run)."""
    from chatlearn.config import Config

    try:
        state = json.loads((checkpoint / COORDINATOR).read_text())
        config = state.get("config") or {}
    except (ValueError, AttributeError):  # a damaged file: `chatlearn inspect --verify` says
        raise ExportError(
            f"{checkpoint / COORDINATOR}: not the coordinator's state (damaged?); "
            "`chatlearn inspect --verify` checks the checkpoint"
        ) from None
    name = model or (state.get("trainer") or {}).get("model")
    models = config.get("models") or {}
    if not name or name not in models:
        known = ", ".join(sorted(models)) or "none"
        raise ExportError(
            f"{checkpoint}: no model {name!r} in the run's config (its models: {known}); "
            "name the trainer with --model"
        )
    if not (models[name] or {}).get("trainable"):
        raise ExportError(
            f"{checkpoint}: {name} does not train (checkpoints hold the trainer's weights): "
            "its weights are the ones its config reads or builds"
        )
    with warnings.catch_warnings():  # the run's config was checked when it ran
        warnings.simplefilter("ignore")
        args = Config.from_dict(config, validate=False)
    module = HFDPOTrainer(name, args=args)
    path = module.model_args.get("model_path")
    if path and not Path(path).is_absolute() and not Path(path).exists():
        raise ExportError(
            f"{checkpoint}: the run's model_path {path!r} is relative and not found from "
            f"{Path.cwd()}: run chatlearn export in the directory the run ran in"
        )
    return module


def export_checkpoint(
    checkpoint: Path, output: Path | None = None, *, model: str | None = None,
    merge_lora: bool | None = None, dtype: torch.dtype | None = None,
) -> Path:  # fmt: skip
    """Write the HF directory of `checkpoint`'s trainer to `output` (default: ``hf/<iter>``
    beside the checkpoints' directory); returns where it is. ``merge_lora`` (default: the
    run's) and ``dtype`` (default: the run's ``export_dtype``, else the weights' own, e.g. the
    fp32 masters of mixed precision) change what is written, so an ``hf_model`` the checkpoint
    holds is then written again."""
    from chatlearn.hf.model import resolve_dtype

    checkpoint = find_checkpoint(checkpoint)
    module = trainer_module(checkpoint, model)
    rank0 = module_checkpoint_dir(checkpoint, module.name, 0)
    exported = rank0 / "hf_model"
    # the trainer's own export (hf_model) is in the run's export_dtype already
    as_held = (exported / "config.json").is_file() and merge_lora is None and dtype is None
    if dtype is None:
        dtype = resolve_dtype(module.arg("export_dtype"))
    if output is None:
        if as_held:
            return exported  # the checkpoint holds it
        output = export_dir(checkpoint)
    if output.resolve().is_relative_to(checkpoint.parent.resolve()):
        # a run's retention removes it with its checkpoint; named iter_*, a broken checkpoint
        # that a save of that iteration replaces
        raise ExportError(
            f"{output} is inside {checkpoint.parent}, among the run's checkpoints (pruned and "
            "replaced as runs go on): name a directory outside it with -o"
        )
    if output.exists():
        raise ExportError(f"{output} exists: name another directory with -o, or remove it")
    merge = bool(module.arg("merge_lora", True)) if merge_lora is None else merge_lora
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    _remove_dead_partials(output)
    shutil.rmtree(partial, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        if as_held:  # as the trainer wrote it
            shutil.copytree(exported, partial)
        else:
            _write(module, checkpoint, rank0, partial, merge=merge, dtype=dtype)
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return output


def _remove_dead_partials(output: Path) -> None:
    """Remove what exports to `output` killed before their rename left (a SIGKILL skips the
    clean-up): ``.<name>.partial-<pid>`` of a process that is gone. A live one's is its own."""
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _write(
    module: Any, checkpoint: Path, rank0: Path, target: Path, *, merge: bool,
    dtype: torch.dtype | None,
) -> None:  # fmt: skip
    from chatlearn.hf.checkpoint import export_hf, safetensors_files
    from chatlearn.hf.lora import module_lora_settings

    sharded = checkpoint / module.name / SHARDED_DIR
    tokenizer = module.build_tokenizer()
    held = safetensors_files(rank0 / "hf_model")
    state: dict[str, torch.Tensor]
    if (sharded / ".metadata").is_file():
        model = _meta_model(module, tokenizer)
        state = _sharded_state(model, sharded, chunk_size=int(module.arg("logps_chunk_size", 0)))
    elif held and module_lora_settings(module) is None:  # a one-process or DDP trainer's
        from safetensors.torch import load_file

        model = _meta_model(module, tokenizer)
        state = {k: v for path in held for k, v in load_file(path).items()}
        _check_names(model, state, rank0 / "hf_model")
    elif (rank0 / "model.pt").is_file():
        model = _meta_model(module, tokenizer)
        state = torch.load(rank0 / "model.pt", map_location="cpu", weights_only=True, mmap=True)
        _check_names(model, state, rank0 / "model.pt")
    elif (rank0 / ADAPTERS_FILE).is_file():
        model = _adapted_base(module, tokenizer, rank0 / ADAPTERS_FILE)
        state = {k: v.detach() for k, v in model.state_dict().items()}
    else:
        raise ExportError(
            f"{checkpoint / module.name}: no weights of {module.name} (no {SHARDED_DIR}/, "
            f"rank_0/hf_model, model.pt or {ADAPTERS_FILE}): not a checkpoint of chatlearn.hf's "
            "trainer"
        )
    with _quiet():  # the weights cast as written (LoRA's merged ones once merged)
        export_hf(model, state, target, tokenizer=tokenizer, merge_lora=merge, dtype=dtype)


def _meta_model(module: Any, tokenizer: Any) -> Any:
    """The trainer's model (with its LoRA layers) on the meta device: names, no weights."""
    from chatlearn.hf.lora import apply_lora, module_lora_settings
    from chatlearn.hf.model import causal_lm_from_args

    with torch.device("meta"), _quiet():
        model = causal_lm_from_args(module.model_args, tokenizer, empty=True)
        lora = module_lora_settings(module)
        if lora is not None:
            model = apply_lora(model, lora, seed=int(module.arg("seed", 0) or 0))
    return model


def _check_names(model: Any, state: Any, where: Path) -> None:
    """`state` holds `model`'s weights: every name (a tied one once), each of its shape. A
    trainer of another kind (a TorchModule's model.pt) was written out under the config of the
    model the run's config builds, exit 0."""
    expected = model.state_dict(keep_vars=True)
    problem = ""
    if not isinstance(state, dict):
        problem = f"a {type(state).__name__}, not a state dict"
    else:
        held = {id(expected[k]) for k in state if k in expected}
        unknown = sorted(k for k in state if k not in expected)
        missing = [k for k, v in expected.items() if k not in state and id(v) not in held]
        shapes = [
            k
            for k, v in state.items()
            if k in expected and tuple(getattr(v, "shape", ())) != tuple(expected[k].shape)
        ]
        if unknown or missing or shapes:
            first = (unknown or missing or shapes)[0]
            kind = "not in" if unknown else "missing from" if missing else "of another shape in"
            problem = f"{first} is {kind} the model the run's model_args build"
    if problem:
        raise ExportError(
            f"{where}: not the weights of the model the run's config builds ({problem}): not a "
            "checkpoint of chatlearn.hf's trainer, or of a subclass building another model"
        )


def _sharded_state(model: Any, sharded: Path, *, chunk_size: int) -> dict[str, torch.Tensor]:
    """`model`'s full state dict read from the trainer's sharded checkpoint, whose keys are
    those of its network (``SequenceLogps``: ``body.*``, ``head.*``) under ``model.``. Tied
    weights are one tensor under both names, as in the model itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from chatlearn.algorithms.logps import SequenceLogps

    network = SequenceLogps.from_causal_lm(model, chunk_size=max(chunk_size, 1), check=False)
    stored_names: dict[int, list[str]] = {}
    for key, tensor in network.state_dict(keep_vars=True).items():
        stored_names.setdefault(id(tensor), []).append(f"model.{key}")
    metadata = dcp.FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    read: dict[str, torch.Tensor] = {}  # stored name -> the tensor it is read into
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        stored = next((n for n in stored_names.get(id(tensor), ()) if n in metadata), None)
        if stored is None:
            raise ExportError(
                f"{sharded}: no tensor for {key} (the run's model_args build another model "
                "than the checkpoint's)"
            )
        if stored not in read:
            entry = metadata[stored]
            assert isinstance(entry, TensorStorageMetadata), stored
            if tuple(entry.size) != tuple(tensor.shape):
                raise ExportError(
                    f"{sharded}: {key} is {tuple(entry.size)} there, {tuple(tensor.shape)} in "
                    "the model the run's model_args build"
                )
            read[stored] = torch.empty(entry.size, dtype=entry.properties.dtype)
        state[key] = read[stored]
    flat = {name.removeprefix("model."): t for name, t in read.items()}
    from chatlearn.hf.checkpoint import plain_failures

    # "loading in a single process": that is the point; a shard that cannot be read is its
    # own error, not torch's CheckpointException (a BaseException: a traceback)
    with _quiet(), plain_failures():
        dcp.load({"model": flat}, checkpoint_id=str(sharded))
    return state


def _adapted_base(module: Any, tokenizer: Any, path: Path) -> Any:
    """The base the run's config builds, with the checkpoint's LoRA adapters on it."""
    from chatlearn.hf.checkpoint import frozen_digest
    from chatlearn.hf.lora import apply_lora, module_lora_settings
    from chatlearn.hf.model import causal_lm_from_args

    lora = module_lora_settings(module)
    if lora is None:
        raise ExportError(f"{path}: LoRA adapters, and the run's config sets no LoRA")
    with _quiet():
        model = causal_lm_from_args(module.model_args, tokenizer)
        model = apply_lora(model, lora, seed=int(module.arg("seed", 0) or 0))
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["base"] != frozen_digest(model):
        raise ExportError(
            f"{path}: the adapters were trained on other base weights than the run's config "
            "builds now (its model_path changed since)"
        )
    missing, unexpected = model.load_state_dict(saved["state"], strict=False)
    if unexpected:
        raise ExportError(f"{path}: adapters of another model ({sorted(unexpected)[:3]})")
    return model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or advice from transformers, peft and torch's checkpoint reader."""
    from transformers.utils import logging as hf_logging

    from chatlearn.hf.checkpoint import quiet_progress_bars

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with quiet_progress_bars(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=None,
    help="Directory to write (default: hf/<iter_...> beside the checkpoints' directory).",
)  # fmt: skip
@click.option("--model", default=None, help="The trainer's name (default: the checkpoint's).")
@click.option(
    "--merge-lora/--no-merge-lora", default=None,
    help="With LoRA: also write the merged weights (default: the run's merge_lora, true).",
)  # fmt: skip
@click.option(
    "--dtype", type=click.Choice(sorted(_DTYPES)), default=None,
    help="Write the weights in this dtype (default: the run's export_dtype, else as trained, "
    "e.g. fp32 master weights).",
)  # fmt: skip
def command(
    checkpoint: Path, output: Path | None, model: str | None, merge_lora: bool | None,
    dtype: str | None,
) -> None:  # fmt: skip
    """Write CHECKPOINT's trainer weights as a Hugging Face directory (from_pretrained).

    CHECKPOINT is a checkpoint (iter_...) or a directory of them (the newest complete one).
    An FSDP2 run's periodic checkpoints hold sharded state only: this consolidates it in one
    process (one copy of the weights in memory)."""
    from chatlearn.config.errors import ConfigError
    from chatlearn.config.report import DEBUG_ENV_VAR, debug_enabled

    try:
        where = export_checkpoint(
            checkpoint, output, model=model, merge_lora=merge_lora,
            dtype=_DTYPES[dtype] if dtype else None,
        )  # fmt: skip
    except ConfigError as exc:  # of the run's config, as the checkpoint holds it
        click.echo(f"chatlearn export: {checkpoint}: the run's config: {exc.one_line()}", err=True)
        raise SystemExit(1) from None
    except (ExportError, OSError) as exc:
        click.echo(f"chatlearn export: {exc}", err=True)
        raise SystemExit(1) from None
    except Exception as exc:  # a file whose bytes cannot be read as what it should hold
        if debug_enabled():
            raise
        said = (str(exc).strip().splitlines() or [""])[0][:300]
        click.echo(
            f"chatlearn export: {checkpoint}: could not be read ({type(exc).__name__}: {said}); "
            f"`chatlearn inspect --verify` checks its files ({DEBUG_ENV_VAR}=1 shows where)",
            err=True,
        )
        raise SystemExit(1) from None
    click.echo(str(where))
