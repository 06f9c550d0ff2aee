"""Which actor a process is: its model, replica, rank, group size, replica count and host.

Runs on both sides: placement gives every process of the coordinator's plan one
(`ProcessAssignment.identity`), the actor receives it in its `ActorSpec`, and handles, services
(`WorkerContext.identity`), error locations and logs read it from there instead of copying its
fields one by one.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ActorIdentity"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ActorIdentity:
    """One actor process's place in its model (the defaults: a model's only process, here)."""

    model: str
    replica_id: int = 0
    rank: int = 0  # rank within the replica's torch.distributed group
    world_size: int = 1  # ranks per replica
    num_replica: int = 1
    host: str = field(default_factory=socket.gethostname)

    @property
    def label(self) -> str:
        """``model.replica.rank``: how process lists, logs and routing ids name the actor."""
        return f"{self.model}.{self.replica_id}.{self.rank}"

    def where(self, pid: int | None, method: str | None = None) -> dict[str, Any]:
        """The location an error names (an ``ActorError``'s context): model, replica, rank,
        host and pid, and the method that raised if there was one."""
        where: dict[str, Any] = {
            "model": self.model,
            "replica_id": self.replica_id,
            "rank": self.rank,
            "host": self.host,
            "pid": pid,
        }
        if method is not None:
            where["method"] = method
        return where

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ActorIdentity:
        return cls(**payload)
