"""The engine: Engine/DPOEngine, sampler and batching with ChatLearn semantics, the pipeline.

It owns a DPO run: the run's state (state.py), the sampler, the pipeline and its credit window,
the engine protocol, the reference and trainer services inside the actors, checkpoints, metrics.

Layer 3 (docs/architecture.md, "Layers"): may import `transport`, `config`, `algorithms` and
`actors`, never `launch`, `hf` or `megatron`.

Where each module runs (its docstring says so too):
- the coordinator: engine.py, pipeline.py, state.py, sampler.py, schedule.py, training_plan.py,
  counters.py, reference_cache.py (the bookkeeping), run_checkpoints.py, checkpoint.py,
  metrics.py, interrupts.py, progress.py, run_lock.py, sample_errors.py;
- the actor processes: worker_services.py, with batching.py (the coordinator uses its
  chunk_sizes) and reference_store.py;
- both sides: protocol.py;
- the `chatlearn inspect` command: inspect_cli.py.
"""
