"""`chatlearn bench memory`: per-process memory of DPO training in three trainer layouts.

A Qwen2.5-0.5B-shaped model (``QWEN2_5_0_5B``: transformers' ``Qwen2ForCausalLM`` built from its
config, random init, tied embeddings, 494M parameters; nothing is downloaded) trains a few DPO
steps of ``--pairs`` pairs × ``--seq-len`` tokens with its reference, through the real engine
(``DPOEngine``, reference and trainer in their own processes), once per layout, one after the
other in one invocation:

- ``ddp``: the trainer on 1 process (every rank would hold the whole model, its gradients and
  AdamW's two moments: 16 bytes a parameter);
- ``fsdp2``: the trainer sharded with FSDP2 over 2 processes (``parallel: fsdp``);
- ``lora``: the trainer on 1 process with LoRA adapters of rank ``--lora-rank`` on every linear
  layer of the decoder (only they have gradients and optimizer state).

The reference is the same in every layout: one process, forward only, colocated with the trainer
at normal priority (throughput is ``bench dpo``'s subject; here a reference under SCHED_IDLE would
only be starved by whatever else runs on the machine), so that the trainer's figures compare.

Figures, per process, measured inside it (``MemoryProbe``):

- peak RSS: ``VmHWM`` of ``/proc/self/status``, the high-water mark of the whole process life
  (imports, model building, sharding, every step);
- peak torch bytes: on CUDA ``torch.cuda.max_memory_allocated()``; on CPU, where torch keeps no
  allocator statistics, the peak of the bytes torch's CPU allocator holds, from the memory events
  of ``torch.profiler`` (``profile_memory``), which runs from before the model is built to the
  end of the ``--warmup`` steps (at least 2: the second step is already a steady-state one,
  optimizer state allocated, gradients freed and reallocated, so later steps add nothing new;
  the timed steps after those run without the profiler's overhead); reported for the whole
  life and for the steps alone (``..._step_peak_torch_bytes``: building a model with tied
  embeddings briefly holds an untied head too, which can exceed what a LoRA step needs);
- samples/s and tokens/s (padded sequence tokens, 2 sequences a pair) over the steps after the
  warm-up, from the trainer's own step end times (the slowest rank's per step).

The model: ``--hidden-size`` etc. give a smaller one (the test's); ``--mixed-precision bf16``
and ``--logps-chunk-size`` are passed to the trainer's ``model_args`` as they are; ``--device
cuda`` puts every process on a GPU (``chatlearn gpu-check`` runs it so). The JSON (``--json``)
has ``num_parameters``, ``layouts`` (per layout: ``trainer_peak_rss_bytes`` and
``trainer_peak_torch_bytes``, the largest over the trainer's processes, the per-process lists,
the reference's peaks, ``samples_per_s``, ``tokens_per_s``, each rank's ``memory_report()``),
``ratios`` (each layout's peaks over DDP's) and ``skipped`` layouts with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import click

from chatlearn.benchmarks.dpo import (
    _PREAMBLE,
    COUNT,
    SEQ_LEN,
    bench_records,
    check_cores,
    check_model_shape,
    throughput,
)
from chatlearn.engine.engine import DPOEngine
from chatlearn.engine.state import RunState
from chatlearn.hf.memory import RECOMMENDED_MMAP_THRESHOLD
from chatlearn.hf.modules import HFDPOTrainer, HFReference
from chatlearn.hf.tokenizer import BYTE_VOCAB_SIZE
from chatlearn.transport import run

# Qwen2.5-0.5B's config.json, the keys that shape memory and compute.
QWEN2_5_0_5B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}

LAYOUTS = ("ddp", "fsdp2", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- inside the actors -------------------------------------------------------------------------
def build_qwen2(config: dict[str, Any], *, seed: int = 0, dtype: Any = None) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` on this process's GPU if it has one, else on
    the CPU (seeded without touching the global RNG)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chatlearn.hf.model import resolve_dtype

    # built where it will run: a random init of 0.49B parameters takes seconds on a CPU
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    with (
        torch.random.fork_rng(devices=[] if device is None else [device]),
        torch.device(device or "cpu"),
    ):
        torch.manual_seed(seed)
        model: Any = Qwen2ForCausalLM(Qwen2Config(**config))
    resolved = resolve_dtype(dtype)
    return model if resolved is None else model.to(resolved)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


STEP_MARK = "chatlearn.bench.memory.step"


class TorchPeak:
    """Peak bytes torch has allocated in this process since ``start()``, and since the first
    ``step()`` (what training adds to a process whose start-up peak may be higher: building a
    model with tied embeddings allocates an untied head first).

    CUDA: the caching allocator's own peaks. CPU: the profiler reports every allocation and free
    of torch's CPU allocator made while it runs (on the profiling thread, which in an actor is the
    compute thread); a peak is the running sum's maximum, the steps' from the first ``step()``
    mark (a ``record_function`` event on the same clock). Memory allocated before ``start()`` is
    not counted, so start it before the model is built.
    """

    def __init__(self) -> None:
        import torch

        self._cuda = torch.cuda.is_available()
        self._profiler: Any = None
        self._peaks: tuple[int, int] | None = None  # (whole, steps)
        self._before_steps: int | None = None  # CUDA: the peak before the first step

    def start(self) -> None:
        import torch

        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.start()

    def step(self) -> contextlib.AbstractContextManager[Any]:
        """Wrap each step: the first one starts the steps' window."""
        import torch

        if self._cuda:
            if self._before_steps is None:
                self._before_steps = int(torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            return contextlib.nullcontext()
        if self._profiler is None:
            return contextlib.nullcontext()
        return torch.profiler.record_function(STEP_MARK)

    def stop(self) -> None:
        """End the CPU profiling (later allocations are not counted); no-op on CUDA."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        events = profiler.profiler.kineto_results.events()
        marks = [e.start_ns() for e in events if e.name() == STEP_MARK]
        deltas = [(e.start_ns(), e.nbytes()) for e in events if _is_cpu_memory(e)]
        self._peaks = running_peaks(deltas, min(marks) if marks else None)

    def peak_bytes(self) -> int:
        """The peak since ``start()``."""
        import torch

        if self._cuda:
            return max(self._before_steps or 0, int(torch.cuda.max_memory_allocated()))
        self.stop()
        return self._peaks[0] if self._peaks else 0

    def step_peak_bytes(self) -> int:
        """The peak since the first ``step()`` (0 without one)."""
        import torch

        if self._cuda:
            return int(torch.cuda.max_memory_allocated()) if self._before_steps is not None else 0
        self.stop()
        return self._peaks[1] if self._peaks else 0


def _is_cpu_memory(event: Any) -> bool:
    from torch.autograd import DeviceType

    return bool(event.name() == "[memory]" and event.device_type() == DeviceType.CPU)


def running_peaks(deltas: list[tuple[int, int]], since: int | None) -> tuple[int, int]:
    """The largest running sums of ``(time, bytes)`` allocations (+) and frees (-), in time
    order: over all of them, and from time ``since`` on (0 if None)."""
    total = peak = 0
    since_peak: int | None = None
    for at, delta in sorted(deltas):
        if since is not None and since_peak is None and at >= since:
            since_peak = total  # what was live when the window opened
        total += delta
        peak = max(peak, total)
        if since_peak is not None:
            since_peak = max(since_peak, total)
    if since is not None and since_peak is None:
        since_peak = total  # nothing happened in the window
    return peak, since_peak or 0


class MemoryProbe:
    """A module's memory figures and step end times; torch bytes tracked for ``profile_steps``."""

    def __init__(self, profile_steps: int) -> None:
        self.profile_steps = profile_steps
        self.torch_peak = TorchPeak()
        self.step_ends: list[float] = []
        self.torch_peak.start()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        with self.torch_peak.step():
            yield
        self.step_ends.append(time.time())
        if len(self.step_ends) == self.profile_steps:
            self.torch_peak.stop()

    def figures(self, module: Any) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "pid": os.getpid(),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_torch_bytes": self.torch_peak.peak_bytes(),
            "step_peak_torch_bytes": self.torch_peak.step_peak_bytes(),
            "step_ends": list(self.step_ends),
        }
        report = getattr(module, "memory_report", None)
        if callable(report):  # the trainer's per-rank parameter/gradient/optimizer bytes
            figures["memory_report"] = dict(report())
        return figures


