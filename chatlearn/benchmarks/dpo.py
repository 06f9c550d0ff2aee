"""`chatlearn bench dpo`: real DPO throughput, pipelined vs the single-process schedule.

On the same model (a Llama-style model built in code, about 6M parameters by default), the same
data (min/max pairs as in the DPO example behind a long instruction, so that every sequence is
``--seq-len`` tokens) and the same total cores, in one invocation:

- (a) single process: one process on all cores (torch threads = cores) runs the reference forward
  then the policy step for every batch — the schedule of a plain training loop (and of TRL);
- (b) chatlearn: ``DPOEngine``, reference and trainer in their own processes, the reference
  running ahead of training;
- (c) train-only: the policy steps alone, reference log-probs computed beforehand, on the cores
  the trainer has in (b): the most (b) can reach;
- second epoch: (b) on a dataset of one episode, run for two episodes; the figure is episode 2,
  where the reference outputs come from the engine's reference cache (``runtime.reference_cache``),
  against (c) on all cores.

(a) and (c) run in an actor process launched like (b)'s (same pinning, thread counts), calling
the same code as (b): ``HFReference.forward_step``'s ``reference_outputs`` and
``HFDPOTrainer.train_step`` (AdamW, clipping, the DPO loss of ``chatlearn.algorithms.dpo``).

``--data realistic`` (issue 14): the records follow the length profile of
``chatlearn.hf.profile`` (prompts and responses over two orders of magnitude, ``max_length`` 1024,
``max_prompt_length`` 512, no preamble), whose measured percentiles are printed; the runs are
(a) single process padded (``packing: false, prefix_sharing: false``: the plain loop), (p) the
same process with packing + prefix sharing, (b) pipelined with everything on, (c) train-only on
all cores, TRL with ``--vs-trl``, and (s) (b) again, served from the on-disk reference store
(``runtime.reference_store``) that a run before it filled. Each run also gives
real tokens/s and the fraction of computed tokens that were real (the trainer's ``tokens/real``
/ ``tokens/computed``: neither padding nor a repeated prompt); ``real_token_fraction`` is (b)'s.

Throughput is samples over the span from the end of the last warm-up step to the end of the last
step, so process start-up, model building and the first steps are excluded. The machine's speed
drifts between runs; ``--repeat N`` measures everything N times in rounds and reports medians
(a ratio: the median of the rounds' own ratios).

Layouts of (b) (``--layout``):

- ``colocated`` (default): reference and trainer share all cores, each with one torch thread per
  core; the reference's compute threads run under SCHED_IDLE (``--reference-priority idle``, the
  model key ``idle_priority``) or at ``--reference-nice`` (``--reference-priority nice``), so the
  kernel gives them only the time the trainer leaves
  (``chatlearn.actors.worker_core.apply_priority``), and the reference computes with all cores
  while the trainer waits.
- ``colocated-1``: the same, the reference with one thread on one core;
- ``split``: the reference on one core, the trainer on the others.

Measured on 2 cores (6.5M parameters, figures in BENCHMARKS.md): the trainer alone scales to 2
threads at about 90% efficiency, so (a) already keeps both cores busy and a first epoch cannot
beat it by much: ``split`` gives b/c about 1 but b/a about 0.75 (the trainer on one core), the
colocated layouts b/a about 0.9-1.0 but b/c about 0.7 ((c) has both cores and the reference's work
must fit somewhere). ``--wait-policy passive`` (OpenMP threads sleep at once instead of spinning)
lets the reference use more of the trainer's gaps, but slows the trainer alone by about 13%, which
the second epoch (reference outputs from the cache) pays in full; OMP_WAIT_POLICY=ACTIVE starves
the reference completely.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import click

from chatlearn.hf.modules import HFDPOTrainer
from chatlearn.transport import run

# The default model: about 6M parameters with the byte-level vocabulary.
BENCH_MODEL: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}

# Prepended to every prompt; prompt truncation (from the left) then makes each pair's longer side
# exactly --seq-len tokens.
_PREAMBLE = (
    "Read the operation and the two numbers, then answer with one of them: the larger one for "
    "max, the smaller one for min. "
) * 16

LAYOUTS = ("colocated", "colocated-1", "split")


class SingleProcessDPO(HFDPOTrainer):
    """(a) and (c): the reference model and the policy in one process, steps timed here."""

    def setup(self) -> None:
        super().setup()
        self.reference_model = self.build_model()  # same seed: starts equal to the policy
        self.reference_model.eval()
        self.reference_model.requires_grad_(False)

    def run_steps(self, records: list[dict[str, Any]], batch_size: int, precompute: bool) -> dict:
        """Train on ``records`` in batches; returns each step's end time (``time.time()``).

        ``precompute``: reference outputs of every batch before the first step (train-only).
        """
        from chatlearn.algorithms.dpo import reference_outputs

        dataset = self.build_dataset(records)
        batches = [
            dataset.collate_fn([dataset[i] for i in range(start, start + batch_size)])
            for start in range(0, len(dataset) - batch_size + 1, batch_size)
        ]

        def reference(batch: dict[str, Any]) -> dict[str, Any]:
            return reference_outputs(
                self.reference_model,
                batch,
                pad_token_id=self.pad_token_id,
                **self.packing.kwargs(),  # the trainer's layout: padded rows or packed
            )

        outputs = [reference(batch) for batch in batches] if precompute else None
        ends = []
        real = computed = 0.0
        for step, batch in enumerate(batches):
            data = outputs[step] if outputs is not None else reference(batch)
            metrics = self.train_step([data], iteration=step)
            ends.append(time.time())
            real += metrics.get("tokens/real", 0.0)
            computed += metrics.get("tokens/computed", 0.0)
        return {"ends": ends, "torch_threads": _torch_threads(), "tokens": (real, computed)}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def bench_records(num_pairs: int, seed: int = 0) -> list[dict[str, str]]:
    """``num_pairs`` min/max preference pairs (the task of the DPO example), deterministic."""
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    while len(records) < num_pairs:
        op, x, y = rng.choice(("max", "min")), rng.randint(0, 999), rng.randint(0, 999)
        if x == y:
            continue
        high, low = str(max(x, y)), str(min(x, y))
        chosen, rejected = (high, low) if op == "max" else (low, high)
        records.append({"prompt": f"{op}({x},{y})=", "chosen": chosen, "rejected": rejected})
    return records


def realistic_records_for(num_pairs: int) -> list[dict[str, str]]:
    """``num_pairs`` records of the realistic length profile (``chatlearn.hf.profile``)."""
    from chatlearn.hf.profile import realistic_records

    return realistic_records(num_pairs, seed=0)


def model_args(options: dict[str, Any]) -> dict[str, Any]:
    """The bench model's ``model_args``. With ``options["data"] == "realistic"``: the profile's
    truncation, the records as they are (no preamble), and packing + prefix sharing left to
    their default (on where exact) unless ``options["padded"]`` turns both off (the plain loop).
    """
    if options.get("data") == "realistic":
        return _realistic_model_args(options)
    return {
        "seed": 0,
        "dtype": "float32",
        "model_config": {
            **BENCH_MODEL,
            "hidden_size": options["hidden_size"],
            "intermediate_size": options["intermediate_size"],
            "num_hidden_layers": options["num_layers"],
            "max_position_embeddings": max(256, options["seq_len"] + 8),
        },
        "max_length": options["seq_len"],
        "prompt_template": _PREAMBLE + "{prompt}",
        "beta": 0.1,
        "learning_rate": 1e-4,
        "max_grad_norm": 1.0,
    }


def _realistic_model_args(options: dict[str, Any]) -> dict[str, Any]:
    from chatlearn.hf.profile import REALISTIC

    args = model_args({**options, "data": "uniform", "seq_len": REALISTIC.max_length})
    # packed rows need no bound: the attention runs by segments (chatlearn.hf.packing), without
    # a mask quadratic in the row
    args.update(REALISTIC.dataset_options(), prompt_template="{prompt}")
    if options.get("padded"):
        args.update(packing=False, prefix_sharing=False)
    return args


def throughput(ends: list[float], batch_size: int, warmup: int) -> float:
    """Samples/s over the steps after ``warmup`` (from the end of the last warm-up step)."""
    ends = sorted(ends)
    if warmup < 1 or len(ends) <= warmup:
        raise ValueError(f"need at least one warm-up step and one timed step, got {len(ends)}")
    return (len(ends) - warmup) * batch_size / (ends[-1] - ends[warmup - 1])


def _runtime(options: dict[str, Any], output_dir: str, **overrides: Any) -> dict[str, Any]:
    batch = options["batch_size"]
    return {
        "num_episode": 1,
        "sample_per_episode": batch * (options["steps"] + options["warmup"]),
        "generation_batch_size": options["generation_batch_size"],
        "train_micro_batch_size": batch,
        "train_global_batch_size": batch,
        "data_shuffle": False,
        "output_dir": output_dir,
        "log_interval": 1000,
        **overrides,
    }


def on_device(model: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A model's resource keys for ``--device``: cuda puts each process on one GPU (colocated
    models share it) instead of cores."""
    if options.get("device", "cpu") != "cuda":
        return model
    return {**{k: v for k, v in model.items() if k != "num_cpu"}, "num_gpu": 1}


