"""CPU compatibility layer for megatron-core: lets a megatron GPTModel train on CPU with gloo.

megatron-core (measured on 0.16.1) is written for CUDA: a few paths that a small GPTModel on
the local layer spec goes through call CUDA-only functions even when every tensor is on the CPU.
This module replaces exactly those functions, and only when CUDA is not available:

| patch                  | replaces (megatron-core)                                        |
|------------------------|-----------------------------------------------------------------|
| `rng_tracker`          | `tensor_parallel.random.CudaRNGStatesTracker` (add / fork)      |
| `global_memory_buffer` | `utils.GlobalMemoryBuffer.get_tensor`                           |
| `causal_mask`          | `transformer.utils.get_default_causal_mask` and                 |
|                        | `get_sliding_window_causal_mask` (+ their fused_softmax imports)|
| `rotary_embedding`     | `models.common.embeddings.rotary_pos_embedding`                 |
|                        | `.RotaryEmbedding.get_emb`                                      |
| `tied_embedding_sync`  | `models.common.language_module.language_module.LanguageModule`  |
|                        | `.setup_embeddings_and_output_layer`                            |

Known CUDA-only paths left alone because this project's models never take them:
`tensor_parallel.mappings` gathers (`parallel_output=False`, sequence parallelism) and
megatron-core's own DistributedDataParallel (`chatlearn.megatron.dpo` uses torch's DDP instead).

Two more things are configuration, not patches: `cpu_config_overrides()` gives the
TransformerConfig fields a CPU model needs (`use_cpu_initialization=True`, which also makes the
initial weights independent of the tensor-parallel size), and callers pass an explicit attention
mask (`chatlearn.megatron.gpt.causal_attention_mask`) so no default mask has to be built.

On a machine with CUDA `apply_cpu_compat()` patches nothing and returns `[]`: megatron's own code
runs unchanged. Every patch is idempotent (a second call finds the replacement in place and does
nothing) and each replacement carries `__chatlearn_cpu_compat__` so it can be recognised.

Usage (what `chatlearn.megatron.parallel.initialize_parallel_state` does before anything else):

    from chatlearn.megatron.compat import apply_cpu_compat
    applied = apply_cpu_compat()       # [CompatPatch(name="rng_tracker", ...), ...] on CPU
"""

from __future__ import annotations

import contextlib
import importlib
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch

from chatlearn.megatron.requirement import megatron_version, require_megatron

__all__ = [
    "CompatPatch",
    "applied_patches",
    "apply_cpu_compat",
    "cpu_compat_needed",
    "cpu_config_overrides",
    "PATCHES",
    "TESTED_MEGATRON_VERSIONS",
]

_MARK = "__chatlearn_cpu_compat__"
TESTED_MEGATRON_VERSIONS = "0.16.x"  # the pyproject extra pins this range


@dataclass(frozen=True, slots=True)
class CompatPatch:
    """One redirection of a CUDA-only megatron-core function to a CPU implementation."""

    name: str
    replaces: tuple[str, ...]  # dotted paths of the megatron objects that get replaced
    reason: str
    install: Callable[[], None]  # idempotent


def cpu_compat_needed() -> bool:
    """The layer applies exactly when torch cannot use CUDA."""
    return not torch.cuda.is_available()


def cpu_config_overrides() -> dict[str, Any]:
    """TransformerConfig fields a CPU run needs (empty when CUDA is available)."""
    if not cpu_compat_needed():
        return {}
    # Without it every parameter is allocated with device=torch.cuda.current_device(). With it
    # the full (unsplit) weight is initialized from the CPU generator and then split, so the
    # initial model is the same whatever the tensor-parallel size.
    return {"use_cpu_initialization": True}


def apply_cpu_compat() -> list[CompatPatch]:
    """Install every patch when CUDA is unavailable; return the patches in effect.

    Returns `[]` (and changes nothing) when CUDA is available. Calling it again is harmless.
    """
    if not cpu_compat_needed():
        return []
    require_megatron("the megatron CPU compatibility layer")
    for patch in PATCHES:
        try:
            patch.install()
        except (ImportError, AttributeError) as exc:
            # A megatron-core release that moved or renamed what a patch replaces.
            raise RuntimeError(
                f"CPU compatibility patch {patch.name!r} cannot replace "
                f"{', '.join(patch.replaces)} in megatron-core {megatron_version()} ({exc}); "
                f"the layer is written for megatron-core {TESTED_MEGATRON_VERSIONS}"
            ) from exc
    return applied_patches()


