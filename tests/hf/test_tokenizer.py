"""The byte-level tokenizer: ids are bytes, any text round-trips, and it saves into a directory
that AutoTokenizer loads (the same path a real local tokenizer takes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatlearn.hf import BYTE_VOCAB_SIZE, byte_tokenizer, has_chat_template, load_tokenizer


def test_ids_are_bytes_with_bos_and_specials() -> None:
    tok = byte_tokenizer()
    assert len(tok) == BYTE_VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    text = "max(3,12)=12 héllo 🙂\n\t"
    ids = tok(text)["input_ids"]
    assert ids == [257, *text.encode("utf-8")]
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert not has_chat_template(tok)


def test_default_load_is_the_byte_tokenizer() -> None:
    assert load_tokenizer(None)("a")["input_ids"] == [257, 97]
    assert load_tokenizer("")("a")["input_ids"] == [257, 97]


def test_save_and_load_from_a_local_directory(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "12+7=19 ünïcode"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id) == (256, 258)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "nope")


def test_a_directory_without_a_usable_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    # called from code: a ValueError naming model_args.model_path (the modules add file:line)
    with pytest.raises(ValueError, match="holds no tokenizer files") as info:
        load_tokenizer(tmp_path)  # empty: transformers said "Couldn't instantiate the backend"
    assert getattr(info.value, "key", None) == "model_args.model_path"
    assert len(str(info.value).splitlines()) == 2  # the problem, then the fix
    tok = byte_tokenizer()
    tok.pad_token, tok.eos_token = None, None
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has neither a pad nor an eos token"):
        load_tokenizer(tmp_path)
    tok.pad_token = "<pad>"  # a pad alone: it said "has an eos token", the opposite
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no eos token: eos ends every response"):
        load_tokenizer(tmp_path)
