"""Preference data: loading, tokenization with templates, the documented truncation rules, chat
templates for conversational records, and the padded batch for the concatenated forward."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import pytest
import torch

from chatlearn.algorithms import concatenate_pairs
from chatlearn.hf import PairTokenizer, PreferenceDataset, byte_tokenizer, load_preference_data

BOS, EOS, PAD = 257, 258, 256
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _b(text: str) -> list[int]:
    return list(text.encode())


def test_load_jsonl_and_list(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": "q", "chosen": "d", "rejected": "s"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_preference_data(path) == rows
    assert load_preference_data(str(path)) == rows
    assert load_preference_data(iter(rows)) == rows


def test_load_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is missing \['rejected'\]"):
        load_preference_data(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        load_preference_data(path)
    path.write_text('["p", "c", "r"]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is \['p', 'c', 'r'\] \(a list\)"):
        load_preference_data(path)


def test_a_line_that_is_not_a_record_says_to_fix_the_line_not_to_call_set_dataset(
    tmp_path: Path,
) -> None:
    """A file's line that is JSON but no object (a string, null, a number) told its reader to
    "pass engine.set_dataset() a list of such dicts (or read them from a JSONL file with
    load_preference_data)": what they had done."""
    path = tmp_path / "d.jsonl"
    ok = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    for line, shown in (('"hello"', "'hello' (a str)"), ("null", "None (a NoneType)")):
        path.write_text(f"{ok}\n{line}\n")
        with pytest.raises(ValueError) as info:
            load_preference_data(path)
        message = str(info.value)
        assert f"d.jsonl:2 is {shown}; write each line as one such JSON object" in message
        assert "set_dataset" not in message and "\n" not in message
    # records given in code keep the advice about set_dataset
    with pytest.raises(ValueError, match=r"sample 1 of .*; pass engine.set_dataset\(\) a list"):
        load_preference_data([json.loads(ok), "hello"])


def test_a_json_array_on_one_huge_line_is_refused_without_reading_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """json.dump(records, f) writes the data set on one line: it was read, decoded and parsed
    whole (0.9 GB for a 194 MB file) only to be told it is a JSON array."""
    import chatlearn.hf.data as data

    parsed: list[int] = []
    loads = json.loads
    monkeypatch.setattr(
        data.json, "loads", lambda text, **kw: parsed.append(len(text)) or loads(text, **kw)
    )
    record = {"prompt": "p" * 100, "chosen": "c" * 100, "rejected": "r" * 100}
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([record] * 12_000).encode())  # 4 MB
    with pytest.raises(
        ValueError, match=r"data.json: a JSON array; preference data files are JSONL"
    ):
        load_preference_data(path)
    assert parsed == []  # never parsed: refused from its first MiB
    # a first record longer than that is read whole, as any other line
    long = {**record, "chosen": "c" * (2 * data.ARRAY_HEAD_BYTES)}
    path.write_text(json.dumps(long) + "\n" + json.dumps(record) + "\n")
    assert load_preference_data(path) == [long, record]


def test_a_line_nested_past_the_recursion_limit_is_one_line_naming_it(tmp_path: Path) -> None:
    # json's decoder raised RecursionError: a traceback naming no line
    path = tmp_path / "deep.jsonl"
    ok = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "c", "rejected": "r"}'
    path.write_text(f"{ok}\n{deep}\n")
    with pytest.raises(ValueError, match=r"deep.jsonl:2: nested too deeply to be read"):
        load_preference_data(path)


def test_a_file_ending_in_zero_bytes_is_said_to_be_one(tmp_path: Path) -> None:
    # a write stopped by a crash or a full disk leaves zero bytes: "Expecting value: line 1
    # column 1 (char 0)" said nothing of them
    path = tmp_path / "d.jsonl"
    ok = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path.write_bytes(f"{ok}\n".encode() + b"\x00" * 4096)
    with pytest.raises(ValueError) as info:
        load_preference_data(path)
    assert str(info.value).startswith(f"{path}:2: not valid JSON: Expecting value")
    assert "(the file's end holds only zero bytes: left by a write that did not finish" in str(
        info.value
    )
    assert "tr -d '\\000' < in.jsonl > out.jsonl" in str(info.value)
    path.write_bytes(f"{ok}\n{ok[:20]}".encode() + b"\x00" * 4096)  # a record cut by them
    with pytest.raises(ValueError, match=r"d.jsonl:2: .*\(the file's end holds zero bytes: "):
        load_preference_data(path)


def test_a_record_nested_under_a_key_names_the_key(tmp_path: Path) -> None:
    # the Hub's datasets-server rows ({"row_idx", "row": {...}, "truncated_cells"}) were
    # "missing ['prompt', 'chosen', 'rejected'] ...; give every record these keys"
    pair = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"row_idx": 0, "row": pair, "truncated_cells": []}) + "\n")
    with pytest.raises(ValueError) as info:
        load_preference_data(path)
    assert str(info.value).endswith(
        "the record is under 'row': write that object alone on each line, e.g. "
        "jq -c '.[\"row\"]' in.jsonl > out.jsonl"
    ), str(info.value)
    assert "rows.jsonl:1 is missing ['prompt', 'chosen', 'rejected']" in str(info.value)
    with pytest.raises(ValueError, match="the record is under 'row': pass each sample's 'row'"):
        load_preference_data([{"row": pair}])


def test_the_guides_string_prompts_are_a_clear_error() -> None:
    """ChatLearn's DPO guide passes `["test"] * 4096`: say what DPO data is, show the first bad
    sample and what build_dataset was given."""
    with pytest.raises(ValueError) as info:
        PreferenceDataset(["test"] * 4096, byte_tokenizer())
    message = str(info.value)
    assert message.startswith("DPO data must be preference records")
    assert "sample 0 of the 4096 samples (all str) given to build_dataset is 'test' (a str)" in (
        message
    )
    assert "engine.set_dataset()" in message
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    with pytest.raises(ValueError, match=r"sample 2 of the 3 samples \(all dict\) .* is missing"):
        load_preference_data([good, good, {"prompt": "p", "chosen": "c"}])
    with pytest.raises(
        ValueError, match=r"sample 1 of the 2 samples \(dict, int\) .* is 7 \(a int\)"
    ):
        load_preference_data([good, 7])
    # str() of these trained on 'None' or on a dict's repr, silently
    with pytest.raises(ValueError, match=r"sample 1 of .*: chosen is None \(a NoneType\)"):
        load_preference_data([good, {**good, "chosen": None}])
    message = {"role": "assistant", "content": "a"}
    with pytest.raises(ValueError, match=r"rejected is .* \(a dict\): a single message must"):
        load_preference_data([{**good, "rejected": message}])


