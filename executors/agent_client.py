"""Host side of the agent contract (guest/agent.proto): a typed client and the channel seam.

``AgentChannel`` is the transport seam on the host: the QEMU backend here hands out a
``VirtioSerialChannel`` (the unix socket of QEMU's chardev); a KVM host with vhost-vsock would
hand out a ``VsockChannel``. Everything above the channel is transport-blind.
"""

from __future__ import annotations

import abc
import hashlib
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

# kata-ci forks (to exec QEMU and virtiofsd) while gRPC threads run; the children exec at once
# and never use gRPC, so gRPC's fork handlers are not needed (and only warn). Set before import.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import google.protobuf
import grpc

from kata_ci.errors import SystemFailure
from kata_ci.guest import agent_pb2 as pb
from kata_ci.guest import agent_pb2_grpc as pb_grpc

StreamName = Literal["stdout", "stderr"]
ENTROPY_BYTES = 64  # 512 bits: a full reseed of the guest CRNG
_STREAMS: dict[int, StreamName] = {pb.STDOUT: "stdout", pb.STDERR: "stderr"}


class AgentChannel(abc.ABC):
    @abc.abstractmethod
    def target(self) -> str:
        """A gRPC target string for this channel."""


@dataclass(frozen=True)
class VirtioSerialChannel(AgentChannel):
    socket_path: str

    def target(self) -> str:
        return f"unix:{self.socket_path}"


@dataclass(frozen=True)
class VsockChannel(AgentChannel):
    cid: int
    port: int = 1024

    def target(self) -> str:
        return f"vsock:{self.cid}:{self.port}"


@dataclass(frozen=True)
class Output:
    stream: StreamName
    data: bytes


@dataclass(frozen=True)
class Exit:
    """How a guest process ended: ``exit_code`` or ``signal`` (then exit_code is 128+signal)."""

    exit_code: int
    signal: int = 0
    error: str = ""


def contract_sha256() -> str:
    return hashlib.sha256(pb.DESCRIPTOR.serialized_pb).hexdigest()


class ExecStream:
    """Iterate for ``Output`` chunks as the guest produces them; then ``exit`` is set."""

    def __init__(self, call: Iterator[pb.ExecEvent], exec_id: str) -> None:
        self._call = call
        self.exec_id = exec_id
        self.pid: int | None = None
        self.exit: Exit | None = None

    def __iter__(self) -> Iterator[Output]:
        try:
            for event in self._call:
                kind = event.WhichOneof("event")
                if kind == "output":
                    yield Output(_STREAMS.get(event.output.stream, "stdout"), event.output.data)
                elif kind == "started":
                    self.pid = event.started.pid
                elif kind == "exited":
                    ex = event.exited
                    code = 128 + ex.signal if ex.signal else ex.exit_code
                    self.exit = Exit(exit_code=code, signal=ex.signal, error=ex.error)
        except grpc.RpcError as exc:
            raise SystemFailure(f"agent connection lost during exec: {_describe(exc)}") from None
        if self.exit is None:
            raise SystemFailure("agent ended the exec stream without an exit status")

    def cancel(self) -> None:
        """Drop the call; the agent then SIGKILLs the process group."""
        cancel = getattr(self._call, "cancel", None)
        if cancel is not None:
            cancel()


