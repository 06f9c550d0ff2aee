"""Types of the `model_args` keys that `chatlearn.hf`'s ready-made modules read.

A model's `model_args` (its `model_config_file` and inline `model_args:`) belong to the module,
so most keys are the module's business. The keys below are read as numbers, booleans or strings
by `chatlearn.hf.modules`, and mean the same in any module that uses the name, so
`Config.validate()` checks them for every model, in the coordinator before any actor starts
(`learning_rate: fast` would otherwise fail in `setup()` with "could not convert string to
float", naming neither file nor key). Only types and signs are checked here; what only the HF
modules require (dtype names, loss types, the Llama config as a whole) is checked by
`chatlearn.hf.model.validate_model_args` when the module builds its model.

`model_config` (the config of a model built from scratch, as in `examples/dpo/model.yaml`) must be
a mapping whose sizes are whole numbers ≥ 1, with `num_attention_heads` dividing `hidden_size`
and `num_key_value_heads` dividing `num_attention_heads` (the attention heads split the hidden
state; grouped-query heads share key/value heads) — true of every transformer config using the
names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError, ValueProblem
from .schema import KeySpec, check_value, read_quoted_number

Locate = Callable[[str, str, str], ConfigError]  # (key path, problem, fix) -> error


# null is allowed everywhere: the modules read a null key as absent (their default)
def _number(default: Any, minimum: float | None = None, **kw: Any) -> KeySpec:
    return KeySpec("number", default, optional=True, min_value=minimum, **kw)


def _int(default: Any, minimum: int | None = None, **kw: Any) -> KeySpec:
    return KeySpec("int", default, optional=True, min_value=minimum, **kw)


def _kind(kind: str, default: Any, **kw: Any) -> KeySpec:
    return KeySpec(kind, default, optional=True, **kw)


MODEL_ARG_KEYS: dict[str, KeySpec] = {
    "model_path": _kind("str", None, example="/path/to/checkpoint"),
    "seed": _int(0),
    "dtype": _kind("str", None, example="float32"),
    "max_length": _int(512, 2),
    "max_prompt_length": _int(None, 1, example=256),
    "min_prompt_length": _int(None, 0, example=64),
    "prompt_template": _kind("str", "{prompt}"),
    "beta": _number(0.1, 0, min_inclusive=False),
    "loss_type": _kind("str", "sigmoid"),
    "label_smoothing": _number(0.0, 0, max_value=0.5),
    "rpo_alpha": _number(None, 0, example=1.0),
    "learning_rate": _number(1e-6, 0, example=1e-5),
    "weight_decay": _number(0.0, 0),
    "adam_eps": _number(1e-8, 0, min_inclusive=False),
    "warmup_steps": _int(0, 0),
    "warmup_ratio": _number(0.0, 0, max_value=1),
    "min_lr_ratio": _number(0.0, 0, max_value=1),
    "max_grad_norm": _number(1.0, 0),
    "gradient_checkpointing": _kind("bool", False),
    "disable_dropout": _kind("bool", True),
    "save_hf_model": _kind("bool", True),
    "export_dtype": _kind("str", None, example="bfloat16"),
    "logps_chunk_size": _int(512, 0),
    # layouts (chatlearn/hf/parallel.py, lora.py, packing.py); mixed_precision and lora have
    # checks of their own below (YAML reads mixed_precision's `no` as false)
    "parallel": _kind("str", "ddp", choices=("ddp", "fsdp", "none")),
    "hsdp": _kind("bool", True),
    "enable_lora": _kind("bool", False),
    "packing": _kind("bool", None, example=True),
    "prefix_sharing": _kind("bool", None, example=True),
    "load_once": _kind("bool", True),
    "load_in_turns": _kind("bool", None, example=True),
    "max_tokens_per_row": _int(None, 1, example=4096),
    "packed_attention": _kind("str", None, choices=("segments", "mask")),
    "max_tokens_per_micro_batch": _int(None, 1, example=8192),
    "malloc_mmap_threshold": _int(0, 0, max_value=32 * 1024 * 1024, example=131072),
}

# Every key the ready-made HF modules read: those above and the ones with checks of their own.
HF_MODULE_KEYS = frozenset(
    [*MODEL_ARG_KEYS, "adam_betas", "mixed_precision", "lora", "merge_lora", "model_config"]
)


# The model_args keys of ChatLearn's DeepSpeed DPO example (its examples/huggingface configs),
# to which `chatlearn.DeepSpeedModule`'s error sends users of these modules: each with what these
# modules read instead. A config brought over unchanged trained as if they were not there: its
# prompts without their template, and (`pretrain_or_model`) a small model built from scratch in
# place of the checkpoint, which is an error (`chatlearn.hf.model.validate_model_args`).
CHATLEARN_DEEPSPEED_KEYS: dict[str, str] = {
    "pretrain_or_model": "model_path",
    "max_len": "max_length",
    "prompt_max_len": "max_prompt_length",
    "input_template": "prompt_template (its {} written {prompt})",
    "bf16": "mixed_precision: bf16 (or dtype: bfloat16)",
    "l2": "weight_decay",
    "zero_stage": "parallel: fsdp (ZeRO-3's sharding)",
}
# Those keys set off (false, 0): what the modules do unless told otherwise, so the key to write
# instead would turn on what the example had off (bf16: false -> mixed_precision: bf16)
CHATLEARN_DEEPSPEED_OFF: dict[str, str] = {
    "bf16": "float32 compute is the default here (mixed_precision: no)",
    "zero_stage": "ZeRO stage 0 is plain data parallelism, the default here (parallel: ddp)",
}


def near_misses(model_args: Mapping[str, Any]) -> dict[str, str]:
    """Keys of `model_args` that the HF modules do not read but that are one typo away from one
    they do (`learnig_rate`: `learning_rate`), each with that key. A module's own keys are its
    business (a subclass reads what it likes), so only near misses are said: a typo otherwise
    left the default in place (lr 1e-6 instead of the 5e-4 written) without a word."""
    found = {}
    for key in model_args:
        if isinstance(key, str) and key not in HF_MODULE_KEYS | CHATLEARN_DEEPSPEED_KEYS.keys():
            near = difflib.get_close_matches(key, HF_MODULE_KEYS, n=1, cutoff=0.8)
            if near:
                found[key] = near[0]
    return found


# Sizes of `model_config`, whole numbers ≥ 1 where given.
_SIZE = KeySpec("int", None, min_value=1, example=8)
MODEL_CONFIG_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "vocab_size",
    "head_dim",
)


def check_model_args(model_args: Mapping[str, Any], prefix: str, error: Locate) -> None:
    """Raise the ConfigError of the first mistyped key of `model_args` (key paths `prefix.key`)."""
    for key, spec in MODEL_ARG_KEYS.items():
        if key not in model_args:
            continue
        try:
            check_value(key, spec, model_args[key])
        except ValueProblem as problem:
            raise error(f"{prefix}.{key}", problem.problem, problem.fix) from None
    if "adam_betas" in model_args:
        _check_betas(model_args["adam_betas"], f"{prefix}.adam_betas", error)
    try:
        mixed_precision(model_args.get("mixed_precision"))
    except ValueProblem as problem:
        raise error(f"{prefix}.mixed_precision", problem.problem, problem.fix) from None
    lora_request(model_args, prefix, error)
    _check_data_args(model_args, prefix, error)
    model_config = model_args.get("model_config")
    if model_config is not None:
        check_model_config(model_config, f"{prefix}.model_config", error)


MIXED_PRECISIONS = ("no", "bf16", "fp16")
_PRECISION_NAMES = {"false": "no", "none": "no", "bfloat16": "bf16", "float16": "fp16"}


def mixed_precision(value: Any) -> str:
    """``mixed_precision`` as one of `MIXED_PRECISIONS` (YAML reads a bare ``no`` as false; the
    dtype names are accepted too), or a `ValueProblem`."""
    name = str(value or "no").strip().lower()
    name = _PRECISION_NAMES.get(name, name)
    if name not in MIXED_PRECISIONS:
        raise ValueProblem(
            f"must be one of {', '.join(MIXED_PRECISIONS)}; got {value!r}",
            "set mixed_precision: bf16 (or no; fp16 needs CUDA)",
        )
    return name


LORA_DEFAULTS: dict[str, Any] = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": "all-linear",
}
# ChatLearn's names for two of them; its switch `enable_lora` may sit in the section too
LORA_ALIASES = {"lora_dim": "r", "lora_dropout": "dropout"}
_LORA_CHECKS = {
    "r": KeySpec("int", None, min_value=1, example=16),
    "alpha": KeySpec("number", None, min_value=0, min_inclusive=False, example=32),
    "dropout": KeySpec("number", None, min_value=0, max_value=0.99, example=0.05),
}


def lora_request(
    model_args: Mapping[str, Any], prefix: str, error: Locate
) -> dict[str, Any] | None:
    """The LoRA settings ``model_args`` ask for, with the defaults filled in, or None without
    LoRA: a ``lora`` section (``lora: {}``: the defaults), or ``enable_lora: true`` for the
    defaults; ``enable_lora: false`` (beside the section or in it) turns it off. A mistake is
    the ConfigError of its key."""
    section = model_args.get("lora")
    path = f"{prefix}.lora"
    if section is not None and not isinstance(section, Mapping):
        raise error(
            path,
            f"expected a mapping like {{r: 16, alpha: 32}}, got {section!r}",
            "write the settings under lora:, or set enable_lora: true for the defaults",
        )
    given = section is not None  # `lora: {}` asks for the defaults (it trained the whole model)
    section = dict(section or {})
    enabled = section.pop("enable_lora", model_args.get("enable_lora"))
    if enabled is False or not (given or enabled):
        return None
    settings = dict(LORA_DEFAULTS)
    for key, value in section.items():
        name = LORA_ALIASES.get(key, key)
        if name not in LORA_DEFAULTS:
            known = ", ".join([*LORA_DEFAULTS, *LORA_ALIASES])
            raise error(f"{path}.{key}", "not a LoRA setting here", f"use {known}")
        settings[name] = value
    for name, spec in _LORA_CHECKS.items():
        # `r: "16"` read as the number it is, as every numeric key of a config file
        value = read_quoted_number(spec, settings[name])
        if spec.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)  # `r: 1.6e1`: a float in YAML, a whole number
        try:
            settings[name] = check_value(name, spec, value)
        except ValueProblem as problem:
            raise error(f"{path}.{name}", problem.problem, problem.fix) from None
    targets = settings["target_modules"]
    if not (
        isinstance(targets, str)
        or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise error(
            f"{path}.target_modules",
            f"expected a name or a list of names, got {targets!r}",
            "write target_modules: all-linear, or a list like [q_proj, v_proj]",
        )
    return settings


def _check_data_args(model_args: Mapping[str, Any], prefix: str, error: Locate) -> None:
    """The data keys chatlearn/hf/data.py's PairTokenizer needs together: a `prompt_template`
    with its ``{prompt}`` and a `min_prompt_length` below `max_length` (found at the first
    build_dataset otherwise, after both models had loaded)."""
    template = model_args.get("prompt_template")
    if isinstance(template, str) and "{prompt}" not in template:
        raise error(
            f"{prefix}.prompt_template",
            f"{template!r} has no {{prompt}}, where each record's prompt goes",
            'write {prompt} where the prompt goes, e.g. "Question: {prompt}\\nAnswer:"',
        )
    max_length = model_args.get("max_length", MODEL_ARG_KEYS["max_length"].default)
    least = model_args.get("min_prompt_length")
    if isinstance(least, int) and isinstance(max_length, int) and least >= max_length:
        raise error(
            f"{prefix}.min_prompt_length",
            f"{least} is not below max_length ({max_length}): no room would be left for a response",
            f"set min_prompt_length below {max_length} (default max_length // 2)",
        )


# ChatLearn's LoraConfig (`models.<name>.lora`) in these terms: its update is
# lora_scaling / lora_dim · B @ A, peft's lora_alpha / r · B @ A, so alpha is lora_scaling
CHATLEARN_LORA_KEYS = {"lora_dim": "r", "lora_dropout": "dropout", "lora_scaling": "alpha"}


def chatlearn_lora_request(
    section: Mapping[str, Any] | None, prefix: str, error: Locate
) -> dict[str, Any] | None:
    """The LoRA settings of ChatLearn's per-model section (``models.<name>.lora``, its defaults
    filled in) when its ``enable_lora`` is true, else None: ``lora_dim`` → r, ``lora_dropout`` →
    dropout, ``lora_scaling`` → alpha, every linear layer adapted."""
    if not isinstance(section, Mapping) or not section.get("enable_lora"):
        return None
    given = {
        ours: section[theirs] for theirs, ours in CHATLEARN_LORA_KEYS.items() if theirs in section
    }
    return lora_request({"lora": given}, prefix, error)


def _check_betas(value: Any, path: str, error: Locate) -> None:
    fix = "write two numbers in [0, 1), e.g. adam_betas: [0.9, 0.999]"
    if value is None:
        return
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise error(path, f"expected a list of two numbers, got {value!r}", fix)
    for beta in value:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
            raise error(path, f"each beta must be a number in [0, 1), got {beta!r}", fix)


def check_model_config(model_config: Any, path: str, error: Locate) -> None:
    """Sizes of a model config: whole numbers ≥ 1, heads dividing the hidden size."""
    if not isinstance(model_config, Mapping):
        raise error(
            path,
            f"expected a mapping of config keys, got {type(model_config).__name__}",
            "write `model_config:` followed by indented keys such as hidden_size: 128",
        )
    for key in MODEL_CONFIG_SIZES:
        if key in model_config:
            try:
                check_value(key, _SIZE, model_config[key])
            except ValueProblem as problem:
                raise error(f"{path}.{key}", problem.problem, problem.fix) from None
    check_heads(model_config, path, error)


def check_heads(values: Mapping[str, Any], path: str, error: Locate) -> None:
    """`num_attention_heads` divides `hidden_size`, `num_key_value_heads` divides the heads."""
    hidden = values.get("hidden_size")
    heads = values.get("num_attention_heads")
    kv_heads = values.get("num_key_value_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        raise error(
            f"{path}.num_attention_heads",
            f"{heads} heads do not divide hidden_size ({hidden})",
            f"set num_attention_heads to a divisor of {hidden}, "
            f"e.g. {_divisor_near(hidden, heads)}, or change hidden_size",
        )
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads:
        raise error(
            f"{path}.num_key_value_heads",
            f"{kv_heads} key/value heads do not divide num_attention_heads ({heads})",
            f"set num_key_value_heads to a divisor of {heads}, "
            f"e.g. {_divisor_near(heads, kv_heads)}",
        )


def _divisor_near(number: int, wanted: int) -> int:
    """The divisor of `number` closest to `wanted` (the smaller one on a tie)."""
    divisors = [d for d in range(1, number + 1) if number % d == 0]
    return min(divisors, key=lambda d: (abs(d - wanted), d))
