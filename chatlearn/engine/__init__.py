"""The engine: Engine/DPOEngine, sampler and batching with ChatLearn semantics, the pipeline.

Layer 3 (docs/architecture.md, "Layers"): may import `transport`, `config`, `algorithms` and
`actors`, never `launch`, `hf` or `megatron`. In the coordinator: engine.py, pipeline.py (with
reference_cache.py's accounting), run_checkpoints.py, sampler.py, schedule.py, training_plan.py,
metrics.py; in the actors: replica.py (with batching.py); both sides: protocol.py.
"""
