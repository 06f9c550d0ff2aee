"""ChatLearn's `chatlearn.utils.megatron_utils` (its Megatron-LM checkpoint helpers, such as
`load_checkpoint`) is not provided: importing it says what to use instead."""

raise ImportError(
    "chatlearn.utils.megatron_utils is not provided by this runtime: subclass "
    "chatlearn.MegatronModule and call self.load_pretrained_model() (HF or torch_dist "
    "checkpoints; docs/chatlearn-compat.md)"
)
