"""`chatlearn launch` end to end: the DPO engine completing with actors on two loopback "hosts"
(started by the launcher's shell command here), and command-line errors."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from launch_testlib import HOST_A, HOST_B

from chatlearn.launch.cli import prepare_launch
from chatlearn.launch.cluster import LaunchSpec
from chatlearn.launch.curve import load_keys
from chatlearn.launch.hostfile import HostSlots

pytestmark = pytest.mark.timeout(90)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run_launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatlearn.cli", "launch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def check_dpo_run(result: subprocess.CompletedProcess[str], output: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    hosts = [json.loads(x) for x in (output / "hosts.jsonl").read_text().splitlines()]
    assert sorted((h["model"], h["host"]) for h in hosts) == [
        ("policy_trainer", HOST_B),
        ("reference", HOST_A),
    ]
    log = [json.loads(x) for x in (output / "log.jsonl").read_text().splitlines()]
    trained = sorted(r for t in log if t["event"] == "train" for b in t["batches"] for r in b)
    assert trained == list(range(8))  # every sample went reference@A → trainer@B over tcp


def test_dpo_completes_across_two_local_hosts(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"# two addresses of this machine\n{HOST_A} slots=1\n{HOST_B} slots=1\n")
    result = run_launch(
        *("--hostfile", str(hostfile), "--launcher", "local", "--slots-are", "cpus"),
        *(str(HERE / "dpo_script.py"), str(tmp_path)),
    )
    check_dpo_run(result, tmp_path)


def test_prepare_launch_selects_hosts_and_keeps_secrets_private(tmp_path, monkeypatch):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=2\n127.0.0.4 slots=4\n{HOST_B} slots=1\n")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("SOME_TOKEN", "do-not-forward")
    directory = tmp_path / "run"
    directory.mkdir()
    path = prepare_launch(
        str(hostfile), directory=directory, exclude=f"127.0.0.4@{HOST_A}:1", launcher="local"
    )
    spec = LaunchSpec.load(path)
    assert spec.hosts == [HostSlots(HOST_A, (0,)), HostSlots(HOST_B, (0,))]
    assert spec.master_addr == "127.0.0.1"  # this machine's address towards 127.0.0.2
    assert spec.env["NCCL_DEBUG"] == "INFO" and "SOME_TOKEN" not in spec.env
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(spec.keys_file).st_mode) == 0o600
    keys = load_keys(spec.keys_file)
    assert keys.client_secret.decode() not in path.read_text()
    assert keys.server_secret.decode() not in path.read_text()


def test_host_file_errors_name_the_line(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=1\n{HOST_A} slots=2\n")
    result = run_launch("--hostfile", str(hostfile), str(HERE / "dpo_script.py"), "x")
    assert result.returncode == 2
    assert f"{hostfile}:2: host '{HOST_A}' is listed twice" in result.stderr


def test_dpo_completes_across_two_hosts_over_real_ssh(tmp_path, sshd):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=1\n{HOST_B} slots=1\n")
    result = run_launch(
        *("--hostfile", str(hostfile), "--slots-are", "cpus"),
        *("--ssh-command", shlex.join(sshd.ssh_command())),
        *(str(HERE / "dpo_script.py"), str(tmp_path)),
    )
    check_dpo_run(result, tmp_path)