def applied_patches() -> list[CompatPatch]:
    """The patches whose replacements are currently installed in megatron-core."""
    return [patch for patch in PATCHES if all(_is_patched(path) for path in patch.replaces)]


# ---------------------------------------------------------------------------------------------
# Helpers: resolve and replace a dotted attribute


def _resolve(path: str) -> tuple[Any, str]:
    """'pkg.module.Class.attr' -> (owner object, 'attr'), importing the longest module prefix."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:-1]:
            owner = getattr(owner, attr)
        return owner, parts[-1]
    raise ImportError(f"cannot resolve {path}")


def _is_patched(path: str) -> bool:
    owner, attr = _resolve(path)
    return bool(getattr(getattr(owner, attr, None), _MARK, False))


def _replace(path: str, replacement: Any) -> None:
    owner, attr = _resolve(path)
    if getattr(getattr(owner, attr, None), _MARK, False):
        return  # already ours: idempotent
    setattr(replacement, _MARK, True)
    setattr(owner, attr, replacement)


# ---------------------------------------------------------------------------------------------
# rng_tracker: megatron keeps named RNG states (data-parallel, model-parallel, expert) and swaps
# them into the CUDA generator with torch.cuda.get_rng_state / _set_cuda_rng_state. On CPU the
# same bookkeeping is done with the CPU default generator.

_RNG_TRACKER = "megatron.core.tensor_parallel.random.CudaRNGStatesTracker"


def _make_cpu_rng_tracker_class() -> type:
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    base = random.CudaRNGStatesTracker
    default_name = random._MODEL_PARALLEL_RNG_TRACKER_NAME

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """megatron's RNG-state tracker on torch's CPU default generator."""

        _current_state_name: str  # set by the base class's reset()

        def __init__(self, use_cudagraphable_rng: bool = False, **kwargs: Any) -> None:
            if use_cudagraphable_rng:
                raise ValueError("CUDA-graph-safe RNG states need CUDA; set it to False on CPU")
            super().__init__(use_cudagraphable_rng=False, **kwargs)

        def add(self, name: str, seed: int) -> None:
            # Same checks as megatron; the state comes from a private generator so that adding
            # a state does not disturb the default generator.
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name: str = default_name) -> Iterator[None]:
            # megatron's fork also warns when the *CPU* state changed inside the fork; on CPU
            # the forked state is the CPU state, so that warning would fire on every dropout.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(
                        f"current state name {self._current_state_name} is not the same as "
                        f"the desired state name {name}."
                    )
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _install_rng_tracker() -> None:
    if _is_patched(_RNG_TRACKER):
        return
    _replace(_RNG_TRACKER, _make_cpu_rng_tracker_class())
    # A tracker created before the patch is a CUDA one: drop it so the next
    # get_cuda_rng_tracker() / model_parallel_cuda_manual_seed() builds a CPU tracker.
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random.initialize_rng_tracker(force_reset=True)


# ---------------------------------------------------------------------------------------------
# global_memory_buffer: the core-attention matmul buffer (and the sequence-parallel gather
# buffers) are allocated with device=torch.cuda.current_device().

_MEMORY_BUFFER = "megatron.core.utils.GlobalMemoryBuffer.get_tensor"


def _cpu_get_tensor(
    self: Any,
    tensor_shape: Any,
    dtype: torch.dtype,
    name: str,
    mem_alloc_context: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """megatron's GlobalMemoryBuffer.get_tensor, allocating on the CPU."""
    required_len = reduce(operator.mul, tensor_shape, 1)
    buffer = self.buffer.get((name, dtype))
    if buffer is None or buffer.numel() < required_len:
        with (mem_alloc_context or contextlib.nullcontext)():
            buffer = torch.empty(required_len, dtype=dtype, device="cpu", requires_grad=False)
        self.buffer[(name, dtype)] = buffer
    return buffer[0:required_len].view(*tensor_shape)


def _install_memory_buffer() -> None:
    _replace(_MEMORY_BUFFER, _cpu_get_tensor)


# ---------------------------------------------------------------------------------------------
# causal_mask: the default masks are built with device="cuda" when no mask is passed.

