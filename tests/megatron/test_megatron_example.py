"""The megatron example's main file runs with `-c` pointing at the example config.

`python examples/megatron/train_dpo.py -c examples/megatron/configs/dpo.yaml`, shortened through
the config's environment overrides, trains through the real engine (one actor process per model
rank) and writes its metrics. Skipped without megatron-core, and until `chatlearn` exports
`DPOEngine` (the main file imports it from there, as ChatLearn's does).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import chatlearn
from chatlearn.megatron.requirement import megatron_available

REPO_ROOT = Path(__file__).resolve().parents[2]
MAIN = REPO_ROOT / "examples" / "megatron" / "train_dpo.py"
CONFIG = REPO_ROOT / "examples" / "megatron" / "configs" / "dpo.yaml"

pytestmark = [
    pytest.mark.skipif(
        not megatron_available(),
        reason="megatron-core is not installed (pip install 'chatlearn[megatron]')",
    ),
    pytest.mark.skipif(
        not hasattr(chatlearn, "DPOEngine"), reason="chatlearn does not export DPOEngine yet"
    ),
    pytest.mark.timeout(300),
]


def _run_main(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """The example's main file to its end: (exit code, output); a run that hangs is stopped
    with all its actors."""
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so a hung run can be stopped with all its actors
    )
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode, output.decode(errors="replace")


def test_main_file_trains_with_the_example_config(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        num_episode="2",
        sample_per_episode="32",
        output_dir=str(tmp_path),
        OMP_NUM_THREADS="1",
    )
    # cwd: the main file finds `examples` itself, wherever it is started from
    code, text = _run_main(["-c", str(CONFIG), "--num-samples", "64"], tmp_path, env)
    assert code == 0, text[-4000:]
    metrics_files = list(tmp_path.rglob("metrics.jsonl"))
    assert metrics_files, f"no metrics.jsonl under {tmp_path}\n{text[-2000:]}"
    records = [json.loads(line) for line in metrics_files[0].read_text().splitlines() if line]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses), records


@pytest.mark.parametrize(
    ("setting", "env", "message"),
    [
        # failed mid-run deep inside megatron-core (some 200 lines, exit 1)
        (
            "pipeline_model_parallel_size: 2",
            {"policy_cpu": "2"},
            "models.ppo_policy.pipeline_model_parallel_size: this example runs one pipeline stage",
        ),
        (
            "num_attention_heads: 3",
            {"policy_cpu": "2", "policy_tp": "2"},
            "models.ppo_policy.model_args.num_attention_heads: 3 heads do not split over "
            "tensor_model_parallel_size 2",
        ),
    ],
)
def test_parallel_sizes_the_example_cannot_run_are_one_config_line(
    tmp_path: Path, setting: str, env: dict[str, str], message: str
) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    text = CONFIG.read_text().replace(
        "    tensor_model_parallel_size: ${policy_tp:1}\n",
        "    tensor_model_parallel_size: ${policy_tp:1}\n"
        + ("    pipeline_model_parallel_size: 2\n" if setting.startswith("pipeline") else ""),
    )
    text = text.replace("runtime:\n", 'runtime:\n  colocation: ["reference,ppo_policy"]\n', 1)
    (configs / "dpo.yaml").write_text(text)
    model = (CONFIG.parent / "gpt_tiny.yaml").read_text()
    if setting.startswith("num_attention_heads"):
        model = model.replace("num_attention_heads: 4", "num_attention_heads: 3")
        model = model.replace("hidden_size: 64", "hidden_size: 66")
    (configs / "gpt_tiny.yaml").write_text(model)
    code, output = _run_main(
        ["-c", str(configs / "dpo.yaml"), "--num-samples", "16"],
        tmp_path,
        dict(os.environ, output_dir=str(tmp_path / "out"), num_episode="1", **env),
    )
    assert code == 2, output[-3000:]
    assert message in output, output[-3000:]
    assert "Traceback" not in output