def test_string_record_with_template() -> None:
    pairs = PairTokenizer(byte_tokenizer(), max_length=64, prompt_template="Q: {prompt}\nA: ")
    item = pairs({"prompt": "max(1,2)=", "chosen": "2", "rejected": "1"})
    prompt = [BOS, *_b("Q: max(1,2)=\nA: ")]
    assert item["chosen_input_ids"].tolist() == [*prompt, *_b("2"), EOS]
    assert item["rejected_input_ids"].tolist() == [*prompt, *_b("1"), EOS]
    assert item["chosen_loss_mask"].tolist() == [0] * len(prompt) + [1, 1]


def test_truncation_rules() -> None:
    pairs = PairTokenizer(byte_tokenizer(), max_length=12, min_prompt_length=4)
    record = {"prompt": "abcdefghij", "chosen": "xyz", "rejected": "uvwxyz0123456"}
    prompt, chosen, rejected = pairs.encode(record)
    assert len(prompt) == 11 and len(chosen) == 4 and len(rejected) == 14
    prompt, chosen, rejected = pairs.truncate(prompt, chosen, rejected)
    # rule 2: the prompt shrinks from the left to its minimum of 4 (bos kept), rule 3: responses
    # are cut from the right to the 8 tokens left
    assert prompt == [BOS, *_b("hij")]
    assert chosen == [*_b("xyz"), EOS]
    assert rejected == _b("uvwxyz01")

    # rule 2 stops as soon as everything fits
    short = PairTokenizer(byte_tokenizer(), max_length=12, min_prompt_length=2)
    prompt, chosen, _ = short.truncate(
        *short.encode({"prompt": "abcdefghij", "chosen": "xy", "rejected": "z"})
    )
    assert prompt == [BOS, *_b("cdefghij")] and chosen == [*_b("xy"), EOS]

    # rule 1: max_prompt_length keeps the end of the prompt
    capped = PairTokenizer(byte_tokenizer(), max_length=64, max_prompt_length=3)
    prompt, _, _ = capped.truncate(
        *capped.encode({"prompt": "abcdef", "chosen": "x", "rejected": "y"})
    )
    assert prompt == [BOS, *_b("ef")]


def test_invalid_settings() -> None:
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="min_prompt_length"):
        PairTokenizer(tok, max_length=8, min_prompt_length=8)
    with pytest.raises(ValueError, match="prompt_template"):
        PairTokenizer(tok, prompt_template="no placeholder")


def test_conversational_records_use_the_chat_template() -> None:
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    pairs = PairTokenizer(tok, max_length=128)
    prompt_msgs = [{"role": "user", "content": "hi"}]
    explicit = pairs(
        {
            "prompt": prompt_msgs,
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": "go away",
        }
    )
    prompt = [BOS, *_b("<|user|>hi"), EOS, *_b("<|assistant|>")]
    chosen_ids = explicit["chosen_input_ids"].tolist()
    assert chosen_ids[: len(prompt)] == prompt
    assert chosen_ids[len(prompt) :] == [*_b("hello"), EOS]
    assert explicit["rejected_input_ids"].tolist()[len(prompt) :] == [*_b("go away"), EOS]
    assert explicit["chosen_loss_mask"].sum().item() == len(_b("hello")) + 1

    # implicit prompt: the shared leading messages
    implicit = pairs(
        {
            "chosen": [*prompt_msgs, {"role": "assistant", "content": "hello"}],
            "rejected": [*prompt_msgs, {"role": "assistant", "content": "go away"}],
        }
    )
    for key in explicit:
        assert torch.equal(implicit[key], explicit[key]), key

    with pytest.raises(ValueError, match="chat template"):
        PairTokenizer(byte_tokenizer())({"prompt": prompt_msgs, "chosen": "a", "rejected": "b"})


def test_dataset_collate_gives_the_dpo_batch() -> None:
    records = [
        {"prompt": "max(1,22)=", "chosen": "22", "rejected": "1"},
        {"prompt": "min(5,3)=", "chosen": "3", "rejected": "5"},
        {"prompt": "same", "chosen": "x", "rejected": "x"},
    ]
    ds = PreferenceDataset(records, byte_tokenizer(), max_length=32)
    assert len(ds) == 3 and ds.num_identical == 1
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["chosen_input_ids"].shape == (2, 14)  # bos + 10 + "22" + eos
    assert batch["rejected_input_ids"].shape == (2, 13)
    assert batch["chosen_input_ids"][1].tolist()[-3:] == [EOS, PAD, PAD]
    assert batch["chosen_attention_mask"][1].tolist() == [1] * 12 + [0, 0]
    assert batch["chosen_loss_mask"][0].tolist() == [0] * 11 + [1, 1, 1]
    cat = concatenate_pairs(batch, pad_token_id=PAD)
    assert cat["input_ids"].shape == (4, 14)
    assert cat["loss_mask"].sum(-1).tolist() == [3, 2, 2, 2]


def test_the_data_set_keeps_each_pair_once_in_32_bits_and_reads_it_back_exactly() -> None:
    """Four int64 tensors per pair (the prompt twice) took 4x the memory in every replica: 1.8 GB
    for 100k pairs of ~600 tokens. Items read back equal what the per-record path builds, for
    string and conversational records mixed, truncated or not, at any index."""
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    records = [
        {"prompt": "p" * (i % 37), "chosen": "c" * (1 + i % 23), "rejected": "r" * (i % 29)}
        for i in range(300)
    ]
    records[7] = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"}
    ds = PreferenceDataset(records, tok, max_length=40)
    pairs = ds.pair_tokenizer
    for i in (*range(len(records)), -1, -300):
        expected = pairs(records[i])
        item = ds[i]
        assert sorted(item) == sorted(expected), i
        for key, value in expected.items():
            assert item[key].dtype == torch.long and torch.equal(item[key], value), (i, key)
    with pytest.raises(IndexError):
        ds[300]
    kept = [pairs.truncate(*pairs.encode(r)) for r in records]
    stored = sum(len(p) + len(c) + len(r) for p, c, r in kept)
    assert ds._tokens.dtype == torch.int32 and ds._tokens.numel() == stored