def _build_bench_model(module: HFReference | HFDPOTrainer) -> Any:
    return build_qwen2(
        dict(module.model_args["qwen2_config"]),
        seed=int(module.arg("seed", 0)),
        dtype=module.model_args.get("dtype"),
    )


class MemoryReference(HFReference):
    """``HFReference`` on the bench's Qwen2 model, with a ``MemoryProbe``."""

    def setup(self) -> None:
        self.probe = MemoryProbe(int(self.arg("memory_profile_steps", 2)))
        super().setup()

    def build_model(self) -> Any:
        return _build_bench_model(self)

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        with self.probe.step():
            return super().forward_step(data, iteration)

    def memory_figures(self) -> dict[str, Any]:
        return self.probe.figures(self)


class MemoryTrainer(HFDPOTrainer):
    """``HFDPOTrainer`` on the bench's Qwen2 model, with a ``MemoryProbe``."""

    def setup(self) -> None:
        self.probe = MemoryProbe(int(self.arg("memory_profile_steps", 2)))
        super().setup()

    def build_model(self) -> Any:
        return _build_bench_model(self)

    def train_step(self, data: list[dict[str, Any]], iteration: int = 0) -> dict[str, float]:
        with self.probe.step():
            return super().train_step(data, iteration)

    def memory_figures(self) -> dict[str, Any]:
        return self.probe.figures(self)


