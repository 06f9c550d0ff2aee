"""The known config keys: their types, defaults, ranges, and the checks of one value.

Sections keep unknown keys (users put their own settings there); only the keys below are
type-checked and get defaults. A value is checked when it is loaded and when it is assigned in
code, and again by `Config.validate()` (lists can be mutated in place). Checks that relate several
keys live in `chatlearn.config.core`.

Runtime section (`runtime:`; `rlhf:` is read as a deprecated alias) — ChatLearn's DPO keys:

| key | type | default | meaning |
|---|---|---|---|
| num_episode | int ≥ 0 | 5000 | episodes |
| sample_per_episode | int ≥ 1 | 1000 | samples per episode (≥ global batch) |
| num_training_epoch | int ≥ 1 | 1 | passes over each episode's buffer |
| generation_batch_size | int or null | 2 | forward chunk size (≤ 0 or null: no split) |
| train_micro_batch_size | int ≥ 1 | 2 | micro-batch size |
| train_global_batch_size | int ≥ 1 | = micro | a multiple of the micro-batch size |
| save_episode_interval | int ≥ 0 or null | null | checkpoint every N episodes (0/null: never) |
| data_shuffle | bool | true | shuffle the sampler |
| data_ratio | int, list of int, "1,2" or null | null | samples per dataset per mixing round |
| data_path | str, list of str or null | null | ChatLearn's data paths (vs data_ratio) |
| colocation | list | [] | groups sharing devices: `["a,b"]` or `[[a, b]]` → `[[a, b]]` |
| eval_episode_interval | int ≥ 0 | 0 | evaluate every N episodes (0: never) |
| enable_eval_before_training | bool | false | evaluate once before training |
| data_checkpoint_path | str or null | null | where the data/coordinator checkpoints go |
| enable_resume_training | bool | true | resume from data_checkpoint_path when it holds one |
| load_data_checkpoint_iteration | int ≥ 0 or null | null | checkpoint to resume (null: last) |
| consumed_samples | int ≥ 0 | 0 | samples already consumed (resume position) |
| training_shuffle_mode | "batch" / "sample" | batch | shuffle of passes after the first |
| drop_last | cycle / drop | cycle | dataset end: wrap into the next pass, or drop (1) |
| exp_name | str | CHATLEARN | run name |
| output_dir | str | ./ | reads as output_dir/exp_name (ChatLearn's rule; `output_path` too) |
| log_interval | int ≥ 1 | 1 | log metrics every N steps |

(1) ChatLearn's sampler modes ("retain" is not offered: chatlearn/engine/sampler.py). ChatLearn
reads `drop_last` (true: drop, false: cycle) from the model_args of the model that builds the
dataset (the reference's model_config_file); so does this runtime when `runtime.drop_last` is not
set (set, it wins, with a warning if they disagree). With several datasets the sampler always
cycles.

Runtime extensions of this project:

| key | type | default | meaning |
|---|---|---|---|
| seed | int | 42 | base seed of the run (module RNGs, training-pass shuffles) |
| pipeline_window | int ≥ 0 or null | 2 × global/micro | reference micro-batches ahead (2) |
| heartbeat_interval | float > 0 | 0.5 | seconds between actor heartbeats |
| heartbeat_timeout | float > 0 | 5.0 | silence after which an actor is dead (> interval) (5) |
| startup_timeout | float > 0 | 60.0 | seconds to start and run `setup()` (+ `setup_allowance()`) |
| call_timeout | float > 0 or null | null | limit on one remote call (null: none) |
| save_keep_last | int ≥ 0 | 3 | checkpoints kept (0: all) |
| tensorboard | bool | false | write TensorBoard event files |
| reference_cache | bool | true | reuse reference outputs when the same samples come back |
| max_reference_cache_mb | float ≥ 0 | 1024 | memory budget of that cache |
| reference_store | str or null | null | directory of reference outputs kept across runs (4) |
| shutdown_timeout | float > 0 | 5.0 | seconds actors get to exit after SHUTDOWN |
| kill_timeout | float > 0 | 3.0 | seconds between terminate and kill when stopping processes |
| dist_timeout | float > 0 | 600 | torch.distributed collective timeout |
| stop_timeout | float > 0 | 120 | after Ctrl-C/SIGTERM: seconds for running steps, then the save |
| fail_fast | bool | true | an error raised by user code stops the whole run |
| max_restarts | int ≥ 0 | 3 | restarts of a lost actor per `restart_window_minutes` (0: none) (3) |
| restart_window_minutes | float > 0 | 60 | the window of `max_restarts` |
| restart_on_error | bool | false | also restart after an error raised by user code |
| save_step_interval | int ≥ 0 or null | null | also checkpoint every N steps (0/null: never) |
| in_process | bool | false | run every module in the coordinator (debugging, tests) |

(3) Self-healing (docs/self-healing.md): a reference replica that dies or hangs is restarted in
place and its work replayed; a lost trainer rank restarts the trainer from the last checkpoint.
`models.<name>.max_restarts` overrides the limit per model.

(4) reference_store: every sample's reference output is kept on disk, keyed by the reference
model's fingerprint and the sample's tokens, so later runs over the same data (a beta sweep,
another loss, a restart) skip the reference for it (`chatlearn/engine/reference_store.py`).

(5) heartbeat_timeout: an actor on the coordinator's host that is silent but running (a call
holding Python's interpreter lock) or waiting for a CPU is kept, with one warning: only
call_timeout (and startup_timeout in setup) bounds a call that computes for ever. An actor on
another host is declared dead after this silence, whatever it does. With call_timeout null, a
call that has run 5 minutes is logged with its actor's pid (again at 10, 20, ... minutes): a
collective waiting for a lost peer keeps heartbeating and would otherwise wait unseen.

(2) pipeline_window: reference micro-batches produced ahead of training (null: the default);
0 is ChatLearn's schedule (the reference runs the whole episode, then training starts).
The default is two training steps' worth of micro-batches: while the trainer runs
step k on one global batch, the reference fills the next one, and the second spare step absorbs
jitter (chunk sizes that do not line up with micro-batches, uneven step times) so the trainer does
not wait. Memory stays bounded at two global batches of reference outputs. A window smaller than
one step (but > 0) could never feed a step, so it is rejected.

Models section (`models.<name>:`):

| key | type | default | meaning |
|---|---|---|---|
| num_gpu (alias num_device) | int ≥ 0 | 0 | GPUs of the model |
| num_cpu | int ≥ 0 | 0 | CPU cores of the model; num_gpu or num_cpu must be > 0 |
| gpu_per_process | int ≥ 1 | 1 | GPUs per process |
| cpu_per_process | int ≥ 1 or null | null → num_cpu | cores per process (default: one process) |
| trainable | bool | false | trainer (true) or inference |
| tensor_model_parallel_size | int ≥ 1 | 1 | may also come from model_config_file |
| pipeline_model_parallel_size | int ≥ 1 | 1 | may also come from model_config_file |
| expert_model_parallel_size | int ≥ 1 | 1 | may also come from model_config_file |
| zero_size | int ≥ 1 | 1 | ZeRO shard group (may also come from model_config_file) |
| model_config_file | str | "" | YAML read into `model_args` |
| free_memory | bool | false | offload when colocated |
| generation_batch_size | int or null | runtime's | this model's chunk size (≤ 0: no split) |
| nice | int in [-20, 19] | 0 | scheduling priority offset of the model's compute threads |
| idle_priority | bool | false | compute only on CPU time no other thread wants (Linux SCHED_IDLE) |
| max_restarts | int ≥ 0 or null | null | this model's restarts (null: `runtime.max_restarts`) |

`runtime_env:` — pip, py_modules, excludes (lists of str), working_dir (str or null), platform
(str), env_vars (mapping of environment variables for actor processes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ValueProblem


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One known key: how to check a value, its default, and its allowed range or choices."""

    kind: str  # a name in _CHECKERS
    default: Any
    optional: bool = False  # null allowed
    min_value: float | None = None
    min_inclusive: bool = True
    max_value: float | None = None
    choices: tuple[str, ...] | None = None
    example: Any = None  # shown in fixes when the default is null


