"""The megatron example's data: its --data file read as chatlearn.hf reads data files, records
its character tokenizer cannot encode named, and truncation that keeps every response.

None of these need megatron-core, and none start a process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatlearn.config import ConfigError
from examples.megatron.data import (
    BOS_ID,
    EOS_ID,
    CharTokenizer,
    PreferenceDataset,
    load_preference_data,
)

PAIR = {"prompt": "max(1,2)=", "chosen": "2", "rejected": "1"}


def test_a_data_file_is_read_as_chatlearn_hf_reads_one(tmp_path: Path) -> None:
    """json.loads per line: a byte-order mark was a JSONDecodeError traceback; str() of each
    value trained a null as the text "None"."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{json.dumps(PAIR)}\r\n{json.dumps(PAIR)}\r\n\r\n".encode())
    records = load_preference_data(path)
    assert records == [PAIR, PAIR]
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps({**PAIR, "chosen": None}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: chosen is None \(a NoneType\)"):
        load_preference_data(path)


def test_a_record_the_tokenizer_cannot_encode_names_its_sample_and_key(tmp_path: Path) -> None:
    """A character beyond printable ASCII was a bare ValueError from the reference replica;
    now a config error the run points at the record's file:line."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps({**PAIR, "chosen": "café"}) + "\n")
    records = load_preference_data(path)
    with pytest.raises(ConfigError) as info:
        PreferenceDataset(records, CharTokenizer(), max_length=32, split="training")
    message = info.value.one_line()
    assert message.startswith(
        "sample 1 of the training data set: chosen: character 'é' (at 3) is outside printable "
        "ASCII (fix: replace the character"
    ), message
    assert records.origin(1) == f"{path}:2"  # where the run says it is
    chat = {**PAIR, "chosen": [{"role": "assistant", "content": "2"}]}
    with pytest.raises(ConfigError, match="sample 0 of the data set: chosen is \\[\\{'role'"):
        PreferenceDataset([chat], CharTokenizer(), max_length=32)


def test_a_long_prompt_keeps_its_end_and_every_response_keeps_a_token() -> None:
    """The prompt was cut from the right with the responses: a prompt longer than max_length
    left no response token, a traceback from the reference replica."""
    tok = CharTokenizer()
    long = {"prompt": "x" * 50 + "end=", "chosen": "a" * 20, "rejected": "b"}
    item = PreferenceDataset([long], tok, max_length=16)[0]
    for side, kept in (("chosen", 8), ("rejected", 2)):
        ids, mask = item[f"{side}_input_ids"], item[f"{side}_loss_mask"]
        assert len(ids) == 8 + kept <= 16
        assert ids[:8] == [BOS_ID, *tok.encode("xxx" + "end=")]  # bos, then the prompt's end
        assert mask == [0] * 8 + [1] * kept
    assert item["rejected_input_ids"][-1] == EOS_ID
    # pairs that fit are as they were
    short = PreferenceDataset([PAIR], tok, max_length=16)[0]
    assert short["chosen_input_ids"] == [BOS_ID, *tok.encode("max(1,2)=2"), EOS_ID]
    assert short["chosen_loss_mask"] == [0] * 10 + [1, 1]
