"""Runnable chatlearn programs (importable as `examples.*` from the repository root)."""
