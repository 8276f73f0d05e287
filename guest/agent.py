"""The in-VM agent: a gRPC server for ``agent.proto``, started by guest/init.c as PID 1's child.

Start-up cost matters (every import is seconds under TCG): only grpc and the generated stubs
are imported before the server serves; subprocess, selectors and hashing are cheap beside them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import google.protobuf
import grpc

import kata_ci
from kata_ci.guest import agent_pb2 as pb
from kata_ci.guest import agent_pb2_grpc as pb_grpc
from kata_ci.guest.transport import serve_transport

SOCKET = "/run/kata-ci-agent.sock"
# Output is read in up to 1 MiB pieces from pipes enlarged to 1 MiB: under TCG every Python
# step and every gRPC message is expensive, so fewer, larger messages stream several times
# faster than 64 KiB ones (bench/bench_vm.py). A read still returns whatever is there at once.
READ_CHUNK = 1024 * 1024
CLOCK_TOLERANCE_NS = 200_000_000  # step the clock only when it is really off, never jitter it
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SPAWN = "/opt/kata-ci/agent/kata-ci-spawn"  # guest/init.c; also kata-ci-mount by argv[0]
# linux/random.h: credit entropy to the input pool; then make the CRNG draw from it now,
# not at its next periodic reseed (a minute away), so the next getrandom() differs.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MAX_ENTROPY = 512


def _findable(program: str, cwd: str, path: str) -> bool:
    """Whether exec would find ``program`` (else Popen reports the error, as it always did)."""
    if "/" in program:
        return os.access(os.path.join(cwd, program), os.X_OK)
    return any(os.access(os.path.join(d or ".", program), os.X_OK) for d in path.split(":"))
PUT_FILES_LIMIT = 4 << 20  # agent.proto: PutFiles carries small files only


def uptime() -> float:
    with open("/proc/uptime") as handle:
        return float(handle.read().split()[0])


def process_start() -> float:
    """Guest uptime when this process was exec'd by init: what Python start-up costs is
    the difference to uptime() in main()."""
    with open("/proc/self/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def contract_sha256() -> str:
    """Hash of the contract as compiled into these stubs; the host compares it with its own."""
    return hashlib.sha256(pb.DESCRIPTOR.serialized_pb).hexdigest()


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, started_at: float, workdir: str, on_shutdown: threading.Event) -> None:
        self.started_at = started_at
        self.workdir = workdir
        self.on_shutdown = on_shutdown
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()
        self.mounted = False
        self.roots: dict[str, str] = {}  # PrepareRoot: name -> path (guest/roots.py)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        if request.entropy:
            problem = reseed(request.entropy)
            if problem:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        drift = request.host_time_unix_nanos - time.time_ns()
        if request.host_time_unix_nanos and abs(drift) > CLOCK_TOLERANCE_NS:
            time.clock_settime_ns(time.CLOCK_REALTIME, request.host_time_unix_nanos)
        return pb.HealthResponse(
            agent_version=kata_ci.__version__,
            grpc_version=grpc.__version__,
            protobuf_version=google.protobuf.__version__,
            contract_sha256=contract_sha256(),
            kernel_release=os.uname().release,
            uptime_seconds=uptime(),
            agent_start_seconds=self.started_at,
        )

    def Mount(self, request: pb.MountRequest, context: grpc.ServicerContext) -> pb.MountResponse:
        if not os.path.isabs(request.path):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"relative path {request.path!r}")
        with self.lock:
            if self.mounted:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Mount was called before")
            self.mounted = True
        done = subprocess.run(["kata-ci-mount", request.path], executable=SPAWN,
                              stdin=subprocess.DEVNULL, capture_output=True)
        if done.returncode != 0:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          done.stderr.decode(errors="replace").strip()
                          or f"kata-ci-mount exited {done.returncode}")
        self.workdir = request.path
        # On the console: a restored VM's console otherwise holds nothing of its own.
        print(f"kata-ci-agent: workspace mounted at {request.path} (uptime {uptime():.2f}s)",
              file=sys.stderr, flush=True)
        return pb.MountResponse()

    def Exec(
        self, request: pb.ExecRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExecEvent]:
        env = dict(request.env) or {"PATH": DEFAULT_PATH}
        argv = list(request.argv)
        # Through kata-ci-spawn (guest/init.c): the job loses the agent's OOM exemption.
        # A missing program is still reported by Popen itself, as before.
        cwd = request.cwd or self.workdir
        if request.root or request.user:
            problem, argv = self._in_root(request, env, cwd)
            if problem:
                yield pb.ExecEvent(exited=pb.Exited(exit_code=126, error=problem))
                return
            cwd = "/"  # kata-ci-spawn enters the command's directory inside the root
        elif argv and os.path.exists(SPAWN) and _findable(argv[0], cwd, env.get("PATH", "")):
            argv = [SPAWN, *argv]
        try:
            proc = subprocess.Popen(
                argv, env=env, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: Signal reaches all it starts
            )
        except (OSError, ValueError) as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            yield pb.ExecEvent(exited=pb.Exited(exit_code=code, error=str(exc)))
            return
        with self.lock:
            self.running[request.exec_id] = proc
        # Host gone (cancelled call, dead connection): nothing may outlive it in the guest.
        context.add_callback(lambda: _kill_group(proc))
        try:
            yield pb.ExecEvent(started=pb.Started(pid=proc.pid))
            yield from _stream_output(proc)
            code = proc.wait()
        finally:
            with self.lock:
                self.running.pop(request.exec_id, None)
        if code < 0:
            yield pb.ExecEvent(exited=pb.Exited(signal=-code))
        else:
            yield pb.ExecEvent(exited=pb.Exited(exit_code=code))

    def _in_root(self, request: pb.ExecRequest, env: dict[str, str],
                 cwd: str) -> tuple[str, list[str]]:
        """kata-ci-spawn --in for a command in an image root; (problem, argv)."""
        from kata_ci.guest import roots

        with self.lock:
            path = self.roots.get(request.root)
        if not path:
            return f"no root {request.root!r} (PrepareRoot first, and it must succeed)", []
        try:
            who = roots.identity(path, request.user)
        except roots.RootError as exc:
            return str(exc), []
        env.setdefault("HOME", who.home)
        env.setdefault("PATH", DEFAULT_PATH)
        return "", [SPAWN, "--in", path, str(who.uid), str(who.gid),
                    ",".join(map(str, who.groups)), cwd, "--", *request.argv]

    def PrepareRoot(
        self, request: pb.PrepareRootRequest, context: grpc.ServicerContext
    ) -> pb.PrepareRootResponse:
        from kata_ci.guest import roots

        hosts = dict(request.hosts)
        with self.lock:
            try:
                roots.check_request(request.name, request.overlay_size, hosts,
                                    len(self.roots))
            except roots.RootError as exc:
                context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            if request.name in self.roots:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"root {request.name!r} exists")
            self.roots[request.name] = ""  # claimed; a failed prepare leaves it unusable
        try:
            path = roots.prepare(request.name, request.scsi_id, request.overlay_size, hosts,
                                 self.workdir if self.mounted else "",
                                 request.wait_seconds or 10.0)
        except roots.RootError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        except OSError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"root {request.name}: {exc}")
        with self.lock:
            self.roots[request.name] = path
        print(f"kata-ci-agent: root {request.name} ready at {path} (uptime {uptime():.2f}s)",
              file=sys.stderr, flush=True)
        return pb.PrepareRootResponse(path=path)

    def Signal(self, request: pb.SignalRequest, context: grpc.ServicerContext) -> pb.SignalResponse:
        with self.lock:
            proc = self.running.get(request.exec_id)
        if proc is None or proc.returncode is not None:
            return pb.SignalResponse(found=False)
        try:
            if request.whole_group:
                os.killpg(proc.pid, request.signal)
            else:
                os.kill(proc.pid, request.signal)
        except ProcessLookupError:
            return pb.SignalResponse(found=False)
        return pb.SignalResponse(found=True)

    def Shutdown(
        self, request: pb.ShutdownRequest, context: grpc.ServicerContext
    ) -> pb.ShutdownResponse:
        with self.lock:
            procs = list(self.running.values())
        for proc in procs:
            _kill_group(proc)
        os.sync()
        self.on_shutdown.set()
        return pb.ShutdownResponse()


    def PutFiles(
        self, request: pb.PutFilesRequest, context: grpc.ServicerContext
    ) -> pb.PutFilesResponse:
        problem = _put_problem(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        for item in request.files:
            os.makedirs(os.path.dirname(item.path) or "/", exist_ok=True)
            # Replace, never write through: a job may have left a link at this path.
            tmp = f"{item.path}.kata-ci-{os.getpid()}-{threading.get_ident()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         item.mode or 0o644)
            try:
                os.write(fd, item.data)
                os.fchmod(fd, item.mode or 0o644)
            finally:
                os.close(fd)
            os.replace(tmp, item.path)
        return pb.PutFilesResponse()

    def GetFiles(
        self, request: pb.GetFilesRequest, context: grpc.ServicerContext
    ) -> pb.GetFilesResponse:
        reply = pb.GetFilesResponse()
        for path in request.paths:
            if not os.path.isabs(path):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"relative path {path!r}")
            try:
                with open(path, "rb") as handle:
                    data = handle.read(request.max_bytes + 1)
            except FileNotFoundError:
                reply.files.append(pb.File(path=path, missing=True))
                continue
            except OSError as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{path}: {exc}")
            cut = len(data) > request.max_bytes
            reply.files.append(pb.File(path=path, data=data[: request.max_bytes], truncated=cut))
        return reply


def reseed(entropy: bytes) -> str:
    """Mix ``entropy`` into the kernel RNG, credited, and reseed the CRNG from it now.

    Empty when done, else why not."""
    if len(entropy) > MAX_ENTROPY:
        return f"{len(entropy)} bytes of entropy, over {MAX_ENTROPY}"
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY,
                        struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"cannot reseed the guest RNG: {exc}"
    return ""


def _put_problem(request: pb.PutFilesRequest) -> str:
    total = 0
    for item in request.files:
        if not os.path.isabs(item.path):
            return f"relative path {item.path!r}"
        total += len(item.data)
    if total > PUT_FILES_LIMIT:
        return f"{total} bytes in one PutFiles call, over {PUT_FILES_LIMIT}"
    return ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _stream_output(proc: subprocess.Popen[bytes]) -> Iterator[pb.ExecEvent]:
    """Yield output as it is read; a yield blocks while gRPC flow control holds us back."""
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): pb.STDOUT, proc.stderr.fileno(): pb.STDERR}
    for fd in streams:
        with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, READ_CHUNK)
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    while streams:
        for fd, _ in poller.poll():
            data = os.read(fd, READ_CHUNK)
            if data:
                yield pb.ExecEvent(output=pb.Output(stream=streams[fd], data=data))
            else:
                poller.unregister(fd)
                del streams[fd]
    proc.stdout.close()
    proc.stderr.close()


def make_server(socket_path: str, workdir: str, shutdown: threading.Event) -> grpc.Server:
    """The gRPC server on a local unix socket; a transport connects it to the host."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    service = AgentService(process_start(), workdir, shutdown)
    pb_grpc.add_AgentServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket_path}")
    return server


def main() -> None:
    shutdown = threading.Event()
    server = make_server(SOCKET, os.environ.get("KATACI_WORKDIR", "/"), shutdown)
    server.start()
    print(f"kata-ci-agent: serving at {uptime():.2f}s (process started {process_start():.2f}s)",
          file=sys.stderr, flush=True)
    bridge = threading.Thread(target=serve_transport,
                              args=(os.environ.get("KATACI_TRANSPORT", "serial"), SOCKET),
                              daemon=True)
    bridge.start()
    shutdown.wait()
    time.sleep(0.05)  # let the Shutdown reply leave before the VM goes away
    server.stop(grace=None)
    # PID 1 (init.c) sees us exit, syncs and powers the VM off.


if __name__ == "__main__":
    main()
