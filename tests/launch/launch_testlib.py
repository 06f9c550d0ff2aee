"""Helpers of the launch tests: clusters of loopback "hosts" on this machine."""

from __future__ import annotations

import os
from pathlib import Path

from chatlearn.launch.cluster import Cluster, LaunchSpec
from chatlearn.launch.curve import generate_keys
from chatlearn.launch.env import exported_environment
from chatlearn.launch.hostfile import HostSlots

HOST_A, HOST_B = "127.0.0.2", "127.0.0.3"


def make_cluster(
    directory: Path,
    hosts: list[tuple[str, int]] = ((HOST_A, 1), (HOST_B, 1)),  # type: ignore[assignment]
    *,
    launcher: str = "local",
    ssh_command: list[str] | None = None,
) -> Cluster:
    directory.mkdir(mode=0o700, exist_ok=True)
    spec = LaunchSpec(
        hosts=[HostSlots(name, tuple(range(n))) for name, n in hosts],
        master_addr="127.0.0.1",
        launcher=launcher,
        env=exported_environment(env_file=os.devnull),
        slots_are="cpus",
        **({"ssh_command": ssh_command} if ssh_command else {}),
    )
    return Cluster(spec, generate_keys())
