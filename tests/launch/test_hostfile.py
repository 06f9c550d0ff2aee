"""Host files, --include/--exclude and env files: every mistake names its line or selection."""

from __future__ import annotations

import pytest

from chatlearn.launch.env import exported_environment, read_env_file
from chatlearn.launch.hostfile import (
    HostfileError,
    HostSlots,
    parse_hostfile,
    read_hostfile,
    select_hosts,
)

GOOD = """
# cluster of two
worker-1 slots=4   # trailing comment

10.0.0.7 slots=2
"""


def test_parse_comments_blank_lines_and_order():
    assert parse_hostfile(GOOD) == [
        HostSlots("worker-1", (0, 1, 2, 3)),
        HostSlots("10.0.0.7", (0, 1)),
    ]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("a slots=1\nb slots=2\na slots=3\n", 3, "listed twice (first on line 1)"),
        ("a slots=1\nb\n", 2, "expected 'hostname slots=N'"),
        ("a slots=1\n\nb slots=1 extra\n", 3, "expected 'hostname slots=N'"),
        ("# c\nb slot=2\n", 2, "expected 'slots=N'"),
        ("b slots=two\n", 1, "slots must be an integer from 1 to 65536, got 'two'"),
        ("b slots=0\n", 1, "slots must be an integer from 1 to 65536, got '0'"),
        ("b slots=-1\n", 1, "slots must be an integer from 1 to 65536"),
        # would build a tuple of 10^11 slot indices
        ("b slots=99999999999\n", 1, "slots must be an integer from 1 to 65536"),
        ("b slots=\u00b2\n", 1, "slots must be an integer from 1 to 65536, got '\u00b2'"),
        # this machine under two names: its cores would be given out twice
        ("localhost slots=1\n127.0.0.1 slots=1\n", 2, "are both this machine"),
        # host names are case-insensitive: one host's slots were given out twice
        ("node1 slots=1\nNode1 slots=2\n", 2, "host 'Node1' is listed twice (first on line 1)"),
        ("LOCALHOST slots=1\n127.0.0.1 slots=1\n", 2, "are both this machine"),
        ("a slots=1\nb;rm slots=1\n", 2, "not a valid host name"),
        # given to ssh before the command, it was an option (the run failed after its restarts)
        ("a slots=1\n-v slots=1\n", 2, "'-v' is not a valid host name or address (a host"),
        # --include/--exclude could not name it, and ZeroMQ binds IPv4 only here
        ("a slots=1\n::1 slots=1\n", 2, "'::1' is an IPv6 address, which chatlearn launch"),
    ],
)
def test_each_malformed_line_is_named(text, line, message):
    with pytest.raises(HostfileError) as info:
        parse_hostfile(text, "hosts.txt")
    assert f"hosts.txt:{line}:" in str(info.value)
    assert message in str(info.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(HostfileError, match="no hosts"):
        parse_hostfile("# nothing\n\n")
    with pytest.raises(HostfileError, match="cannot read host file"):
        read_hostfile(tmp_path / "absent")
    (tmp_path / "h").write_text("x slots=2\n")
    assert read_hostfile(tmp_path / "h") == [HostSlots("x", (0, 1))]


HOSTS = [HostSlots("h1", (0, 1, 2, 3)), HostSlots("h2", (0, 1)), HostSlots("h3", (0,))]


def test_include_hosts_and_slots_in_host_file_order():
    assert select_hosts(HOSTS, include="h3@h1:0,2") == [
        HostSlots("h1", (0, 2)),
        HostSlots("h3", (0,)),
    ]
    assert select_hosts(HOSTS, include="h2") == [HostSlots("h2", (0, 1))]
    assert select_hosts(HOSTS) == HOSTS


def test_exclude_hosts_and_slots():
    assert select_hosts(HOSTS, exclude="h2@h1:1,3") == [
        HostSlots("h1", (0, 2)),
        HostSlots("h3", (0,)),
    ]
    assert select_hosts(HOSTS, exclude="h3:0") == HOSTS[:2]  # a host left without slots goes


@pytest.mark.parametrize(
    ("include", "exclude", "message"),
    [
        ("h1", "h2", "mutually exclusive"),
        ("h9", None, "host 'h9' is not in the host file"),
        ("h2:5", None, "host 'h2' has slots 0..1, not [5]"),
        ("h1:x", None, "slot 'x' of host 'h1' is not an integer"),
        ("h1@h1", None, "appears twice"),
        (None, "h1@h2@h3", "leaves no host"),
        ("@", None, "is not 'host' or 'host:0,1'"),
        # given but empty (an unset shell variable): not "all hosts"
        ("", None, "--include: empty host selection"),
        (None, "", "--exclude: empty host selection"),
        ("  ", None, "--include: empty host selection"),
        ("", "h1", "mutually exclusive"),
    ],
)
def test_bad_selections(include, exclude, message):
    with pytest.raises(HostfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        select_hosts(HOSTS, include=include, exclude=exclude)


def test_env_allow_list_and_env_file(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("# site settings\nNCCL_IB_DISABLE=1\nMY_FLAG = on\n\n")
    environ = {
        "NCCL_DEBUG": "INFO",
        "PYTHONPATH": "/src",
        "CUDA_HOME": "/cuda",
        "PATH": "/bin",
        "AWS_SECRET_ACCESS_KEY": "x",
        "HOME": "/root",
        "CHATLEARN_LAUNCH": "/tmp/spec",
        "MYAPP_X": "1",
    }
    env = exported_environment(environ, prefixes=("MYAPP_",), env_file=env_file)
    assert env == {
        "NCCL_DEBUG": "INFO",
        "PYTHONPATH": "/src",
        "CUDA_HOME": "/cuda",
        "PATH": "/bin",
        "MYAPP_X": "1",
        "NCCL_IB_DISABLE": "1",
        "MY_FLAG": "on",
    }
    env_file.write_text("A=1\nnot a pair\n")
    with pytest.raises(HostfileError, match=r"env:2: expected KEY=VALUE"):
        read_env_file(env_file)


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_bytes(b"a slots=1\n# caf\xff\n")
    with pytest.raises(HostfileError) as info:
        read_hostfile(hosts)
    assert str(info.value) == f"{hosts}:2: not UTF-8 text (byte 0xff); save the host file as UTF-8"
    env_file = tmp_path / "env"
    env_file.write_bytes(b"\xffA=1\n")
    with pytest.raises(HostfileError) as info:
        read_env_file(env_file)
    assert (
        str(info.value) == f"{env_file}:1: not UTF-8 text (byte 0xff); save the env file as UTF-8"
    )


def test_an_env_value_with_a_nul_byte_is_refused_naming_its_line(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_bytes(b"A=1\n# x\nB=x\x00y\n")
    with pytest.raises(HostfileError) as info:
        read_env_file(env_file)
    assert str(info.value).startswith(f"{env_file}:3: the value of B contains a NUL byte")
