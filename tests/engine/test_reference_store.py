"""The on-disk reference store (``runtime.reference_store``): a second run over the same data is
served from it and trains exactly the same; another model (other weights: another fingerprint)
or other samples (other tokens: other keys) find nothing; a broken entry or file is detected and
computed again, never used."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from resume_trials import Trial, assert_identical  # noqa: E402

from chatlearn.config.errors import ConfigError
from chatlearn.engine import reference_store
from chatlearn.engine.reference_store import ReferenceStore, fingerprint, sample_key

pytestmark = pytest.mark.timeout(120)


def _episodes(trial: Trial) -> list[dict]:
    lines = (trial.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "episode"]


@pytest.fixture(scope="module")
def first_store_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trial, Path, str]:
    """A first run of the one-process reference with an empty store: the run, the store
    directory it filled, its log. Tests copy the store before they add to it."""
    base = tmp_path_factory.mktemp("first_store_run")
    first, store = Trial(base / "first"), base / "store"
    return first, store, _run(first, store)


def test_a_second_run_is_served_from_the_store_and_trains_the_same(
    baseline: Trial, first_store_run: tuple[Trial, Path, str], tmp_path: Path
) -> None:
    first, filled, text = first_store_run
    assert "reference store" in text
    assert _episodes(first)[-1]["reference_stored"] == 0  # 20 samples, computed once each
    (path,) = filled.glob("reference-*.sqlite")
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM outputs").fetchone() == (20,)
    store = tmp_path / "store"
    shutil.copytree(filled, store)
    second = Trial(tmp_path / "second")
    text = _run(second, store)
    # 3 episodes of 8 over 20 samples: the 20 first draws come from the store, the 4 repeats
    # from the in-run cache; the reference computes nothing
    assert _episodes(second)[-1]["reference_stored"] == 20
    assert "20 samples served, 0 computed" in text, text
    assert_identical(second.final_state(), baseline.final_state())
    assert second.train_records() == baseline.train_records()


def test_a_sharded_reference_uses_the_store_too(
    first_store_run: tuple[Trial, Path, str], tmp_path: Path
) -> None:
    # One reference replica of two processes, each holding a shard of the layer and gathering
    # the logits in forward_step (a collective): the last rank looks samples up and stores
    # them, and the other rank computes exactly the samples it did not find. The store already
    # holds the single-process reference's file (the same layer): the whole model's
    # fingerprint, not one rank's shard, and not the single-process model's either, so the
    # sharded reference finds nothing of it and writes a file of its own.
    store = tmp_path / "store"
    shutil.copytree(first_store_run[1], store)
    (single,) = store.glob("reference-*.sqlite")
    sharded = {"REFERENCE_SHARDED": "1"}
    first, second = Trial(tmp_path / "first"), Trial(tmp_path / "second")
    text = _run(first, store, sharded)
    assert "computing every sample" not in text
    assert _episodes(first)[-1]["reference_stored"] == 0
    (path,) = set(store.glob("reference-*.sqlite")) - {single}  # one store: the last rank's
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM outputs").fetchone() == (20,)
    text = _run(second, store, sharded)
    assert _episodes(second)[-1]["reference_stored"] == 20
    assert "20 samples served, 0 computed" in text, text
    assert_identical(second.final_state(), first.final_state())
    assert second.train_records() == first.train_records()
    assert len(list(store.glob("reference-*.sqlite"))) == 2


def test_broken_entries_and_files_are_computed_again(tmp_path: Path) -> None:
    layer = torch.nn.Linear(3, 2)

    class Module:
        def __init__(self) -> None:
            self.model = layer

    store = ReferenceStore(tmp_path, fingerprint(Module()))
    samples = [{"x": torch.arange(3) + i} for i in range(3)]
    keys = [sample_key(s) for s in samples]
    assert len(set(keys)) == 3 and sample_key({"x": torch.arange(3)}) == keys[0]
    store.put({key: {"y": torch.full((2,), float(i))} for i, key in enumerate(keys)})
    assert torch.equal(store.get(keys)[keys[2]]["y"], torch.full((2,), 2.0))
    with closing(sqlite3.connect(store.path)) as db, db:  # one truncated, one bit flipped
        value = db.execute("SELECT value FROM outputs WHERE key = ?", (keys[0],)).fetchone()[0]
        db.execute("UPDATE outputs SET value = ? WHERE key = ?", (value[:-3], keys[0]))
        flipped = bytearray(value)
        flipped[-1] ^= 0x01
        db.execute("UPDATE outputs SET value = ? WHERE key = ?", (bytes(flipped), keys[1]))
    found = store.get(keys)
    assert list(found) == [keys[2]] and store.corrupted == 2
    assert store.get(keys).keys() == {keys[2]}  # the broken ones were deleted
    store.close()
    # another model's fingerprint: nothing of this one's
    another = Module()
    another.model = torch.nn.Linear(3, 2)
    other = ReferenceStore(tmp_path, fingerprint(another))
    assert other.path != store.path and other.get(keys) == {}
    other.close()
    store.path.write_bytes(b"not a database at all" * 100)  # a file SQLite cannot read
    fresh = ReferenceStore(tmp_path, fingerprint(Module()))
    assert fresh.get(keys) == {} and list(tmp_path.glob("*.corrupt-*"))
    fresh.close()


def _run(trial: Trial, store: Path, env: dict[str, str] | None = None) -> str:
    proc, log = trial.start(env={"REFERENCE_STORE": str(store), **(env or {})})
    try:
        proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text
    return text


def test_the_fingerprint_covers_every_byte_name_and_shape_whatever_the_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)

    class Module:
        def __init__(self, *layers: torch.nn.Module) -> None:
            self.model = torch.nn.Sequential(*layers)

    model = Module(torch.nn.Linear(512, 256), torch.nn.Linear(256, 64))
    fingerprints = set()
    for threads in (1, 3, 8):  # tensors hashed on that many threads
        monkeypatch.setattr(reference_store, "_hash_threads", lambda threads=threads: threads)
        fingerprints.add(fingerprint(model))
    assert len(fingerprints) == 1
    (same,) = fingerprints
    with torch.no_grad():
        model.model[0].weight[200, 300] += 1e-6  # one element of the largest tensor
    assert fingerprint(model) != same
    with torch.no_grad():
        model.model[0].weight[200, 300] -= 1e-6
    assert fingerprint(model) == same
    # the same bytes under another shape or another name are another model
    reshaped = Module(torch.nn.Linear(512, 256), torch.nn.Linear(256, 64))
    reshaped.model.load_state_dict(model.model.state_dict())
    assert fingerprint(reshaped) == same
    reshaped.model[1].weight = torch.nn.Parameter(model.model[1].weight.detach().reshape(128, 128))
    assert fingerprint(reshaped) != same
    renamed = Module.__new__(Module)
    renamed.other = model.model  # type: ignore[attr-defined]
    assert fingerprint(renamed) != same


def test_models_kept_in_lists_and_dicts_are_in_the_fingerprint() -> None:
    # A Megatron reference keeps its model as a list of chunks; others a dict of models. Their
    # weights decide the outputs as much as an attribute's do: another checkpoint loaded into
    # them must not be served this one's entries.
    torch.manual_seed(0)
    chunks = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)]
    holders = {
        "list": type("M", (), {})(),
        "dict": type("M", (), {})(),
        "parameter": type("M", (), {})(),
    }
    holders["list"].model = chunks
    holders["dict"].models = {"actor": chunks[0], "head": (chunks[1],)}
    holders["parameter"].weight = chunks[0].weight
    before = {name: fingerprint(holder) for name, holder in holders.items()}
    with torch.no_grad():
        chunks[0].weight[1, 2] += 1e-3
        chunks[1].bias[0] += 1e-3  # only in the list and the dict
    after = {name: fingerprint(holder) for name, holder in holders.items()}
    assert all(before[name] != after[name] for name in holders), (before, after)
    assert len(set(after.values())) == 3


def test_a_reference_with_no_weights_to_fingerprint_is_a_config_error() -> None:
    class Opaque:  # its model out of reach: a closure, a C++ handle, a list of 10,000 things
        def __init__(self) -> None:
            layer = torch.nn.Linear(2, 2)
            self.forward = lambda x: layer(x)
            self.cache = [torch.nn.Linear(1, 1)] * 2000

    with pytest.raises(ConfigError) as info:
        fingerprint(Opaque())
    assert info.value.key == "runtime.reference_store"
    assert "reference_store_key()" in str(info.value)

    class Keyed(Opaque):  # the module vouches for its weights by naming them
        checkpoint = "/ckpt/iter_0001000"

        def reference_store_key(self) -> dict:
            return {"checkpoint": self.checkpoint}

    keyed, other = Keyed(), Keyed()
    other.checkpoint = "/ckpt/iter_0002000"
    assert fingerprint(keyed) != fingerprint(other)


def test_a_reference_whose_weights_the_store_cannot_see_stops_the_run_in_one_line(
    tmp_path: Path,
) -> None:
    trial = Trial(tmp_path)
    env = {"REFERENCE_STORE": str(tmp_path / "store"), "REFERENCE_OPAQUE": "1"}
    code, text = trial.run_to_end(env=env)
    assert code == 2, text
    assert "Traceback" not in text, text
    last = text.splitlines()[-1]
    assert last.startswith("runtime.reference_store: the reference module TinyOpaqueReference")
    assert "fix: keep the model in an attribute" in last and "[model reference" in last, last
    assert not list((tmp_path / "store").glob("reference-*.sqlite"))  # nothing stored


def test_the_fingerprint_covers_the_architecture_not_only_the_weights() -> None:
    """The same weights under another config (heads at the same hidden size, rope_theta,
    rms_norm_eps) compute other outputs: the store served the first model's entries to the
    second (every step of a run differed from one without the store). A config read from
    elsewhere (`_name_or_path`) is the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def reference(**changes: object) -> object:
        torch.manual_seed(0)
        sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
        heads = {"num_attention_heads": 4, "num_key_value_heads": 4}
        config = LlamaConfig(**{**sizes, **heads, "vocab_size": 64, **changes})
        holder = type("Reference", (), {})()
        holder.model = LlamaForCausalLM(config)
        return holder

    base = fingerprint(reference())
    elsewhere = reference()
    elsewhere.model.config._name_or_path = "/elsewhere"  # type: ignore[attr-defined]
    assert fingerprint(elsewhere) == base
    for change in ({"rms_norm_eps": 1e-3}, {"num_attention_heads": 2, "num_key_value_heads": 2}):
        other = reference(**change)
        assert all(  # the weights' bytes are the same: only the architecture differs
            torch.equal(a, b)
            for a, b in zip(
                reference().model.state_dict().values(),
                other.model.state_dict().values(),
                strict=True,
            )
        )
        assert fingerprint(other) != base, change


