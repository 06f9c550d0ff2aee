"""ChatLearn's Megatron DPO example: `models.py` (PolicyReference, PolicyTrainer), `data.py`,
`train_dpo.py` (the main file) and `configs/`."""
