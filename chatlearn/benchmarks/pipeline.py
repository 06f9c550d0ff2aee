"""`chatlearn bench pipeline`: our pipelined schedule vs ChatLearn's, on synthetic costs.

Both runs use the same synthetic modules (``synthetic.py``: fixed seconds per reference chunk and
per training step), each model on its own core, in one invocation so the figures are side by side:

- ours: the reference runs ahead of training by the default credit window;
- ChatLearn's schedule: ``pipeline_window: 0`` — the whole episode's inference, then training;
- ideal: ``max(reference, trainer)`` time per sample, i.e. perfect overlap (none when both costs
  are 0: the runs then measure the runtime's own overhead, which has no ideal figure).

Each run writes into its own output directory (a second run in the first one's would find its
metrics and move them aside as an earlier start's).

Throughput is samples over the span from the first ``forward_step`` to the last ``train_step``
(process start-up excluded).

``--soak`` measures the coordinator instead (issue 17): no-op modules (``NoOpReference`` returns
its input, ``NoOpTrainer`` does nothing), 1-sample chunks and micro-batches, one micro-batch per
step, ``--micro-batches`` of them, the reference up to ``--soak-window`` micro-batches ahead. It
reports micro-batches dispatched per second over the first and the last minute (1/10 of the run
when that is shorter) and the whole run, from the timestamps of the ``train`` records of
metrics.jsonl; the coordinator's RSS after the first window and at the end; the CPU time per
micro-batch of the coordinator and of the actors; and what computing the timing statistics costs
at an episode end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
import time
from typing import Any, NamedTuple

import click

from chatlearn.launch.options import FiniteFloat
from chatlearn.transport import run


async def _measure(window: int | None, options: dict[str, Any], output_dir: str) -> float:
    import chatlearn
    from chatlearn.benchmarks.synthetic import SpinReference, SpinTrainer
    from chatlearn.config import reset_args
    from chatlearn.engine.engine import DPOEngine

    chatlearn.init(
        {
            "models": {
                "reference": {"num_cpu": 1, "model_args": {"cost": options["forward_cost"]}},
                "policy_trainer": {
                    "num_cpu": 1,
                    "trainable": True,
                    "model_args": {"cost": options["train_cost"]},
                },
            },
            "runtime": {
                "num_episode": options["episodes"],
                "sample_per_episode": options["sample_per_episode"],
                "generation_batch_size": options["generation_batch_size"],
                "train_micro_batch_size": options["micro_batch_size"],
                "train_global_batch_size": options["global_batch_size"],
                "pipeline_window": window,
                "output_dir": output_dir,
                "data_shuffle": False,
            },
        }
    )
    try:
        engine = DPOEngine(SpinReference("reference"), SpinTrainer("policy_trainer"))
        engine.set_dataset(range(options["sample_per_episode"] * 2))
        result = await engine.learn_async()
    finally:
        reset_args()
    assert result.seconds is not None
    return options["episodes"] * options["sample_per_episode"] / result.seconds


_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * _PAGE


def children_cpu_seconds() -> float:
    """CPU time (user + system) of this process's live children, i.e. the actors."""
    total = 0.0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as children:
                pids = children.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it just exited
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


class Sample(NamedTuple):
    time: float
    rss: int  # bytes, this process
    cpu: float  # seconds, this process
    actors_cpu: float  # seconds, its children


