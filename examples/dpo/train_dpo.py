"""DPO training in the shape of ChatLearn's DPO main file.

    python -m examples.dpo.train_dpo -c examples/dpo/dpo.yaml

The data (a min/max preference task, `make_data.py`) is generated on first use. The engine logs
progress and evaluations; at the end this prints a summary of the run.
"""

from __future__ import annotations

from pathlib import Path

import chatlearn
from chatlearn import DPOEngine
from chatlearn.hf import load_preference_data
from examples.dpo.make_data import make_pairs, write_jsonl
from examples.dpo.models import PolicyReference, PolicyTrainer


def resolve(path: str, config_dir: str | None) -> Path:
    candidate = Path(path)
    if not candidate.is_absolute() and config_dir:
        candidate = Path(config_dir) / candidate
    return candidate


def ensure_data(train_path: Path, eval_path: Path) -> None:
    if train_path.exists() and eval_path.exists():
        return
    train, held_out = make_pairs("minmax")
    write_jsonl(train, train_path)
    write_jsonl(held_out, eval_path)


def summarize(engine: DPOEngine) -> str:
    state, pipeline = engine.state, engine.pipeline
    history = state.history
    evals = pipeline.eval_history if pipeline is not None else []
    lines = [f"trained {state.iteration} steps on {state.consumed_samples} samples"]
    if history:
        lines.append(f"train loss        {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"eval loss         {first['loss']:.4f} -> {last['loss']:.4f}")
        lines.append(
            f"eval reward acc.  {first['rewards/accuracies']:.3f} -> "
            f"{last['rewards/accuracies']:.3f}  (held-out; 0 at first: policy = reference)"
        )
    timers = pipeline.timers if pipeline is not None else None
    first_last = timers.span() if timers else None
    if first_last is None:
        lines.append("nothing was left to train: this run had already completed")
    else:
        span = first_last[1] - first_last[0]
        trainer = timers[engine.policy_trainer.name]
        steps = trainer.num_intervals // max(1, len(pipeline.trainer))  # one interval per rank
        trained = steps * pipeline.settings.global_batch_size
        overlap = timers.overlap(engine.reference.name, engine.policy_trainer.name)
        lines.append(f"throughput        {trained / span:.1f} samples/s trained")
        lines.append(f"overlap           {100 * overlap:.0f}% of reference time hidden by training")
    output = Path(chatlearn.get_args().runtime_args.output_path)
    lines.append(f"metrics           {output / 'metrics.jsonl'}")
    last = engine.checkpoints.last if engine.checkpoints is not None else None
    if last is not None:
        lines.append(f"checkpoint        {last}")
        for hf_dir in sorted(Path(last).glob("**/hf_model")):
            lines.append(f"policy (HF)       {hf_dir}  (AutoModelForCausalLM.from_pretrained)")
    return "\n".join(lines)


if __name__ == "__main__":
    chatlearn.init()
    args = chatlearn.get_args()
    runtime = args.runtime_args
    train_path = resolve(runtime.data_path, args.config_dir)
    eval_path = resolve(runtime.get("eval_data_path", "data/eval.jsonl"), args.config_dir)
    ensure_data(train_path, eval_path)

    reference = PolicyReference("reference")
    policy = PolicyTrainer("policy_trainer")
    engine = DPOEngine(reference, policy)
    engine.set_dataset(load_preference_data(train_path))
    engine.set_eval_dataset(load_preference_data(eval_path))
    engine.learn()
    print(summarize(engine))
