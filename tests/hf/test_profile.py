"""The realistic length profile: records tokenize to the drawn lengths, which follow the issue's
lognormal distributions; percentiles are measured from the tokenizer."""

from __future__ import annotations

import math
import statistics

from chatlearn.hf import PreferenceDataset, byte_tokenizer
from chatlearn.hf.data import PairTokenizer
from chatlearn.hf.profile import (
    REALISTIC,
    format_percentiles,
    measured_percentiles,
    realistic_records,
    sample_lengths,
)


def test_records_tokenize_to_the_drawn_lengths_reproducibly() -> None:
    records = realistic_records(40, seed=3)
    assert records == realistic_records(40, seed=3) != realistic_records(40, seed=4)
    pairs = PairTokenizer(byte_tokenizer(), max_length=10_000)
    encoded = [tuple(map(len, pairs.encode(record))) for record in records]
    assert encoded == sample_lengths(40, seed=3)
    dataset = PreferenceDataset(records, byte_tokenizer(), **REALISTIC.dataset_options())
    assert max(len(dataset[i]["chosen_input_ids"]) for i in range(len(dataset))) <= 1024


def test_lengths_follow_the_lognormal_profile() -> None:
    lengths = sample_lengths(4000, seed=0)
    prompts = [p for p, _, _ in lengths]
    responses = [n for _, c, r in lengths for n in (c, r)]
    assert min(prompts) >= 8 and max(prompts) <= 1024
    assert min(responses) >= 4 and max(responses) <= 1024
    assert abs(statistics.median(prompts) / 96 - 1) < 0.08
    assert abs(statistics.median(responses) / 192 - 1) < 0.08
    # σ of log length, from the quartiles (unaffected by the clipping): IQR = 2 · 0.674 σ
    q1, _, q3 = statistics.quantiles(map(math.log, prompts), n=4)
    assert abs((q3 - q1) / 1.349 - 1.0) < 0.08
    q1, _, q3 = statistics.quantiles(map(math.log, responses), n=4)
    assert abs((q3 - q1) / 1.349 - 0.8) < 0.08


def test_measured_percentiles_come_from_the_tokenizer() -> None:
    records = [{"prompt": "a" * 9, "chosen": "b" * n, "rejected": "c"} for n in range(1, 101)]
    measured = measured_percentiles(records, byte_tokenizer())
    assert measured["prompt"] == {10: 10, 50: 10, 90: 10, 99: 10}  # <s> + 9
    assert measured["chosen"] == {10: 11, 50: 51, 90: 91, 99: 100}  # n + </s>
    assert measured["rejected"][50] == 2
    assert measured["pair"][99] == 10 + 100
    assert format_percentiles(measured).splitlines()[0] == "prompt   p10 10  p50 10  p90 10  p99 10"
