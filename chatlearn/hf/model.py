"""Causal LMs: a small Llama-style model built from a config (random init, seeded) or a local
checkpoint directory loaded with `from_pretrained` (never a download).

    model = build_causal_lm({"hidden_size": 192, "num_hidden_layers": 3}, seed=0)
    model = load_causal_lm("/path/to/checkpoint", dtype="bfloat16")
    model = causal_lm_from_args(model_args, tokenizer)   # either, from a model's config

transformers is imported only when a model is built. `validate_model_args` (at the end) turns
model arguments these modules cannot use into a one-line `ConfigError` naming the key and file.
`tied_gradient_in_place(model)` lets a trainable model with tied input and output embeddings sum
the two gradients of that weight without a third copy of it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from chatlearn.algorithms.logps import modes_kept
from chatlearn.config.errors import ConfigError
from chatlearn.hf.tokenizer import BYTE_VOCAB_SIZE

# The default small model: about 1.4M parameters with the byte-level vocabulary; a DPO step on
# 32 short pairs takes a few tens of milliseconds on two CPU cores.
SMALL_LLAMA: dict[str, Any] = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bfloat16"`, `"bf16"`, `torch.bfloat16`, ... → a torch dtype; None/"auto" → None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def build_causal_lm(
    config: Mapping[str, Any] | None = None,
    *,
    vocab_size: int = BYTE_VOCAB_SIZE,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    empty: bool = False,
) -> Any:
    """A randomly initialised `LlamaForCausalLM`; `config` overrides `SMALL_LLAMA` keys.

    Initialisation is seeded from `seed` without touching the global RNG state, so the reference
    and the trainer build identical weights in different processes. `empty`: on the meta device
    (shapes and dtypes, no memory; its weights come from elsewhere: chatlearn/hf/load_once.py).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    values = {**SMALL_LLAMA, **dict(config or {})}
    values.setdefault("vocab_size", vocab_size)
    for key, value in (
        ("pad_token_id", pad_token_id),
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
    ):
        if value is not None:
            values.setdefault(key, value)
    llama_config = LlamaConfig(**values)
    with torch.random.fork_rng(devices=[]), _meta_device(empty):
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(llama_config)
    resolved = resolve_dtype(dtype)
    if resolved is not None:
        model = model.to(resolved)
    return model


