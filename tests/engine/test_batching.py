"""Chunking, concatenation, per-sample split and collation with padding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from chatlearn.engine.batching import (
    PaddingSpec,
    batch_size_of,
    chunk_sizes,
    collate_inputs,
    collate_samples,
    concat_outputs,
    gather_micro_batch,
    normalize_padding_config,
    pad_stack,
    split_into_chunks,
    split_per_sample,
)

# -- chunking ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "gbs", "sizes"),
    [
        (8, 3, [3, 3, 2]),
        (8, 2, [2, 2, 2, 2]),
        (8, 8, [8]),
        (8, 10, [8]),
        (8, 0, [8]),
        (8, -1, [8]),
        (8, -2, [8]),
        (8, None, [8]),
        (1, 2, [1]),
        (0, 2, [0]),
        (7, 1, [1] * 7),
        (5, 2, [2, 2, 1]),
    ],
)
def test_chunk_sizes(batch, gbs, sizes):
    assert chunk_sizes(batch, gbs) == sizes


def test_split_into_chunks_slices_every_batch_first_value():
    batch = {
        "ids": torch.arange(16).reshape(8, 2),
        "prompt": [f"p{i}" for i in range(8)],
        "lens": tuple(range(8)),
        "arr": np.arange(8),
        "temperature": 0.7,
        "scale": torch.tensor(2.0),
    }
    chunks = split_into_chunks(batch, 3)
    assert [len(c["prompt"]) for c in chunks] == [3, 3, 2]
    assert torch.equal(chunks[1]["ids"], torch.tensor([[6, 7], [8, 9], [10, 11]]))
    assert chunks[2]["prompt"] == ["p6", "p7"]
    assert chunks[2]["lens"] == [6, 7]
    assert chunks[0]["arr"].tolist() == [0, 1, 2]
    assert all(c["temperature"] == 0.7 for c in chunks)
    assert all(c["scale"] is batch["scale"] for c in chunks)


def test_split_into_chunks_without_split_returns_the_batch():
    batch = {"ids": torch.arange(4), "p": list("abcd")}
    (only,) = split_into_chunks(batch, 0)
    assert only["p"] == list("abcd") and only is not batch
    assert split_into_chunks({"flag": True}, 2) == [{"flag": True}]


def test_chunk_then_concat_round_trips():
    batch = {"x": torch.randn(11, 3), "ids": list(range(11))}
    out = concat_outputs(split_into_chunks(batch, 4))
    assert torch.equal(out["x"], batch["x"])
    assert out["ids"] == batch["ids"]


def test_mismatched_lengths_name_the_keys():
    bad = {"input_ids": torch.zeros(4, 3), "labels": [1, 2, 3]}
    with pytest.raises(ValueError, match="'labels' has batch size 3 but key 'input_ids' has 4"):
        split_into_chunks(bad, 2)
    with pytest.raises(ValueError, match="forward_step output of reference: key 'labels'"):
        split_per_sample(bad, what="forward_step output of reference")
    with pytest.raises(ValueError, match="holds a dict"):
        batch_size_of({"a": {"b": torch.zeros(2)}})
    with pytest.raises(ValueError, match="must be a dict"):
        batch_size_of([torch.zeros(2)])  # type: ignore[arg-type]


# -- concatenation -----------------------------------------------------------------------------


def test_concat_outputs_tensors_lists_arrays():
    outs = [
        {"logp": torch.tensor([1.0, 2.0]), "txt": ["a", "b"], "a": np.zeros((2, 2))},
        {"logp": torch.tensor([3.0]), "txt": ("c",), "a": np.ones((1, 2))},
    ]
    joined = concat_outputs(outs)
    assert torch.equal(joined["logp"], torch.tensor([1.0, 2.0, 3.0]))
    assert joined["txt"] == ["a", "b", "c"]
    assert joined["a"].shape == (3, 2)


def test_concat_detaches_and_moves_to_cpu():
    x = torch.ones(2, requires_grad=True) * 2
    joined = concat_outputs([{"x": x}])
    assert not joined["x"].requires_grad
    assert joined["x"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_concat_moves_cuda_outputs_to_cpu():
    outs = [{"x": torch.ones(2, device="cuda")}, {"x": torch.zeros(1, device="cuda")}]
    assert concat_outputs(outs)["x"].device.type == "cpu"


@pytest.mark.parametrize(
    ("outs", "message"),
    [
        ([None], "chunk 0 is None"),
        ([{"x": torch.zeros(2)}, {"y": torch.zeros(2)}], r"missing \['x'\], extra \['y'\]"),
        ([{"loss": torch.tensor(1.0)}], "'loss' of chunk 0 is a 0-dim tensor"),
        ([{"n": 3}], "'n' of chunk 0 is a int"),
        ([{"x": torch.zeros(2, 3)}, {"x": torch.zeros(1, 4)}], "cannot be concatenated"),
        ([{"x": torch.zeros(2)}, {"x": [1.0]}], "tensor in some chunks"),
        ([{"x": [1]}, {"x": torch.zeros(1)}], "list in chunk 0 but not in chunk 1"),
        ([], "nothing to concatenate"),
    ],
)
def test_concat_errors(outs, message):
    with pytest.raises(ValueError, match=message):
        concat_outputs(outs)


# -- per-sample split ----------------------------------------------------------------------------


def test_split_per_sample_rows_and_items():
    out = {"ids": torch.arange(6).reshape(3, 2), "txt": ["a", "b", "c"], "beta": 0.1}
    samples = split_per_sample(out, expected_size=3)
    assert len(samples) == 3
    assert torch.equal(samples[2]["ids"], torch.tensor([4, 5]))
    assert [s["txt"] for s in samples] == ["a", "b", "c"]
    assert all(s["beta"] == 0.1 for s in samples)
    # rows of a 1-dim tensor are 0-dim tensors; collation stacks them back
    scalars = split_per_sample({"logp": torch.tensor([0.5, 1.5])})
    assert scalars[0]["logp"].dim() == 0
    assert torch.equal(collate_samples(scalars)["logp"], torch.tensor([0.5, 1.5]))


def test_split_per_sample_errors():
    with pytest.raises(ValueError, match="3 rows for 4 input samples"):
        split_per_sample({"x": torch.zeros(3)}, expected_size=4)
    with pytest.raises(ValueError, match="no batch-first value"):
        split_per_sample({"loss": torch.tensor(1.0)})


# -- collation -----------------------------------------------------------------------------------


def samples_of(*seqs, key="ids"):
    return [{key: torch.tensor(s)} for s in seqs]


def test_right_padding_with_zero_by_default():
    batch = collate_samples(samples_of([1, 2, 3], [4], [5, 6]))
    assert batch["ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert batch["ids"].dtype == torch.int64


def test_left_padding_and_custom_values():
    samples = [
        {
            "ids": torch.tensor([1, 2, 3]),
            "mask": torch.tensor([1, 1, 1]),
            "lp": torch.tensor([0.5]),
        },
        {"ids": torch.tensor([4]), "mask": torch.tensor([1]), "lp": torch.tensor([0.25, 0.75])},
    ]
    padding = {
        "ids": PaddingSpec(value=99, padding_type="left"),
        "mask": {"padding_value": 0, "padding_type": "left"},
        "lp": {"padding_value": -1.0, "padding_type": "right"},
    }
    batch = collate_samples(samples, padding)
    assert batch["ids"].tolist() == [[1, 2, 3], [99, 99, 4]]
    assert batch["mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["lp"].tolist() == [[0.5, -1.0], [0.25, 0.75]]


def test_padding_is_on_the_first_per_sample_dim_only():
    samples = [{"h": torch.ones(2, 3)}, {"h": torch.ones(4, 3) * 2}]
    h = collate_samples(samples, {"h": PaddingSpec(-5.0, "left")})["h"]
    assert h.shape == (2, 4, 3)
    assert h[0, :2].eq(-5).all() and h[0, 2:].eq(1).all() and h[1].eq(2).all()


def test_zero_dim_tensors_are_stacked_and_others_listed():
    samples = [
        {"r": torch.tensor(1.0), "txt": "a", "meta": {"k": 1}},
        {"r": torch.tensor(2.0), "txt": "b", "meta": {"k": 2}},
    ]
    batch = collate_samples(samples)
    assert torch.equal(batch["r"], torch.tensor([1.0, 2.0]))
    assert batch["txt"] == ["a", "b"]
    assert batch["meta"] == [{"k": 1}, {"k": 2}]


def test_pad_stack_matches_torch_pad_sequence():
    from torch.nn.utils.rnn import pad_sequence

    seqs = [torch.randn(n, 2) for n in (3, 1, 5)]
    assert torch.equal(pad_stack(seqs, 0.0), pad_sequence(seqs, batch_first=True))
    left = pad_sequence([s.flip(0) for s in seqs], batch_first=True, padding_value=7.0).flip(1)
    assert torch.equal(pad_stack(seqs, 7.0, "left"), left)


def test_samples_that_differ_in_a_later_dim_pad_there() -> None:
    # a dataset that keeps a tokenizer's [1, L] rows (ChatLearn's reward datasets do): the
    # reference's output per sample is [1, L], L varying with the chunk it was collated in
    rows = [torch.arange(1, 4)[None], torch.arange(1, 6)[None]]
    batch = collate_samples([{"ids": rows[0]}, {"ids": rows[1]}], {"ids": PaddingSpec(-1)})
    assert batch["ids"].tolist() == [[[1, 2, 3, -1, -1]], [[1, 2, 3, 4, 5]]]
    left = pad_stack([torch.ones(2, 3), torch.full((1, 4), 2.0)], 0.0, "left")
    assert left.tolist() == [[[0, 1, 1, 1], [0, 1, 1, 1]], [[0, 0, 0, 0], [2, 2, 2, 2]]]


@pytest.mark.parametrize(
    ("samples", "padding", "message"),
    [
        ([], None, "empty micro-batch"),
        ([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], None, "sample 1 of the micro-batch"),
        ([{"a": torch.zeros(2)}, {"a": torch.zeros(2, 1)}], None, "different ranks"),
        ([{"a": torch.zeros(2)}, {"a": [0.0, 0.0]}], None, "tensor in some samples"),
        ([{"a": torch.zeros(2)}], {"a": {"padding_type": "middle"}}, "'right' or 'left'"),
        ([{"a": torch.zeros(2)}], {"a": {"pad": 1}}, "unknown fields"),
        ([{"a": torch.zeros(2)}], {"a": 3}, "must be a dict"),
    ],
)
def test_collate_errors(samples, padding, message):
    with pytest.raises(ValueError, match=message):
        collate_samples(samples, padding)


def test_padding_spec_validation_and_chatlearn_form():
    with pytest.raises(ValueError, match="'right' or 'left'"):
        PaddingSpec(0.0, "up")  # type: ignore[arg-type]
    spec = PaddingSpec(2.0, "left")
    assert spec.to_dict() == {"padding_value": 2.0, "padding_type": "left"}
    assert normalize_padding_config({"k": spec.to_dict()}) == {"k": spec}
    assert normalize_padding_config(None) == {}


def test_gather_micro_batch_from_a_buffer():
    buffer = {p: {"ids": torch.arange(p + 1)} for p in range(4)}
    batch = gather_micro_batch(buffer, [3, 0])
    assert batch["ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]
    with pytest.raises(KeyError, match=r"\[7\]"):
        gather_micro_batch(buffer, [0, 7])


# -- a reference's input without a collate_fn: as ChatLearn's default_collate -----------------
def test_inputs_without_a_collate_fn_are_what_default_collate_makes_of_them():
    # ChatLearn's DataLoader collates with default_collate when the dataset has no collate_fn
    # (as its guide suggests for some): programs call .tolist() or .cuda() on the numbers
    samples = [
        {
            "id": i,
            "score": 0.5 * i,
            "keep": i % 2 == 0,
            "weight": np.float32(i),
            "count": np.int64(i),
            "features": np.arange(3, dtype=np.float32) + i,
            "ids": torch.tensor([i, i + 1]),
            "text": f"prompt {i}",
        }
        for i in range(3)
    ]
    ours = collate_inputs(samples)
    theirs = torch.utils.data.default_collate(samples)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(ours[key], torch.Tensor), key
            assert ours[key].dtype == value.dtype, key
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key


def test_inputs_without_a_collate_fn_pad_what_default_collate_cannot_stack():
    samples = [
        {"ids": np.array([1, 2, 3]), "n": 3, "mixed": 1, "big": 2**70, "s": np.array(["a"])},
        {"ids": np.array([4]), "n": 1, "mixed": "one", "big": 1, "s": np.array(["b"])},
    ]
    batch = collate_inputs(samples)
    assert torch.equal(batch["ids"], torch.tensor([[1, 2, 3], [4, 0, 0]]))
    assert torch.equal(batch["n"], torch.tensor([3, 1]))
    assert batch["mixed"] == [1, "one"]  # not all numbers: a list, as the trainer's rule
    assert batch["big"] == [2**70, 1]  # beyond int64: left as Python ints
    assert [a.tolist() for a in batch["s"]] == [["a"], ["b"]]  # arrays of strings stay arrays


def test_inputs_without_a_collate_fn_keep_arrays_they_cannot_stack_as_a_list():
    # as before numpy arrays became tensors: an optional feature (None in some samples), arrays
    # of another rank or a list in another sample stay the list of them, not a ValueError
    samples = [
        {"opt": np.arange(3), "rank": np.arange(3), "kind": np.arange(2)},
        {"opt": None, "rank": np.zeros((2, 2)), "kind": [1, 2]},
    ]
    batch = collate_inputs(samples)
    for key, values in batch.items():
        assert isinstance(values, list), key
        assert [v is s[key] for v, s in zip(values, samples, strict=True)] == [True, True], key


def test_inputs_without_a_collate_fn_stack_arrays_in_their_promoted_dtype():
    # np.array([1, 2]) is int64, np.array([0.5, 1.5]) float64: default_collate gives float64;
    # padded into the first array's dtype, 0.5 became 0
    samples = [{"x": np.array([1, 2])}, {"x": np.array([0.5, 1.5])}, {"x": np.array([3.25])}]
    batch = collate_inputs(samples)
    assert batch["x"].dtype == torch.float64
    assert batch["x"].tolist() == [[1.0, 2.0], [0.5, 1.5], [3.25, 0.0]]
    same_shape = samples[:2]
    assert torch.equal(collate_inputs(same_shape)["x"], default_collate(same_shape)["x"])
    # dtypes torch does not promote together: the list, as before
    unsigned = [{"x": np.array([1], dtype=np.uint32)}, {"x": np.array([2])}]
    assert isinstance(collate_inputs(unsigned)["x"], list)


def test_inputs_without_a_collate_fn_take_arrays_torch_cannot_view():
    # a reversed array, one of another byte order (read from a file) and a read-only one (a
    # memory map): torch.from_numpy refuses the first two (ValueError) and warns at the third
    ours = [np.arange(3)[::-1], np.arange(2, dtype=">i4"), np.frombuffer(b"\x01\0\0\0", "<i4")]
    samples = [{"x": array} for array in ours]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = collate_inputs(samples)
        same_shape = collate_inputs([{"x": ours[1]}, {"x": ours[1][::-1]}])  # stacked at once
    assert batch["x"].tolist() == [[2, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert same_shape["x"].tolist() == [[0, 1], [1, 0]]
    assert same_shape["x"].dtype == torch.int32


def test_inputs_without_a_collate_fn_that_are_not_dicts_are_default_collates():
    # a dataset of prompt strings or of tuples: ChatLearn's forward_step gets default_collate's
    # list (its strings) or tuple of columns; collated key by key it was an AttributeError
    assert collate_inputs(["a", "b"]) == ["a", "b"]
    rows = [(1, "x", np.float32(0.5)), (2, "y", np.float32(1.5))]
    ours, theirs = collate_inputs(rows), default_collate(rows)
    assert torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1] == ("x", "y")
    assert ours[2].dtype == torch.float32


def test_a_number_passed_through_is_a_list_when_its_chunks_collated_it_differently():
    # a reference's forward_step passes "score" through: a chunk of numbers made it a tensor,
    # a chunk with a None left the list; a micro-batch of samples from both stopped training
    # with "key 'score' is a tensor in some samples and not in others" (or held tensor(1)),
    # as the draw fell. The numbers come as they were in the dataset, as before
    chunks = [[{"row": 0, "score": 1}, {"row": 1, "score": 2}], [{"row": 2, "score": None}]]
    outputs = [split_per_sample(collate_inputs(chunk)) for chunk in chunks]
    for samples in ([outputs[0][0], outputs[1][0]], [outputs[1][0], outputs[0][1]]):
        batch = collate_samples(samples)
        assert batch["score"] in ([1, None], [None, 2])
        assert [type(v) for v in batch["score"] if v is not None] == [int]
    # all tensors, all 0-dim: stacked, as ever
    assert torch.equal(collate_samples(outputs[0])["score"], torch.tensor([1, 2]))


@pytest.mark.parametrize(
    "values",
    [
        [np.int64(1), 2],  # a pandas column's numbers beside Python's
        [1, np.int64(2)],
        [1, 2.5],  # an int first: float32, as default_collate
        [True, 1],
        [np.complex64(1j), np.complex64(2)],
        [np.float16(0.5), 3],
    ],
)
def test_inputs_without_a_collate_fn_mixing_numbers_are_default_collates_tensor(values):
    # numpy's and Python's numbers together were left a list: forward_step's .tolist() on it
    # was an AttributeError where ChatLearn's default_collate gives a tensor
    samples = [{"x": value} for value in values]
    ours, theirs = collate_inputs(samples)["x"], default_collate(samples)["x"]
    assert isinstance(ours, torch.Tensor)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