_CAUSAL_MASKS = (
    "megatron.core.transformer.utils.get_default_causal_mask",
    "megatron.core.fusions.fused_softmax.get_default_causal_mask",
    "megatron.core.transformer.utils.get_sliding_window_causal_mask",
    "megatron.core.fusions.fused_softmax.get_sliding_window_causal_mask",
)


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """megatron's get_default_causal_mask on the CPU (True = masked)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size: Any) -> torch.Tensor:
    """megatron's get_sliding_window_causal_mask on the CPU (True = masked)."""
    ones = torch.ones(sq, skv, dtype=torch.bool)
    upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
    return ~torch.tril(upper, diagonal=skv - sq + window_size[1])


def _install_causal_mask() -> None:
    # fused_softmax imported the functions by name, so both bindings are replaced.
    for path in _CAUSAL_MASKS:
        if path.endswith("get_default_causal_mask"):
            _replace(path, _cpu_default_causal_mask)
        else:
            _replace(path, _cpu_sliding_window_causal_mask)


# ---------------------------------------------------------------------------------------------
# rotary_embedding: get_emb moves inv_freq "to GPU once at the first micro-batch" with
# torch.cuda.current_device(), even when use_cpu_initialization put it on the CPU on purpose.

_ROTARY = "megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding.get_emb"


def _cpu_rotary_get_emb(self: Any, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    """megatron's RotaryEmbedding.get_emb without the move to the current CUDA device."""
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if not self.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]  # [seq, 1, 1, dim]


def _install_rotary() -> None:
    _replace(_ROTARY, _cpu_rotary_get_emb)


# ---------------------------------------------------------------------------------------------
# tied_embedding_sync: with tied embeddings and several pipeline stages, the last stage's copy of
# the embedding is made equal to the first stage's by an all-reduce over the embedding group,
# after `weight.data = weight.data.cuda()`. The replacement runs megatron's method with the
# all-reduce step masked (its only call of `_is_in_embd_group`), then does the all-reduce where
# the weight is.

_LANGUAGE_MODULE = "megatron.core.models.common.language_module.language_module.LanguageModule"
_SETUP_EMBEDDINGS = _LANGUAGE_MODULE + ".setup_embeddings_and_output_layer"


def _make_cpu_setup_embeddings() -> Callable[[Any], None]:
    owner, attr = _resolve(_SETUP_EMBEDDINGS)
    original = getattr(owner, attr)

    def setup_embeddings_and_output_layer(self: Any) -> None:
        """megatron's setup_embeddings_and_output_layer, all-reducing the tied copy in place."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        in_group = distributed and self._is_in_embd_group()
        self.__dict__["_is_in_embd_group"] = lambda: False  # shadows the method during the call
        try:
            original(self)
        finally:
            del self.__dict__["_is_in_embd_group"]
        if in_group:
            weight = self.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(weight.data, group=self.embd_group)

    return setup_embeddings_and_output_layer


def _install_setup_embeddings() -> None:
    if _is_patched(_SETUP_EMBEDDINGS):
        return
    _replace(_SETUP_EMBEDDINGS, _make_cpu_setup_embeddings())


PATCHES: tuple[CompatPatch, ...] = (
    CompatPatch(
        name="rng_tracker",
        replaces=(_RNG_TRACKER,),
        reason="its add()/fork() read and write the CUDA generator (torch.cuda.get_rng_state, "
        "_set_cuda_rng_state); model_parallel_cuda_manual_seed and every tensor-parallel "
        "dropout go through it",
        install=_install_rng_tracker,
    ),
    CompatPatch(
        name="global_memory_buffer",
        replaces=(_MEMORY_BUFFER,),
        reason="allocates with device=torch.cuda.current_device(); core attention takes its "
        "matmul buffer from it on every forward",
        install=_install_memory_buffer,
    ),
    CompatPatch(
        name="causal_mask",
        replaces=_CAUSAL_MASKS,
        reason='builds the mask with device="cuda" when attention gets no explicit mask',
        install=_install_causal_mask,
    ),
    CompatPatch(
        name="rotary_embedding",
        replaces=(_ROTARY,),
        reason="moves inv_freq to torch.cuda.current_device() on the first forward",
        install=_install_rotary,
    ),
    CompatPatch(
        name="tied_embedding_sync",
        replaces=(_SETUP_EMBEDDINGS,),
        reason="moves the tied output weight to CUDA before the all-reduce that copies the "
        "embedding to the last pipeline stage (tied embeddings, pipeline size > 1)",
        install=_install_setup_embeddings,
    ),
)
