"""The real guest agent (gRPC server) on a local unix socket, driven by the real host client.

No VM: this isolates the contract (streaming, exit statuses, signals, cancel, versions) from
the transport, so a failure here is the agent's and not QEMU's.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ci.errors import SystemFailure
from kata_ci.executors.agent_client import AgentClient, Output, VirtioSerialChannel
from kata_ci.guest.agent import make_server

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentClient, threading.Event]]:
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    sock_dir = tempfile.mkdtemp(prefix="kci-agent-", dir="/tmp")
    sock = os.path.join(sock_dir, "agent.sock")
    shutdown = threading.Event()
    server = make_server(sock, str(tmp_path), shutdown)
    server.start()
    client = AgentClient(VirtioSerialChannel(sock))
    yield client, shutdown
    client.close()
    server.stop(grace=None).wait()
    shutil.rmtree(sock_dir)


def collect(client: AgentClient, argv: list[str]) -> tuple[list[Output], int, int]:
    stream = client.exec(argv, ENV)
    chunks = list(stream)
    assert stream.exit is not None
    return chunks, stream.exit.exit_code, stream.exit.signal


def test_health_reports_matching_versions(agent: tuple[AgentClient, threading.Event]) -> None:
    """Health succeeds only when guest grpcio, protobuf and contract hash equal the host's."""
    client, _ = agent
    reply = client.health(timeout=10)
    assert reply.kernel_release == os.uname().release
    assert reply.agent_start_seconds > 0


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes(agent: tuple[AgentClient, threading.Event], code: int) -> None:
    """The exit status of the command comes back unchanged."""
    _, status, sig = collect(agent[0], ["sh", "-c", f"exit {code}"])
    assert (status, sig) == (code, 0)


def test_signal_death(agent: tuple[AgentClient, threading.Event]) -> None:
    """A command killed by a signal reports the signal, and 128+N as its status."""
    _, status, sig = collect(agent[0], ["sh", "-c", "kill -9 $$"])
    assert (status, sig) == (137, 9)


def test_missing_program_is_127_with_reason(agent: tuple[AgentClient, threading.Event]) -> None:
    """A program that does not exist ends as 127 (as in a shell) with the reason attached."""
    stream = agent[0].exec(["/no/such/program"], ENV)
    assert list(stream) == []
    assert stream.exit is not None and stream.exit.exit_code == 127
    assert "No such file" in stream.exit.error


def test_stdout_and_stderr_stay_apart(agent: tuple[AgentClient, threading.Event]) -> None:
    """Bytes written to stderr arrive tagged stderr, stdout tagged stdout."""
    chunks, _, _ = collect(agent[0], ["sh", "-c", "echo out; echo err >&2; echo out2"])
    out = b"".join(c.data for c in chunks if c.stream == "stdout")
    err = b"".join(c.data for c in chunks if c.stream == "stderr")
    assert (out, err) == (b"out\nout2\n", b"err\n")


def test_env_and_cwd_are_exactly_as_requested(
        agent: tuple[AgentClient, threading.Event], tmp_path: Path) -> None:
    """The process gets the requested environment only, in the workdir by default."""
    os.environ["KATA_CI_LEAK_CHECK"] = "leak"
    try:
        stream = agent[0].exec(["sh", "-c", "echo $KATA_CI_LEAK_CHECK:$A; pwd"],
                               {**ENV, "A": "b"})
        out = b"".join(c.data for c in stream)
    finally:
        del os.environ["KATA_CI_LEAK_CHECK"]
    assert out == f":b\n{tmp_path}\n".encode()


def test_output_is_streamed_before_exit(agent: tuple[AgentClient, threading.Event]) -> None:
    """The first line arrives while the command is still running (streamed, not collected)."""
    stream = agent[0].exec(["sh", "-c", "echo first; sleep 2; echo second"], ENV)
    first = next(iter(stream))
    assert first.data == b"first\n" and stream.exit is None


def test_signal_reaches_the_whole_process_group(
        agent: tuple[AgentClient, threading.Event]) -> None:
    """SIGTERM via Signal stops the job and what it started (no orphaned sleep survives)."""
    client, _ = agent
    marker = f"kci-sleep-{os.getpid()}-{time.monotonic_ns()}"
    stream = client.exec(["bash", "-c", f"echo ready; exec -a {marker} sleep 300 & wait"], ENV)
    chunks = iter(stream)
    assert next(chunks).data == b"ready\n"
    assert client.signal(stream.exec_id, signal.SIGTERM)
    list(chunks)
    assert stream.exit is not None and stream.exit.exit_code != 0
    time.sleep(0.2)
    assert not _processes_named(marker)
    assert client.signal(stream.exec_id, signal.SIGTERM) is False  # finished: safe to repeat