async def _call_in_actor(
    options: dict[str, Any], output_dir: str, klass: type, num_cpu: int, method: str, *args: Any
) -> Any:
    """``method(*args)`` of a ``klass`` actor (the bench's model_args) on ``num_cpu`` cores."""
    import chatlearn
    from chatlearn.config import reset_args
    from chatlearn.engine.engine import Engine

    name = "single"
    chatlearn.init(
        {
            "models": {
                name: on_device(
                    {"num_cpu": num_cpu, "trainable": True, "model_args": model_args(options)},
                    options,
                )
            },
            "runtime": _runtime(options, output_dir),
        }
    )
    try:
        async with Engine(klass(name)) as engine:
            return await engine.group(name).call(0, method, *args)
    finally:
        reset_args()


async def measure_single(
    options: dict[str, Any], records: list[dict], num_cpu: int, precompute: bool, output_dir: str
) -> dict[str, Any]:
    """(a) (``precompute=False``) or (c): one process on ``num_cpu`` cores."""
    batch = options["batch_size"]
    result = await _call_in_actor(
        options, output_dir, SingleProcessDPO, num_cpu, "run_steps", records, batch, precompute
    )
    return {
        "samples_per_s": throughput(result["ends"], batch, options["warmup"]),
        "cores": num_cpu,
        "torch_threads": result["torch_threads"],
        "tokens": result["tokens"],
    }


