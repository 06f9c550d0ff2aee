"""ChatLearn's `chatlearn.models` (its module classes and Megatron model code, such as
`chatlearn.models.megatron.lora`) is not provided: importing it says what to use instead."""

raise ImportError(
    "chatlearn.models is not provided by this runtime: import the modules from chatlearn "
    "(BaseModule, TorchModule, MegatronModule); LoRA is applied by chatlearn.hf's ready-made "
    "modules (model_args.lora), MegatronModule has none (docs/chatlearn-compat.md)"
)