def test_cancelled_call_kills_the_process_group(
        agent: tuple[AgentClient, threading.Event]) -> None:
    """A host that drops the call leaves nothing running in the guest."""
    marker = f"kci-orphan-{os.getpid()}-{time.monotonic_ns()}"
    stream = agent[0].exec(["bash", "-c", f"echo ready; exec -a {marker} sleep 300"], ENV)
    assert next(iter(stream)).data == b"ready\n"
    stream.cancel()
    deadline = time.monotonic() + 5
    while _processes_named(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_named(marker)


def test_shutdown_kills_running_jobs(agent: tuple[AgentClient, threading.Event]) -> None:
    """Shutdown ends running execs and tells the agent's main loop to stop."""
    client, shutdown = agent
    stream = client.exec(["sh", "-c", "echo ready; sleep 300"], ENV)
    assert next(iter(stream)).data == b"ready\n"
    client.shutdown()
    assert shutdown.is_set()
    list(stream)
    assert stream.exit is not None and stream.exit.signal == signal.SIGKILL


def _processes_named(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_socket_counts_as_ready_only_once_it_listens(tmp_path: Path) -> None:
    """A unix socket that is bound but not yet listening (the window in which connect() is
    refused) is not ready; after listen() it is."""
    import socket as socket_mod

    from kata_ci.executors.qemu.backend import _listening

    sock_dir = tempfile.mkdtemp(prefix="kci-l-", dir="/tmp")
    path = Path(sock_dir) / "s.sock"
    server = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    try:
        assert not _listening(path)
        server.bind(str(path))
        assert path.exists() and not _listening(path)
        server.listen()
        assert _listening(path)
    finally:
        server.close()
        shutil.rmtree(sock_dir)


def test_put_and_get_files_round_trip(agent: tuple[AgentClient, threading.Event],
                                      tmp_path: Path) -> None:
    """PutFiles creates parents and sets the mode; GetFiles returns the bytes, None for a
    missing file, and cuts a long file at max_bytes."""
    client, _ = agent
    script, empty = str(tmp_path / "deep" / "step0"), str(tmp_path / "deep" / "env")
    client.put_files({script: b"echo hi\n", empty: b""}, mode=0o700)
    assert os.stat(script).st_mode & 0o777 == 0o700
    (tmp_path / "big").write_bytes(b"x" * 100)
    got = client.get_files([script, empty, str(tmp_path / "nope"), str(tmp_path / "big")], 10)
    assert got == {script: b"echo hi\n", empty: b"", str(tmp_path / "nope"): None,
                   str(tmp_path / "big"): b"x" * 10}


def test_put_files_replaces_a_link_instead_of_writing_through_it(
        agent: tuple[AgentClient, threading.Event], tmp_path: Path) -> None:
    """A job that leaves a symlink where the host will write (a GITHUB_* file) does not get
    the host's bytes written to the link's target."""
    client, _ = agent
    target = tmp_path / "precious"
    target.write_text("keep")
    (tmp_path / "env").symlink_to(target)
    client.put_files({str(tmp_path / "env"): b""})
    assert target.read_text() == "keep" and not (tmp_path / "env").is_symlink()


def test_file_rpcs_refuse_relative_paths_and_oversize(
        agent: tuple[AgentClient, threading.Event], tmp_path: Path) -> None:
    """Relative paths and a PutFiles over 4 MiB are refused as a whole; nothing is written."""
    client, _ = agent
    with pytest.raises(SystemFailure, match="relative path"):
        client.put_files({str(tmp_path / "a"): b"1", "rel/b": b"2"})
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemFailure, match=r"larger than max|over 4194304"):
        client.put_files({str(tmp_path / "c"): b"x" * (5 << 20)})
    with pytest.raises(SystemFailure, match="relative path"):
        client.get_files(["rel"], 10)


def test_mount_takes_one_absolute_path_once(agent: tuple[AgentClient, threading.Event],
                                            tmp_path: Path) -> None:
    """Mount refuses a relative path, and any call after the first (whatever became of it):
    a job's workspace cannot be swapped under it."""
    client, _ = agent
    with pytest.raises(SystemFailure, match="INVALID_ARGUMENT"):
        client.mount("relative/ws", timeout=10)
    with pytest.raises(SystemFailure):  # no kata-ci-mount outside a guest: it fails here
        client.mount(str(tmp_path / "ws"), timeout=10)
    with pytest.raises(SystemFailure, match="called before"):
        client.mount(str(tmp_path / "other"), timeout=10)


def test_health_refuses_oversized_entropy(agent: tuple[AgentClient, threading.Event]) -> None:
    """The entropy a Health call carries is bounded (agent.proto: at most 512 bytes)."""
    import grpc

    from kata_ci.guest import agent_pb2 as pb

    client, _ = agent
    with pytest.raises(grpc.RpcError) as caught:
        client._stub.Health(pb.HealthRequest(entropy=b"x" * 513), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