def test_a_data_file_that_cannot_be_read_says_which_and_why(tmp_path) -> None:
    """Not an IsADirectoryError or UnicodeDecodeError traceback, and not an empty run."""
    empty, binary = tmp_path / "empty.jsonl", tmp_path / "binary.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"  # "the file is empty" sent its reader to look at its size
    blank.write_bytes(b"\n \r\n\xef\xbb\xbf\n")
    binary.write_bytes(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n\xff\xfe\n')
    cases = [
        (tmp_path, "a directory; give the path of one JSONL file in it (it holds binary.jsonl, "),
        (tmp_path / "missing.jsonl", "cannot read it (No such file or directory)"),
        (empty, "no records (the file is empty)"),
        (blank, "no records (its 3 lines are all blank)"),
        (binary, "binary.jsonl:2: not UTF-8 text (byte 0xff at byte 0 of the line)"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_preference_data(path)


def test_what_max_length_cut_is_counted_and_said() -> None:
    # responses that differ only past max_length: identical after truncation, a zero gradient,
    # and a run that trains nothing (loss 0.6931 throughout) without a word
    preamble = "Let me think step by step about it. "
    records = [
        {"prompt": f"q{i}", "chosen": preamble + "ANSWER A", "rejected": preamble + "ANSWER B"}
        for i in range(3)
    ] + [{"prompt": "p" * 40, "chosen": "a", "rejected": "b"}]
    ds = PreferenceDataset(records, byte_tokenizer(), max_length=32)
    assert (ds.num_truncated_prompts, ds.num_truncated_responses, ds.num_identical) == (1, 3, 3)
    summary = ds.truncation_summary()
    assert summary is not None and summary.startswith(
        "of 4 pairs, 1 lost prompt tokens and 3 lost response tokens to max_length 32; 3 have "
        "identical responses after it (no DPO gradient"
    ), summary
    short = PreferenceDataset(records[3:], byte_tokenizer(), max_length=64)
    assert short.truncation_summary() is None


def test_a_byte_order_mark_is_skipped_and_a_json_array_file_is_named(tmp_path: Path) -> None:
    record = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(record) + "\n").encode())  # Windows tools
    assert load_preference_data(path) == [record]
    for text in (json.dumps([record, record]), json.dumps([record, record], indent=2)):
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match="bom.jsonl: a JSON array; preference data files"):
            load_preference_data(path)


@pytest.mark.parametrize(
    ("chosen", "message"),
    [
        ([], "chosen is an empty message list"),
        (["x", "y"], "chosen: message 0 is 'x' (a str), not a message"),
        ([{"role": "assistant"}], "chosen: message 0 has no content"),
        ([{"role": "assistant", "content": None}], "chosen: message 0 has no content"),
        ([{"content": "hi"}], "chosen: message 0 has no role"),
    ],
)
def test_a_broken_message_list_is_named_where_it_is_read(
    tmp_path: Path, chosen: list, message: str
) -> None:
    # these failed later in the actor's chat template without naming the record, or (a missing
    # or null content) trained on an empty response
    good = {
        "prompt": [{"role": "user", "content": "q"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps(good | {"chosen": [{"role": "assistant", "content": "a"}]}) + "\n"
                    + json.dumps(good | {"chosen": chosen}) + "\n")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(f"conv.jsonl:2: {message}")):
        load_preference_data(path)


def test_pairs_without_a_prompt_token_are_counted() -> None:
    # Qwen2- and GPT-2-style tokenizers add no bos: with an empty prompt nothing comes before
    # a response's first token, so only the tokens after it are scored, silently
    class NoBos:
        bos_token_id, eos_token_id, pad_token_id = None, 1, 0

        def __call__(self, text, add_special_tokens=False):
            texts = [text] if isinstance(text, str) else text
            ids = [[2 + (ord(c) % 50) for c in t] for t in texts]
            return {"input_ids": ids[0] if isinstance(text, str) else ids}

    records = [
        {"prompt": "", "chosen": "Y", "rejected": "N"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "qqqq", "chosen": "a" * 20, "rejected": "b"},  # cut away: min_prompt_length 0
    ]
    ds = PreferenceDataset(records, NoBos(), max_length=16, min_prompt_length=0)
    assert (ds.num_empty_prompts, ds.num_prompts_cut_away) == (2, 1)
    summary = ds.truncation_summary()
    assert summary is not None and "; 1 have no prompt token (an empty prompt" in summary, summary
    assert "; 1 lost every prompt token to max_length (min_prompt_length 0" in summary, summary


@pytest.mark.parametrize("min_prompt_length", [0, 1])
def test_a_prompt_cut_below_two_tokens_keeps_its_bos(min_prompt_length: int) -> None:
    # the bos was kept only when 2 or more tokens were: a long prompt lost it (and at 0 every
    # token), and the summary blamed "an empty prompt and a tokenizer without bos"
    record = {"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "x"}
    pairs = PairTokenizer(byte_tokenizer(), max_length=8, min_prompt_length=min_prompt_length)
    assert pairs.truncate(*pairs.encode(record)) == ([BOS], _b("0123456"), [*_b("x"), EOS])
    ds = PreferenceDataset(
        [record], byte_tokenizer(), max_length=8, min_prompt_length=min_prompt_length
    )
    assert ds.num_empty_prompts == 0 and "no prompt token" not in str(ds.truncation_summary())


def test_a_chat_template_failure_names_the_sample() -> None:
    # raised in the reference replica, the chat template's own error named no record
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    conversational = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    with pytest.raises(
        ValueError, match=r"sample 1 of the data set \(\{'prompt': \[\{'role'.*chat template"
    ):
        PreferenceDataset([good, conversational], byte_tokenizer())  # no chat template


def test_whole_conversations_that_hold_the_prompt_are_not_given_it_twice() -> None:
    # UltraFeedback / argilla dpo-mix: prompt a string, chosen/rejected whole conversations
    # that start with its user turn; the prompt was prepended again (a second user turn trained
    # on as part of the response, or the template's 'renders the prompt differently' error)
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    pairs = PairTokenizer(tok, max_length=128)
    user = {"role": "user", "content": "hi"}
    answers = {
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    expected = pairs({"prompt": [user], **answers})
    for prompt in ("hi", [user]):
        whole = {"prompt": prompt, **{k: [user, *v] for k, v in answers.items()}}
        item = pairs(whole)
        for key in expected:
            assert torch.equal(item[key], expected[key]), (prompt, key)
    # a response that still holds a user turn is one error naming the sample
    other = {"role": "user", "content": "again"}
    record = {"prompt": "hi", **{k: [user, *v, other] for k, v in answers.items()}}
    with pytest.raises(ValueError, match=r"sample 0 of the data set .*chosen has a user turn"):
        PreferenceDataset([record], tok, max_length=128)


def test_anthropic_hh_string_records_without_a_prompt_have_it_extracted(tmp_path: Path) -> None:
    # was "missing ['prompt']"; as TRL: the common prefix up to its last "\n\nAssistant:"
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: max(1,2)?\n\nAssistant:"
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": dialogue + " 2", "rejected": dialogue + " 1"}) + "\n")
    assert load_preference_data(path) == [{"prompt": dialogue, "chosen": " 2", "rejected": " 1"}]
    with pytest.raises(ValueError, match=r"missing \['prompt'\]"):
        load_preference_data([{"chosen": "yes", "rejected": "no"}])


def test_a_tokenizer_that_appends_eos_puts_none_inside_the_prompt() -> None:
    # Llama with add_eos_token=True: the prompt ended with eos, so each response followed an
    # end of text
    from tokenizers import processors

    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)]
    )
    record = {"prompt": "hello", "chosen": "world", "rejected": "fox"}
    expected = [BOS, *_b("hello"), *_b("world"), EOS]
    assert PairTokenizer(tok, max_length=32)(record)["chosen_input_ids"].tolist() == expected
    item = PreferenceDataset([record], tok, max_length=32)[0]
    assert item["chosen_input_ids"].tolist() == expected
    assert item["chosen_loss_mask"].tolist() == [0] * 6 + [1] * 6


