"""DPO on a small Llama-style model: `python -m examples.dpo.train_dpo -c examples/dpo/dpo.yaml`."""