def layout_models(
    layout: str, cores: int, priority: dict[str, Any], args: dict[str, Any]
) -> dict[str, Any]:
    """The ``models:`` and ``colocation`` of (b) for ``layout`` on ``cores`` cores; ``priority``
    is the reference's ``nice``/``idle_priority`` keys."""
    if layout == "colocated":
        reference = {"num_cpu": cores, **priority}
        trainer_cores = cores
    elif layout == "colocated-1":
        reference = {"num_cpu": 1, **priority}
        trainer_cores = cores
    elif layout == "split":
        if cores < 2:
            raise click.UsageError("--layout split needs at least 2 cores")
        reference = {"num_cpu": 1, **priority}
        trainer_cores = cores - 1
    else:
        raise click.UsageError(f"unknown layout {layout!r}: choose one of {LAYOUTS}")
    return {
        "models": {
            "reference": {**reference, "model_args": args},
            "policy_trainer": {"num_cpu": trainer_cores, "trainable": True, "model_args": args},
        },
        "colocation": [["reference", "policy_trainer"]] if layout.startswith("colocated") else [],
        "trainer_cores": trainer_cores,
    }


async def measure_pipelined(
    options: dict[str, Any],
    records: list[dict],
    output_dir: str,
    *,
    episodes: int = 1,
    store: str | None = None,
) -> dict[str, Any]:
    """(b): ``DPOEngine`` with the ``--layout`` placement; with ``episodes`` > 1 the records are
    one episode and the figure is the last episode's (its reference outputs come again); with
    ``store``, the reference keeps its outputs there (``runtime.reference_store``)."""
    import chatlearn
    from chatlearn.config import reset_args
    from chatlearn.engine.engine import DPOEngine
    from chatlearn.hf.modules import HFReference

    batch = options["batch_size"]
    if options["reference_priority"] == "idle":
        priority: dict[str, Any] = {"idle_priority": True}
    else:
        priority = {"nice": options["reference_nice"]}
    layout = layout_models(options["layout"], options["cores"], priority, model_args(options))
    layout["models"] = {name: on_device(m, options) for name, m in layout["models"].items()}
    runtime = _runtime(options, output_dir, colocation=layout["colocation"])
    if store is not None:
        runtime["reference_store"] = store
    if episodes > 1:
        runtime.update(num_episode=episodes, sample_per_episode=len(records))
    policy = options["wait_policy"]
    env_vars = {} if policy == "default" else {"OMP_WAIT_POLICY": policy.upper()}
    chatlearn.init(
        {"models": layout["models"], "runtime": runtime, "runtime_env": {"env_vars": env_vars}}
    )
    try:
        engine = DPOEngine(HFReference("reference"), HFDPOTrainer("policy_trainer"))
        engine.set_dataset(records)
        await engine.learn_async()
    finally:
        reset_args()
    assert engine.pipeline is not None
    timers = engine.pipeline.timers
    # a bench run is far shorter than what Timers keeps unfolded: every step is in ``recent``
    ends = sorted(end for _, end in timers[engine.policy_trainer.name].recent)
    if episodes > 1:
        per_episode = len(records) // batch
        # the last episode's steps, timed from the end of the episode before
        warmup = len(ends) - per_episode
    else:
        warmup = options["warmup"]
    history = engine.state.history  # the steps' metrics (a bench run keeps all of them)
    return {
        "stored": engine.pipeline.reference_stored,
        "samples_per_s": throughput(ends, batch, warmup),
        "trainer_cores": layout["trainer_cores"],
        "overlap": timers.overlap(engine.reference.name, engine.policy_trainer.name),
        "tokens": (
            sum(step.get("tokens/real", 0.0) for step in history),
            sum(step.get("tokens/computed", 0.0) for step in history),
        ),
    }