def test_a_record_the_data_refuses_is_one_config_line_at_its_file_and_line(tmp_path) -> None:
    # a 70-80 line traceback from the reference replica named only "sample i"; a chat template's
    # raise_exception (jinja2's TemplateError) was not even caught
    from chatlearn.actors.errors import ActorError
    from chatlearn.config import ConfigError
    from chatlearn.engine.sample_errors import located_sample_error

    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
        "{% endfor %}"
    )
    ok = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    bad = {**ok, "prompt": [{"role": "system", "content": "be nice"}, *ok["prompt"]]}
    path = tmp_path / "d.jsonl"
    path.write_text(f"{json.dumps(ok)}\n\n{json.dumps(ok)}\n{json.dumps(bad)}\n")
    records = load_preference_data(path)
    assert records[1:].origin(1) == f"{path}:4"  # slices keep their lines (the example's limit)
    # a list changed in place no longer knows its lines: said as "sample i", never a wrong line
    shuffled = load_preference_data(path)
    random.Random(0).shuffle(shuffled)
    with pytest.raises(ValueError, match="changed in place"):
        shuffled.origin(0)
    for change in (lambda r: r.sort(key=str), lambda r: r.pop(0), lambda r: r.append(ok)):
        changed = load_preference_data(path)
        change(changed)
        with pytest.raises(ValueError):
            changed.origin(0)
    with pytest.raises(ConfigError) as info:
        PreferenceDataset(records, tok, split="eval")
    message = info.value.one_line()
    assert message.startswith("sample 2 of the eval data set ({'prompt': [{'role': 'system'")
    assert "System role not supported (fix: correct that record" in message
    # the coordinator names the file and line of the sample the actor refused
    remote = ActorError("chatlearn.config.errors.ConfigError", str(info.value))
    located = located_sample_error(remote, {"eval": records.origin})
    assert isinstance(located, ConfigError) and located.where == f"{path}:4"
    assert located.one_line().startswith(f"{path}:4: sample 2 of the eval data set")
    assert located_sample_error(remote, {"training": records.origin}) is remote  # other split


def test_a_lone_surrogate_escape_is_named_at_its_line_and_key(tmp_path: Path) -> None:
    # valid JSON, no Unicode text: it crashed deep in the tokenizer or the transport
    path = tmp_path / "d.jsonl"
    good = '{"prompt": "ok \\ud83d\\ude00", "chosen": "a", "rejected": "b"}\n'
    path.write_text(good + '{"prompt": "p", "chosen": [{"role": "assistant", "content": '
                    '"broken \\ud83d"}], "rejected": "b"}\n')  # fmt: skip
    with pytest.raises(ValueError) as info:
        load_preference_data(path)
    assert str(info.value).startswith(
        f"{path}:2: key 'chosen'[0]['content'] holds a lone surrogate escape (\\ud83d, at "
    )
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"sample 0 of .*key 'prompt' holds a lone surrogate"):
        load_preference_data([{"prompt": "x\udc00", "chosen": "a", "rejected": "b"}])
    path.write_text(good)
    assert load_preference_data(path)[0]["prompt"] == "ok \U0001f600"


