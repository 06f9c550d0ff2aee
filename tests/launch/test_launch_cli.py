"""`chatlearn launch` end to end: the DPO engine completing with actors on two loopback "hosts"
(started by the launcher's shell command here), and command-line errors."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
from launch_testlib import HOST_A, HOST_B

from chatlearn.launch.cli import prepare_launch
from chatlearn.launch.hostfile import HostSlots

pytestmark = pytest.mark.timeout(90)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


SECRET = "hf_launch_secret_789"


def run_launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatlearn.cli", "launch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_TOKEN": SECRET},
    )


def check_dpo_run(result: subprocess.CompletedProcess[str], output: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    hosts = [json.loads(x) for x in (output / "hosts.jsonl").read_text().splitlines()]
    assert sorted((h["model"], h["host"]) for h in hosts) == [
        ("policy_trainer", HOST_B),
        ("reference", HOST_A),
    ]
    # HF_TOKEN is forwarded (HF_*), on the actors' stdin: in no command line (the actor's or
    # its launching shell's / ssh's) and in no environment block
    assert [(h["hf_token"], h["token_shown_in"]) for h in hosts] == [(SECRET, [])] * 2
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


def test_prepare_launch_selects_hosts_and_writes_no_secret(tmp_path, monkeypatch):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=2\n127.0.0.4 slots=4\n{HOST_B} slots=1\n")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("SOME_TOKEN", "do-not-forward")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    cluster = prepare_launch(str(hostfile), exclude=f"127.0.0.4@{HOST_A}:1", launcher="local")
    spec = cluster.spec
    assert spec.hosts == [HostSlots(HOST_A, (0,)), HostSlots(HOST_B, (0,))]
    assert spec.master_addr == "127.0.0.1"  # this machine's address towards 127.0.0.2
    assert spec.env["NCCL_DEBUG"] == "INFO" and "SOME_TOKEN" not in spec.env
    assert len(cluster.keys.client_secret) == 40
    # The keys live in memory only: nothing is written where a kill could leave it behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert cluster.keys.client_secret.decode() not in json.dumps(asdict(spec))


def test_host_file_errors_name_the_line(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=1\n{HOST_A} slots=2\n")
    result = run_launch("--hostfile", str(hostfile), str(HERE / "dpo_script.py"), "x")
    assert result.returncode == 2
    # one line, no usage text
    assert result.stderr.strip().splitlines() == [
        f"chatlearn launch: {hostfile}:2: host '{HOST_A}' is listed twice (first on line 1); "
        "list each host once with its total slots"
    ]


def test_dpo_completes_across_two_hosts_over_real_ssh(tmp_path, sshd):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=1\n{HOST_B} slots=1\n")
    result = run_launch(
        *("--hostfile", str(hostfile), "--slots-are", "cpus"),
        *("--ssh-command", shlex.join(sshd.ssh_command())),
        *(str(HERE / "dpo_script.py"), str(tmp_path)),
    )
    check_dpo_run(result, tmp_path)


def test_kill9_under_launch_leaves_no_process_directory_or_key(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=1\n{HOST_B} slots=1\n")
    base = os.environ["XDG_RUNTIME_DIR"]
    before = set(os.listdir(base))
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatlearn.cli", "launch", "--hostfile", str(hostfile)]
        + [
            "--launcher",
            "local",
            "--slots-are",
            "cpus",
            str(HERE / "dpo_script.py"),
            str(tmp_path),
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "DPO_SCRIPT_EPISODES": "100", "DPO_SCRIPT_ECHO_COST": "0.05"},
    )
    pids: list[int] = []
    try:
        hosts_file = tmp_path / "hosts.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if hosts_file.exists() and len(hosts_file.read_text().splitlines()) == 2:
                break
            time.sleep(0.05)
        pids = [json.loads(x)["pid"] for x in hosts_file.read_text().splitlines()]
        assert len(pids) == 2 and proc.poll() is None
        time.sleep(0.5)  # mid-run
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], 10)
        assert not alive
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and set(os.listdir(base)) - before:
            time.sleep(0.05)
        assert not set(os.listdir(base)) - before
        assert not [p for p in tmp_path.rglob("*") if "key" in p.name]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in pids:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("option", ["--include", "--exclude"])
def test_an_empty_host_selection_is_one_line_not_all_hosts(tmp_path, option):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=1\n{HOST_B} slots=1\n")
    result = run_launch(
        *("--hostfile", str(hostfile), option, "", "--launcher", "local", "--slots-are", "cpus"),
        *(str(HERE / "dpo_script.py"), str(tmp_path)),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"chatlearn launch: {option}: empty host selection"
    ]
    assert not (tmp_path / "hosts.jsonl").exists()  # no actor started


def test_an_env_file_that_cannot_be_used_is_one_line_naming_it(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=1\n")
    env_file = tmp_path / "env"
    for content, message in [
        (b"A=1\nB=\xff\n", f"{env_file}:2: not UTF-8 text (byte 0xff)"),
        # every actor crashed reading it ("embedded null byte") and was restarted
        (b"A=x\x00y\n", f"{env_file}:1: the value of A contains a NUL byte"),
    ]:
        env_file.write_bytes(content)
        result = run_launch(
            *("--hostfile", str(hostfile), "--env-file", str(env_file)),
            *("--launcher", "local", "--slots-are", "cpus"),
            *(str(HERE / "dpo_script.py"), str(tmp_path)),
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"chatlearn launch: {message}"), lines
        assert not (tmp_path / "hosts.jsonl").exists()


def test_a_master_address_this_machine_cannot_bind_is_one_line(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots=1\n{HOST_B} slots=1\n")
    # TEST-NET-1 (RFC 5737): an address of no machine; the bind of the control endpoint ended
    # in a ZMQError traceback ("Cannot assign requested address")
    result = run_launch(
        *("--hostfile", str(hostfile), "--master-addr", "192.0.2.1"),
        *("--launcher", "local", "--slots-are", "cpus"),
        *(str(HERE / "dpo_script.py"), str(tmp_path)),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(
        "chatlearn launch: --master-addr 192.0.2.1: this machine cannot listen there"
    )
    assert not (tmp_path / "hosts.jsonl").exists()


def test_an_ipv6_master_address_is_refused_in_one_line() -> None:
    # it passed the bind check and failed in ZeroMQ: "No such device (addr='tcp://[::1]:*')"
    from chatlearn.launch.cluster import check_master_addr

    with pytest.raises(ValueError, match=r"--master-addr ::1: an IPv6 address, which"):
        check_master_addr("::1")
    check_master_addr("127.0.0.1")
    with pytest.raises(ValueError, match=r"an address without a port .*--master-addr 127.0.0.1$"):
        check_master_addr("127.0.0.1:29500")  # not "an IPv6 address"


def test_slots_beyond_a_cpu_hosts_cores_are_one_line_and_no_restart(tmp_path):
    # Each actor failed "invalid CPU 6; choose between [0, 1]" in its pinning, a crash that was
    # restarted 3 times per model: 221 lines. Now the actors say it as a config error.
    cores = len(psutil.cpu_times(percpu=True))
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST_A} slots={cores + 2}\n")
    result = run_launch(
        *("--hostfile", str(hostfile), "--include", f"{HOST_A}:{cores},{cores + 1}"),
        *("--launcher", "local", "--slots-are", "cpus"),
        *(str(HERE / "dpo_script.py"), str(tmp_path)),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "restarting" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    # the coordinator's own lines (actors and the log prefix theirs with "[") are the one line
    own = [
        line
        for line in result.stderr.splitlines()
        if line and not line.startswith("[") and "not a known key" not in line  # the script's
    ]
    assert len(own) == 1, result.stderr
    assert own[0].startswith(f"host {HOST_A}: slot {cores}") or own[0].startswith(
        f"host {HOST_A}: slot {cores + 1}"
    ), own
    assert f"but the host has {cores} core" in own[0] and f"at most slots={cores}" in own[0]
    assert not (tmp_path / "hosts.jsonl").exists()  # no setup() ran
