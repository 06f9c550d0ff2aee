"""The HF modules in every layout train the same model: FSDP2 over two gloo processes equals one
process, sharded checkpoints resume bit for bit and export loadable HF directories, LoRA trains
only its adapters, bf16 mixed precision runs on the CPU.

Three real processes (one single-process run, one 2-rank gloo group) start together once for this
module; each writes its results as JSON (see layout_worker.py) and the tests below check them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from chatlearn.actors.checkpoint_paths import FORMAT

pytestmark = pytest.mark.timeout(400)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "layout_worker.py"
REPO_ROOT = HERE.parents[1]
RUN_TIMEOUT = 300.0  # all three processes; about 25 s on an idle 2-core machine
TOLERANCE = 1e-5

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(name: str, rank: int, world: int, port: int, runs: str, tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable, str(WORKER), "--rank", str(rank), "--world-size", str(world),
        "--port", str(port), "--out", str(tmp / f"{name}.json"), "--tmp", str(tmp / f"w{world}"),
        "--runs", runs,
    ]  # fmt: skip
    with open(tmp / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("layouts")
    jobs = [
        ("single", 0, 1, "train,lora,bf16,tied,budget"),
        ("rank0", 0, 2, "train,ddp,lora,bf16,tied,budget"),
    ]
    jobs.append(("rank1", 1, 2, jobs[1][3]))
    port = _free_port()
    procs: list[subprocess.Popen] = []
    try:
        for name, rank, world, what in jobs:
            procs.append(_start(name, rank, world, port, what, tmp))
        deadline = time.monotonic() + RUN_TIMEOUT
        for (name, *_), proc in zip(jobs, procs, strict=True):
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                log = (tmp / f"{name}.log").read_text(errors="replace")[-4000:]
                pytest.fail(f"worker {name} ended with {code} (None: timed out)\n{log}")
    finally:
        _stop(procs)
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name, *_ in jobs}


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _logps(model: Any) -> list[float]:
    from layout_worker import first_batch

    from chatlearn.algorithms import concatenated_logps

    with torch.no_grad():
        logps = concatenated_logps(model, first_batch())
    return torch.cat([logps.chosen, logps.rejected]).tolist()


def _base_model() -> Any:
    from layout_worker import TINY

    from chatlearn.hf import causal_lm_from_args, load_tokenizer

    return causal_lm_from_args({"model_config": TINY, "seed": 0}, load_tokenizer(None))


def test_fsdp2_over_two_processes_trains_like_one_process(runs: dict[str, Any]) -> None:
    single = runs["single"]["train"]
    for rank in ("rank0", "rank1"):
        sharded = runs[rank]["train"]
        assert sharded["layout"].startswith("FSDP2 over 2 ranks")
        assert _max_diff(single["losses"], sharded["losses"]) < TOLERANCE
        assert _max_diff(single["grad_norms"], sharded["grad_norms"]) < TOLERANCE
    assert single["losses"][0] == pytest.approx(0.693147, abs=1e-5)  # policy == reference
    assert single["losses"][-1] < single["losses"][0]


def test_sharded_reference_logps_equal_unsharded(runs: dict[str, Any]) -> None:
    single = [x for batch in runs["single"]["train"]["ref_logps"] for x in batch]
    sharded = [x for batch in runs["rank1"]["train"]["ref_logps"] for x in batch]  # it sends
    assert _max_diff(single, sharded) < TOLERANCE


def test_a_sharded_reference_has_one_fingerprint_for_the_whole_model(
    runs: dict[str, Any],
) -> None:
    # Each rank hashes the shards it holds (DTensor local parts) and the ranks combine their
    # digests: both ranks agree, and the sharded model's store is not the unsharded one's.
    sharded = {runs[name]["train"]["reference_fingerprint"] for name in ("rank0", "rank1")}
    assert len(sharded) == 1
    assert runs["single"]["train"]["reference_fingerprint"] not in sharded


def test_fsdp2_per_rank_state_bytes_are_about_half_of_ddp(runs: dict[str, Any]) -> None:
    def total(memory: dict[str, Any]) -> int:
        assert not memory["estimated"]  # measured after a step, from the tensors' storage
        return memory["param_bytes"] + memory["grad_bytes"] + memory["optimizer_bytes"]

    for rank in ("rank0", "rank1"):
        ddp, fsdp = runs[rank]["ddp"]["memory"], runs[rank]["train"]["memory"]
        assert ddp["num_parameters"] == fsdp["num_parameters"]
        assert total(fsdp) <= 0.55 * total(ddp), (fsdp, ddp)
    # a DDP rank holds what one process holds: the whole model, gradients and both moments
    assert runs["rank0"]["ddp"]["memory"] == runs["single"]["train"]["memory"]


def test_checkpoints_resume_bit_identically(runs: dict[str, Any]) -> None:
    for name in ("single", "rank0", "rank1"):
        result = runs[name]["train"]
        assert result["resumed_losses"] == result["losses"][5:]
        assert result["resumed_weights"] == result["final_weights"]
    sharded_dir = Path(runs["rank0"]["train"]["checkpoint"]).parent / "sharded"
    assert (sharded_dir / ".metadata").is_file()
    # a periodic FSDP2 checkpoint: the sharded state only (hf_model at the end, on request)
    for name in ("rank0", "rank1"):
        rank_dir = Path(runs[name]["train"]["checkpoint"])
        assert sorted(p.name for p in rank_dir.iterdir()) == ["rng.pt", "scheduler.pt"]
    # one process: the weights once, in the HF export, which the resume read back
    single = Path(runs["single"]["train"]["checkpoint"])
    assert sorted(p.name for p in single.iterdir()) == [
        "hf_model", "optimizer.pt", "rng.pt", "scheduler.pt"
    ]  # fmt: skip
    assert runs["single"]["train"]["final_extra_bytes"] == 0  # written at every save
    # what the run's end writes beyond a periodic FSDP2 save, rank 0's (the engine's disk-room
    # check counts it): the export's weights, to the byte
    export = Path(runs["rank0"]["train"]["export"])
    assert runs["rank0"]["train"]["final_extra_bytes"] == _safetensors_data_bytes(export)
    assert runs["rank1"]["train"]["final_extra_bytes"] == 0


def _safetensors_data_bytes(directory: Path) -> int:
    """The tensors' bytes in ``directory``'s safetensors files (each less its header)."""
    total = 0
    for path in directory.glob("*.safetensors"):
        with path.open("rb") as f:
            header = int.from_bytes(f.read(8), "little")
        total += path.stat().st_size - 8 - header
    assert total > 0, directory
    return total


def test_a_ddp_checkpoint_holds_the_replicas_state_once_and_resumes_bit_identically(
    runs: dict[str, Any],
) -> None:
    for name in ("rank0", "rank1"):
        result = runs[name]["ddp"]
        assert result["resumed_losses"] == result["losses"][2:]
        assert result["resumed_weights"] == result["final_weights"]
    assert runs["rank0"]["ddp"]["final_weights"] == runs["rank1"]["ddp"]["final_weights"]
    rank0, rank1 = (Path(runs[name]["ddp"]["checkpoint"]) for name in ("rank0", "rank1"))
    # rank 0 writes the weights (in hf_model); the moments are in two shares, one a rank
    assert sorted(p.name for p in rank0.iterdir()) == [
        "hf_model", "optimizer.pt", "rng.pt", "scheduler.pt"
    ]  # fmt: skip
    assert sorted(p.name for p in rank1.iterdir()) == ["optimizer.pt", "rng.pt", "scheduler.pt"]
    shares = [torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (rank0, rank1)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    weights = (rank0 / "hf_model" / "model.safetensors").stat().st_size
    moments = [(d / "optimizer.pt").stat().st_size for d in (rank0, rank1)]
    # balanced with the weights rank 0 writes besides: 1 + 2 weights' bytes, 1.5 a rank
    assert abs(weights + moments[0] - moments[1]) < 0.35 * weights, (weights, moments)


def test_exported_hf_directory_loads_to_the_same_logps(runs: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    for name in ("single", "rank0"):
        result = runs[name]["train"]
        model = AutoModelForCausalLM.from_pretrained(result["export"])
        assert _max_diff(_logps(model), result["logps_at_checkpoint"]) < TOLERANCE


def test_lora_trains_only_adapters_and_its_exports_reproduce_the_trainer(
    runs: dict[str, Any],
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = runs["single"]["lora"]
    assert lora["changed"] and all(".lora_A." in n or ".lora_B." in n for n in lora["changed"])
    assert len(lora["changed"]) == lora["optimizer_params"] == 2 * 4 * 2  # 4 targets, 2 layers
    losses = lora["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses
    memory = lora["memory"]
    assert memory["optimizer_bytes"] == 2 * 4 * memory["num_trainable_parameters"]
    assert memory["num_trainable_parameters"] < memory["num_parameters"] // 5

    adapter = PeftModel.from_pretrained(_base_model(), Path(lora["export"]) / "adapter")
    assert _max_diff(_logps(adapter), lora["logps"]) < TOLERANCE
    merged = AutoModelForCausalLM.from_pretrained(lora["export"])
    assert _max_diff(_logps(merged), lora["logps"]) < TOLERANCE


def test_a_lora_checkpoint_holds_the_adapters_not_the_base_and_resumes_bit_identically(
    runs: dict[str, Any],
) -> None:
    result = runs["single"]["lora"]
    assert result["resumed_losses"] == result["losses"][15:18]
    checkpoint = Path(result["checkpoint"])
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == ["adapters.pt", "hf_model", "optimizer.pt", "rng.pt", "scheduler.pt"]
    adapters = torch.load(checkpoint / "adapters.pt", weights_only=True)
    assert adapters["state"] and all("lora_" in name for name in adapters["state"])
    # the base is what setup builds again: not in the checkpoint (a digest of it is)
    merged = sum(p.stat().st_size for p in Path(result["export"]).glob("*.safetensors"))
    assert (checkpoint / "adapters.pt").stat().st_size < 0.2 * merged
    # a periodic checkpoint: the adapter (peft) and the tokenizer; merged weights at the end
    exported = checkpoint / "hf_model"
    assert (exported / "adapter" / "adapter_model.safetensors").is_file()
    assert (exported / "tokenizer_config.json").is_file()
    assert not list(exported.glob("*.safetensors")) and not (exported / "config.json").exists()
    # the merged weights it leaves to the run's end, counted by the engine's disk-room check
    assert result["final_extra_bytes"] == _safetensors_data_bytes(Path(result["export"]))


def test_lora_with_fsdp2_matches_one_process(runs: dict[str, Any]) -> None:
    single = runs["single"]["lora"]["losses"]
    for rank in ("rank0", "rank1"):
        sharded = runs[rank]["lora"]
        assert _max_diff(single[: len(sharded["losses"])], sharded["losses"]) < TOLERANCE
        assert sharded["changed"] == runs["single"]["lora"]["changed"]
    merged = _safetensors_data_bytes(Path(runs["rank0"]["lora"]["export"]))
    assert runs["rank0"]["lora"]["final_extra_bytes"] == merged
    assert runs["rank1"]["lora"]["final_extra_bytes"] == 0
    adapter_dir = Path(runs["rank0"]["lora"]["export"]) / "adapter"
    adapter = __import__("peft").PeftModel.from_pretrained(_base_model(), adapter_dir)
    assert _max_diff(_logps(adapter), runs["rank0"]["lora"]["logps"]) < TOLERANCE


def test_bf16_mixed_precision_runs_on_cpu(runs: dict[str, Any]) -> None:
    fp32 = runs["single"]["train"]["losses"]
    for name in ("single", "rank0"):
        bf16 = runs[name]["bf16"]
        assert bf16["param_dtypes"] == ["torch.float32"]  # fp32 master weights
        assert bf16["losses"][0] == pytest.approx(0.6931, abs=1e-3)
        assert _max_diff(bf16["losses"], fp32[: len(bf16["losses"])]) < 2e-2


def test_tied_embeddings_with_fsdp2_train_like_one_process(runs: dict[str, Any]) -> None:
    single = runs["single"]["tied"]
    assert single["head"] == "TiedHeadLinear"  # the two gradients of the weight summed in place
    backwards = 4 * 2  # 4 steps of 2 micro-batches
    assert single["root_sharded_in_backward"] == [False] * backwards  # one process: no shards
    for rank in ("rank0", "rank1"):
        sharded = runs[rank]["tied"]
        assert _max_diff(single["losses"], sharded["losses"]) < TOLERANCE
        assert _max_diff(single["grad_norms"], sharded["grad_norms"]) < TOLERANCE
        # the root (embedding = head, final norm) is freed once the backward passes the last
        # layer, not kept gathered until the end of the backward
        assert sharded["root_sharded_in_backward"] == [True] * backwards


def test_a_token_budget_per_forward_trains_like_the_micro_batches(runs: dict[str, Any]) -> None:
    """`max_tokens_per_micro_batch`: more forwards than micro-batches, the same number on both
    FSDP2 ranks, and the same losses, gradient norms, reference log-probs and evaluation."""
    from layout_worker import MICRO_BATCHES

    plain = runs["single"]["train"]
    for name in ("single", "rank0", "rank1"):
        budget = runs[name]["budget"]
        assert _max_diff(plain["losses"], budget["losses"]) < TOLERANCE, name
        assert _max_diff(plain["grad_norms"], budget["grad_norms"]) < TOLERANCE, name
        assert budget["eval"] == pytest.approx(budget["eval_whole"], abs=TOLERANCE), name
    assert max(runs["single"]["budget"]["forwards"]) > MICRO_BATCHES
    assert runs["rank0"]["budget"]["forwards"] == runs["rank1"]["budget"]["forwards"]
    single_ref = [x for batch in plain["ref_logps"] for x in batch]
    sharded_ref = [x for batch in runs["rank1"]["budget"]["ref_logps"] for x in batch]
    assert _max_diff(single_ref, sharded_ref) < TOLERANCE


def _as_checkpoint(model_dir: Path, model_args: dict[str, Any], where: Path) -> Path:
    """`model_dir` (a trainer's directory: rank_*/, sharded/) as the model `policy` of a
    complete checkpoint of a run with these model_args."""
    from layout_worker import make_args

    checkpoint = where / "checkpoints" / "iter_0000005"
    shutil.copytree(model_dir, checkpoint / "policy")
    state = {"config": make_args(2, **model_args).to_dict(), "trainer": {"model": "policy"}}
    (checkpoint / "coordinator.json").write_text(json.dumps(state))
    _manifest(checkpoint)
    return checkpoint


def _manifest(checkpoint: Path) -> None:
    """The checkpoint's manifest of its files as they are now (sizes: what export checks)."""
    files = {
        path.relative_to(checkpoint).as_posix(): {"size": path.stat().st_size}
        for path in checkpoint.rglob("*")
        if path.is_file() and path.name != "MANIFEST.json"
    }
    (checkpoint / "MANIFEST.json").write_text(json.dumps({"format": FORMAT, "files": files}))


def _same_tensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    first, second = load_file(a), load_file(b)
    assert sorted(first) == sorted(second)
    for key, tensor in first.items():
        assert tensor.dtype == second[key].dtype and torch.equal(tensor, second[key]), key


def test_chatlearn_export_writes_a_sharded_checkpoint_as_the_trainer_exports_it(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    # FSDP2's periodic checkpoints hold no hf_model: `chatlearn export` reads the shards in
    # one process (no process group) and writes what the trainer's own export wrote there
    from safetensors.torch import load_file, save_file

    from chatlearn.hf.export import export_checkpoint

    lora = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    for run, model_args in (("train", {}), ("lora", {"lora": lora})):
        result = runs["rank0"][run]
        model_args = {"parallel": "fsdp", **model_args}
        checkpoint = _as_checkpoint(Path(result["checkpoint"]).parent, model_args, tmp_path / run)
        assert not (checkpoint / "policy" / "rank_0" / "hf_model").exists()
        written = export_checkpoint(checkpoint.parent)  # the newest checkpoint there
        assert written == tmp_path / run / "hf" / "iter_0000005"
        exported = Path(result["export"])
        _same_tensors(written / "model.safetensors", exported / "model.safetensors")
        if run == "lora":
            adapter = "adapter/adapter_model.safetensors"
            _same_tensors(written / adapter, exported / adapter)
            # in another dtype: the merged weights are merged as trained, then cast (cast
            # first, base and adapters each rounded, then the sum: off by one in places)
            cast = export_checkpoint(checkpoint, tmp_path / "lora_bf16", dtype=torch.bfloat16)
            ours = load_file(cast / "model.safetensors")
            theirs = load_file(exported / "model.safetensors")
            assert sorted(ours) == sorted(theirs)
            for key, value in theirs.items():
                assert torch.equal(ours[key], value.to(torch.bfloat16)), key
            ours = load_file(cast / adapter)
            theirs = load_file(exported / adapter)
            assert all(torch.equal(ours[k], v.to(torch.bfloat16)) for k, v in theirs.items())
        assert not list(written.parent.glob(".*partial*"))
        if run == "train":
            # in another dtype (bf16 for inference, not the fp32 masters): the same tensors
            # cast, the tied head still one tensor, the config saying so
            cast = export_checkpoint(checkpoint, tmp_path / "bf16", dtype=torch.bfloat16)
            ours = load_file(cast / "model.safetensors")
            theirs = load_file(exported / "model.safetensors")
            assert sorted(ours) == sorted(theirs)
            assert all(torch.equal(ours[k], v.to(torch.bfloat16)) for k, v in theirs.items())
            assert json.loads((cast / "config.json").read_text())["dtype"] == "bfloat16"
    # make gpu-check's check of the same, on the GPUs' checkpoint: here on this one, whose
    # final hf_model is the trainer's export
    from chatlearn.gpu_check import CheckFailed, check_sharded_export

    run = tmp_path / "gpu" / "output" / "run"
    checkpoint = _as_checkpoint(Path(runs["rank0"]["train"]["checkpoint"]).parent, {}, run)
    gathered = checkpoint / "policy" / "rank_0" / "hf_model"
    shutil.copytree(runs["rank0"]["train"]["export"], gathered)
    figure = check_sharded_export(tmp_path / "gpu", model="policy")
    assert figure.endswith("(21 tensors)"), figure  # the tiny model's, its head tied
    other = load_file(gathered / "model.safetensors")  # a trainer's export that differs
    other["model.norm.weight"] = other["model.norm.weight"] + 1
    save_file(other, gathered / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(tmp_path / "gpu" / "shards")
    with pytest.raises(CheckFailed, match="model.norm.weight: the export from the shards differs"):
        check_sharded_export(tmp_path / "gpu", model="policy")


def test_chatlearn_export_of_unsharded_checkpoints_without_hf_model(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    # save_hf_model: false: the weights in model.pt, or with LoRA the adapters on the base the
    # run's config builds (checked by its digest)
    from layout_worker import make_args
    from safetensors.torch import load_file

    from chatlearn.hf.export import ExportError, export_checkpoint

    lora = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    for run, model_args in (("train", {}), ("lora", {"lora": lora})):
        rank_dir = Path(runs["single"][run]["checkpoint"])
        model_args = {"parallel": "none", **model_args}
        checkpoint = _as_checkpoint(rank_dir.parent, model_args, tmp_path / run)
        held = checkpoint / "policy" / "rank_0" / "hf_model"
        if run == "train":
            assert export_checkpoint(checkpoint) == held  # it holds one already
            # in another dtype: written again from the weights it holds
            cast = export_checkpoint(checkpoint, tmp_path / "f16", dtype=torch.float16)
            ours = load_file(cast / "model.safetensors")
            theirs = load_file(held / "model.safetensors")
            assert sorted(ours) == sorted(theirs)
            assert all(torch.equal(ours[k], v.to(torch.float16)) for k, v in theirs.items())
            original = tmp_path / run / "original"
            shutil.move(held, original)
            weights = load_file(original / "model.safetensors")
            torch.save(weights, checkpoint / "policy" / "rank_0" / "model.pt")
            _manifest(checkpoint)
            written = export_checkpoint(checkpoint, tmp_path / run / "out")
            _same_tensors(written / "model.safetensors", original / "model.safetensors")
            # a run with export_dtype: its exports are in that dtype, by default here too
            state = json.loads((checkpoint / "coordinator.json").read_text())
            state["config"]["models"]["policy"]["model_args"]["export_dtype"] = "bfloat16"
            (checkpoint / "coordinator.json").write_text(json.dumps(state))
            _manifest(checkpoint)
            bf16 = export_checkpoint(checkpoint, tmp_path / run / "bf16")
            ours = load_file(bf16 / "model.safetensors")
            assert all(torch.equal(ours[k], v.to(torch.bfloat16)) for k, v in weights.items())
            assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
            continue
        # a periodic LoRA checkpoint holds the adapter alone: the merged weights written from
        # adapters.pt on the base, equal to the adapter on the base
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        written = export_checkpoint(checkpoint)
        assert written == tmp_path / run / "hf" / "iter_0000005"
        adapter = "adapter/adapter_model.safetensors"
        _same_tensors(written / adapter, held / adapter)
        merged = AutoModelForCausalLM.from_pretrained(written)
        on_base = PeftModel.from_pretrained(_base_model(), held / "adapter")
        assert _max_diff(_logps(merged), _logps(on_base)) < TOLERANCE
        # adapters trained on another base: refused
        other = make_args(1, **model_args, seed=1).to_dict()
        (checkpoint / "coordinator.json").write_text(json.dumps({"config": other}))
        _manifest(checkpoint)
        with pytest.raises(ExportError, match="other base weights"):
            export_checkpoint(checkpoint, tmp_path / run / "other", model="policy")


def test_chatlearn_export_of_unreadable_shards_is_one_line(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    # a shard whose bytes are not what it held (same size: the manifest's sizes pass) was a
    # traceback of torch's CheckpointException; one line now, nothing written
    from click.testing import CliRunner

    from chatlearn.cli import main

    result = runs["rank0"]["train"]
    model_dir = Path(result["checkpoint"]).parent
    checkpoint = _as_checkpoint(model_dir, {"parallel": "fsdp"}, tmp_path)
    (shard,) = list((checkpoint / "policy" / "sharded").glob("__0_*.distcp"))
    shard.write_bytes(b"\0" * shard.stat().st_size)
    done = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(tmp_path / "out")])
    lines = done.output.splitlines()
    assert done.exit_code == 1 and len(lines) == 1, done.output[-3000:]
    assert lines[0].startswith(f"chatlearn export: {checkpoint}: could not be read ("), lines
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