# -- the coordinator ---------------------------------------------------------------------------
class _MeasuredDPOEngine(DPOEngine):
    """``DPOEngine`` that asks every process for its memory figures once training is done,
    before the processes stop (``learn_async`` stops them when ``_run`` returns)."""

    figures: dict[str, list[dict[str, Any]]]

    async def _run(self, runtime: Any, started: float) -> RunState:
        state = await super()._run(runtime, started)
        self.figures = {
            name: await self.group(name).call_all("memory_figures")
            for name in (self.reference.name, self.policy_trainer.name)
        }
        return state


def model_config(options: dict[str, Any]) -> dict[str, Any]:
    return {
        **QWEN2_5_0_5B,
        "hidden_size": options["hidden_size"],
        "intermediate_size": options["intermediate_size"],
        "num_hidden_layers": options["num_layers"],
        "num_attention_heads": options["num_heads"],
        "num_key_value_heads": options["num_kv_heads"],
        "vocab_size": options["vocab_size"],
    }


def trainer_args(layout: str, options: dict[str, Any]) -> dict[str, Any]:
    """The layout's own trainer ``model_args`` keys (``chatlearn.hf``'s interface)."""
    args: dict[str, Any] = {"parallel": "fsdp" if layout == "fsdp2" else "ddp"}
    if layout == "lora":
        rank = options["lora_rank"]
        args["lora"] = {"r": rank, "alpha": 2 * rank, "dropout": 0.0}
        args["lora"]["target_modules"] = list(LORA_TARGETS)
    if options["mixed_precision"] != "no":
        args["mixed_precision"] = options["mixed_precision"]
    if options["logps_chunk_size"]:
        args["logps_chunk_size"] = options["logps_chunk_size"]
    return args


def trainer_processes(layout: str) -> int:
    return 2 if layout == "fsdp2" else 1