def test_a_megatron_style_extra_state_is_fingerprinted_not_a_crash() -> None:
    """megatron-core's layers put `_extra_state` entries in their state (None without
    TransformerEngine's fp8 metadata): the store crashed every Megatron reference at its first
    forward ('NoneType' object has no attribute 'detach')."""

    class Layer(torch.nn.Linear):
        def get_extra_state(self) -> object:
            return self.extra

        def set_extra_state(self, state: object) -> None:
            self.extra = state

    torch.manual_seed(0)
    holder = type("Reference", (), {})()
    holder.model = [Layer(4, 4)]
    holder.model[0].extra = None
    first = fingerprint(holder)
    holder.model[0].extra = b"fp8 scales"  # bytes: hashed
    assert fingerprint(holder) != first
    with torch.no_grad():
        holder.model[0].weight[0, 0] += 1.0
    assert fingerprint(holder) not in (first,)


def test_many_broken_entries_are_said_a_few_times_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """400 bit-flipped rows printed 400 identical warnings; the first few are said, the rest
    counted (the store's summary line gives the count)."""

    class Module:
        def __init__(self) -> None:
            self.model = torch.nn.Linear(3, 2)

    store = ReferenceStore(tmp_path, fingerprint(Module()))
    keys = [sample_key({"x": torch.arange(3) + i}) for i in range(40)]
    store.put({key: {"y": torch.zeros(2)} for key in keys})
    with closing(sqlite3.connect(store.path)) as db, db:
        db.execute("UPDATE outputs SET value = substr(value, 1, length(value) - 3)")
    with caplog.at_level("WARNING", logger="chatlearn.engine"):
        assert store.get(keys) == {}
    store.close()
    said = [m for m in caplog.messages if "a broken entry" in m]
    assert store.corrupted == 40 and len(said) == reference_store._BROKEN_SAID
    assert said[-1].endswith("further ones are counted in the store's summary")