class AgentClient:
    def __init__(self, channel: AgentChannel) -> None:
        self.channel = channel
        # One HTTP/2 connection for the VM's whole life: the serial bridge in the guest serves
        # one connection at a time, so reconnecting mid-life is avoided, not relied upon.
        self._grpc = grpc.insecure_channel(
            channel.target(),
            options=[("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 8 << 20)],
        )
        self._stub = pb_grpc.AgentStub(self._grpc)  # type: ignore[no-untyped-call]

    def health(self, timeout: float) -> pb.HealthResponse:
        """Versions checked, guest clock set, guest RNG reseeded with fresh host entropy
        (a VM restored from a snapshot starts with its template's RNG state)."""
        try:
            reply: pb.HealthResponse = self._stub.Health(
                pb.HealthRequest(host_time_unix_nanos=time.time_ns(),
                                 entropy=os.urandom(ENTROPY_BYTES)),
                timeout=timeout, wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            raise SystemFailure(f"guest agent did not answer: {_describe(exc)}") from None
        mismatch = [
            f"{what}: guest {theirs}, host {ours}"
            for what, theirs, ours in (
                ("grpcio", reply.grpc_version, grpc.__version__),
                ("protobuf", reply.protobuf_version, google.protobuf.__version__),
                ("agent.proto", reply.contract_sha256[:12], contract_sha256()[:12]),
            )
            if theirs != ours
        ]
        if mismatch:
            raise SystemFailure(
                "guest agent does not match this host (" + "; ".join(mismatch)
                + "): run `kata-ci images build`"
            )
        return reply

    def mount(self, path: str, timeout: float) -> None:
        """Mount the workspace at ``path`` in the guest (agent.proto Mount)."""
        try:
            self._stub.Mount(pb.MountRequest(path=path), timeout=timeout)
        except grpc.RpcError as exc:
            raise SystemFailure(f"guest could not mount the workspace at {path}: "
                                f"{_describe(exc)}") from None

    def exec(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str = "",
        exec_id: str | None = None, root: str = "", user: str = "",
    ) -> ExecStream:
        exec_id = exec_id or uuid.uuid4().hex
        request = pb.ExecRequest(exec_id=exec_id, argv=list(argv), env=dict(env), cwd=cwd,
                                 root=root, user=user)
        return ExecStream(self._stub.Exec(request), exec_id)

    def prepare_root(self, name: str, scsi_id: int, overlay_size: str,
                     hosts: Mapping[str, str], timeout: float) -> str:
        """An OCI image's root in the guest (agent.proto PrepareRoot); its guest path."""
        request = pb.PrepareRootRequest(name=name, scsi_id=scsi_id, overlay_size=overlay_size,
                                        hosts=dict(hosts), wait_seconds=max(1.0, timeout - 1))
        try:
            reply = self._stub.PrepareRoot(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise SystemFailure(f"agent PrepareRoot {name}: {_describe(exc)}") from None
        return str(reply.path)

    def signal(self, exec_id: str, signum: int, whole_group: bool = True,
               timeout: float = 5.0) -> bool:
        try:
            reply = self._stub.Signal(
                pb.SignalRequest(exec_id=exec_id, signal=signum, whole_group=whole_group),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            raise SystemFailure(f"agent did not take the signal: {_describe(exc)}") from None
        return bool(reply.found)

    def put_files(self, files: Mapping[str, bytes], mode: int = 0o644,
                  timeout: float = 30.0) -> None:
        """Write small files into the guest (agent.proto PutFiles)."""
        request = pb.PutFilesRequest(files=[pb.File(path=path, data=data, mode=mode)
                                            for path, data in files.items()])
        try:
            self._stub.PutFiles(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise SystemFailure(f"agent could not write files: {_describe(exc)}") from None

    def get_files(self, paths: Sequence[str], max_bytes: int,
                  timeout: float = 30.0) -> dict[str, bytes | None]:
        """Small files from the guest, each cut at ``max_bytes``; None for a missing one.

        The reply is guest-controlled: only the paths asked for are accepted, and nothing
        longer than ``max_bytes``, whatever the guest sends.
        """
        try:
            reply = self._stub.GetFiles(pb.GetFilesRequest(paths=list(paths),
                                                           max_bytes=max_bytes),
                                        timeout=timeout)
        except grpc.RpcError as exc:
            raise SystemFailure(f"agent could not read files: {_describe(exc)}") from None
        got: dict[str, bytes | None] = {}
        for item in reply.files:
            if item.path in paths and item.path not in got:
                got[item.path] = None if item.missing else bytes(item.data[:max_bytes])
        if set(got) != set(paths):
            raise SystemFailure("agent's GetFiles reply does not match the request")
        return got

    def shutdown(self, timeout: float = 2.0) -> None:
        try:
            self._stub.Shutdown(pb.ShutdownRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise SystemFailure(f"agent did not shut down: {_describe(exc)}") from None

    def close(self) -> None:
        self._grpc.close()


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{getattr(code, 'name', code)}: {details}"
