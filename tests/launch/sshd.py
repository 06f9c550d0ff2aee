"""A throwaway sshd for the launch tests: listens on 127.0.0.2 and 127.0.0.3 at a free port,
with a fresh host key and a fresh client key, and nothing else accepted.

openssh-server is installed with apt-get when missing (and possible); otherwise `start_sshd`
returns the reason it cannot run, for the tests to skip with.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
LISTEN = ("127.0.0.2", "127.0.0.3")


@dataclass
class TestSshd:
    popen: subprocess.Popen[bytes]
    port: int
    client_key: Path

    def ssh_command(self) -> list[str]:
        return [
            *("ssh", "-T", "-p", str(self.port), "-i", str(self.client_key)),
            *("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"),
            *("-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"),
            *("-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5"),
        ]

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def _install() -> str | None:
    if os.path.exists(SSHD):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "sshd is not installed and this user cannot apt-get install openssh-server"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"],
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"],
    ):
        subprocess.run(args, env=env, capture_output=True, timeout=300)
        if os.path.exists(SSHD):
            return None
    return "apt-get install openssh-server failed"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LISTEN[0], 0))
        return int(sock.getsockname()[1])


def start_sshd(directory: Path) -> TestSshd | str:
    """A running sshd, or the reason there cannot be one."""
    reason = _install()
    if reason is not None:
        return reason
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "the ssh client (openssh-client) is not installed"
    directory.mkdir(mode=0o700, exist_ok=True)
    host_key, client_key = directory / "host_key", directory / "client_key"
    for key in (host_key, client_key):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
            check=True,
            capture_output=True,
        )
    authorized = directory / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o600)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    port = _free_port()
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                *(f"ListenAddress {addr}" for addr in LISTEN),
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {directory / 'sshd.pid'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "X11Forwarding no",
                "",
            ]
        )
    )
    popen = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sshd = TestSshd(popen, port, client_key)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            return f"sshd exited with code {popen.returncode} at start"
        try:
            with socket.create_connection((LISTEN[1], port), timeout=0.5):
                return sshd
        except OSError:
            time.sleep(0.1)
    sshd.stop()
    return "sshd did not start listening within 10 s"
