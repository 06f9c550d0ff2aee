"""`chatlearn bench pipeline`: our pipelined schedule vs ChatLearn's, on synthetic costs.

Both runs use the same synthetic modules (``synthetic.py``: fixed seconds per reference chunk and
per training step), each model on its own core, in one invocation so the figures are side by side:

- ours: the reference runs ahead of training by the default credit window;
- ChatLearn's schedule: ``pipeline_window: 0`` — the whole episode's inference, then training;
- ideal: ``max(reference, trainer)`` time per sample, i.e. perfect overlap.

Throughput is samples over the span from the first ``forward_step`` to the last ``train_step``
(process start-up excluded).
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import click

from chatlearn.transport import run


async def _measure(window: int | None, options: dict[str, Any], output_dir: str) -> float:
    import chatlearn
    from chatlearn.benchmarks.synthetic import SpinReference, SpinTrainer
    from chatlearn.config import reset_args
    from chatlearn.engine.engine import DPOEngine

    chatlearn.init(
        {
            "models": {
                "reference": {"num_cpu": 1},
                "policy_trainer": {"num_cpu": 1, "trainable": True},
            },
            "runtime": {
                "num_episode": options["episodes"],
                "sample_per_episode": options["sample_per_episode"],
                "generation_batch_size": options["generation_batch_size"],
                "train_micro_batch_size": options["micro_batch_size"],
                "train_global_batch_size": options["global_batch_size"],
                "pipeline_window": window,
                "bench_forward_cost": options["forward_cost"],
                "bench_train_cost": options["train_cost"],
                "output_dir": output_dir,
                "data_shuffle": False,
            },
        }
    )
    try:
        engine = DPOEngine(SpinReference("reference"), SpinTrainer("policy_trainer"))
        engine.set_dataset(range(options["sample_per_episode"] * 2))
        await engine.learn_async()
    finally:
        reset_args()
    assert engine.pipeline is not None
    busy = [i for timer in engine.pipeline.timers.models.values() for i in timer.busy]
    span = max(end for _, end in busy) - min(start for start, _ in busy)
    return options["episodes"] * options["sample_per_episode"] / span


@click.command("pipeline")
@click.option("--forward-cost", default=0.02, show_default=True, help="seconds per reference chunk")
@click.option("--train-cost", default=0.04, show_default=True, help="seconds per training step")
@click.option("--episodes", default=3, show_default=True)
@click.option("--sample-per-episode", default=64, show_default=True)
@click.option("--generation-batch-size", default=4, show_default=True)
@click.option("--micro-batch-size", default=2, show_default=True)
@click.option("--global-batch-size", default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(as_json: bool, **options: Any) -> None:
    """Samples/s of the pipelined schedule vs ChatLearn's schedule vs the ideal overlap."""
    per_sample_ref = options["forward_cost"] / options["generation_batch_size"]
    per_sample_train = options["train_cost"] / options["global_batch_size"]
    ideal = 1.0 / max(per_sample_ref, per_sample_train)
    with tempfile.TemporaryDirectory(prefix="chatlearn-bench-") as output_dir:
        ours = run(_measure(None, options, output_dir))
        chatlearn_schedule = run(_measure(0, options, output_dir))
    result = {
        **options,
        "ours_samples_per_s": ours,
        "chatlearn_schedule_samples_per_s": chatlearn_schedule,
        "ideal_samples_per_s": ideal,
        "ratio_vs_ideal": ours / ideal,
        "ratio_vs_chatlearn_schedule": ours / chatlearn_schedule,
    }
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"reference {per_sample_ref * 1e3:.1f} ms/sample, trainer {per_sample_train * 1e3:.1f} "
        f"ms/sample, {options['episodes']} episodes × {options['sample_per_episode']} samples",
        file=sys.stderr,
    )
    click.echo(f"{'schedule':<24}{'samples/s':>12}{'vs ideal':>10}")
    for name, value in (
        ("chatlearn (pipelined)", ours),
        ("ChatLearn's schedule", chatlearn_schedule),
        ("ideal max(ref, train)", ideal),
    ):
        click.echo(f"{name:<24}{value:>12.1f}{value / ideal:>10.2f}")
