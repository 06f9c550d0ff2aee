"""A sample the transport cannot send is named by split, index, file:line and key path."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np

from chatlearn.engine.sample_errors import unsendable_sample_error
from chatlearn.hf import load_preference_data


def test_an_unsendable_extra_field_is_named_by_its_sample_and_key(tmp_path: Path) -> None:
    # was `EncodeError: cannot encode an object of type datetime`, naming neither
    good = {"prompt": "p", "chosen": "c", "rejected": "r", "score": np.float32(8.5)}
    bad = dict(good, meta={"tags": ["a", {"created": datetime.datetime(2024, 1, 1)}]})
    error = unsendable_sample_error([("training", [good, good, good, bad]), ("eval", [])], {})
    assert error is not None
    assert error.one_line() == (
        "sample 3 of the training data set: key 'meta'['tags'][1]['created'] is "
        "datetime.datetime(2024, 1, 1, 0, 0) (a datetime), which cannot be sent to the models "
        "(fix: convert it to a string or a number, or drop the key, before set_dataset)"
    )
    assert unsendable_sample_error([("training", [good])], {}) is None
    # from a data file: its line too
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" * 3)
    records = load_preference_data(path)
    records[0]["created"] = {1, 2}
    error = unsendable_sample_error([("eval", records)], {"eval": records.origin})
    assert error is not None and error.one_line().startswith(
        f"{path}:1: sample 0 of the eval data set: key 'created' is {{1, 2}} (a set)"
    )


def test_a_lone_surrogate_in_a_sample_is_named_as_such() -> None:
    # "is 'a\ud83d' (a str) ... fix: convert it to a string": it is one already
    error = unsendable_sample_error([("training", [{"prompt": "a\ud83d"}])], {})
    assert error is not None
    line = error.one_line()
    assert line.startswith("sample 0 of the training data set: key 'prompt' holds text that is ")
    assert "lone surrogate" in line and "convert it to a string" not in line
