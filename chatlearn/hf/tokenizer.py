"""Tokenizers: a byte-level one built in code (no download) or a real one from a local directory.

Both are Hugging Face tokenizers, so the rest of the code has one path: `tokenizer(text)`,
`tokenizer.decode`, `pad_token_id`, `eos_token_id`, `apply_chat_template` when the tokenizer has a
chat template, and `save_pretrained` into a checkpoint that `AutoTokenizer.from_pretrained` loads.

The byte-level tokenizer maps byte b to id b (0..255) and adds `<pad>` = 256, `<s>` = 257,
`</s>` = 258; `tokenizer(text)` prepends `<s>` as Llama tokenizers do. transformers and tokenizers
are imported only when a tokenizer is built.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from chatlearn.config.errors import ConfigError

BYTE_PAD_TOKEN = "<pad>"
BYTE_BOS_TOKEN = "<s>"
BYTE_EOS_TOKEN = "</s>"
BYTE_VOCAB_SIZE = 259  # 256 bytes + pad, bos, eos


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def byte_tokenizer() -> Any:
    """A byte-level `PreTrainedTokenizerFast` built in code: ids 0..255 are the bytes themselves.

    A BPE model with the 256 byte symbols and no merges, so every byte is exactly one token and any
    text (any language, emoji) round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[byte]: byte for byte in range(256)}
    specials = (BYTE_PAD_TOKEN, BYTE_BOS_TOKEN, BYTE_EOS_TOKEN)
    for offset, token in enumerate(specials):
        vocab[token] = 256 + offset
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # no regex split: with single-byte tokens it would only cost time
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    bos_id = vocab[BYTE_BOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BYTE_BOS_TOKEN} $A",
        pair=f"{BYTE_BOS_TOKEN} $A $B",
        special_tokens=[(BYTE_BOS_TOKEN, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=BYTE_PAD_TOKEN,
        bos_token=BYTE_BOS_TOKEN,
        eos_token=BYTE_EOS_TOKEN,
        padding_side="right",
    )
    assert len(tokenizer) == BYTE_VOCAB_SIZE, len(tokenizer)
    return tokenizer


# Files of a saved tokenizer (fast, sentencepiece, BPE or WordPiece), any of them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)


def load_tokenizer(model_path: str | Path | None = None, **kwargs: Any) -> Any:
    """The tokenizer of a local checkpoint directory, or the byte-level one when no path is given.

    A tokenizer without a pad token gets its eos token as pad token (the common choice for causal
    LMs; padding is masked out everywhere, so its id never matters). A directory whose tokenizer
    cannot be used is a `ConfigError` of ``model_args.model_path`` saying why (the HF modules
    locate it in their config: `chatlearn.hf.model.located_errors`).
    """
    if model_path is None or str(model_path) == "":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    path = Path(model_path).expanduser()  # ~ as in the config's other paths
    if not path.is_dir():
        raise _model_path_error(
            f"{str(model_path)!r} is not a directory (no downloads here)",
            "give the local directory of a Hugging Face checkpoint, or remove model_path",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as failed:
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise _model_path_error(
                f"{str(path)!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)",
                "save the model's tokenizer there too (tokenizer.save_pretrained(model_path))",
            ) from None
        reason = " ".join(str(failed).split())
        raise _model_path_error(
            f"the tokenizer in {str(path)!r} does not load: {reason}",
            "check that AutoTokenizer.from_pretrained(model_path) loads it",
        ) from failed
    if tokenizer.eos_token is None:  # every response ends with it; padding may hold it too
        tokens = (
            "no eos token"
            if tokenizer.pad_token_id is not None
            else "neither a pad nor an eos token"
        )
        raise _model_path_error(
            f"the tokenizer in {str(path)!r} has {tokens}: eos ends every response",
            "set eos_token in its tokenizer_config.json (pad_token may stay unset: padding "
            "then holds eos)",
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_path_error(problem: str, fix: str) -> ConfigError:
    return ConfigError(problem, key="model_args.model_path", fix=fix)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
