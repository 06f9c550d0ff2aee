"""When the padding-free and shared-prompt forwards are exact for a Hugging Face model.

`chatlearn.algorithms.packing` lays sequences out with restarting `position_ids` and a 4-D
block-diagonal causal `attention_mask`. That gives the log-probs of the padded forward only when
the model's attention applies the given mask as it is and its positions come from `position_ids`:

- qualifies: ``sdpa`` (boolean mask) and ``eager`` (additive mask) attention of the decoder-only
  models verified here (Llama, Qwen2, and their structural twins Mistral and Qwen3), every layer
  with full attention (no sliding window);
- segment attention (`use_segment_attention`, the modules' default for an ``sdpa`` model with
  Hugging Face transformers' attention registry, ``packed_attention: segments``): the model's
  attention becomes ``chatlearn_segments``, which is SDPA for every ordinary call and, for a
  packed forward (``packed_segments=`` among the model's arguments), runs each unit's branches
  through SDPA's fused causal kernel (`chatlearn.algorithms.packing.segment_attention`): no
  ``T²`` mask, no padding, attention work only within units. ``packed_attention: mask`` keeps
  the mask;
- falls back to padded rows: FlashAttention (it takes no 4-D mask; its varlen path could pack
  without prefix sharing on CUDA, not implemented), FlexAttention (takes a BlockMask, not a
  tensor), sliding-window layers (the 4-D mask would drop the window), ALiBi models, and model
  types not verified above.

    support = packing_support(model)       # PackingSupport(exact=True, reason="")
    options = packing_options(model_args, model, log=logger.info)  # may switch the attention
    concatenated_logps(network, batch, **options.kwargs())
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from chatlearn.algorithms.packing import SEGMENT_ATTENTION, segment_attention
from chatlearn.hf.model import locate_model_args, model_arg

MASKED_ATTENTION = ("sdpa", "eager", SEGMENT_ATTENTION)
VERIFIED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")


@dataclass(frozen=True, slots=True)
class PackingSupport:
    exact: bool
    reason: str = ""  # why not, when not exact


@dataclass(frozen=True, slots=True)
class PackingOptions:
    """The forward layout of a module: `concatenated_logps`'s keyword arguments."""

    packing: bool = False
    prefix_sharing: bool = False
    max_tokens_per_row: int | None = None
    segments: bool = False  # segment attention (the layout follows the model's attention)

    def kwargs(self) -> dict[str, Any]:
        return {
            "packing": self.packing,
            "prefix_sharing": self.prefix_sharing,
            "max_tokens_per_row": self.max_tokens_per_row,
        }

    def describe(self) -> str:
        if not (self.packing or self.prefix_sharing):
            return "padded rows"
        parts = [name for name in ("packing", "prefix_sharing") if getattr(self, name)]
        if self.max_tokens_per_row is not None:
            parts.append(f"max_tokens_per_row={self.max_tokens_per_row}")
        parts.append("segment attention" if self.segments else "masked attention")
        return " + ".join(parts)


def packing_support(model: Any) -> PackingSupport:
    """Whether a (peft-wrapped or plain) HF causal LM gives exact log-probs when packed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        return PackingSupport(False, f"{type(base).__name__} has no Hugging Face config")
    model_type = str(getattr(config, "model_type", ""))
    implementation = str(getattr(config, "_attn_implementation", None))
    if model_type not in VERIFIED_MODEL_TYPES:
        return PackingSupport(False, f"model_type {model_type!r} is not verified for packing")
    if implementation not in MASKED_ATTENTION:
        return PackingSupport(
            False, f"attn_implementation {implementation!r} does not take a 4-D mask"
        )
    if _sliding_window(config):
        return PackingSupport(False, "the model has sliding-window attention layers")
    if getattr(config, "alibi", False):
        return PackingSupport(False, "the model uses ALiBi position biases")
    return PackingSupport(True)


def _sliding_window(config: Any) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return any(kind != "full_attention" for kind in layer_types)
    if hasattr(config, "use_sliding_window"):  # Qwen2/Qwen3: a window only when enabled
        return bool(config.use_sliding_window and getattr(config, "sliding_window", None))
    return getattr(config, "sliding_window", None) is not None


def packing_options(
    model_args: Mapping[str, Any], model: Any, *, log: Callable[[str], None]
) -> PackingOptions:
    """`packing` / `prefix_sharing` (default: on where exact), `max_tokens_per_row` (None).

    A default that is not exact falls back to padded rows with one log line; asking for it
    explicitly on such a model is the ConfigError of its key saying why (with its file:line for
    a model of the process-wide config).
    """
    support = packing_support(model)
    # Types and ranges are checked by the keys' specs (a located ConfigError, as at start-up);
    # what depends on the model is checked here, located the same way.
    prefix, error = locate_model_args(model_args)
    chosen = {}
    for key in ("packing", "prefix_sharing"):
        value = model_arg(model_args, key)
        if value and not support.exact:
            raise error(
                f"{prefix}.{key}",
                f"true is not exact for this model ({support.reason})",
                f"set {key}: false",
            )
        chosen[key] = support.exact if value is None else value
    budget = model_arg(model_args, "max_tokens_per_row")
    if not support.exact and any(model_args.get(k) is None for k in ("packing", "prefix_sharing")):
        log(f"packing and prefix sharing off (padded rows): {support.reason}")
    attention = model_arg(model_args, "packed_attention")
    segments = False
    if (chosen["packing"] or chosen["prefix_sharing"]) and attention != "mask":
        segments = use_segment_attention(model)
        if not segments and attention == "segments":
            raise error(
                f"{prefix}.packed_attention",
                "segments needs an sdpa model and transformers' attention registry "
                "(transformers >= 4.48)",
                "set packed_attention: mask",
            )
    return PackingOptions(chosen["packing"], chosen["prefix_sharing"], budget, segments)


def use_segment_attention(model: Any) -> bool:
    """Switch an ``sdpa`` HF model's attention to ``chatlearn_segments`` (see the module doc);
    False, the model unchanged, for other attention or a transformers without the registry."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == SEGMENT_ATTENTION:
        return True
    if config is None or implementation != "sdpa" or not _register():
        return False
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(SEGMENT_ATTENTION)
    else:
        config._attn_implementation = SEGMENT_ATTENTION
    return str(getattr(base.config, "_attn_implementation", "")) == SEGMENT_ATTENTION


@functools.cache
def _register() -> bool:
    """Register the attention (and SDPA's mask builder under its name) with transformers, once."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False

    def attention(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        segments = kwargs.pop("packed_segments", None)
        if segments is None:  # an ordinary forward: SDPA as the model would run it
            return sdpa_attention_forward(  # type: ignore[no-any-return]
                module, query, key, value, attention_mask, dropout, scaling, **kwargs
            )
        groups = int(getattr(module, "num_key_value_groups", 1))
        if groups > 1:  # grouped-query attention: every query head its key/value head
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        out = segment_attention(query, key, value, segments, scale=scaling, dropout_p=dropout)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(SEGMENT_ATTENTION, attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
    return True