def layout_config(layout: str, options: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """The whole run config of one layout: models, colocation, runtime."""
    common = {
        "seed": 0,
        "dtype": "float32",
        "qwen2_config": model_config(options),
        "max_length": options["seq_len"],
        "prompt_template": _PREAMBLE + "{prompt}",
        "memory_profile_steps": max(2, options["warmup"]),
        "beta": 0.1,
        "learning_rate": 1e-5,
        "max_grad_norm": 1.0,
        "save_hf_model": False,
        # every layout alike: glibc returns freed tensors' memory at once, so RSS follows what
        # torch holds (off by default in the modules: it costs CPU steps page faults)
        "malloc_mmap_threshold": RECOMMENDED_MMAP_THRESHOLD,
    }
    processes = trainer_processes(layout)
    if options["device"] == "cuda":
        reference: dict[str, Any] = {"num_gpu": 1}
        trainer: dict[str, Any] = {"num_gpu": processes}
    else:
        cores = options["cores"]
        reference = {"num_cpu": cores}
        per_process = cores // processes
        trainer = {"num_cpu": per_process * processes, "cpu_per_process": per_process}
    pairs = options["pairs"]
    return {
        "models": {
            "reference": {**reference, "model_args": common},
            "policy_trainer": {
                **trainer,
                "trainable": True,
                "model_args": {**common, **trainer_args(layout, options)},
            },
        },
        "runtime": {
            "num_episode": 1,
            "sample_per_episode": pairs * (options["warmup"] + options["steps"]),
            "generation_batch_size": pairs,
            "train_micro_batch_size": pairs // processes,
            "train_global_batch_size": pairs,
            "data_shuffle": False,
            "output_dir": os.path.join(output_dir, layout),
            "log_interval": 1000,
            "colocation": [["reference", "policy_trainer"]],
            # setup() builds the model with a random init: tens of seconds for 0.49B on a CPU
            "startup_timeout": 600.0,
        },
    }


def skip_reason(layout: str, options: dict[str, Any]) -> str | None:
    """Why ``layout`` cannot run with these options here (None: it can)."""
    processes = trainer_processes(layout)
    if options["pairs"] % processes:
        return f"--pairs must be a multiple of {processes} for {layout}"
    if options["device"] == "cuda":
        import torch

        if torch.cuda.device_count() < processes:
            return f"{layout} needs {processes} GPUs, this machine has {torch.cuda.device_count()}"
    elif options["cores"] < processes:
        return f"{layout} needs {processes} cores, --cores is {options['cores']}"
    return None


def step_ends(ranks: Sequence[dict[str, Any]]) -> list[float]:
    """Each step's end: the slowest rank's."""
    return [max(ends) for ends in zip(*(r["step_ends"] for r in ranks), strict=True)]


def summarize(figures: dict[str, list[dict[str, Any]]], options: dict[str, Any]) -> dict:
    """One layout's JSON figures from every process's ``memory_figures()``."""
    trainer, reference = figures["policy_trainer"], figures["reference"]
    samples_per_s = throughput(step_ends(trainer), options["pairs"], options["warmup"])
    result: dict[str, Any] = {
        "trainer_processes": len(trainer),
        "trainer_peak_rss_bytes": max(r["peak_rss_bytes"] for r in trainer),
        "trainer_peak_torch_bytes": max(r["peak_torch_bytes"] for r in trainer),
        "trainer_step_peak_torch_bytes": max(r["step_peak_torch_bytes"] for r in trainer),
        "trainer_rss_bytes": [r["peak_rss_bytes"] for r in trainer],
        "trainer_torch_bytes": [r["peak_torch_bytes"] for r in trainer],
        "reference_peak_rss_bytes": max(r["peak_rss_bytes"] for r in reference),
        "reference_peak_torch_bytes": max(r["peak_torch_bytes"] for r in reference),
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * 2 * options["seq_len"],
    }
    if "memory_report" in trainer[0]:
        result["trainer_memory_report"] = [r["memory_report"] for r in trainer]
    return result


async def measure_layout(layout: str, options: dict[str, Any], output_dir: str) -> dict:
    import chatlearn
    from chatlearn.config import reset_args

    records = bench_records(options["pairs"] * (options["warmup"] + options["steps"]))
    chatlearn.init(layout_config(layout, options, output_dir))
    try:
        engine = _MeasuredDPOEngine(MemoryReference("reference"), MemoryTrainer("policy_trainer"))
        engine.set_dataset(records)
        await engine.learn_async()
    finally:
        reset_args()
    return summarize(engine.figures, options)


def ratios(layouts: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each other layout's trainer peaks as a fraction of DDP's."""
    out: dict[str, float] = {}
    if "ddp" not in layouts:
        return out
    for name in (n for n in layouts if n != "ddp"):
        for key, short in (
            ("trainer_peak_rss_bytes", "rss"),
            ("trainer_peak_torch_bytes", "torch"),
            ("trainer_step_peak_torch_bytes", "step_torch"),
        ):
            if layouts["ddp"].get(key) and key in layouts[name]:
                out[f"{name}_vs_ddp_{short}"] = layouts[name][key] / layouts["ddp"][key]
    return out


async def _measure_all(options: dict[str, Any], output_dir: str) -> dict[str, Any]:
    layouts: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for layout in options["layouts"]:
        reason = skip_reason(layout, options)
        if reason is not None:
            skipped[layout] = reason
            continue
        layouts[layout] = figures = await measure_layout(layout, options, output_dir)
        click.echo(  # progress: a layout of the 0.49B model takes minutes on a CPU
            f"{layout}: trainer peak RSS {_gib(figures['trainer_peak_rss_bytes'])} GiB, "
            f"torch {_gib(figures['trainer_peak_torch_bytes'])} GiB "
            f"({_gib(figures['trainer_step_peak_torch_bytes'])} in steps), "
            f"{figures['samples_per_s']:.3f} samples/s",
            err=True,
        )
    return {"layouts": layouts, "ratios": ratios(layouts), "skipped": skipped}


def num_parameters(options: dict[str, Any]) -> int:
    """Parameters of the model, built on the meta device (no memory, no init)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**model_config(options)))
    return sum(p.numel() for p in model.parameters())


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def _print_table(result: dict[str, Any], options: dict[str, Any]) -> None:
    click.echo(
        f"{result['num_parameters'] / 1e6:.0f}M parameters, {options['pairs']} pairs × "
        f"{options['seq_len']} tokens per step, {options['warmup']} warm-up + {options['steps']} "
        f"timed steps, {options['device']}"
        + (f", {options['cores']} cores" if options["device"] == "cpu" else "")
    )
    header = f"{'layout':<8}{'procs':>6}{'trainer RSS':>12}{'torch':>8}{'in steps':>10}"
    click.echo(header + f"{'ref RSS':>9}{'samples/s':>11}{'tokens/s':>10}   (GiB)")
    for name, figures in result["layouts"].items():
        click.echo(
            f"{name:<8}{figures['trainer_processes']:>6}"
            f"{_gib(figures['trainer_peak_rss_bytes']):>12}"
            f"{_gib(figures['trainer_peak_torch_bytes']):>8}"
            f"{_gib(figures['trainer_step_peak_torch_bytes']):>10}"
            f"{_gib(figures['reference_peak_rss_bytes']):>9}"
            f"{figures['samples_per_s']:>11.3f}{figures['tokens_per_s']:>10.1f}"
        )
    for key, value in result["ratios"].items():
        click.echo(f"{key} {value:.3f}")
    for name, reason in result["skipped"].items():
        click.echo(f"{name} skipped: {reason}")


