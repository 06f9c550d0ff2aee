"""Embedding chatlearn in your own asyncio program: `python -m examples.custom_flow.flow`."""