def describe(value: Any) -> str:
    """A short description of a value for error messages, naming its YAML type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a bool)"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int | float):
        return f"{value!r} (a number)"
    if isinstance(value, list | tuple):
        text = repr(list(value))
        return f"the list {text if len(text) < 60 else text[:57] + '...'}"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _example(name: str, spec: KeySpec) -> str:
    value = spec.example if spec.example is not None else spec.default
    if isinstance(value, bool):
        value = str(value).lower()
    return f"{name}: {value}"


def _check_int(name: str, value: Any, spec: KeySpec) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)  # `1e3` is a float in YAML and in ChatLearn's literal reading
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        raise ValueProblem(
            f"expected a whole number, got {describe(value)}",
            f"remove the quotes: {name}: {value.strip()}",
        )
    raise ValueProblem(
        f"expected a whole number, got {describe(value)}",
        f"write a whole number, e.g. {_example(name, spec)}",
    )


def _check_float(name: str, value: Any, spec: KeySpec) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueProblem(
        f"expected a number, got {describe(value)}",
        f"write a number without quotes, e.g. {_example(name, spec)}",
    )


# A string that ChatLearn's config reader (its parse_value) turns into a number: it reads every
# such string of a config file as one, quoted or not (`learning_rate: "1e-5"`, `num_episode:
# "2"`); here only on keys whose value is a number, so a string key keeps its text
_NUMBER_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
NUMBER_KINDS = ("int", "float", "number")


def read_quoted_number(spec: KeySpec | None, value: Any) -> Any:
    """``value`` as a config file gives it for a key of ``spec``: the number a string written
    as one holds (``"2"`` → 2, ``"1e-5"`` → 1e-05) where the key takes a number, as ChatLearn
    reads it; anything else as it is (a non-number is then the key's one-line error)."""
    if spec is None or spec.kind not in NUMBER_KINDS or not isinstance(value, str):
        return value
    text = value.strip()
    if not _NUMBER_TEXT.fullmatch(text):
        return value
    return int(text) if text.lstrip("+-").isdigit() else float(text)


def _check_number(name: str, value: Any, spec: KeySpec) -> float:
    """A number, or a string `float()` reads: YAML 1.1 leaves `1e-6` (no dot) a string."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    return _check_float(name, value, spec)


def _check_bool(name: str, value: Any, spec: KeySpec) -> bool:
    if isinstance(value, bool):
        return value
    fix = f"write true or false (without quotes), e.g. {_example(name, spec)}"
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        # the usual source: ${NAME} set to `false`; ChatLearn reads it as a truthy string
        fix += (
            "; a value from an environment variable (${NAME}) is read as a Python literal, "
            f"so set the variable to {value.strip().capitalize()}"
        )
    raise ValueProblem(f"expected true or false, got {describe(value)}", fix)


def _check_str(name: str, value: Any, spec: KeySpec) -> str:
    if isinstance(value, str):
        value = value.strip().lower() if spec.choices else value
        return value
    raise ValueProblem(
        f"expected a string, got {describe(value)}",
        f"write a string, e.g. {name}: {spec.choices[0] if spec.choices else repr(spec.default)}",
    )


def _check_str_list(name: str, value: Any, spec: KeySpec) -> list[str]:
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueProblem(
        f"expected a list of strings, got {describe(value)}",
        f"write a YAML list of strings, e.g. {name}: [a, b]",
    )


def _check_str_or_str_list(name: str, value: Any, spec: KeySpec) -> str | list[str]:
    if isinstance(value, str):
        return value
    return _check_str_list(name, value, spec)


def _check_str_dict(name: str, value: Any, spec: KeySpec) -> dict[str, str]:
    scalars = str | int | float | bool
    if isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, scalars) for k, v in value.items()
    ):
        # environment variables are strings; YAML may have read `8` or `true`
        return {k: v if isinstance(v, str) else str(v) for k, v in value.items()}
    raise ValueProblem(
        f"expected a mapping of names to string values, got {describe(value)}",
        f"write e.g. {name}: {{OMP_NUM_THREADS: '1'}}",
    )


def _check_colocation(name: str, value: Any, spec: KeySpec) -> list[list[str]]:
    """ChatLearn writes groups as "a,b" strings; lists of names are accepted too."""
    fix = 'write a list of groups, e.g. colocation: ["reference,policy_trainer"]'
    if not isinstance(value, list | tuple):
        raise ValueProblem(f"expected a list of model groups, got {describe(value)}", fix)
    groups: list[list[str]] = []
    for group in value:
        if isinstance(group, str):
            names = [part.strip() for part in group.split(",")]
        elif isinstance(group, list | tuple) and all(isinstance(n, str) for n in group):
            names = [n.strip() for n in group]
        else:
            raise ValueProblem(f"a group must be a string 'a,b', got {describe(group)}", fix)
        if any(not n for n in names):
            raise ValueProblem(f"group {group!r} has an empty model name", fix)
        groups.append(names)
    return groups


def _check_data_ratio(name: str, value: Any, spec: KeySpec) -> int | list[int]:
    """Ratios are sample counts per mixing round (ChatLearn's sampler), hence integers."""
    fix = "write whole numbers per dataset, e.g. data_ratio: [1, 2] (or data_ratio: 1,2)"
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueProblem(f"cannot read {describe(value)} as numbers", fix) from None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueProblem(f"must be ≥ 1, got {value}", fix)
        return value
    if not isinstance(value, list | tuple):
        raise ValueProblem(f"expected a list of whole numbers, got {describe(value)}", fix)
    ratios = list(value)
    if not ratios:
        return ratios  # ChatLearn reads [] like null: equal mixing
    bad = [r for r in ratios if not isinstance(r, int) or isinstance(r, bool) or r < 0]
    if bad:
        raise ValueProblem(f"entries must be whole numbers ≥ 0, got {bad[0]!r}", fix)
    if sum(ratios) == 0:
        raise ValueProblem(f"needs at least one entry > 0, got {ratios}", fix)
    return ratios


_CHECKERS: dict[str, Callable[[str, Any, KeySpec], Any]] = {
    "int": _check_int,
    "float": _check_float,
    "number": _check_number,
    "bool": _check_bool,
    "str": _check_str,
    "str_list": _check_str_list,
    "str_or_str_list": _check_str_or_str_list,
    "str_dict": _check_str_dict,
    "colocation": _check_colocation,
    "data_ratio": _check_data_ratio,
}


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_value(name: str, spec: KeySpec, value: Any) -> Any:
    """Return `value` normalized for key `name`, or raise ValueProblem saying what to change."""
    if value is None:
        if spec.optional:
            return None
        raise ValueProblem(
            "must not be null",
            f"set a value, e.g. {_example(name, spec)}, or remove the key to use the default",
        )
    value = _CHECKERS[spec.kind](name, value, spec)
    if isinstance(value, float) and not math.isfinite(value):
        # nan passes every comparison below (and inf breaks timers and counters later)
        raise ValueProblem(f"must be a finite number, got {value}", f"set {_example(name, spec)}")
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not _INT64_MIN <= value <= _INT64_MAX
    ):
        # every setting travels to the actors in messages, whose integers are 64-bit
        # described by its size: a float of it overflows, and str() refuses 4,300+ digits
        raise ValueProblem(
            f"is beyond a 64-bit integer (a {value.bit_length()}-bit "
            f"{'negative ' if value < 0 else ''}number)",
            f"set {_example(name, spec)}",
        )
    if spec.min_value is not None:
        too_small = value < spec.min_value if spec.min_inclusive else value <= spec.min_value
        if too_small:
            bound = f"≥ {spec.min_value:g}" if spec.min_inclusive else f"> {spec.min_value:g}"
            raise ValueProblem(f"must be {bound}, got {value}", f"set {_example(name, spec)}")
    if spec.max_value is not None and value > spec.max_value:
        raise ValueProblem(
            f"must be ≤ {spec.max_value:g}, got {value}", f"set {_example(name, spec)}"
        )
    if spec.choices is not None and value not in spec.choices:
        raise ValueProblem(
            f"must be one of {', '.join(spec.choices)}; got {value!r}",
            f"set {name}: {spec.choices[0]} (or another of {', '.join(spec.choices)})",
        )
    return value


def _int(default: Any, minimum: int | None = None, **kw: Any) -> KeySpec:
    return KeySpec("int", default, min_value=minimum, **kw)


RUNTIME_KEYS: dict[str, KeySpec] = {
    "num_episode": _int(5000, 0),
    "sample_per_episode": _int(1000, 1),
    "num_training_epoch": _int(1, 1),
    "generation_batch_size": _int(2, optional=True),
    "train_micro_batch_size": _int(2, 1),
    "train_global_batch_size": _int(None, 1, optional=True, example=8),
    "save_episode_interval": _int(None, 0, optional=True, example=10),
    "data_shuffle": KeySpec("bool", True),
    "data_ratio": KeySpec("data_ratio", None, optional=True),
    "data_path": KeySpec("str_or_str_list", None, optional=True),
    "colocation": KeySpec("colocation", []),
    "eval_episode_interval": _int(0, 0),
    "enable_eval_before_training": KeySpec("bool", False),
    "data_checkpoint_path": KeySpec("str", None, optional=True, example="./data_ckpt"),
    "enable_resume_training": KeySpec("bool", True),
    "load_data_checkpoint_iteration": _int(None, 0, optional=True, example=100),
    "consumed_samples": _int(0, 0),
    "training_shuffle_mode": KeySpec("str", "batch", choices=("batch", "sample")),
    # ChatLearn's "retain" is not offered (sampler.py): accepted here, it passed every check and
    # the run failed at its start with a traceback from the sampler
    "drop_last": KeySpec("str", "cycle", choices=("cycle", "drop")),
    "exp_name": KeySpec("str", "CHATLEARN"),
    "output_dir": KeySpec("str", "./"),
    "log_interval": _int(1, 1),
    # extensions of this project
    "seed": _int(42),
    "pipeline_window": _int(None, 0, optional=True, example=8),
    "heartbeat_interval": KeySpec("float", 0.5, min_value=0, min_inclusive=False),
    "heartbeat_timeout": KeySpec("float", 5.0, min_value=0, min_inclusive=False),
    "startup_timeout": KeySpec("float", 60.0, min_value=0, min_inclusive=False),
    "call_timeout": KeySpec("float", None, optional=True, min_value=0, min_inclusive=False,
                            example=600),
    "save_keep_last": _int(3, 0),
    "tensorboard": KeySpec("bool", False),
    "reference_cache": KeySpec("bool", True),
    "reference_store": KeySpec("str", None, optional=True, example="./reference_store"),
    "max_reference_cache_mb": KeySpec("float", 1024.0, min_value=0),
    "shutdown_timeout": KeySpec("float", 5.0, min_value=0, min_inclusive=False),
    "kill_timeout": KeySpec("float", 3.0, min_value=0, min_inclusive=False),
    "dist_timeout": KeySpec("float", 600.0, min_value=0, min_inclusive=False),
    "stop_timeout": KeySpec("float", 120.0, min_value=0, min_inclusive=False),
    "fail_fast": KeySpec("bool", True),
    "in_process": KeySpec("bool", False),
    "max_restarts": _int(3, 0),
    "restart_window_minutes": KeySpec("float", 60.0, min_value=0, min_inclusive=False),
    "restart_on_error": KeySpec("bool", False),
    "save_step_interval": _int(None, 0, optional=True, example=100),
}  # fmt: skip

MODEL_KEYS: dict[str, KeySpec] = {
    "num_gpu": _int(0, 0),
    "num_cpu": _int(0, 0),
    "gpu_per_process": _int(1, 1),
    "cpu_per_process": _int(None, 1, optional=True, example=1),
    "trainable": KeySpec("bool", False),
    "tensor_model_parallel_size": _int(None, 1, optional=True, example=1),
    "pipeline_model_parallel_size": _int(None, 1, optional=True, example=1),
    "expert_model_parallel_size": _int(None, 1, optional=True, example=1),
    "zero_size": _int(None, 1, optional=True, example=1),
    "model_config_file": KeySpec("str", ""),
    "free_memory": KeySpec("bool", False),
    "generation_batch_size": _int(None, optional=True, example=4),
    "nice": _int(0, -20, max_value=19),
    "idle_priority": KeySpec("bool", False),
    "max_restarts": _int(None, 0, optional=True, example=3),
}

# Parallel sizes that a Megatron-style model_config_file may set instead (ChatLearn reads them
# from there); unset they mean 1.
PARALLEL_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "zero_size",
)

