"""Preference data for the megatron DPO example: records, a character tokenizer, the dataset.

Records are the DPO example's format, one preference pair each:

    {"prompt": "max(37,512)=", "chosen": "512", "rejected": "37"}

`load_preference_data(path)` reads them from a JSONL file (e.g. the one `examples/dpo/make_data.py`
writes); `toy_preference_pairs(n, seed)` makes the same kind of pairs in memory, so the example
and its tests run without any file or download. A megatron model here has no Hugging Face
tokenizer, so text is encoded one character per token (printable ASCII), which keeps the
vocabulary at 128 — small enough for a GPTModel that trains on a CPU in seconds.

The dataset's `collate_fn` produces the batch convention of `chatlearn.algorithms.dpo`:
`chosen_input_ids`, `chosen_attention_mask`, `chosen_loss_mask` and the same `rejected_*`,
right-padded with 0; the loss mask marks the response and its end-of-text token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

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
        for char in text:
            code = ord(char)
            if not _FIRST_CHAR <= code <= _LAST_CHAR:
                raise ValueError(f"character {char!r} is outside printable ASCII")
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
    """Records from a JSONL file with `prompt`, `chosen` and `rejected` on every line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = {"prompt", "chosen", "rejected"} - set(record)
            if missing:
                raise ValueError(f"{path}:{number}: missing keys {sorted(missing)}")
            records.append({key: str(record[key]) for key in ("prompt", "chosen", "rejected")})
    return records


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs; `collate_fn` pads them into the DPO batch convention."""

    def __init__(self, records: Sequence[Record], tokenizer: CharTokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.items = [self._encode(record) for record in records]

    def _encode(self, record: Record) -> dict[str, list[int]]:
        prompt = [BOS_ID, *self.tokenizer.encode(record["prompt"])]
        item = {}
        for side in ("chosen", "rejected"):
            response = [*self.tokenizer.encode(record[side]), EOS_ID]
            ids = (prompt + response)[: self.max_length]
            # the first token is never predicted, so a response needs at least one prompt token
            loss_mask = ([0] * len(prompt) + [1] * len(response))[: self.max_length]
            if sum(loss_mask) == 0:
                raise ValueError(f"max_length {self.max_length} leaves no response token: {record}")
            item[f"{side}_input_ids"] = ids
            item[f"{side}_loss_mask"] = loss_mask
        return item

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
