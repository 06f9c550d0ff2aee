"""Benchmark programs (`chatlearn bench ...`): each measures its variants side by side.

Layer 4 (docs/architecture.md, "Layers"): may import every other package; nothing imports it.
"""