def load_causal_lm(
    model_path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    empty: bool = False,
    device: torch.device | None = None,
) -> Any:
    """`AutoModelForCausalLM.from_pretrained` on a local directory, offline. `empty`: the model
    its config describes, on the meta device (no weights read; `dtype`, else float32: the
    checkpoint's own dtype is known only once its weights are read). `device`: each weight read
    straight onto it (`device_map`), where this transformers can (`loads_onto_device`); else
    the model is in host memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_path).expanduser()  # ~ as in the config's other paths
    if not path.is_dir():
        raise ValueError(f"model_path {str(model_path)!r} is not a directory (no downloads here)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    resolved = resolve_dtype(dtype)
    if resolved is not None:
        kwargs[dtype_keyword()] = resolved
    if device is not None and loads_onto_device():
        kwargs["device_map"] = device
    try:
        if empty:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            with _meta_device(True):
                return AutoModelForCausalLM.from_config(config, **{dtype_keyword(): resolved})
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as failed:
        raise _unloadable(path, failed) from failed
    except Exception as failed:  # safetensors' SafetensorError: a truncated or corrupt file
        if type(failed).__name__ != "SafetensorError":
            raise
        raise _unloadable(path, failed) from failed


def dtype_keyword() -> str:
    """The name `from_pretrained`/`from_config` take a dtype by: `dtype` since transformers 4.56,
    `torch_dtype` before (the `hf` extra allows 4.40 on, where `dtype=` reached the model's
    constructor and failed there, naming no key)."""
    import re

    import transformers

    found = re.match(r"(\d+)\.(\d+)", str(transformers.__version__))
    version = (int(found[1]), int(found[2])) if found else (5, 0)
    return "dtype" if version >= (4, 56) else "torch_dtype"


def loads_onto_device() -> bool:
    """Whether `from_pretrained` takes a `device_map` here: with accelerate, at the version this
    transformers asks for (4.x and 5 alike: without it a `device_map` is from_pretrained's error
    "requires `accelerate`", and every checkpoint failed to load on CUDA). The weights then go
    from the files (memory-mapped safetensors) to the device one by one: the host holds no copy
    of its own, only the page cache, which every process of the host reading the same checkpoint
    shares (8 replicas of a 7B reference on one host held 8 copies of it in host memory, 112 GB
    in fp32, while they loaded)."""
    from transformers.utils import is_accelerate_available

    return bool(is_accelerate_available())


def _unloadable(path: Path, failed: BaseException) -> ConfigError:
    """The ConfigError of ``model_args.model_path`` for a directory `from_pretrained` failed on
    (an architecture this transformers lacks, custom code, missing or broken weight files): its
    own message was a traceback of 40-120 lines from the actor, naming no key."""
    reason = " ".join(str(failed).split()) or type(failed).__name__
    fix = "check that AutoModelForCausalLM.from_pretrained(model_path) loads it"
    try:
        auto_map = json.loads((path / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        auto_map = None
    if auto_map and isinstance(failed, ValueError):  # transformers': pass trust_remote_code
        reason = (
            "its config.json maps the model to code of its own (auto_map), which is never run "
            "here (no trust_remote_code)"
        )
        fix = "use a checkpoint of an architecture transformers has (save_pretrained of it)"
    return ConfigError(
        f"the model in {str(path)!r} does not load: {reason[:500]}",
        key="model_args.model_path",
        fix=fix,
    )


def causal_lm_from_args(
    model_args: Mapping[str, Any],
    tokenizer: Any,
    empty: bool = False,
    device: torch.device | None = None,
) -> Any:
    """The model a module's config asks for (`empty`: on the meta device; `device`: a checkpoint's
    weights read onto it where `load_causal_lm` can).

    Keys read: `model_path` (a local checkpoint; when set the other keys but `dtype` are ignored),
    `model_config` (overrides of `SMALL_LLAMA`), `seed` (default 0), `dtype` (default float32).
    """
    validate_model_args(model_args)
    check_checkpoint_key(model_args)
    dtype = model_args.get("dtype")
    model_path = model_args.get("model_path")
    if model_path:
        return load_causal_lm(model_path, dtype=dtype, empty=empty, device=device)
    return build_causal_lm(
        model_args.get("model_config") or {},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=int(model_args.get("seed", 0) or 0),
        dtype=dtype,
        empty=empty,
    )


def _meta_device(empty: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.device("meta") if empty else contextlib.nullcontext()


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- tied embeddings: their two gradients summed in place ------------------------------------------
class _LinearFreshWeightGrad(torch.autograd.Function):
    """`F.linear(x, weight)` (no bias) whose weight gradient is a new tensor of the weight's layout.

    `F.linear`'s backward returns the weight gradient as a transposed view of a transposed
    product; autograd will not add into a view in place, so when the same weight also gets the
    embedding's gradient (tied embeddings), it sums the two into a third weight-sized tensor
    (0.5 GiB for Qwen2.5-0.5B's 152k × 896 head). Here the gradient is the same product
    (`gradᵀ @ x`, the same kernel on the same operands: bit-identical values) as a plain tensor,
    which autograd then accumulates the embedding's gradient into.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            flat_grad = grad.reshape(-1, grad.shape[-1])
            grad_weight = flat_grad.t().mm(x.reshape(-1, x.shape[-1]))
        return grad_x, grad_weight


class TiedHeadLinear(torch.nn.Linear):
    """An output head whose weight is the input embedding's (set by `tied_gradient_in_place`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        plain = (
            self.bias is not None
            or not torch.is_grad_enabled()
            or not self.weight.requires_grad
            or torch.is_autocast_enabled(input.device.type)  # autocast casts inside F.linear
        )
        if plain:
            return super().forward(input)
        out: torch.Tensor = _LinearFreshWeightGrad.apply(input, self.weight)
        return out


def tied_gradient_in_place(model: Any) -> bool:
    """Make a trainable model with tied embeddings accumulate that weight's gradient in place.

    With tied embeddings the weight gets two gradients in one backward: the output head's (dense,
    first) and the embedding's (dense, at the end). Autograd adds the second into the first in
    place only when the first is a plain tensor, which `F.linear`'s is not; the head's class
    becomes `TiedHeadLinear` (same parameters, same outputs and gradients) so that it is. Saves
    one weight-sized buffer at the end of every backward. Returns whether the model was changed
    (False: embeddings not tied, head not a bias-free `nn.Linear`, or the weight frozen).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    if (
        type(head) is not torch.nn.Linear
        or head.bias is not None
        or embedding is None
        or head.weight is not getattr(embedding, "weight", None)
        or not head.weight.requires_grad
    ):
        return False
    head.__class__ = TiedHeadLinear
    return True