def _trl_message() -> str | None:
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install 'chatlearn[bench]'); --vs-trl skipped"
    return None


async def measure_trl(options: dict[str, Any], records: list[dict], output_dir: str) -> dict:
    """TRL's DPOTrainer on the same model, data and cores, in an actor process like (a)."""
    batch = options["batch_size"]
    result = await _call_in_actor(
        options, output_dir, TRLRunner, options["cores"], "run_trl", records, batch, output_dir
    )
    return {
        "samples_per_s": throughput(result["ends"], batch, options["warmup"]),
        "torch_threads": result["torch_threads"],
    }


class TRLRunner(SingleProcessDPO):
    """TRL's DPOTrainer with the bench's model, tokenizer and DPO settings.

    TRL's own training loop, collator, loss and metrics are used as they are, but not two TRL
    config defaults that would make it compute something else than (a):

    - ``bf16``: TRL's configs default it to True when ``fp16`` is not set, which on CPU makes
      accelerate run every forward under bf16 autocast. Our model and (a) compute in the
      ``dtype`` of ``model_args`` (float32); without native bf16 matmuls (AVX2-only CPUs) a bf16
      ``mm`` is about 10x slower than a float32 one, and a step of the default bench model took
      25-34 s instead of about 1 s. Off here: TRL computes in the model's own dtype, like (a).
    - ``gradient_checkpointing``: TRL's default is True (transformers' is False); it recomputes
      the forward in the backward (about 30% slower on the default model). It follows
      ``model_args`` as our trainer does (off in the bench).

    Thread count: the actor sets it from its pinning as for (a); ``torch_threads`` is read on
    the thread that runs TRL's steps and returned.
    """

    def run_trl(self, records: list[dict[str, Any]], batch_size: int, output_dir: str) -> dict:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        ends: list[float] = []

        class StepEnds(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                ends.append(time.time())

        template = str(self.model_args["prompt_template"])
        max_length = int(self.model_args["max_length"])
        data = [
            {
                **r,
                "prompt": self._fit_prompt(
                    template.replace("{prompt}", r["prompt"]), r, max_length
                ),
            }
            for r in records
        ]
        config = DPOConfig(
            output_dir=os.path.join(output_dir, "trl"),
            per_device_train_batch_size=batch_size,
            max_steps=len(records) // batch_size,
            learning_rate=float(self.model_args["learning_rate"]),
            beta=float(self.model_args["beta"]),
            max_length=int(self.model_args["max_length"]),
            max_grad_norm=float(self.model_args["max_grad_norm"]),
            lr_scheduler_type="constant",
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,  # a carriage-return bar, unreadable through an actor's stderr
            # the model's own dtype, no autocast (TRL defaults bf16 to True): see the class doc
            bf16=False,
            fp16=False,
            gradient_checkpointing=bool(self.arg("gradient_checkpointing", False)),
        )
        trainer = DPOTrainer(
            model=self.model,
            ref_model=self.reference_model,
            args=config,
            train_dataset=Dataset.from_list(data),
            processing_class=self.tokenizer,
            callbacks=[StepEnds()],
        )
        # The Trainer prints its final metrics to stdout, which is the benchmark's JSON output.
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        return {"ends": ends, "torch_threads": _torch_threads()}  # TRL's steps ran on this thread

    def _fit_prompt(self, prompt: str, record: dict[str, Any], max_length: int) -> str:
        """Cut the prompt's start so prompt + response + EOS fit ``max_length`` tokens, as our
        data pipeline does (TRL would cut the response and drop the pair instead)."""

        def count(text: str, special: bool) -> int:
            return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])

        # TRL tokenizes the prompt with the tokenizer's special tokens (bos) and the response
        # after it, without them, plus EOS
        responses = (count(record["chosen"], False), count(record["rejected"], False))
        response = max(responses) + 1
        for _ in range(8):  # bounded: each round removes the measured excess
            excess = count(prompt, True) + response - max_length
            if excess <= 0:
                break
            prompt = prompt[excess:]
        return prompt