def _bpe_tokenizer() -> object:
    """A small trained byte-level BPE with a ChatML template (as the probe's mk_tok.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["hello world", "the quick brown fox", "max(1,2)=2"] * 50, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tok.pad_token = tok.eos_token
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok


def test_a_huge_line_is_cut_before_it_is_tokenized_with_the_same_result() -> None:
    # one 50 MB line was tokenized in full before truncation (9 GB); only what truncation
    # keeps matters: the end of the prompt, the start of each response
    from tokenizers import Regex, normalizers

    long = "the quick brown fox, hello world! " * 3000  # 102k characters
    records = [
        {"prompt": long + "max(1,2)=", "chosen": "2", "rejected": "1"},
        {"prompt": "q", "chosen": long, "rejected": "max" + long},
        {
            "prompt": [{"role": "user", "content": long}, {"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": long}],
            "rejected": "short",
        },
    ]
    folding = byte_tokenizer()  # folds a run of x into one: cut texts would have too few ids
    folding._tokenizer.normalizer = normalizers.Replace(Regex("x+"), "x")
    folding.chat_template = CHAT_TEMPLATE
    folded = {"prompt": "p", "chosen": "x" * 50_000 + "yes", "rejected": "no"}
    for tok in (byte_tokenizer(), _bpe_tokenizer(), folding):
        if tok.chat_template is None:
            tok.chat_template = CHAT_TEMPLATE
        pairs = PairTokenizer(tok, max_length=64, max_prompt_length=40)
        assert pairs.max_chars is not None and pairs.max_chars < len(long)
        for record in [*records, folded]:
            whole = pairs.encode(record, cut=False)
            cut = pairs.encode(record)
            assert pairs.truncate(*cut) == pairs.truncate(*whole), record
            if record is not folded:
                assert sum(map(len, cut)) < sum(map(len, whole)) / 10  # it was cut
        dataset = PreferenceDataset([*records, folded], tok, max_length=64, max_prompt_length=40)
        for i, record in enumerate([*records, folded]):
            item = PairTokenizer.build_item(*pairs.truncate(*pairs.encode(record, cut=False)))
            for key, value in item.items():
                assert torch.equal(dataset[i][key], value), (i, key)


def test_pairs_identical_in_the_data_are_not_blamed_on_max_length() -> None:
    # "raise max_length" was the advice for a pair whose chosen and rejected are the same text
    same = {"prompt": "max(0,0)=", "chosen": "0", "rejected": "0"}
    ds = PreferenceDataset(
        [same, {"prompt": "q", "chosen": "a", "rejected": "b"}], byte_tokenizer()
    )
    assert (ds.num_identical, ds.num_identical_in_data) == (1, 1)
    assert ds.truncation_summary() == (
        "of 2 pairs, 1 have identical chosen and rejected responses in the data itself (no DPO "
        "gradient: they only dilute the batch; drop them from the data) (the first: sample 0)"
    )
    # one of each: each said as what it is
    preamble = "Let me think step by step about it. "
    cut = {"prompt": "q", "chosen": preamble + "A", "rejected": preamble + "B"}
    ds = PreferenceDataset([same, cut], byte_tokenizer(), max_length=24)
    assert (ds.num_identical, ds.num_identical_in_data) == (2, 1)
    summary = ds.truncation_summary()
    assert summary is not None
    assert "; 1 have identical responses after it (no DPO gradient" in summary, summary
    assert "; 1 have identical chosen and rejected responses in the data itself" in summary


def test_records_that_repeat_an_earlier_one_are_counted_and_said(tmp_path: Path) -> None:
    # a data set concatenated twice, or merged from overlapping sources, trained some pairs
    # twice as often without a word
    user = [{"role": "user", "content": "hi"}]
    chat = {"prompt": user, "chosen": "hello", "rejected": "go away"}
    same = {"prompt": "max(3,7)=", "chosen": "7", "rejected": "3"}
    other = {"prompt": "max(3,7)=", "chosen": "7", "rejected": "4"}  # not a repeat
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [same, other, same, chat, same, chat]))
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ds = PreferenceDataset(path, tok, max_length=32)
    assert len(ds) == 6 and ds.num_duplicates == 3  # kept: each trained as often as it occurs
    assert ds.truncation_summary() == (
        "of 6 pairs, 3 repeat an earlier record (the same prompt, chosen and rejected): kept, "
        "so such a pair is trained as often as it occurs; deduplicate the data if that is not "
        "meant (the first: sample 2)"
    )
    assert PreferenceDataset([same, other], tok).num_duplicates == 0


def test_the_summary_names_the_first_pair_of_each_kind_it_counts() -> None:
    """ "4 have an empty or whitespace-only ... text" left the user to search a data set of
    thousands for them: each count names its first pair, as errors name theirs."""
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ok = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    long = "Let me think step by step about it, slowly. "
    records = [
        ok,
        {"prompt": "q", "chosen": long + "A", "rejected": long + "B"},  # 1: cut to identical
        {"prompt": "q", "chosen": "", "rejected": "no"},  # 2: blank
        {"prompt": "q", "chosen": "same", "rejected": "same"},  # 3: identical in the data
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "", "rejected": "x"},  # 4
        {"prompt": "q", "chosen": "", "rejected": "no"},  # 5: blank again, a repeat of 2
        {"prompt": "q", "chosen": "a", "rejected": ""},  # 6: blank
    ]
    ds = PreferenceDataset(records, tok, max_length=24)
    assert ds.first_samples == {
        "made_identical": 1,
        "blank": 2,
        "identical_in_data": 3,
        "no_token": 4,
        "repeat": 5,
    }
    summary = ds.truncation_summary()
    assert summary is not None
    for said in (
        "fix the data or the template (the first: sample 4)",
        "drop or fix those records (the first: sample 2)",
        "raise max_length or max_prompt_length's share (the first: sample 1)",
        "drop them from the data) (the first: sample 3)",
        "deduplicate the data if that is not meant (the first: sample 5)",
    ):
        assert said in summary, (said, summary)
    assert PreferenceDataset([ok, ok, ok], tok).first_samples == {"repeat": 1}


def test_responses_that_start_with_their_whole_prompt_are_counted_and_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anthropic HH dialogues given a prompt key without removing it from chosen and rejected
    trained the whole dialogue as a part of each answer, without a word."""
    from chatlearn.config import Config
    from chatlearn.hf.modules import HFReference

    dialogue = "\n\nHuman: What is 2+2?\n\nAssistant:"
    records = [
        {"prompt": "q", "chosen": "yes", "rejected": "no"},
        {"prompt": dialogue, "chosen": dialogue + " 4", "rejected": dialogue + " 5"},
        {"prompt": "a", "chosen": "apple", "rejected": "avocado"},  # too short to tell
        {"chosen": dialogue + " 4", "rejected": dialogue + " 5"},  # HH: extracted, not counted
        {"prompt": "max(1,2)=", "chosen": "max(1,2)=2", "rejected": "max(1,2)=1"},
    ]
    ds = PreferenceDataset(records, byte_tokenizer(), max_length=128)
    assert ds.num_prompt_in_responses == 2 and ds.first_samples["prompt_in_responses"] == 1
    summary = ds.truncation_summary()
    assert summary == (
        "of 5 pairs, 2 have chosen and rejected texts that both start with the whole prompt (the "
        "prompt kept in the responses?): it is trained as a part of each answer; remove it from "
        "chosen and rejected, or leave out the prompt key of Anthropic HH dialogues (it is then "
        "extracted) (the first: sample 1)"
    )
    # the HF modules warn of it, however few such pairs there are
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    model = {"num_cpu": 1, "model_args": {"model_config": tiny, "max_length": 128}}
    args = {"num_episode": 1, "sample_per_episode": 2, "train_global_batch_size": 2}
    config = Config({"models": {"reference": model}, "runtime": args})
    reference = HFReference("reference", args=config)
    reference._rank, reference._world_size = 0, 1
    reference.setup()
    with caplog.at_level("WARNING"):
        others = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(200)]
        reference.build_dataset(records[1:2] + others)
    assert any("start with the whole prompt" in r.getMessage() for r in caplog.records)


