"""Shared by the megatron tests: small HF checkpoints, and worker ranks started on a gloo group.

Not a test module: the tests put this directory on `sys.path` and `import gloo_ranks` (as
tests/actors does with tests/engine).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

SMALL_HF = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention: 2 heads per group
    "intermediate_size": 96,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}


def hf_configs() -> dict[str, object]:
    """The two small HF configs the conversion tests use (transformers imported lazily)."""
    import transformers

    return {
        # untied head, a non-default rope theta
        "llama": transformers.LlamaConfig(
            vocab_size=100, rope_theta=50000.0, tie_word_embeddings=False, **SMALL_HF
        ),
        # q/k/v bias, tied embeddings
        "qwen2": transformers.Qwen2Config(
            vocab_size=128, rope_theta=1000000.0, tie_word_embeddings=True, **SMALL_HF
        ),
    }


def save_random_checkpoint(name: str, path: Path) -> None:
    """`save_pretrained` a model of config `name` with every weight random (norms around 1)."""
    import transformers

    torch.manual_seed(len(name))
    model = transformers.AutoModelForCausalLM.from_config(hf_configs()[name])
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            torch.nn.init.normal_(param, std=0.15)
            if "norm" in param_name:
                param.add_(1.0)
    model.save_pretrained(str(path))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    worker: Path, jobs: list[tuple[str, int, int]], args: list[str], tmp: Path, timeout: float
) -> None:
    """Run `worker` once per (name, rank, world size) job; ranks of one world size form a group.

    Each job gets `--rank R --world-size W --port P --out tmp/<name>.json` plus `args`, and logs
    to `tmp/<name>.log`. Fails the test (with the log's tail) when a job exits non-zero or the
    jobs together take longer than `timeout` seconds; every process is gone on return.
    """
    ports = {world: free_port() for _, _, world in jobs}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    try:
        for name, rank, world in jobs:
            with open(tmp / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(worker), "--rank", str(rank), "--world-size", str(world),
                     "--port", str(ports[world]), "--out", str(tmp / f"{name}.json"), *args],
                    cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
        deadline = time.monotonic() + timeout
        for (name, _, _), proc in zip(jobs, procs, strict=True):
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                log_text = (tmp / f"{name}.log").read_text(errors="replace")[-4000:]
                pytest.fail(f"worker {name} ended with {code} (None: timed out)\n{log_text}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
