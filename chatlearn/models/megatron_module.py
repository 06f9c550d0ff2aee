"""ChatLearn's path of `MegatronModule`
(`from chatlearn.models.megatron_module import MegatronModule`)."""

from chatlearn.megatron.module import MegatronModule

__all__ = ["MegatronModule"]
