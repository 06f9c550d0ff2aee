"""ChatLearn's path of `TorchModule` (`from chatlearn.models.torch_module import TorchModule`)."""

from chatlearn.actors.module import TorchModule

__all__ = ["TorchModule"]
