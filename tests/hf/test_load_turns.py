"""A host's ranks load a checkpoint one after another where their copies would not fit in its
memory together (chatlearn/hf/load_turns.py): the plan, the checkpoint's size, and two gloo
ranks of a sharded reference that load in turns and compute what they compute loading together."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chatlearn.hf import load_turns
from chatlearn.hf.load_turns import SHARE, checkpoint_bytes, plan_turns

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
GiB = 2**30


def test_auto_takes_turns_only_where_a_hosts_copies_would_not_fit() -> None:
    roomy = [("a", 64 * GiB, 10 * GiB)] * 4  # 40 GiB of 64
    assert plan_turns(roomy, 2, None) is None
    assert plan_turns(roomy, 2, True) is not None  # asked for
    crowded = [("a", 64 * GiB, 14 * GiB)] * 4  # 56 GiB > SHARE of 64
    assert 56 > SHARE * 64
    plans = [plan_turns(crowded, rank, None) for rank in range(4)]
    assert [p.turn for p in plans if p] == [0, 1, 2, 3] and {p.turns for p in plans if p} == {4}
    assert plan_turns(crowded, 1, False) is None


def test_ranks_of_other_hosts_load_at_once_and_every_rank_passes_as_many_barriers() -> None:
    # two hosts of 3 and 2 ranks (interleaved): each host's ranks in turn, the hosts together;
    # every rank passes the busiest host's 3 barriers
    peers = [(h, 32 * GiB, 12 * GiB) for h in ("a", "b", "a", "b", "a")]
    plans = [plan_turns(peers, rank, None) for rank in range(5)]
    assert [(p.turn, p.turns, p.ranks_here) for p in plans if p] == [
        (0, 3, 3),
        (0, 3, 2),
        (1, 3, 3),
        (1, 3, 2),
        (2, 3, 3),
    ]
    alone = [("a", GiB, 100 * GiB), ("b", GiB, 100 * GiB)]  # one rank a host: nothing to wait for
    assert plan_turns(alone, 0, True) is None


def test_a_checkpoints_bytes_are_its_weights_as_loaded(tmp_path: Path) -> None:
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 3000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert checkpoint_bytes(tmp_path) == 4000
    assert checkpoint_bytes(tmp_path, "float32") == 8000  # bf16 on disk, fp32 in memory
    assert checkpoint_bytes(tmp_path, "torch.bfloat16") == 4000
    assert checkpoint_bytes(tmp_path / "nothing") == 0


@pytest.mark.timeout(180)
def test_two_ranks_load_in_turns_and_compute_what_they_compute_loading_together(
    tmp_path: Path,
) -> None:
    checkpoint = _checkpoint(tmp_path)
    outputs, codes = _run_ranks(
        [
            [
                str(HERE / "load_turns_worker.py"),
                str(rank),
                "{port}",
                str(checkpoint),
                str(tmp_path / f"rank{rank}.json"),
            ]
            for rank in range(2)
        ]
    )
    assert codes == [0, 0], "\n".join(outputs)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    first, second = (r["turns"] for r in ranks)
    assert second["load"] >= first["handed_over"]  # rank 1 loaded once rank 0 had sharded
    together = ranks[0]["together"]
    assert first["logps"] == second["logps"] == together["logps"]


@pytest.mark.timeout(180)
def test_a_ddp_trainer_loading_in_turns_reaches_ddps_collective_on_every_rank(
    tmp_path: Path,
) -> None:
    # On CUDA the DDP trainer's copy leaves host memory in build_model (to its GPU); DDP's
    # constructor then checks and broadcasts the parameters over every rank. A rank whose turn
    # ended only after the wrap waited in its turn's barrier while the one before it was in
    # DDP's collective: a hang until the group's timeout (mismatched NCCL collectives on GPUs).
    checkpoint = _checkpoint(tmp_path)
    outputs, codes = _run_ranks(
        [
            [str(HERE / "load_turns_ddp_worker.py"), str(rank), "{port}", str(checkpoint)]
            for rank in range(2)
        ]
    )
    assert codes == [0, 0], "\n".join(outputs)[-4000:]


def _checkpoint(tmp_path: Path) -> Path:
    from layout_worker import TINY

    from chatlearn.hf import byte_tokenizer
    from chatlearn.hf.model import causal_lm_from_args

    tokenizer = byte_tokenizer()
    checkpoint = tmp_path / "model"
    causal_lm_from_args({"model_config": TINY, "seed": 0}, tokenizer).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint


def _run_ranks(commands: list[list[str]]) -> tuple[list[str], list[int | None]]:
    """Each command (``{port}``: a free port of 127.0.0.1) as a process; their outputs and exit
    codes, every process ended."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    try:
        for command in commands:
            argv = [sys.executable, *(a.replace("{port}", str(port)) for a in command)]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs = [proc.communicate(timeout=150)[0].decode(errors="replace") for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return outputs, [proc.returncode for proc in procs]


@pytest.mark.timeout(180)
def test_a_rank_whose_setup_raises_reports_at_once_not_after_the_later_ranks_load(
    tmp_path: Path,
) -> None:
    # The error stops the run (the coordinator stops every process on a start-up failure): a
    # rank that passed its turn on before raising reported only once every later rank of its
    # host had loaded in turn (7 loads of a 70B on 8 GPUs), each likely failing the same way.
    checkpoint, mark = _checkpoint(tmp_path), tmp_path / "rank1_loaded"
    worker = str(HERE / "load_turns_error_worker.py")
    outputs, codes = _run_ranks(
        [[worker, str(rank), "{port}", str(checkpoint), str(mark)] for rank in range(2)]
    )
    assert codes[0] == 3, outputs[0][-4000:]
    assert "rank 0 failed; rank 1 loaded first: False" in outputs[0], outputs[0][-4000:]


def test_a_checkpoints_bytes_are_the_files_from_pretrained_loads(tmp_path: Path) -> None:
    # a Hub download with both formats (and Mistral's consolidated copy) loads one of them; a
    # Trainer's checkpoint-N directory also holds its optimizer's state (twice the model), its
    # scheduler's, its RNG states and its arguments, none of which from_pretrained loads
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    for name, size in [
        ("pytorch_model.bin", 1000),
        ("consolidated.safetensors", 1000),
        ("optimizer.pt", 4000),
        ("scheduler.pt", 10),
        ("rng_state.pth", 10),
        ("training_args.bin", 10),
    ]:
        (tmp_path / name).write_bytes(b"\0" * size)
    assert checkpoint_bytes(tmp_path) == 1000
    (tmp_path / "model.safetensors").unlink()  # the .bin then
    assert checkpoint_bytes(tmp_path) == 1000
    shards = {"model-00001-of-00002.safetensors": 300, "model-00002-of-00002.safetensors": 200}
    for name, size in shards.items():
        (tmp_path / name).write_bytes(b"\0" * size)
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_bytes(tmp_path) == 500


def test_the_memory_available_is_the_containers_where_its_cgroup_limits_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # psutil reports the host's memory: a container limited to less (Kubernetes, Docker,
    # Slurm) loaded together what its limit could not hold, and was killed for it
    import types

    import psutil

    host = 64 * GiB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=host))
    monkeypatch.setattr(load_turns, "CGROUP", tmp_path)
    (tmp_path / "memory.max").write_text("3000\n")
    (tmp_path / "memory.current").write_text("1000\n")
    (tmp_path / "memory.stat").write_text("anon 600\ninactive_file 400\nactive_file 0\n")
    assert load_turns.available_memory() == 3000 - 600  # the file cache reclaimed
    (tmp_path / "memory.max").write_text("max\n")
    assert load_turns.available_memory() == host
    for name in ("memory.max", "memory.current", "memory.stat"):
        (tmp_path / name).unlink()
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("5000\n")
    (v1 / "memory.usage_in_bytes").write_text("2000\n")
    assert load_turns.available_memory() == 3000
    (v1 / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1's "no limit"
    assert load_turns.available_memory() == host
    (v1 / "memory.limit_in_bytes").unlink()  # no cgroup files: the host's
    assert load_turns.available_memory() == host


def test_a_checkpoints_bytes_as_loaded_in_any_dtype_name_the_modules_accept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dtype: fp32 (or bf16, half) was not a name the count knew: a bf16 checkpoint loaded as
    # fp32 counted as half its size, and its host's ranks loaded together what did not fit
    import transformers

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert checkpoint_bytes(tmp_path, "fp32") == checkpoint_bytes(tmp_path, "float32") == 2000
    assert checkpoint_bytes(tmp_path, "bf16") == checkpoint_bytes(tmp_path, "half") == 1000
    assert checkpoint_bytes(tmp_path, "auto") == 1000
    # without a dtype, from_pretrained's default: float32 before transformers 5, "auto" since
    monkeypatch.setattr(transformers, "__version__", "4.46.3")
    assert checkpoint_bytes(tmp_path) == 2000
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    assert checkpoint_bytes(tmp_path) == 1000


def test_setup_is_allowed_the_time_to_read_the_checkpoint_beyond_startup_timeout(
    tmp_path: Path,
) -> None:
    # A checkpoint of more than a few GB took longer to read than startup_timeout (60 s by
    # default): every run of a large model stopped with "did not become ready" until raised.
    from layout_worker import make_args

    from chatlearn.hf.modules import CHECKPOINT_READ_RATE, HFDPOTrainer, HFReference

    checkpoint = _checkpoint(tmp_path)
    size = (checkpoint / "model.safetensors").stat().st_size
    once = HFReference("reference", args=make_args(2, model_path=str(checkpoint)))
    seconds, why = once.setup_allowance()
    assert seconds == pytest.approx(size / CHECKPOINT_READ_RATE)
    assert str(checkpoint) in why and "at 100 MiB/s" in why
    # every rank reads it, maybe in turns: each read allowed for
    args = make_args(2, model_path=str(checkpoint), load_once=False)
    args.models["policy"].cpu_per_process = 1  # 2 processes (else one of 2 cores)
    every = HFDPOTrainer("policy", args=args).setup_allowance()
    assert every[0] == pytest.approx(2 * seconds) and "2 times" in every[1]
    args = make_args(2, model_path=str(checkpoint), load_once=False, load_in_turns=False)
    assert HFDPOTrainer("policy", args=args).setup_allowance()[0] == pytest.approx(seconds)
    # built from its config, or a path only the model's hosts have: nothing to allow for
    assert HFReference("reference", args=make_args(2)).setup_allowance() == (0.0, "")
    missing = make_args(2, model_path=str(tmp_path / "elsewhere"))
    assert HFReference("reference", args=missing).setup_allowance() == (0.0, "")


def test_a_subclass_allowing_a_bare_number_of_seconds_sets_up(tmp_path: Path) -> None:
    # The coordinator takes setup_allowance()'s seconds alone or with why; the HF modules' setup
    # indexed it, and such a subclass passed the start only to fail in every process with
    # "'int' object is not subscriptable"
    from layout_worker import make_args

    from chatlearn.hf.modules import HFReference

    class Reference(HFReference):
        def setup_allowance(self) -> float:  # type: ignore[override]
            return 600

    module = Reference("reference", args=make_args(1))
    module.setup()
    assert module.network is not None