ENV_KEYS: dict[str, KeySpec] = {
    "pip": KeySpec("str_list", []),
    "py_modules": KeySpec("str_list", []),
    "working_dir": KeySpec("str", None, optional=True, example="."),
    "platform": KeySpec("str", ""),
    "excludes": KeySpec("str_list", []),
    "env_vars": KeySpec("str_dict", {}),
}

# Keys that are not ours are kept as given (programs read their own settings from the sections)
# and logged once as a warning naming file:line. Keys of ChatLearn's config classes that this
# runtime does not act on get a warning saying so; ChatLearn keys that only programs read (data
# paths) get none.
PROGRAM_KEYS = {"runtime": ("eval_data_path", "training_data_num_limit", "eval_data_num_limit")}
CHATLEARN_ONLY_KEYS: dict[str, tuple[str, ...]] = {
    "runtime": (
        "debug", "nsys", "profiler_dir", "log_config_file", "log_args_dict", "concurrent_setup",
        "coalesce_param", "coalesced_buffer_mb", "concurrent_comm", "param_sync_comm_type",
        "param_sync_max_workers", "validate_param_sync", "free_sync_collective_group",
        "bucket_size_mb_in_memory_manager", "max_relay_episode", "relay_episode_offset",
        "stream_data_loader_type", "cpu_schedule_strategy", "data_rerank",
        "policy_to_regroup_queue", "max_iteration_per_sample",
        "routed_expert_regrouping_comm_type",
    ),
    "models": (
        "num_replica", "batch_generation", "offload_optimizer_states", "offload_weights",
        "free_grad_buffers", "sync_frequency", "fsdp_size", "sp", "packing",
        "max_token_in_packing", "model_type", "force_push_params", "sp_size",
        "force_free_memory",
    ),
}  # fmt: skip
# What ChatLearn's config classes give for those keys when a config leaves them out: there they
# are class attributes, so `self.module_args.offload_weights` or `runtime_args.data_rerank` always
# read a value; here they read the same (no effect, but a program that reads one keeps working).
# ModelConfig derives offload_weights, free_grad_buffers and offload_optimizer_states from
# free_memory as ChatLearn's validation does.
CHATLEARN_DEFAULTS: dict[str, dict[str, Any]] = {
    "runtime": {
        "max_iteration_per_sample": 1, "debug": False, "nsys": False, "profiler_dir": None,
        "coalesced_buffer_mb": 100, "concurrent_comm": True, "param_sync_comm_type": "broadcast",
        "param_sync_max_workers": None, "routed_expert_regrouping_comm_type": "alltoall",
        "max_relay_episode": 0, "relay_episode_offset": 0, "concurrent_setup": False,
        "bucket_size_mb_in_memory_manager": 1024, "free_sync_collective_group": False,
        "cpu_schedule_strategy": "SPREAD", "validate_param_sync": False,
        "policy_to_regroup_queue": "global_barrier", "log_config_file": "",
        "log_args_dict": None, "data_rerank": True, "stream_data_loader_type": "fixed",
        "max_data_ckpt_nums": None,
    },
    "models": {
        "offload_optimizer_states": False, "offload_weights": False, "free_grad_buffers": False,
        "force_free_memory": False, "sync_frequency": 1, "fsdp_size": 1, "sp_size": 1,
        "model_type": "",
    },
}  # fmt: skip
# ChatLearn keys with a counterpart here that acts instead: the warning names it
CHATLEARN_REPLACED_KEYS: dict[str, dict[str, str]] = {
    "runtime": {
        "max_data_ckpt_nums": "set runtime.save_keep_last instead, the number of checkpoints "
        "kept here (default 3; 0 keeps all, as ChatLearn does without max_data_ckpt_nums)",
        # ChatLearn's configs carry it (`query_key: ${query_key:query}`) but none of its code
        # reads it; written here to name the data's prompt field, it changed nothing, silently
        "query_key": "the ready-made modules (chatlearn.hf) read each record's prompt from its "
        "'prompt' key whatever query_key says (ChatLearn's entry scripts do not read it either); "
        "rename the field in the data to prompt, and remove query_key",
    },
}
# ChatLearn's per-model LoRA switch; ours is in model_args (see chatlearn.hf.lora).
LORA_MODEL_KEYS = ("lora", "enable_lora")

# Top-level sections of a config file; `rlhf` is ChatLearn's deprecated name of `runtime`.
SECTIONS = ("runtime_env", "models", "runtime")