# -- validation of model args ----------------------------------------------------------------------
def check_checkpoint_key(model_args: Mapping[str, Any]) -> None:
    """A ConfigError for ``pretrain_or_model`` without ``model_path``: the key of the checkpoint
    in ChatLearn's DeepSpeed DPO example (`CHATLEARN_DEEPSPEED_KEYS`), where a model built from
    the args would be a small one from scratch, with nothing said. Checked where such a model
    is built (`causal_lm_from_args`), and by the modules' `check_args()` unless a subclass
    builds its model itself (and may read the key)."""
    if model_args.get("pretrain_or_model") and not model_args.get("model_path"):
        prefix, error = locate_model_args(model_args)
        raise error(
            f"{prefix}.pretrain_or_model",
            "ChatLearn's DeepSpeed key of the checkpoint, which the ready-made modules do not "
            "read: they would train a small model built from scratch instead",
            "rename it to model_path",
        )


def validate_model_args(model_args: Mapping[str, Any], files: bool = True) -> None:
    """Raise a ConfigError naming the key (and its file:line) of model args the HF modules reject.

    Run by the modules' `check_args()` in the coordinator before any process starts (with
    ``files`` false: the model's files are on its hosts, which may be other machines), and first
    by their `setup()` (and by `causal_lm_from_args`): the types of the common keys were checked
    by `Config.validate()` already (again here: model_args can be set in code);
    what only these modules require is checked here — dtype names, the DPO loss type, a
    model_path that is a checkpoint directory (with its config.json), and the attention heads
    of `model_config` over `SMALL_LLAMA`.
    """
    from chatlearn.algorithms.dpo import LOSS_TYPES
    from chatlearn.config.model_args import check_heads, check_model_args

    prefix, error = locate_model_args(model_args)
    check_model_args(model_args, prefix, error)
    dtype = model_args.get("dtype")
    if dtype is not None and str(dtype).lower().removeprefix("torch.") not in (*_DTYPES, "auto"):
        raise error(
            f"{prefix}.dtype", f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}, auto"
        )
    export_dtype = model_args.get("export_dtype")
    if export_dtype is not None and str(export_dtype).lower() not in _DTYPES:
        raise error(
            f"{prefix}.export_dtype",
            f"unknown dtype {export_dtype!r}",
            f"use one of {', '.join(_DTYPES)}, or null for the weights' own",
        )
    loss_type = model_args.get("loss_type")
    if loss_type is not None and loss_type not in LOSS_TYPES:
        raise error(
            f"{prefix}.loss_type",
            f"unknown loss type {loss_type!r}",
            f"use {', '.join(LOSS_TYPES)}",
        )
    model_path = model_args.get("model_path")
    if model_path and not files:
        return  # its config.json holds the heads
    if model_path:
        directory = Path(model_path).expanduser()
        if not directory.is_dir():
            raise error(
                f"{prefix}.model_path",
                f"{str(model_path)!r} is not a directory (checkpoints are never downloaded)",
                "give the local directory of a Hugging Face checkpoint, or remove model_path",
            )
        if not (directory / "config.json").is_file():
            if (directory / "adapter_config.json").is_file():
                raise error(
                    f"{prefix}.model_path",
                    f"{str(model_path)!r} holds a peft adapter (adapter_config.json), not a model",
                    "give the merged model's directory (the hf_model beside a chatlearn "
                    "checkpoint's adapter/ in a run's last checkpoint, or `chatlearn export "
                    "<checkpoint>`'s) or the base model's with lora set, or merge it first "
                    "(PeftModel.from_pretrained(base, path).merge_and_unload().save_pretrained)",
                )
            if (directory / "adapter" / "adapter_config.json").is_file():
                raise error(
                    f"{prefix}.model_path",
                    f"{str(model_path)!r} holds a LoRA adapter alone (adapter/), not the merged "
                    "model: a LoRA run's periodic checkpoint's hf_model",
                    "`chatlearn export <that checkpoint>` writes the merged model (to hf/ beside "
                    "the checkpoints), or give the base model's directory with lora set",
                )
            raise error(
                f"{prefix}.model_path",
                f"{str(model_path)!r} holds no Hugging Face checkpoint (no config.json)",
                "give the directory that save_pretrained wrote the model and its tokenizer "
                "to, or remove model_path",
            )
        return  # the checkpoint's own config is used
    merged = {**SMALL_LLAMA, **dict(model_args.get("model_config") or {})}
    check_heads(merged, f"{prefix}.model_config", error)