def test_hh_dialogues_that_differ_before_their_last_turn_are_counted_and_said() -> None:
    """Their prompt is extracted up to where they part, and the human's later turns were
    trained as the assistant's answer without a word (a message list is refused for it)."""
    parted = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: bye!",
        "rejected": "\n\nHuman: hi\n\nAssistant: go away\n\nHuman: bye\n\nAssistant: no",
    }
    last = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello",
        "rejected": "\n\nHuman: hi\n\nAssistant: no",
    }
    dialogue = "\n\nHuman: What is 2+2?\n\nAssistant:"
    kept = {"prompt": dialogue, "chosen": dialogue + " 4", "rejected": dialogue + " 5"}
    ds = PreferenceDataset([last, kept, parted], byte_tokenizer(), max_length=128)
    assert ds.num_turns_in_responses == 1 and ds.first_samples["turn_in_responses"] == 2
    assert ds.num_prompt_in_responses == 1  # its prompt's turn is said as that, not twice
    summary = ds.truncation_summary()
    assert (
        summary is not None
        and (
            "1 have a '\\n\\nHuman:' turn inside chosen or rejected (Anthropic HH dialogues that "
            "differ before their last turn): the model is taught to write the human's turns; drop "
            "those records, or cut their responses before it (the first: sample 2)"
        )
        in summary
    ), summary


def test_a_system_prompt_under_a_key_of_its_own_is_said_to_be_unused(tmp_path: Path) -> None:
    """Intel/orca_dpo_pairs (system, question, chosen, rejected), renamed question to prompt
    as the missing-key error says, trained without its system prompts, without a word."""
    orca = {"system": "You are a careful assistant.", "question": "2+2?", "chosen": "4"}
    path = tmp_path / "orca.jsonl"
    path.write_text(json.dumps({**orca, "rejected": "5"}) + "\n")
    with pytest.raises(ValueError, match="rename 'question' to 'prompt'"):
        load_preference_data(path)
    records = [
        {"prompt": "q", "chosen": "yes", "rejected": "no", "system": ""},  # empty: nothing lost
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": orca["system"]},
    ]
    ds = PreferenceDataset(records, byte_tokenizer(), max_length=64)
    assert ds.num_unused_system == 1
    assert ds.truncation_summary() == (
        "of 2 pairs, 1 have a system prompt under a key of its own (system or system_prompt), "
        "which is not read: they train without it; put it into the prompt (a system message "
        "first in a message list, or the prompt's text) (the first: sample 1)"
    )


def test_a_repeat_whose_messages_list_their_keys_in_another_order_is_counted() -> None:
    # merged sources write a message's keys in their own order ({"content", "role"}): the same
    # record, rendered the same, was not counted as a repeat
    from chatlearn.hf.data import _record_hash

    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    first = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    again = {"prompt": [{"content": "hi", "role": "user"}], "chosen": "a", "rejected": "b"}
    assert PreferenceDataset([first, again], tok, max_length=32).num_duplicates == 1
    # keys that cannot be ordered together (a record built in code) are hashed as written
    odd = {"prompt": [{"role": "user", "content": "hi", 1: "x"}], "chosen": "a", "rejected": "b"}
    assert _record_hash(odd) == _record_hash(dict(odd))


def test_responses_of_no_token_are_counted_and_said() -> None:
    # a template rendering empty content gave a response of no token, its loss mask all zeros,
    # accepted without a word
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    prompt = [{"role": "user", "content": "hello"}]
    records = [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": ""}], "rejected": "world"},
        {"prompt": prompt, "chosen": "yes", "rejected": "no"},
    ]
    ds = PreferenceDataset(records, tok, max_length=32)
    assert ds.num_empty_responses == 1 and ds[0]["chosen_loss_mask"].sum() == 0
    summary = ds.truncation_summary()
    assert summary == (
        "of 2 pairs, 1 have a response of no token (the chat template renders nothing for it, "
        "e.g. empty content): its log-prob is 0 whatever the model, so only the other response "
        "is trained; fix the data or the template (the first: sample 0)"
    )


def test_a_file_that_is_not_utf8_names_its_line_and_gzip_is_read(tmp_path: Path) -> None:
    # "not UTF-8 text" named no line (the bad byte of a 777-line file was to be found by hand),
    # and gave no hint for a gzip or a UTF-16 file
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n"
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes((good * 776 + good.replace('"c"', '"caf\u00e9"')).encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_preference_data(latin1)
    assert str(info.value).startswith(f"{latin1}:777: not UTF-8 text (byte 0xe9 at byte 30 ")
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text(good, encoding="utf-16")
    with pytest.raises(ValueError, match=re.escape(f"{utf16}: UTF-16 text (it starts with")):
        load_preference_data(utf16)
    packed = tmp_path / "data.jsonl.gz"
    packed.write_bytes(gzip.compress((good * 3).encode()))
    records = load_preference_data(packed)
    assert len(records) == 3 and records.origin(2) == f"{packed}:3"
    packed.write_bytes(gzip.compress((good * 3).encode())[:-10])  # cut short
    with pytest.raises(ValueError, match="data.jsonl.gz: cannot read it"):
        load_preference_data(packed)
    damaged = bytearray(gzip.compress((good * 50).encode()))
    damaged[20:40] = b"\x00" * 20  # bytes of the deflate stream: zlib's error, not an OSError
    packed.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="data.jsonl.gz: cannot read it"):
        load_preference_data(packed)


