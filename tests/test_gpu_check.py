"""`chatlearn gpu-check` (`make gpu-check`): without a GPU, one line and exit 0 at once; the
checks' own logic on made-up actor reports (the checks themselves need GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chatlearn.gpu_check import (
    REPO,
    CheckFailed,
    check_lora_export,
    check_placement,
    example_checkpoint,
    example_config,
    lora_gpu_model_args,
    lora_model_args,
    loss_fell,
    no_gpu_reason,
    probe_config,
)

_HAS_DRIVER = os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")


def _gpu_check(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    command = [sys.executable, "-X", "importtime", "-m", "chatlearn.cli", "gpu-check"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    return done, time.perf_counter() - started


@pytest.mark.parametrize(
    "hide",
    [
        pytest.param(True, id="CUDA_VISIBLE_DEVICES-empty"),
        pytest.param(
            False,
            id="no-driver",
            marks=pytest.mark.skipif(_HAS_DRIVER, reason="this machine has an NVIDIA driver"),
        ),
    ],
)
@pytest.mark.serial  # asserts a wall-clock bound: run alone (make test's second part)
def test_without_a_gpu_one_line_and_exit_0_within_a_second(hide: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if hide:
        env["CUDA_VISIBLE_DEVICES"] = ""
    done, seconds = _gpu_check(env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("gpu-check: no GPU here")
    assert seconds < 1.0
    # what keeps it fast: torch is never imported (-X importtime lists every import on stderr)
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "click" in imported and "torch" not in imported


def test_no_gpu_reason_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert "CUDA_VISIBLE_DEVICES" in str(no_gpu_reason())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert (no_gpu_reason() is None) == (_HAS_DRIVER or not sys.platform.startswith("linux"))


def _where(model: str, gpus: list[int], uuids: list[str]) -> list[dict[str, Any]]:
    return [
        {"rank": rank, "assigned": [gpu], "uuid": uuid, "allocated_on_cuda": True}
        for rank, (gpu, uuid) in enumerate(zip(gpus, uuids, strict=True))
    ]


def _uuid(gpu: int) -> str:
    return f"uuid-{gpu}"


def test_placement_check_accepts_what_the_placement_asked_for() -> None:
    one_gpu = {
        "reference": _where("r", [0], ["uuid-0"]),
        "policy_trainer": _where("t", [0], ["uuid-0"]),
    }
    assert "colocated" in check_placement(one_gpu, True, uuid_of=_uuid)
    three = {
        "reference": _where("r", [0], ["uuid-0"]),
        "policy_trainer": _where("t", [1, 2], ["uuid-1", "uuid-2"]),
    }
    assert "trainer on GPU 1,2 (disjoint)" in check_placement(three, False, uuid_of=_uuid)


@pytest.mark.parametrize(
    ("where", "colocated", "message"),
    [
        # the process runs on another GPU than the one it was given
        ({"reference": [0], "policy_trainer": [1]}, False, "placement gave"),
        # two trainer ranks on one GPU
        ({"reference": [0], "policy_trainer": [1, 1]}, False, "share a GPU"),
        # not colocated, yet on the same GPU
        ({"reference": [0], "policy_trainer": [0]}, False, "not colocated"),
    ],
)
def test_placement_check_fails_on_wrong_gpus(
    where: dict[str, list[int]], colocated: bool, message: str
) -> None:
    reports = {
        model: _where(model, gpus, [_uuid(g) for g in gpus]) for model, gpus in where.items()
    }
    if message == "placement gave":
        reports["policy_trainer"][0]["uuid"] = "uuid-7"
    with pytest.raises(CheckFailed, match=message):
        check_placement(reports, colocated, uuid_of=_uuid)


def test_probe_config_colocates_only_when_gpus_are_short() -> None:
    assert probe_config(1)["runtime"]["colocation"] == [["reference", "policy_trainer"]]
    assert probe_config(2)["models"]["policy_trainer"]["num_gpu"] == 2
    assert probe_config(2)["runtime"]["colocation"]  # 3 processes on 2 GPUs
    assert probe_config(4)["runtime"]["colocation"] == []


def test_example_config_is_the_example_on_gpus(tmp_path: Path) -> None:
    from chatlearn.config import load_config

    trainer = {"num_gpu": 2, "model_args": {"parallel": "fsdp", "mixed_precision": "bf16"}}
    reference = {"num_gpu": 2, "zero_size": 2, "model_args": {"parallel": "fsdp"}}
    store = str(tmp_path / "store")
    path = example_config(tmp_path, trainer, reference, True, {"reference_store": store})
    config = load_config(path)
    policy = config.model("policy_trainer")
    assert (policy.num_gpu, config.model("reference").num_gpu) == (2, 2)
    assert config.model("reference").num_replica == 1  # one replica sharded over both GPUs
    assert policy.model_args["parallel"] == "fsdp"
    assert policy.model_args["learning_rate"] == 3.0e-3  # the example's model.yaml
    assert Path(config.runtime_args.data_path).is_absolute()
    assert config.runtime_args.reference_store == store


def test_offload_check_wants_the_memory_released_and_the_weights_back() -> None:
    from chatlearn.gpu_check import CheckFailed, check_offload

    good = {
        "loaded": 512 << 20,
        "offloaded": 8 << 20,
        "onloaded": 512 << 20,
        "weights_equal": True,
        "on_device": True,
    }
    assert check_offload(good) == "512 MiB on the GPU → 8 MiB offloaded → back, intact"
    for bad in ({"offloaded": 300 << 20}, {"weights_equal": False}, {"onloaded": 100 << 20}):
        with pytest.raises(CheckFailed):
            check_offload({**good, **bad})


def test_packed_attention_check_runs_its_comparison_on_any_device() -> None:
    # the same comparison gpu-check runs on CUDA: here on the CPU, where it must pass too
    from chatlearn.gpu_check import check_packed_attention

    assert "equal the padded forward" in check_packed_attention("cpu")


def test_the_lora_run_is_the_lora_example_and_its_exports_are_checked(tmp_path: Path) -> None:
    from chatlearn.config import load_config

    trainer = {"num_gpu": 1, "model_args": lora_model_args()}
    config = load_config(example_config(tmp_path, trainer, {"num_gpu": 1}, True))
    policy = config.model("policy_trainer").model_args
    assert policy["lora"]["target_modules"] == "all-linear" and policy["learning_rate"] == 1e-3
    assert "lora" not in config.model("reference").model_args  # the frozen base model
    with pytest.raises(CheckFailed, match="no hf_model"):
        check_lora_export(tmp_path)
    export = tmp_path / "output" / "run" / "checkpoints" / "iter_0000024" / "p" / "hf_model"
    (export / "adapter").mkdir(parents=True)
    with pytest.raises(CheckFailed, match="no adapter"):
        check_lora_export(tmp_path)
    (export / "adapter" / "adapter_model.safetensors").write_text("{}")
    with pytest.raises(CheckFailed, match="no merged model"):
        check_lora_export(tmp_path)
    (export / "config.json").write_text("{}")
    assert check_lora_export(tmp_path) == "adapter and merged weights exported"
    # a periodic checkpoint before it: the adapter alone
    periodic = Path(str(export).replace("iter_0000024", "iter_0000012"))
    (periodic / "adapter").mkdir(parents=True)
    (periodic / "adapter" / "adapter_model.safetensors").write_text("{}")
    assert check_lora_export(tmp_path) == "adapter in 2 checkpoints, merged weights in the last"
    (periodic / "config.json").write_text("{}")
    with pytest.raises(CheckFailed, match="merged weights in a periodic checkpoint"):
        check_lora_export(tmp_path)


def test_the_gpu_lora_runs_scale_their_loss_and_adapt_the_embeddings_under_fsdp2(
    tmp_path: Path,
) -> None:
    # fp16 (its loss scaler is CUDA only) on one GPU; under FSDP2 (the sharded scaler) the
    # embeddings get adapters too, the case FSDP2 must keep its root gathered for
    from chatlearn.config import load_config

    single, sharded = lora_gpu_model_args(fsdp=False), lora_gpu_model_args(fsdp=True)
    assert single["mixed_precision"] == sharded["mixed_precision"] == "fp16"
    assert "parallel" not in single and sharded["parallel"] == "fsdp"
    assert "embed_tokens" in sharded["lora"]["target_modules"]
    trainer = {"num_gpu": 2, "model_args": sharded}
    policy = load_config(example_config(tmp_path, trainer, {"num_gpu": 2}, True))
    args = policy.model("policy_trainer").model_args
    assert args["learning_rate"] == 1.0e-3  # dpo_lora.yaml's
    assert args["lora"]["r"] == 16


def test_the_loss_must_fall_on_average_not_at_one_step(tmp_path: Path) -> None:
    import json

    metrics = tmp_path / "output" / "run" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)

    def write(losses: list[float]) -> None:
        records = [{"kind": "train", "loss": x} for x in losses] + [{"kind": "eval", "loss": 0}]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in records))

    # a last step above the first (noise) while the run learns: passes
    write([0.69, 0.70, 0.68, 0.69] + [0.66] * 7 + [0.65] * 12 + [0.70])
    assert loss_fell(tmp_path, by=0.02).startswith("loss 0.6900 -> 0.656")
    write([0.69] * 24)
    with pytest.raises(CheckFailed, match="did not fall"):
        loss_fell(tmp_path, by=0.02)
    write([0.69] * 5)
    with pytest.raises(CheckFailed, match="only 5 training steps"):
        loss_fell(tmp_path, by=0.02)


def test_the_sharded_reference_loads_the_policys_first_weights_from_a_checkpoint(
    tmp_path: Path,
) -> None:
    # the FSDP2 run's reference loads its model in turns from a local checkpoint: the example's
    # model, as the policy builds it from model.yaml (equal weights: the loss starts at ln 2)
    import torch
    import yaml

    from chatlearn.config import load_config
    from chatlearn.hf.model import causal_lm_from_args
    from chatlearn.hf.tokenizer import load_tokenizer

    checkpoint = example_checkpoint(tmp_path / "model")
    example = yaml.safe_load((REPO / "examples" / "dpo" / "model.yaml").read_text())
    tokenizer = load_tokenizer(None)
    built = causal_lm_from_args(
        {"model_config": example["model_config"], "seed": example["seed"]}, tokenizer
    ).state_dict()
    loaded = causal_lm_from_args({"model_path": str(checkpoint)}, load_tokenizer(checkpoint))
    assert built.keys() == loaded.state_dict().keys()
    assert all(torch.equal(built[k], v) for k, v in loaded.state_dict().items())
    reference = {"num_gpu": 2, "zero_size": 2, "model_args": {"model_path": str(checkpoint)}}
    config = load_config(example_config(tmp_path, {"num_gpu": 2}, reference, True))
    assert config.model("reference").model_args["model_path"] == str(checkpoint)


def test_a_resumed_example_is_told_by_its_log() -> None:
    from chatlearn.gpu_check import CheckFailed, resumed

    log = (
        "[chatlearn 04:23:06] resuming from /w/out/dpo_example/checkpoints/iter_0000024 with "
        "changed training settings, so the run will not repeat an uninterrupted one exactly: "
        "num_episode: saved 2, now 3\n"
        "[chatlearn 04:23:06] resuming from /w/out/dpo_example/checkpoints/iter_0000024: "
        "iteration 24, consumed_samples 768; continuing with episode 3\n"
        "[chatlearn 04:23:07] episode 3/3 done in 0.3s: iteration 36, loss 0.6857\n"
    )
    assert resumed(log, 3) == "resumed from iter_0000024 (iteration 24)"
    with pytest.raises(CheckFailed, match="episode 4 was not trained"):
        resumed(log, 4)
    with pytest.raises(CheckFailed, match="did not resume"):
        resumed(log.replace("resuming", "starting"), 3)
