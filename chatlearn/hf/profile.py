"""A realistic length profile of preference data, generated (nothing is downloaded).

Real preference data spreads prompt and response lengths over two orders of magnitude; a
benchmark on equal-length rows hides what padding and repeated prompts cost. `REALISTIC` is the
profile of issue 14: prompts lognormal with median 96 tokens and σ 1.0 (clipped to [8, 1024]),
chosen and rejected independently lognormal with median 192 and σ 0.8 (clipped to [4, 1024]),
`max_length` 1024 and `max_prompt_length` 512 for the dataset.

Lengths are in tokens of the byte tokenizer (`chatlearn.hf.tokenizer`) as
`chatlearn.hf.data.PairTokenizer` encodes a record: a prompt counts its leading ``<s>``, a response
its trailing ``</s>``, and every other character of the generated ASCII text is one token.

    records = realistic_records(256, seed=0)              # [{"prompt", "chosen", "rejected"}]
    dataset = PreferenceDataset(records, byte_tokenizer(), **REALISTIC.dataset_options())
    print(format_percentiles(measured_percentiles(records, byte_tokenizer())))
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PERCENTILES = (10, 50, 90, 99)


@dataclass(frozen=True, slots=True)
class LengthProfile:
    prompt_median: int = 96
    prompt_sigma: float = 1.0
    prompt_range: tuple[int, int] = (8, 1024)
    response_median: int = 192
    response_sigma: float = 0.8
    response_range: tuple[int, int] = (4, 1024)
    max_length: int = 1024
    max_prompt_length: int = 512

    def dataset_options(self) -> dict[str, int]:
        """The truncation settings of `PreferenceDataset` / a module's model_args."""
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length}


REALISTIC = LengthProfile()


def sample_lengths(
    num_pairs: int, *, seed: int = 0, profile: LengthProfile = REALISTIC
) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of `num_pairs` pairs, reproducible from `seed`."""
    rng = random.Random(seed)

    def draw(median: int, sigma: float, bounds: tuple[int, int]) -> int:
        value = round(rng.lognormvariate(math.log(median), sigma))
        return min(max(value, bounds[0]), bounds[1])

    return [
        (
            draw(profile.prompt_median, profile.prompt_sigma, profile.prompt_range),
            draw(profile.response_median, profile.response_sigma, profile.response_range),
            draw(profile.response_median, profile.response_sigma, profile.response_range),
        )
        for _ in range(num_pairs)
    ]


def realistic_records(
    num_pairs: int, *, seed: int = 0, profile: LengthProfile = REALISTIC
) -> list[dict[str, str]]:
    """Preference records whose byte-tokenized lengths follow `profile` (see the module doc)."""
    rng = random.Random(seed + 1)  # the text, independent of the lengths' draws
    records = []
    for prompt, chosen, rejected in sample_lengths(num_pairs, seed=seed, profile=profile):
        # one token of each is the <s> / </s> the tokenization adds
        records.append(
            {
                "prompt": _text(rng, prompt - 1),
                "chosen": _text(rng, chosen - 1),
                "rejected": _text(rng, rejected - 1),
            }
        )
    return records


def _text(rng: random.Random, length: int) -> str:
    """`length` ASCII characters of lowercase words separated by single spaces (no trailing
    space: a tokenizer may drop it)."""
    words: list[str] = []
    size = 0
    while size <= length:  # size counts a space after the last word, which join does not add
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        words.append(word)
        size += len(word) + 1
    text = " ".join(words)[:length]
    return text[:-1] + "x" if text.endswith(" ") else text


def measured_percentiles(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    profile: LengthProfile = REALISTIC,
    percentiles: Sequence[int] = PERCENTILES,
) -> dict[str, dict[int, int]]:
    """Percentiles of the tokenized lengths: `prompt`, `chosen`, `rejected` as encoded, and
    `pair` — prompt + the longer response after the profile's truncation (one side's row)."""
    from chatlearn.hf.data import PairTokenizer

    pairs = PairTokenizer(
        tokenizer, max_length=profile.max_length, max_prompt_length=profile.max_prompt_length
    )
    encoded = pairs.encode_many(records)
    columns: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": [], "pair": []}
    for prompt, chosen, rejected in encoded:
        columns["prompt"].append(len(prompt))
        columns["chosen"].append(len(chosen))
        columns["rejected"].append(len(rejected))
        p, c, r = pairs.truncate(prompt, chosen, rejected)
        columns["pair"].append(len(p) + max(len(c), len(r)))
    return {name: _percentiles(values, percentiles) for name, values in columns.items()}


def _percentiles(values: list[int], percentiles: Sequence[int]) -> dict[int, int]:
    """Nearest-rank percentiles (each one a length that occurs)."""
    if not values:
        raise ValueError("no records to measure")
    ordered = sorted(values)
    return {q: ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in percentiles}


def format_percentiles(measured: Mapping[str, Mapping[int, int]]) -> str:
    """One line per column: `prompt   p10 33  p50 96  p90 346  p99 986` (tokens)."""
    lines = []
    for name, values in measured.items():
        cells = "  ".join(f"p{q} {value}" for q, value in values.items())
        lines.append(f"{name:<9}{cells}")
    return "\n".join(lines)
