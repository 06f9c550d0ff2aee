"""The engine: Engine/DPOEngine, sampler and batching with ChatLearn semantics, the pipeline."""
