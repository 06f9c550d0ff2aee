"""ChatLearn's path of `BaseModule` (`from chatlearn.models.base_module import BaseModule`)."""

from chatlearn.actors.module import BaseModule

__all__ = ["BaseModule"]
