"""Preference data for the megatron DPO example: records, a character tokenizer, the dataset.

Records are the DPO example's format, one preference pair each:

    {"prompt": "max(37,512)=", "chosen": "512", "rejected": "37"}

`load_preference_data(path)` reads them from a JSONL file (e.g. the one `examples/dpo/make_data.py`
writes) with chatlearn.hf's loader: a byte-order mark, CRLF line ends, gzip and Anthropic HH
records without a prompt are read, and a record that is none is one line naming its file:line.
`toy_preference_pairs(n, seed)` makes the same kind of pairs in memory, so the example
and its tests run without any file or download. A megatron model here has no Hugging Face
tokenizer, so text is encoded one character per token (printable ASCII), which keeps the
vocabulary at 128 — small enough for a GPTModel that trains on a CPU in seconds. A record it
cannot encode (another character, a message list) is a config error naming the sample (the
run names its file:line).

Truncation to `max_length` follows chatlearn.hf's rules: a prompt too long for the longer
response loses tokens from its left (keeping its bos and at least half of `max_length`), then
each response is cut from the right; every response keeps at least one token.

The dataset's `collate_fn` produces the batch convention of `chatlearn.algorithms.dpo`:
`chosen_input_ids`, `chosen_attention_mask`, `chosen_loss_mask` and the same `rejected_*`,
right-padded with 0; the loss mask marks the response and its end-of-text token.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from chatlearn.config.errors import ConfigError, sample_where
from chatlearn.hf.data import load_preference_data as load_records

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_FIRST_CHAR, _LAST_CHAR = 32, 126  # printable ASCII
VOCAB_SIZE = 128  # 3 special ids + 95 characters, rounded up

Record = dict[str, str]


class CharTokenizer:
    """Printable ASCII, one id per character, with pad / bos / eos ids 0 / 1 / 2."""

    pad_token_id = PAD_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        ids = []
        for position, char in enumerate(text):
            code = ord(char)
            if not _FIRST_CHAR <= code <= _LAST_CHAR:
                raise ValueError(f"character {char!r} (at {position}) is outside printable ASCII")
            ids.append(code - _FIRST_CHAR + 3)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i - 3 + _FIRST_CHAR) for i in ids if i >= 3)


def toy_preference_pairs(num: int, seed: int = 0, max_value: int = 99) -> list[Record]:
    """`num` min/max pairs: the chosen answer is the right operand, the rejected the other one."""
    rng = random.Random(seed)
    records: list[Record] = []
    while len(records) < num:
        op = rng.choice(("max", "min"))
        x, y = rng.randint(0, max_value), rng.randint(0, max_value)
        if x == y:
            continue
        high, low = str(max(x, y)), str(min(x, y))
        chosen, rejected = (high, low) if op == "max" else (low, high)
        records.append({"prompt": f"{op}({x},{y})=", "chosen": chosen, "rejected": rejected})
    return records


def load_preference_data(path: str | Path) -> list[Record]:
    """Records from a JSONL file with `prompt`, `chosen` and `rejected` on every line.

    Read by chatlearn.hf's loader, whose list of records knows each one's file:line (the run
    names it when `build_dataset` refuses a record). It was ``json.loads`` per line, where a
    byte-order mark or a cut last line was a traceback, and ``str()`` of each value, where a
    null trained as the text "None". A file that is no preference data is a ValueError."""
    return cast(list[Record], load_records(path))


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs; `collate_fn` pads them into the DPO batch convention.

    A record the character tokenizer cannot encode is a ConfigError naming "sample i of the
    <split> data set" and its key: it was a bare ValueError from a reference replica, naming
    no record. A prompt too long was cut from the right with the responses, and the pair's
    response gone entirely was a traceback; it keeps its end now (see the module doc)."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: CharTokenizer,
        max_length: int,
        split: str = "",
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a bos and a response token): {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.items = [self._encode(record, i, split) for i, record in enumerate(records)]

    def _encode(self, record: Record, index: int, split: str) -> dict[str, list[int]]:
        ids = {
            key: self._ids(record, key, index, split) for key in ("prompt", "chosen", "rejected")
        }
        prompt = [BOS_ID, *ids["prompt"]]
        responses = {side: [*ids[side], EOS_ID] for side in ("chosen", "rejected")}
        longest = max(len(response) for response in responses.values())
        if len(prompt) + longest > self.max_length:
            keep = max(self.max_length - longest, min(len(prompt), self.max_length // 2))
            prompt = [BOS_ID, *prompt[len(prompt) - keep + 1 :]]  # its end, after its bos
        room = self.max_length - len(prompt)
        item = {}
        for side, response in responses.items():
            # the first token is never predicted: the bos comes before every response token
            item[f"{side}_input_ids"] = prompt + response[:room]
            item[f"{side}_loss_mask"] = [0] * len(prompt) + [1] * len(response[:room])
        return item

    def _ids(self, record: Record, key: str, index: int, split: str) -> list[int]:
        value = record.get(key) if isinstance(record, Mapping) else None
        where = sample_where(index, split)
        if not isinstance(value, str):
            shown = "missing" if value is None else f"{value!r:.80} (a {type(value).__name__})"
            raise ConfigError(
                f"{key} is {shown}: this example's character tokenizer encodes text only",
                where=where,
                fix=f"give {key} as a string (message lists train with chatlearn.hf's modules, "
                "examples/dpo)",
            )
        try:
            return self.tokenizer.encode(value)
        except ValueError as exc:
            raise ConfigError(
                f"{key}: {exc}",
                where=where,
                fix="replace the character, or train with chatlearn.hf's modules (examples/dpo), "
                "whose tokenizers encode any text",
            ) from None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]

    @staticmethod
    def collate_fn(items: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            length = max(len(item[f"{side}_input_ids"]) for item in items)
            ids = torch.full((len(items), length), PAD_ID, dtype=torch.long)
            attention = torch.zeros((len(items), length), dtype=torch.long)
            loss_mask = torch.zeros((len(items), length), dtype=torch.long)
            for row, item in enumerate(items):
                n = len(item[f"{side}_input_ids"])
                ids[row, :n] = torch.tensor(item[f"{side}_input_ids"])
                attention[row, :n] = 1
                loss_mask[row, :n] = torch.tensor(item[f"{side}_loss_mask"])
            batch[f"{side}_input_ids"] = ids
            batch[f"{side}_attention_mask"] = attention
            batch[f"{side}_loss_mask"] = loss_mask
        return batch