def test_a_record_limit_reads_the_file_no_further(tmp_path: Path) -> None:
    # training_data_num_limit: 1000 on a 2 GB file parsed all of its 2M records (25 s, 3.2 GiB)
    # before keeping 1000; the loader now stops at the limit (here a broken line after it)
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n"
    data = tmp_path / "data.jsonl"
    data.write_text(good * 3 + "{not json\n")
    records = load_preference_data(data, limit=2)
    assert len(records) == 2 and records.origin(1) == f"{data}:2"
    assert load_preference_data(data, limit=0) == []
    with pytest.raises(ValueError, match=":4: not valid JSON"):
        load_preference_data(data, limit=-1)  # ChatLearn's -1: every record
    assert len(load_preference_data(iter([json.loads(good)] * 5), limit=3)) == 3


def test_a_file_too_large_for_memory_is_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a 2 GB file under a 3 GB memory limit was a bare MemoryError traceback from inside json
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n"
    data = tmp_path / "data.jsonl"
    data.write_text(good * 5)
    loads, calls = json.loads, []

    def short_of_memory(text: str) -> object:
        calls.append(text)
        if len(calls) > 3:
            raise MemoryError
        return loads(text)

    monkeypatch.setattr(json, "loads", short_of_memory)
    with pytest.raises(ValueError) as info:
        load_preference_data(data)
    assert str(info.value).startswith(
        f"{data}: ran out of memory at line 4, after 3 records: the records are held in memory"
    )
    assert "training_data_num_limit" in str(info.value)


@pytest.mark.timeout(20)  # before the fix the second open waited for a writer forever
def test_data_from_a_pipe_keeps_its_first_bytes(tmp_path: Path) -> None:
    # the gzip check read two bytes and opened the path again: a pipe lost them
    import os
    import threading

    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n"
    fifo = tmp_path / "data.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(good * 2), daemon=True)
    writer.start()
    try:
        records = load_preference_data(fifo)
    finally:
        if writer.is_alive():  # the loader failed before reading: release the blocked writer
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(5)
    assert not writer.is_alive()
    assert len(records) == 2


def test_empty_or_whitespace_only_responses_in_the_data_are_counted_and_said() -> None:
    # "" or "  \n" as chosen or rejected (a failed scrape or generation) scored as eos alone and
    # was trained as an answer of nothing, without a word
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    user = {"role": "user", "content": "hi"}
    records = [
        {"prompt": "q", "chosen": "", "rejected": "no"},
        {"prompt": "q", "chosen": "yes", "rejected": " \n\t"},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": " "}], "rejected": "no"},
        {  # whole conversations: the prompt's message is not a response
            "chosen": [user, {"role": "assistant", "content": ""}],
            "rejected": [user, {"role": "assistant", "content": "no"}],
        },
        {"prompt": "", "chosen": "yes", "rejected": "no"},  # an empty prompt is no response
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "ok"}], "rejected": "no"},
    ]
    ds = PreferenceDataset(records, tok, max_length=32)
    assert len(ds) == 6 and ds.num_blank_responses == 4 and ds.num_empty_responses == 0
    assert ds.truncation_summary() == (
        "of 6 pairs, 4 have an empty or whitespace-only chosen or rejected text in the data: it "
        "scores as an answer of nothing (eos alone), which a chosen one teaches; drop or fix "
        "those records (the first: sample 0)"
    )


def test_byte_order_marks_of_concatenated_files_are_skipped(tmp_path: Path) -> None:
    # `cat a.jsonl b.jsonl` of two files a Windows tool wrote (each with a BOM, CRLF line ends):
    # line 3 was "not valid JSON: Unexpected UTF-8 BOM"
    part = "\ufeff" + "".join(
        json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r"}) + "\r\n" for i in range(2)
    )
    data = tmp_path / "all.jsonl"
    data.write_bytes((part + part).encode("utf-8"))
    records = load_preference_data(data)
    assert [r["prompt"] for r in records] == ["p0", "p1", "p0", "p1"]
    assert records.origin(2) == f"{data}:3"


@pytest.mark.parametrize(
    ("head", "kind", "convert"),
    [
        (b"PAR1\x15\x00\x15\xc8\x01\x15", "a Parquet file", "Dataset.from_parquet('data.jsonl')"),
        (b"\xff\xff\xff\xff\xb8\x00\x00\x00", "an Arrow stream", "Dataset.from_file('data.jsonl')"),
        (b"ARROW1\x00\x00\xff\xff", "an Arrow (Feather) file", "pandas.read_feather('data.jsonl')"),
    ],
)
def test_parquet_and_arrow_files_are_named_with_a_conversion(
    head: bytes, kind: str, convert: str, tmp_path: Path
) -> None:
    # the Hub's parquet files and datasets' .arrow ones were "not UTF-8 text", with advice to
    # convert them from Latin-1 with iconv
    data = tmp_path / "data.jsonl"
    data.write_bytes(head + bytes(64) + b"\n" + bytes(64))
    with pytest.raises(ValueError) as info:
        load_preference_data(data)
    said = str(info.value)
    assert said.startswith(f"{data}: {kind}") and "not UTF-8" not in said, said
    assert convert in said and "data.converted.jsonl" in said  # never the file itself