async def _measure_all(options: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """``--repeat`` rounds of every run; with several, each figure is the median over rounds,
    a ratio the median of the rounds' own ratios (runs of one round see the same machine)."""
    rounds = [await _measure_round(options, output_dir) for _ in range(options["repeat"])]
    if len(rounds) == 1 and options.get("data") != "realistic":
        return rounds[0]
    return median_of_rounds(rounds)  # realistic: `rounds` always there, as issue 14 names it


def median_of_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Every float figure's median over ``rounds`` (other values from the first), plus the
    rounds themselves under ``"rounds"``."""
    result: dict[str, Any] = {}
    for key, value in rounds[0].items():
        if isinstance(value, float) and all(key in r for r in rounds):
            result[key] = statistics.median(r[key] for r in rounds)
        else:
            result[key] = value
    result["rounds"] = rounds
    return result


async def _measure_round(options: dict[str, Any], output_dir: str) -> dict[str, Any]:
    if options.get("data") == "realistic":
        return await _measure_realistic_round(options, output_dir)
    batch, cores = options["batch_size"], options["cores"]
    records = bench_records(batch * (options["steps"] + options["warmup"]))
    single = await measure_single(options, records, cores, False, output_dir)
    pipelined = await measure_pipelined(options, records, output_dir)
    trainer_cores = pipelined["trainer_cores"]
    train_only = await measure_single(options, records, trainer_cores, True, output_dir)
    result: dict[str, Any] = {
        "single_process_samples_per_s": single["samples_per_s"],
        "pipelined_samples_per_s": pipelined["samples_per_s"],
        "train_only_samples_per_s": train_only["samples_per_s"],
        "ratio_pipelined_vs_single": pipelined["samples_per_s"] / single["samples_per_s"],
        "ratio_pipelined_vs_train_only": pipelined["samples_per_s"] / train_only["samples_per_s"],
        "trainer_cores": trainer_cores,
        "overlap": pipelined["overlap"],
    }
    if options["second_epoch"]:
        one_episode = records[: batch * max(options["steps"], 2)]
        second = await measure_pipelined(options, one_episode, output_dir, episodes=2)
        train_all = train_only
        if trainer_cores != cores:
            train_all = await measure_single(options, records, cores, True, output_dir)
        result["second_epoch_samples_per_s"] = second["samples_per_s"]
        result["train_only_all_cores_samples_per_s"] = train_all["samples_per_s"]
        result["ratio_second_epoch_vs_train_only_all_cores"] = (
            second["samples_per_s"] / train_all["samples_per_s"]
        )
    if options["vs_trl"]:
        message = _trl_message()
        if message is None:
            trl = await measure_trl(options, records, output_dir)
            result["trl_samples_per_s"] = trl["samples_per_s"]
            result["ratio_pipelined_vs_trl"] = pipelined["samples_per_s"] / trl["samples_per_s"]
        else:
            result["trl_skipped"] = message
    return result


def token_figures(run: dict[str, Any], batch_size: int, steps: int) -> dict[str, float]:
    """Real tokens/s (samples/s × the run's mean real tokens per sample) and the fraction of
    computed tokens that were real, from the trainer's ``tokens/real`` / ``tokens/computed``."""
    real, computed = run["tokens"]
    if real <= 0 or computed <= 0:
        raise ValueError(f"the trainer reported no token counts ({real}, {computed})")
    return {
        "real_tokens_per_s": run["samples_per_s"] * real / (batch_size * steps),
        "real_token_fraction": real / computed,
    }


async def _measure_realistic_round(options: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """``--data realistic``: (a) padded, (p) packed, (b) pipelined, train-only on all cores,
    TRL, and (s): (b) again, served from a reference store a run before filled."""
    batch, cores = options["batch_size"], options["cores"]
    steps = options["steps"] + options["warmup"]
    records = realistic_records_for(batch * steps)
    padded = {**options, "padded": True}
    runs = {
        "single_padded": await measure_single(padded, records, cores, False, output_dir),
        "single_packed": await measure_single(options, records, cores, False, output_dir),
        "pipelined": await measure_pipelined(options, records, output_dir),
        "train_only_all_cores": await measure_single(options, records, cores, True, output_dir),
    }
    with tempfile.TemporaryDirectory(prefix="chatlearn-store-", dir=output_dir) as store:
        await measure_pipelined(options, records, output_dir, store=store)  # fills the store
        runs["store"] = await measure_pipelined(options, records, output_dir, store=store)
    if not runs["store"]["stored"]:
        raise RuntimeError("(s): no sample came from the reference store")
    result: dict[str, Any] = {}
    for name, measured in runs.items():
        result[f"{name}_samples_per_s"] = measured["samples_per_s"]
        for key, value in token_figures(measured, batch, steps).items():
            result[f"{name}_{key}"] = value
    pipelined, padded_rate = (
        runs["pipelined"]["samples_per_s"],
        result["single_padded_samples_per_s"],
    )
    train_all = result["train_only_all_cores_samples_per_s"]
    result.update(
        # the uniform bench's keys keep their meaning: (a) is the plain loop
        single_process_samples_per_s=padded_rate,
        train_only_samples_per_s=train_all,
        real_token_fraction=result["pipelined_real_token_fraction"],
        trainer_cores=runs["pipelined"]["trainer_cores"],
        overlap=runs["pipelined"]["overlap"],
        ratio_store_vs_train_only_all_cores=result["store_samples_per_s"] / train_all,
        store_served_fraction=runs["store"]["stored"] / len(records),
        ratio_pipelined_vs_single=pipelined / padded_rate,
        ratio_packed_vs_single=result["single_packed_samples_per_s"] / padded_rate,
        ratio_pipelined_vs_train_only=pipelined / train_all,
    )
    if options["vs_trl"]:
        message = _trl_message()
        if message is None:
            trl = await measure_trl(options, records, output_dir)
            result["trl_samples_per_s"] = trl["samples_per_s"]
            result["ratio_pipelined_vs_trl"] = pipelined / trl["samples_per_s"]
        else:
            result["trl_skipped"] = message
    return result


def _print_realistic(result: dict[str, Any], options: dict[str, Any]) -> None:
    """The human-readable table of ``--data realistic``."""
    click.echo(
        f"{result['num_parameters'] / 1e6:.1f}M parameters, realistic lengths "
        f"(max_length 1024, max_prompt_length 512), {options['batch_size']} pairs per step, "
        f"{options['cores']} cores, {options['steps']} timed steps after {options['warmup']}",
        file=sys.stderr,
    )
    click.echo("measured lengths (tokens):")
    click.echo(result["length_percentiles_text"])
    runs = (
        ("(a) single process padded", "single_padded"),
        ("(p) single process packed", "single_packed"),
        ("(b) chatlearn pipelined", "pipelined"),
        ("(c) train-only all cores", "train_only_all_cores"),
        ("(s) from the reference store", "store"),
    )
    click.echo(f"{'run':<28}{'samples/s':>10}{'real tok/s':>12}{'real frac':>11}")
    for label, key in runs:
        click.echo(
            f"{label:<28}{result[key + '_samples_per_s']:>10.2f}"
            f"{result[key + '_real_tokens_per_s']:>12.0f}"
            f"{result[key + '_real_token_fraction']:>11.3f}"
        )
    if "trl_samples_per_s" in result:
        click.echo(f"{'TRL DPOTrainer':<28}{result['trl_samples_per_s']:>10.2f}")
    if "trl_skipped" in result:
        click.echo(result["trl_skipped"])
    click.echo(f"b/a {result['ratio_pipelined_vs_single']:.3f}")
    click.echo(f"p/a {result['ratio_packed_vs_single']:.3f}")
    click.echo(f"b/c {result['ratio_pipelined_vs_train_only']:.3f}")
    click.echo(f"s/c {result['ratio_store_vs_train_only_all_cores']:.3f}")
    if "ratio_pipelined_vs_trl" in result:
        click.echo(f"b/TRL {result['ratio_pipelined_vs_trl']:.3f}")
    _print_rounds(result)


def _print_rounds(result: dict[str, Any]) -> None:
    if "rounds" in result:
        click.echo(f"medians of {len(result['rounds'])} rounds; each round's ratios:")
        for key in (k for k in result if k.startswith("ratio_")):
            spread = ", ".join(f"{r[key]:.3f}" for r in result["rounds"])
            click.echo(f"  {key}: {spread}")


def _length_percentiles(options: dict[str, Any]) -> dict[str, Any]:
    """The realistic records' measured percentiles (what every round trains on)."""
    from chatlearn.hf.profile import format_percentiles, measured_percentiles
    from chatlearn.hf.tokenizer import load_tokenizer

    num_pairs = options["batch_size"] * (options["steps"] + options["warmup"])
    measured = measured_percentiles(realistic_records_for(num_pairs), load_tokenizer(None))
    return {
        "length_percentiles": {
            name: {f"p{q}": value for q, value in column.items()}
            for name, column in measured.items()
        },
        "length_percentiles_text": format_percentiles(measured),
    }


def _num_parameters(options: dict[str, Any]) -> int:
    from chatlearn.hf.model import build_causal_lm, num_parameters

    return num_parameters(build_causal_lm(model_args(options)["model_config"]))


# Counts of the command lines (sizes, steps, pairs): a 0 or a negative one ended in a traceback
# (ZeroDivisionError) or in a config error about a key the user never wrote
# (runtime.sample_per_episode); refused by click, naming the option, before anything starts.
COUNT = click.IntRange(min=1)
# the pair tokenizer's max_length: a prompt token and a response token at least
SEQ_LEN = click.IntRange(min=2)


def check_model_shape(
    options: dict[str, Any], num_heads: int | None = None, num_kv_heads: int | None = None
) -> None:
    """`--hidden-size` splits into the attention heads (`--num-heads`, or the model's fixed
    `num_heads`) with an even size per head (the rotary embedding rotates pairs of dimensions),
    and the heads into `--num-kv-heads` groups; else the model fails to build in every actor."""
    hidden = options["hidden_size"]
    heads = options.get("num_heads", num_heads)
    assert heads is not None
    named = "--num-heads" if "num_heads" in options else "the model's attention heads"
    if hidden % (2 * heads):
        raise click.UsageError(
            f"--hidden-size {hidden} must be a multiple of 2 × {named} ({heads}): each head's "
            "size must be even; e.g. --hidden-size "
            + str(max(1, round(hidden / (2 * heads))) * 2 * heads)
        )
    kv_heads = options.get("num_kv_heads", num_kv_heads)
    if kv_heads is not None and heads % kv_heads:
        raise click.UsageError(
            f"--num-heads {heads} must be a multiple of --num-kv-heads {kv_heads}: each key/value "
            "head serves the same number of attention heads"
        )


def check_cores(options: dict[str, Any]) -> None:
    """`--cores` (default: every usable core) within this machine (`--warmup`/`--steps` are
    counts ≥ 1 by their option type)."""
    available = len(os.sched_getaffinity(0))
    if options["cores"] is None:
        options["cores"] = available
    if not 1 <= options["cores"] <= available:
        raise click.UsageError(f"--cores must be between 1 and {available}")


@click.command("dpo")
@click.option("--hidden-size", default=256, show_default=True, type=COUNT)
@click.option("--intermediate-size", default=688, show_default=True, type=COUNT)
@click.option("--num-layers", default=8, show_default=True, type=COUNT)
@click.option("--seq-len", default=128, show_default=True, type=SEQ_LEN, help="tokens per sequence")
@click.option(
    "--batch-size", default=8, show_default=True, type=COUNT, help="pairs per training step"
)
@click.option(
    "--generation-batch-size", default=8, show_default=True, type=COUNT, help="reference chunk"
)
@click.option(
    "--data",
    type=click.Choice(("uniform", "realistic")),
    default="uniform",
    show_default=True,
    help="uniform: every sequence --seq-len tokens; realistic: the length profile of "
    "chatlearn.hf.profile (max_length 1024): padded, packed, pipelined and TRL runs",
)
@click.option("--steps", default=30, show_default=True, type=COUNT, help="timed training steps")
@click.option(
    "--warmup", default=4, show_default=True, type=COUNT, help="steps before timing starts"
)
@click.option("--cores", type=int, default=None, help="total cores [default: all usable]")
@click.option(
    "--device",
    type=click.Choice(("cpu", "cuda")),
    default="cpu",
    show_default=True,
    help="cuda: each model process on one GPU (used by `chatlearn gpu-check`)",
)
@click.option("--layout", type=click.Choice(LAYOUTS), default="colocated", show_default=True)
@click.option(
    "--reference-priority",
    type=click.Choice(("idle", "nice")),
    default="idle",
    show_default=True,
    help="the reference's compute threads: SCHED_IDLE, or --reference-nice",
)
@click.option(
    "--reference-nice", default=19, show_default=True, help="with --reference-priority nice"
)
@click.option(
    "--wait-policy",
    type=click.Choice(("passive", "default")),
    default="default",
    show_default=True,
    help="OMP_WAIT_POLICY of (b)'s processes (default: not set, OpenMP's own)",
)
@click.option("--second-epoch/--no-second-epoch", default=True, show_default=True)
@click.option(
    "--repeat",
    type=click.IntRange(1, 20),
    default=1,
    show_default=True,
    help="rounds of every run; figures are medians over rounds",
)
@click.option("--vs-trl", is_flag=True, help="also TRL's DPOTrainer (needs trl installed)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(as_json: bool, **options: Any) -> None:
    """Samples/s of DPO: single process (a), chatlearn pipelined (b), train-only (c)."""
    check_cores(options)
    check_model_shape(options, num_heads=BENCH_MODEL["num_attention_heads"])
    if options["device"] == "cuda":
        import torch

        if torch.cuda.device_count() == 0:
            # the models fell back to CPU cores with a warning, and the figures of CPU runs
            # were reported as --device cuda
            raise click.UsageError("--device cuda: this machine has no usable CUDA GPU")
    with tempfile.TemporaryDirectory(prefix="chatlearn-bench-") as output_dir:
        realistic = options["data"] == "realistic"
        result = {
            **options,
            "num_parameters": _num_parameters(options),
            **(_length_percentiles(options) if realistic else {}),
            **run(_measure_all(options, output_dir)),
        }
    if as_json:
        click.echo(json.dumps(result))
        return
    if realistic:
        _print_realistic(result, options)
        return
    click.echo(
        f"{result['num_parameters'] / 1e6:.1f}M parameters, {options['batch_size']} pairs × "
        f"{options['seq_len']} tokens per step, {options['cores']} cores, {options['steps']} "
        f"timed steps after {options['warmup']}; (b): {options['layout']} layout, trainer on "
        f"{result['trainer_cores']} core(s)",
        file=sys.stderr,
    )
    rows = [
        ("(a) single process", result["single_process_samples_per_s"]),
        ("(b) chatlearn pipelined", result["pipelined_samples_per_s"]),
        ("(c) train-only", result["train_only_samples_per_s"]),
    ]
    if "second_epoch_samples_per_s" in result:
        rows.append(("(b) second epoch", result["second_epoch_samples_per_s"]))
        rows.append(("(c) on all cores", result["train_only_all_cores_samples_per_s"]))
    if "trl_samples_per_s" in result:
        rows.append(("TRL DPOTrainer", result["trl_samples_per_s"]))
    click.echo(f"{'run':<26}{'samples/s':>10}")
    for name, value in rows:
        click.echo(f"{name:<26}{value:>10.2f}")
    click.echo(f"b/a {result['ratio_pipelined_vs_single']:.3f}")
    click.echo(f"b/c {result['ratio_pipelined_vs_train_only']:.3f}")
    if "ratio_second_epoch_vs_train_only_all_cores" in result:
        ratio = result["ratio_second_epoch_vs_train_only_all_cores"]
        click.echo(f"second epoch / (c) on all cores {ratio:.3f}")
    if "trl_skipped" in result:
        click.echo(result["trl_skipped"])
    _print_rounds(result)