def disable_dropout(model: Any) -> int:
    """Dropout off in `model` (as TRL's DPO does by default): every ``nn.Dropout`` at p 0, and
    every rate kept as a number whose name says drop (OPT's ``dropout``, ``activation_dropout``
    and ``layerdrop``, which skips whole layers; GPT-2's ``attn_pdrop``, ...) at 0, on the
    modules and on their configs (which a model rebuilt from them would read). The policy
    trained with its checkpoint's dropout (GPT-2's 0.1) while the reference, in eval mode, had
    none: their log-probs differed from the first step (loss 0.6965, not ln 2, for equal
    weights), noise in every reward. A rate no name gives away is what `forwards_differ`
    finds. Returns how many were on."""
    import torch

    changed = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
        holders = [module, getattr(module, "config", None)]
        for holder in holders:
            if holder is None or id(holder) in seen:
                continue
            seen.add(id(holder))
            for name, value in list(vars(holder).items()):
                if hasattr(value, "to_dict") and hasattr(value, "model_type"):
                    holders.append(value)  # a composite config's text_config, ...
                elif "drop" in name and isinstance(value, float) and value > 0:
                    setattr(holder, name, 0.0)
                    changed += 1
    return changed


def embedding_rows(model: Any) -> int | None:
    """Rows of the model's input embeddings: the token ids it can take (its config's vocab_size
    may be more or fewer; len(tokenizer) often fewer, which is fine); None when unknown."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def forwards_differ(model: Any, num_tokens: int = 8) -> bool:
    """Whether two train-mode forwards of the same few tokens differ: dropout `disable_dropout`
    did not find (a hard-coded rate, a name without "drop"). No gradients; every module's mode
    and the random generators' states are restored, so a run draws the same numbers as without
    the check (the bit-identical resume depends on it). Runs on the model alone, no collectives
    (the same on every rank of a sharded model, which is wrapped later)."""
    import torch

    parameter = next(model.parameters(), None)
    if parameter is None:
        return False
    device = parameter.device
    ids = torch.arange(min(num_tokens, embedding_rows(model) or num_tokens), device=device)
    ids = ids.unsqueeze(0)
    devices = [device] if device.type == "cuda" else []
    with modes_kept(model), torch.random.fork_rng(devices=devices), torch.no_grad():
        model.train()
        first, second = (model(input_ids=ids, use_cache=False).logits for _ in range(2))
    return not torch.equal(first, second)


def model_arg(model_args: Mapping[str, Any], key: str) -> Any:
    """``key`` (one of `chatlearn.config.model_args.MODEL_ARG_KEYS`) of these model args, or
    its default; a mistyped or out-of-range value is the ConfigError `Config.validate()` gives,
    naming the key (and its file:line). For keys read before the model is built (and so before
    `validate_model_args`), e.g. ``malloc_mmap_threshold``."""
    from chatlearn.config.errors import ValueProblem
    from chatlearn.config.model_args import MODEL_ARG_KEYS
    from chatlearn.config.schema import check_value

    spec = MODEL_ARG_KEYS[key]
    try:
        value = check_value(key, spec, model_args.get(key))
    except ValueProblem as problem:
        prefix, error = locate_model_args(model_args)
        raise error(f"{prefix}.{key}", problem.problem, problem.fix) from None
    return spec.default if value is None else value


def near_miss_warnings(model_args: Mapping[str, Any]) -> list[str]:
    """One line per key of `model_args` that looks like a mistyped key of these modules
    (`chatlearn.config.model_args.near_misses`), or is a key of ChatLearn's DeepSpeed DPO
    example that these modules read under another name (`CHATLEARN_DEEPSPEED_KEYS`), with the
    file:line it was written at."""
    from chatlearn.config import get_args
    from chatlearn.config.model_args import (
        CHATLEARN_DEEPSPEED_KEYS,
        CHATLEARN_DEEPSPEED_OFF,
        near_misses,
    )

    misses = near_misses(model_args)
    theirs = [key for key in model_args if key in CHATLEARN_DEEPSPEED_KEYS]
    if not misses and not theirs:
        return []
    prefix, _ = locate_model_args(model_args)
    # located: get_args() answered there (model args given in code are not)
    config = get_args() if prefix != "model_args" else None
    lines = []
    for key in theirs:
        path = f"{prefix}.{key}"
        where = f"{config.where(path)}: " if config is not None else ""
        if key in CHATLEARN_DEEPSPEED_OFF and not model_args[key]:
            instead = f"{CHATLEARN_DEEPSPEED_OFF[key]}: remove it"
        else:
            instead = f"write {CHATLEARN_DEEPSPEED_KEYS[key]} instead"
        lines.append(
            f"{where}{path}: a key of ChatLearn's DeepSpeed DPO example, not read by the "
            f"ready-made modules; {instead}"
        )
    for key, near in misses.items():
        path = f"{prefix}.{key}"
        where = f"{config.where(path)}: " if config is not None else ""
        lines.append(
            f"{where}{path}: not a key the ready-made modules read, so {near} keeps its "
            f"default; did you mean {near}? (a key your own module reads is fine as it is)"
        )
    return lines


def locate_model_args(
    model_args: Mapping[str, Any],
) -> tuple[str, Callable[[str, str, str], ConfigError]]:
    """The key path of these model args in the process-wide config and its error factory."""
    from chatlearn.config import get_args

    try:
        config = get_args()
    except ConfigError:
        return "model_args", _unlocated
    for name, model in config.models.items():
        if model.model_args is model_args:  # what BaseModule.model_args hands out
            return f"models.{name}.model_args", config.error
    return "model_args", _unlocated


def _unlocated(key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(problem, key=key, fix=fix)


@contextlib.contextmanager
def located_errors(model_args: Mapping[str, Any]) -> Iterator[None]:
    """Code given a value rather than the model args (`load_tokenizer`, `Layout.wrap`) raises
    the unlocated ConfigError of ``model_args.<key>``; inside this, it becomes the ConfigError of
    these model args' key path (``models.<name>.model_args.<key>``) with its file:line."""
    try:
        yield
    except ConfigError as unlocated:
        key = unlocated.key or ""
        if unlocated.where is not None or not key.startswith("model_args."):
            raise
        prefix, error = locate_model_args(model_args)
        path = prefix + key.removeprefix("model_args")
        raise error(path, unlocated.problem, unlocated.fix or "") from None
