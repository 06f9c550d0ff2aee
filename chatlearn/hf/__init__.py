"""Hugging Face helpers: tokenizers, causal LMs and preference data for DPO.

transformers and tokenizers are imported only when a tokenizer or a model is built, so importing
this package costs torch alone.

Layer 3 (docs/architecture.md, "Layers"): may import `transport`, `config`, `algorithms` and
`actors`, never `engine`, `launch` or `megatron`.
"""

from __future__ import annotations

from chatlearn._lazy import lazy_exports
from chatlearn.hf.data import (
    PairTokenizer,
    PreferenceCollator,
    PreferenceDataset,
    load_preference_data,
)
from chatlearn.hf.model import (
    SMALL_LLAMA,
    build_causal_lm,
    causal_lm_from_args,
    load_causal_lm,
    num_parameters,
    resolve_dtype,
)
from chatlearn.hf.tokenizer import (
    BYTE_VOCAB_SIZE,
    byte_tokenizer,
    has_chat_template,
    load_tokenizer,
)

# The ready-made modules, on first use: `from chatlearn.hf import HFReference` is what the errors
# that send users to them ("chatlearn.hf's HFReference") lead to, and it was an ImportError.
_modules, __getattr__, __dir__ = lazy_exports(
    __name__, {"chatlearn.hf.modules": ("HFDPOTrainer", "HFReference")}, globals()
)

__all__ = [
    *_modules,
    "BYTE_VOCAB_SIZE",
    "SMALL_LLAMA",
    "PairTokenizer",
    "PreferenceCollator",
    "PreferenceDataset",
    "build_causal_lm",
    "byte_tokenizer",
    "causal_lm_from_args",
    "has_chat_template",
    "load_causal_lm",
    "load_preference_data",
    "load_tokenizer",
    "num_parameters",
    "resolve_dtype",
]
