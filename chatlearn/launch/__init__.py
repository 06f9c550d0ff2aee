"""Multi-host runs: host files, the hosts' environment, CURVE keys and spawning over ssh.

`chatlearn launch --hostfile FILE script.py` (cli.py) prepares a run; the coordinator's
`ActorSystem` picks it up as its default hosts (`chatlearn.actors.hosts`).

Layer 3 (docs/architecture.md, "Layers"): may import `transport`, `config`, `algorithms` and
`actors` (it implements `actors.hosts.Hosts`), never `engine`, `hf` or `megatron`.
"""

from chatlearn.launch.cluster import Cluster, LaunchSpec
from chatlearn.launch.curve import generate_keys
from chatlearn.launch.env import exported_environment, read_env_file
from chatlearn.launch.hostfile import (
    HostfileError,
    HostSlots,
    parse_hostfile,
    read_hostfile,
    select_hosts,
)

__all__ = [
    "Cluster",
    "HostSlots",
    "HostfileError",
    "LaunchSpec",
    "exported_environment",
    "generate_keys",
    "parse_hostfile",
    "read_env_file",
    "read_hostfile",
    "select_hosts",
]