def _parse_layouts(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in LAYOUTS]
    if unknown or not names:
        raise click.BadParameter(f"choose from {', '.join(LAYOUTS)} (comma-separated)")
    return names


def _check_vocab_size(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """The model's vocabulary must hold every id of the byte-level tokenizer the benchmark's
    modules use (chatlearn.hf.tokenizer): a smaller one started every actor, then failed in the
    trainer's embedding lookup (IndexError)."""
    if value < BYTE_VOCAB_SIZE:
        raise click.BadParameter(
            f"{value} is smaller than the byte-level tokenizer's {BYTE_VOCAB_SIZE} tokens; "
            f"give at least {BYTE_VOCAB_SIZE}"
        )
    return value


def _model_option(name: str, key: str) -> Any:
    return click.option(name, default=QWEN2_5_0_5B[key], show_default=True, type=COUNT)


@click.command("memory")
@_model_option("--hidden-size", "hidden_size")
@_model_option("--intermediate-size", "intermediate_size")
@_model_option("--num-layers", "num_hidden_layers")
@_model_option("--num-heads", "num_attention_heads")
@_model_option("--num-kv-heads", "num_key_value_heads")
@click.option(
    "--vocab-size",
    default=QWEN2_5_0_5B["vocab_size"],
    show_default=True,
    type=int,
    callback=_check_vocab_size,
)
@click.option("--seq-len", default=256, show_default=True, type=SEQ_LEN, help="tokens per sequence")
@click.option("--pairs", default=2, show_default=True, type=COUNT, help="pairs per training step")
@click.option("--steps", default=1, show_default=True, type=COUNT, help="timed training steps")
@click.option(
    "--warmup",
    default=2,
    show_default=True,
    type=COUNT,
    help="steps before timing; torch bytes are tracked through max(2, warmup) steps",
)
@click.option("--layouts", default=",".join(LAYOUTS), show_default=True, callback=_parse_layouts)
@click.option("--lora-rank", default=16, show_default=True, type=COUNT)
@click.option(
    "--mixed-precision", type=click.Choice(("no", "bf16", "fp16")), default="no", show_default=True
)
@click.option("--logps-chunk-size", type=COUNT, default=None, help="[default: the trainer's]")
@click.option("--device", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True)
@click.option("--cores", type=int, default=None, help="CPU cores [default: all usable]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(as_json: bool, **options: Any) -> None:
    """Peak memory and throughput of DPO training: DDP, FSDP2 over 2 processes, LoRA."""
    check_cores(options)
    check_model_shape(options)
    if options["mixed_precision"] == "fp16" and options["device"] == "cpu":
        # the trainer refused it in setup(), after the actors had started, naming a model_args
        # key the user never wrote
        raise click.UsageError(
            "--mixed-precision fp16 needs a loss scaler, which needs --device cuda; on CPU use "
            "bf16 or no"
        )
    with tempfile.TemporaryDirectory(prefix="chatlearn-bench-memory-") as output_dir:
        measured = run(_measure_all(options, output_dir))
    result = {"num_parameters": num_parameters(options), **measured, "options": options}
    if as_json:
        click.echo(json.dumps(result))
        return
    _print_table(result, options)
    sys.stdout.flush()