def test_a_line_that_is_not_json_says_what_it_most_likely_is(tmp_path: Path) -> None:
    # json's messages alone ("Expecting property name enclosed in double quotes", "Extra data")
    # left the user to find out that a write was cut short, or that records were pretty-printed
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    data = tmp_path / "data.jsonl"

    def said(text: str) -> str:
        data.write_text(text)
        with pytest.raises(ValueError) as info:
            load_preference_data(data)
        return str(info.value)

    cut = said(f"{good}\n{good}\n{good[:30]}")  # no line end: the file ends inside the record
    assert cut.startswith(f"{data}:3: not valid JSON: ") and "cut short" in cut, cut
    assert "complete that line or delete it" in cut
    pretty = said(json.dumps(json.loads(good), indent=2) + "\n")
    assert pretty.startswith(f"{data}:1: not valid JSON: ") and "pretty-printed" in pretty
    assert "jq -c . in.json > out.jsonl" in pretty
    assert "two records on one line" in said(f"{good}{good}\n")
    # lines ended by a carriage return alone (classic Mac OS) were "two records on one line"
    mac = said(f"{good}\r{good}\r")
    assert "end with a carriage return alone" in mac and "tr '\\r' '\\n'" in mac, mac
    for table, sep in (
        ('"prompt","chosen","rejected"\n"p","c","r"\n', ","),
        ("prompt\tchosen\trejected\n", "\\t"),
    ):
        csv = said(table)  # was "Expecting value" or "Extra data" alone
        assert csv.startswith(f"{data}:1: not valid JSON: ") and "it is a CSV/TSV table" in csv
        assert f"pandas.read_csv('in.csv', sep='{sep}')" in csv, csv
    # a record that is not closed, followed by others: no guess
    unclosed = said(f"{good}\n{good[:-1]}\n{good}\n")
    assert unclosed.startswith(f"{data}:2: not valid JSON: Expecting ',' delimiter"), unclosed
    assert unclosed.endswith("(char 47)"), unclosed


def test_the_summary_names_max_prompt_length_when_it_cut() -> None:
    # "lost prompt tokens to max_length 512" blamed max_length for what max_prompt_length cut
    record = {"prompt": "ABCDEFGHIJ", "chosen": "0123", "rejected": "ab"}
    ds = PreferenceDataset([record], byte_tokenizer(), max_length=512, max_prompt_length=4)
    assert ds.truncation_summary() == (
        "of 1 pairs, 1 lost prompt tokens and 0 lost response tokens to max_length 512 and "
        "max_prompt_length 4"
    )


def test_a_missing_key_names_the_key_that_most_likely_is_it(tmp_path: Path) -> None:
    # a file's record missing a key ended with "pass engine.set_dataset() a list of such dicts",
    # advice for code, naming none of the keys the record had under another name
    data = tmp_path / "data.jsonl"
    lines = [
        {"question": "q", "response_j": "a", "response_k": "b"},  # StackExchange-paired
        {"Prompt": "q", "Chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "reject": "b"},
        {"p": "q", "c": "a", "r": "b"},
    ]
    fixes = [
        "rename 'question' to 'prompt', 'response_j' to 'chosen', 'response_k' to 'rejected'",
        "rename 'Prompt' to 'prompt', 'Chosen' to 'chosen'",
        "rename 'reject' to 'rejected'",
        "give every record these keys",
    ]
    for line, fix in zip(lines, fixes, strict=True):
        data.write_text(json.dumps(line) + "\n")
        with pytest.raises(ValueError) as info:
            load_preference_data(data)
        assert str(info.value).endswith(f"); {fix}"), str(info.value)
    with pytest.raises(ValueError, match=r"\); pass engine.set_dataset\(\) a list"):
        load_preference_data([lines[3]])  # records given in code: fixed in code


def test_sharegpt_records_are_named_with_what_to_change(tmp_path: Path) -> None:
    # LLaMA-Factory's ShareGPT preference records: "conversations" and {"from", "value"}
    # messages were "missing ['prompt']" / "message 0 has no role", naming neither
    data = tmp_path / "data.jsonl"
    turn = {"from": "human", "value": "hi"}
    data.write_text(json.dumps({"conversations": [turn], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match="rename 'conversations' to 'prompt'$"):
        load_preference_data(data)
    data.write_text(json.dumps({"prompt": [turn], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"message 0 has no role .*\(ShareGPT's from/value: human"):
        load_preference_data(data)


def test_a_directory_given_as_data_names_the_data_files_in_it(tmp_path: Path) -> None:
    # a data set's folder (a Hub download, datasets' save_to_disk) was "cannot read it (Is a
    # directory)", naming none of the files to give instead
    (tmp_path / "data").mkdir()
    for name in ("data/train-00000-of-00001.parquet", "data/test.jsonl", "README.md"):
        (tmp_path / name).write_text("")
    with pytest.raises(ValueError) as info:
        load_preference_data(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: a directory; give the path of one JSONL file in it (it holds "
        "data/test.jsonl, data/train-00000-of-00001.parquet)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="a directory, with no data file in it"):
        load_preference_data(empty)


def test_a_json_object_holding_the_records_under_a_key_is_named(tmp_path: Path) -> None:
    # {"data": [records]} on one line was "missing ['prompt', 'chosen', 'rejected'] (it has
    # ['data'])", as if it were one bad record
    record = {"prompt": "p", "chosen": "c", "rejected": "r"}
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"version": 1, "data": [record] * 3}))
    with pytest.raises(ValueError) as info:
        load_preference_data(data)
    said = str(info.value)
    assert said.startswith(f"{data}: one JSON object holding the records in a list under 'data'")
    assert "json.load(sys.stdin)['data']" in said, said


def test_text_that_holds_the_bos_or_eos_already_gets_no_second_one() -> None:
    # data exported with its template applied ("<s>[INST] ... [/INST]", "answer</s>"): the
    # prompt started with two bos and the response ended with two eos, the second scored and
    # taught as the answer's last token
    tok = byte_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    records = [
        {"prompt": "<s>[INST] hi [/INST]", "chosen": "yes</s>", "rejected": "no"},
        {"prompt": "[INST] hi [/INST]", "chosen": "yes", "rejected": "no</s>"},
    ]
    ds = PreferenceDataset(records, tok)
    first, second = ds[0], ds[1]
    for side in ("chosen", "rejected"):
        assert torch.equal(first[f"{side}_input_ids"], second[f"{side}_input_ids"]), side
    ids = first["chosen_input_ids"].tolist()
    assert ids[:2] == [bos, ord("[")] and ids[-2:] == [ord("s"), eos], ids
    assert len(PairTokenizer(tok).encode(records[0])[1]) == len("yes") + 1
