"""Rules that relate several config keys, run by `Config.validate()`.

One value at a time is checked in `schema`; here: batch sizes that must divide, the global batch
against the episode, devices against processes and parallel sizes, replicas against the episode,
data-parallel trainers against the micro-batches of a step, colocation groups, data_ratio against
data_path, the pipeline window, heartbeats, the types of the model_args keys the ready-made
modules read (`model_args`), and — in the coordinator only — that the output paths can be
created. The first problem raises a `ConfigError`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, nearest_existing
from .model_args import check_model_args
from .schema import PARALLEL_KEYS
from .sections import ModelConfig

if TYPE_CHECKING:
    from .core import Config


def check_config(config: Config) -> None:
    _check_batches(config)
    _check_runtime_knobs(config)
    _check_colocation(config)
    for name, model in config.models.items():
        _check_model(config, name, model)


def _error(config: Config, key: str, problem: str, fix: str) -> ConfigError:
    return config._locator.error(key, problem, fix)


def _check_batches(config: Config) -> None:
    rt = config.runtime_args
    micro, global_batch = rt.train_micro_batch_size, rt.train_global_batch_size
    if global_batch % micro:
        lower = max(micro, global_batch // micro * micro)
        raise _error(
            config,
            "runtime.train_global_batch_size",
            f"{global_batch} is not a multiple of train_micro_batch_size ({micro})",
            f"set train_global_batch_size to a multiple of {micro}, e.g. {lower}",
        )
    if rt.sample_per_episode < global_batch:
        raise _error(
            config,
            "runtime.sample_per_episode",
            f"{rt.sample_per_episode} is smaller than train_global_batch_size ({global_batch})",
            f"set sample_per_episode ≥ {global_batch}, or lower train_global_batch_size",
        )
    window = rt._values.get("pipeline_window")
    steps = rt.micro_batches_per_step
    if window is not None and 0 < window < steps:
        raise _error(
            config,
            "runtime.pipeline_window",
            f"{window} micro-batches cannot feed one training step of {steps} "
            f"(train_global_batch_size {global_batch} / train_micro_batch_size {micro})",
            f"set pipeline_window ≥ {steps} (or 0 for ChatLearn's whole-episode schedule)",
        )


def _check_runtime_knobs(config: Config) -> None:
    rt = config.runtime_args
    if rt.heartbeat_timeout <= rt.heartbeat_interval:
        raise _error(
            config,
            "runtime.heartbeat_timeout",
            f"{rt.heartbeat_timeout:g}s is not longer than heartbeat_interval "
            f"({rt.heartbeat_interval:g}s): every actor would look dead",
            f"set heartbeat_timeout to several intervals, e.g. {10 * rt.heartbeat_interval:g}",
        )
    if isinstance(rt.data_path, list) and isinstance(rt.data_ratio, list):
        if len(rt.data_path) != len(rt.data_ratio):
            raise _error(
                config,
                "runtime.data_ratio",
                f"has {len(rt.data_ratio)} entries but data_path lists "
                f"{len(rt.data_path)} datasets",
                "give one data_ratio entry per data_path entry",
            )


def _check_colocation(config: Config) -> None:
    seen: set[str] = set()
    for group in config.runtime_args.colocation:
        for name in group:
            if name not in config.models:
                known = ", ".join(sorted(config.models)) or "none"
                raise _error(
                    config,
                    "runtime.colocation",
                    f"names model {name!r}, which is not under models: (known: {known})",
                    "use the names of the models: section in colocation groups",
                )
            if name in seen:
                raise _error(
                    config,
                    "runtime.colocation",
                    f"model {name!r} appears in more than one place",
                    "put each model in at most one colocation group",
                )
            seen.add(name)


def _check_model(config: Config, name: str, model: ModelConfig) -> None:
    path = f"models.{name}"
    if model.num_gpu <= 0 and model.num_cpu <= 0:
        raise _error(
            config,
            path,
            "neither num_gpu nor num_cpu is > 0, so the model has no devices",
            "set num_gpu: 1 (or num_cpu: 1 for a CPU model)",
        )
    _check_parallel_sources(config, path, model)
    _check_processes(config, path, model)
    _check_parallel_sizes(config, path, model)
    check_model_args(model.model_args, f"{path}.model_args", config._locator.error)
    rt = config.runtime_args
    if not model.trainable and rt.sample_per_episode % model.num_replica:
        replicas = model.num_replica
        raise _error(
            config,
            "runtime.sample_per_episode",
            f"{rt.sample_per_episode} samples cannot be split evenly over the "
            f"{replicas} replicas of model {name!r}",
            f"make sample_per_episode a multiple of {replicas}, or change {path}.num_gpu/num_cpu",
        )
    if model.trainable and rt.micro_batches_per_step % model.data_parallel_size:
        dp = model.data_parallel_size
        raise _error(
            config,
            "runtime.train_global_batch_size",
            f"a step of {rt.micro_batches_per_step} micro-batches cannot be shared by the "
            f"{dp} data-parallel ranks of model {name!r}",
            f"make train_global_batch_size / train_micro_batch_size a multiple of {dp}",
        )


def _check_parallel_sources(config: Config, path: str, model: ModelConfig) -> None:
    """Parallel sizes may be set on the model or in its model_config_file; they must agree."""
    for key in PARALLEL_KEYS:
        from_file = model.model_args.get(key)
        if from_file is None:
            continue
        if isinstance(from_file, bool) or not isinstance(from_file, int) or from_file < 1:
            raise _error(
                config,
                f"{path}.model_args.{key}",
                f"expected a whole number ≥ 1, got {from_file!r}",
                f"set {key}: 1 (or larger) in the model config file",
            )
        own = model._values.get(key)
        if own is not None and own != from_file:
            raise _error(
                config,
                f"{path}.{key}",
                f"{own} disagrees with {from_file} in model_config_file",
                f"set {key} in one place only",
            )


def _check_processes(config: Config, path: str, model: ModelConfig) -> None:
    if model.num_gpu > 0:
        devices, per_process, kind = model.num_gpu, model.gpu_per_process, "gpu"
    else:
        devices, per_process, kind = model.num_cpu, model.cpu_per_process, "cpu"
    if per_process > devices or devices % per_process:
        raise _error(
            config,
            f"{path}.{kind}_per_process",
            f"{per_process} does not divide num_{kind} ({devices}) into whole processes",
            f"set {kind}_per_process to a divisor of {devices} (1 gives one process per {kind})",
        )


def _check_parallel_sizes(config: Config, path: str, model: ModelConfig) -> None:
    units = model.num_gpu if model.num_gpu > 0 else model.num_processes
    unit_name = "num_gpu" if model.num_gpu > 0 else "processes (num_cpu / cpu_per_process)"
    parallel = model.model_parallel_size
    if units % parallel:
        raise _error(
            config,
            f"{path}.tensor_model_parallel_size",
            f"{unit_name} = {units} is not divisible by tensor × pipeline × expert parallel "
            f"sizes ({model.tensor_model_parallel_size} × {model.pipeline_model_parallel_size} "
            f"× {model.expert_model_parallel_size} = {parallel})",
            f"use a multiple of {parallel} devices, or smaller parallel sizes",
        )
    if model.zero_size > 1:
        if parallel > 1:
            raise _error(
                config,
                f"{path}.zero_size",
                "ZeRO (zero_size > 1) cannot be combined with tensor/pipeline/expert parallelism",
                "set zero_size: 1 or all parallel sizes to 1",
            )
        if units % model.zero_size:
            raise _error(
                config,
                f"{path}.zero_size",
                f"{model.zero_size} does not divide {unit_name} = {units}",
                f"set zero_size to a divisor of {units}",
            )


def check_output_paths(config: Config) -> None:
    """The run's output directories can be created (not under a file, not read-only).

    Checked in the coordinator only: actors on other hosts see other file systems.
    """
    rt = config.runtime_args
    # output_dir first: when it is fine but output_dir/exp_name is not, exp_name is to blame
    paths = [("output_dir", rt.output_dir_as_given), ("exp_name", rt.output_path)]
    if rt.data_checkpoint_path:
        paths.append(("data_checkpoint_path", rt.data_checkpoint_path))
    if rt.reference_store:
        paths.append(("reference_store", rt.reference_store))
    for key, path in paths:
        problem = _directory_problem(path)
        if problem:
            raise _error(
                config,
                f"runtime.{key}",
                problem,
                f"set {key} so that the path names a directory that can be created and "
                "written, e.g. output/my_run",
            )
    if rt.saves_checkpoints and not rt.data_checkpoint_path:
        # the default place of the checkpoints: found at the first save it would cost the
        # run everything trained until then
        problem = _directory_problem(rt.checkpoint_path)
        if problem:
            raise _error(
                config,
                "runtime.data_checkpoint_path",
                f"{problem}: the run's checkpoints go there (data_checkpoint_path is not set)",
                "move that out of the way, or set data_checkpoint_path to a writable directory",
            )


def _directory_problem(path: str) -> str | None:
    """Why a directory cannot be created (or written) at `path`; None when it can."""
    target = Path(os.path.abspath(path))
    existing = nearest_existing(target)
    if not existing.is_dir():
        what = "is an existing file" if existing == target else f"is under a file ({existing})"
        return f"{path!r} {what}, not a directory"
    where = "" if existing == target else f" (the nearest existing directory {existing})"
    # made and removed: permissions, a read-only mount (which root's mode bits do not show),
    # /proc, /sys, a full disk, quotas all answer here
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".chatlearn-probe-", dir=existing))
    except OSError as exc:
        return f"{path!r} cannot hold the run's files{where}: {exc.strerror or exc}"
    return None