class RssSampler:
    """Samples this process's RSS and CPU time, and its children's CPU time, every
    ``interval`` seconds on a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> Sample:
        times = os.times()
        return Sample(time.time(), rss_bytes(), times.user + times.system, children_cpu_seconds())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, moment: float) -> Sample:
        """The last sample taken at or before ``moment`` (the first one if none is)."""
        before = [sample for sample in self.samples if sample.time <= moment]
        return before[-1] if before else self.samples[0]


def soak_figures(
    times: list[float], rss: RssSampler | None = None, *, window: float = 60.0
) -> dict[str, float]:
    """Rates over the first and last ``window`` seconds (1/10 of the run if shorter) and the
    whole run, from the completion times of the micro-batches; RSS after the first window and
    at the end."""
    times = sorted(times)
    if len(times) < 2:
        raise ValueError(f"the soak needs at least 2 micro-batches, got {len(times)}")
    first, last = times[0], times[-1]
    duration = max(last - first, 1e-9)
    window = min(window, duration / 10)
    head = sum(1 for t in times if t <= first + window)
    tail = sum(1 for t in times if t >= last - window)
    figures = {
        "duration_s": duration,
        "window_s": window,
        "first_window_per_s": head / window,
        "last_window_per_s": tail / window,
        "total_per_s": (len(times) - 1) / duration,
    }
    figures["last_vs_first"] = figures["last_window_per_s"] / figures["first_window_per_s"]
    if rss is not None:
        start, end = rss.at(first + window), rss.at(last)
        done = max(1, sum(1 for t in times if start.time < t <= end.time))
        figures.update(
            rss_start_mib=start.rss / 2**20,
            rss_end_mib=end.rss / 2**20,
            rss_growth_pct=100 * (end.rss - start.rss) / start.rss,
            # between the two samples; the actors' figure counts both processes
            coordinator_cpu_us=1e6 * (end.cpu - start.cpu) / done,
            actors_cpu_us=1e6 * (end.actors_cpu - start.actors_cpu) / done,
        )
    return figures


async def _soak(options: dict[str, Any], output_dir: str) -> dict[str, Any]:
    import chatlearn
    from chatlearn.benchmarks.synthetic import NoOpReference, NoOpTrainer
    from chatlearn.config import reset_args
    from chatlearn.engine.engine import DPOEngine
    from chatlearn.engine.metrics import read_metrics

    per_episode = min(options["soak_episode"], options["micro_batches"])
    episodes = -(-options["micro_batches"] // per_episode)
    chatlearn.init(
        {
            "models": {
                "reference": {"num_cpu": 1},
                "policy_trainer": {"num_cpu": 1, "trainable": True},
            },
            "runtime": {
                "num_episode": episodes,
                "sample_per_episode": per_episode,
                "generation_batch_size": 1,
                "train_micro_batch_size": 1,
                "train_global_batch_size": 1,
                "pipeline_window": options["soak_window"],
                "output_dir": output_dir,
                "data_shuffle": False,
                "reference_cache": False,
                "enable_resume_training": False,
            },
        }
    )
    try:
        engine = DPOEngine(NoOpReference("reference"), NoOpTrainer("policy_trainer"))
        engine.set_dataset(range(per_episode))
        with RssSampler() as rss:
            await engine.learn_async()
        output = chatlearn.get_args().runtime_args.output_path
    finally:
        reset_args()
    assert engine.pipeline is not None
    records = read_metrics(os.path.join(output, "metrics.jsonl"))
    times = [r["time"] for r in records if r["kind"] == "train"]
    stats_ms = [r.get("stats_ms", math.nan) for r in records if r["kind"] == "episode"]
    timers = engine.pipeline.timers
    costs = []
    for _ in range(5):  # the best of 5: one call can meet a busy moment of the machine
        started = time.perf_counter()
        timers.summary()
        timers.overlap("reference", "policy_trainer")
        costs.append(time.perf_counter() - started)
    final_stats_ms = 1e3 * min(costs)
    return {
        "micro_batches": len(times),
        "episodes": episodes,
        "soak_window": options["soak_window"],
        "forward_orders": getattr(engine.pipeline, "num_forward_orders", math.nan),
        "train_calls": getattr(engine.pipeline, "num_train_calls", math.nan),
        **soak_figures(times, rss),
        "episode_stats_ms_first": stats_ms[0],
        "episode_stats_ms_last": stats_ms[-1],
        "episode_stats_ms_max": max(stats_ms),
        "final_stats_ms": final_stats_ms,
    }


def _print_soak(result: dict[str, Any]) -> None:
    click.echo(
        f"soak: {result['micro_batches']} micro-batches of 1 sample, no-op modules, "
        f"{result['episodes']} episodes, pipeline_window {result['soak_window']}, "
        f"{result['duration_s']:.1f} s",
        file=sys.stderr,
    )
    window = result["window_s"]
    click.echo(f"{'micro-batches/s':<28}{'':>12}")
    for name, key in (
        (f"first {window:.1f} s", "first_window_per_s"),
        (f"last {window:.1f} s", "last_window_per_s"),
        ("whole run", "total_per_s"),
    ):
        click.echo(f"  {name:<26}{result[key]:>12.0f}")
    click.echo(f"  {'last / first':<26}{result['last_vs_first']:>12.3f}")
    click.echo(
        f"coordinator RSS: {result['rss_start_mib']:.1f} MiB after the first window, "
        f"{result['rss_end_mib']:.1f} MiB at the end ({result['rss_growth_pct']:+.1f}%)"
    )
    click.echo(
        f"orders: {result['forward_orders']} to the reference, {result['train_calls']} to the "
        f"trainer ({result['micro_batches'] / result['train_calls']:.1f} steps a call)"
    )
    click.echo(
        f"CPU per micro-batch: coordinator {result['coordinator_cpu_us']:.0f} µs, actors "
        f"{result['actors_cpu_us']:.0f} µs (both together)"
    )
    click.echo(
        f"timing statistics at an episode end: first {result['episode_stats_ms_first']:.3f} ms, "
        f"last {result['episode_stats_ms_last']:.3f} ms, max {result['episode_stats_ms_max']:.3f}"
        f" ms; over the whole run at its end {result['final_stats_ms']:.3f} ms"
    )


# finite, not negative (nan refused); counts at least 1
_SECONDS = FiniteFloat(min=0)
_COUNT = click.IntRange(min=1)


@click.command("pipeline")
@click.option(
    "--forward-cost",
    default=0.02,
    show_default=True,
    type=_SECONDS,
    help="seconds per reference chunk",
)
@click.option(
    "--train-cost", default=0.04, show_default=True, type=_SECONDS, help="seconds per training step"
)
@click.option("--episodes", default=3, show_default=True, type=_COUNT)
@click.option("--sample-per-episode", default=64, show_default=True, type=_COUNT)
@click.option("--generation-batch-size", default=4, show_default=True, type=_COUNT)
@click.option("--micro-batch-size", default=2, show_default=True, type=_COUNT)
@click.option("--global-batch-size", default=8, show_default=True, type=_COUNT)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--soak", is_flag=True, help="measure the coordinator with no-op modules instead")
@click.option(
    "--micro-batches", default=100_000, show_default=True, type=_COUNT, help="with --soak"
)
@click.option(
    "--soak-episode",
    default=1000,
    show_default=True,
    type=_COUNT,
    help="with --soak: micro-batches per episode",
)
@click.option(
    "--soak-window",
    default=512,
    show_default=True,
    type=click.IntRange(min=0),
    help="with --soak: runtime.pipeline_window in micro-batches (0: ChatLearn's schedule); the "
    "engine's default, 2 global batches, lets the reference run only 2 samples ahead here",
)
def command(as_json: bool, soak: bool, **options: Any) -> None:
    """Samples/s of the pipelined schedule vs ChatLearn's schedule vs the ideal overlap."""
    if soak:
        with tempfile.TemporaryDirectory(prefix="chatlearn-soak-") as output_dir:
            result = run(_soak(options, output_dir))
        if as_json:
            click.echo(json.dumps(result))
        else:
            _print_soak(result)
        return
    # said in the options' names: the config check named runtime keys the user never wrote
    micro, global_batch = options["micro_batch_size"], options["global_batch_size"]
    if global_batch % micro:
        raise click.UsageError(
            f"--global-batch-size {global_batch} must be a multiple of --micro-batch-size {micro}"
        )
    if options["sample_per_episode"] < global_batch:
        raise click.UsageError(
            f"--sample-per-episode {options['sample_per_episode']} must be at least "
            f"--global-batch-size {global_batch}"
        )
    per_sample_ref = options["forward_cost"] / options["generation_batch_size"]
    per_sample_train = options["train_cost"] / options["global_batch_size"]
    slowest = max(per_sample_ref, per_sample_train)
    # both costs 0: the runtime's overhead alone, which no overlap bounds
    ideal = 1.0 / slowest if slowest > 0 else None
    with tempfile.TemporaryDirectory(prefix="chatlearn-bench-") as output_dir:
        ours = run(_measure(None, options, os.path.join(output_dir, "pipelined")))
        chatlearn_schedule = run(_measure(0, options, os.path.join(output_dir, "chatlearn")))
    result = {
        **options,
        "ours_samples_per_s": ours,
        "chatlearn_schedule_samples_per_s": chatlearn_schedule,
        "ideal_samples_per_s": ideal,
        "ratio_vs_ideal": ours / ideal if ideal else None,
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
    if ideal is None:
        click.echo("both costs are 0: no ideal figure (the runtime's overhead alone)", err=True)
    click.echo(f"{'schedule':<24}{'samples/s':>12}{'vs ideal':>10}")
    for name, value in (
        ("chatlearn (pipelined)", ours),
        ("ChatLearn's schedule", chatlearn_schedule),
        ("ideal max(ref, train)", ideal),
    ):
        if value is None:
            click.echo(f"{name:<24}{'-':>12}{'-':>10}")
        elif ideal is None:
            click.echo(f"{name:<24}{value:>12.1f}{'-':>10}")
        else:
            click.echo(f"{name:<24}{value:>12.1f}{value / ideal:>10.2f}")
