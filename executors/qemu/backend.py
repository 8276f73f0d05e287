"""QEMU microvm backend: process lifecycle of QEMU + virtiofsd, QMP through qemu.qmp.

A VM owns one run directory (sockets, console, logs, a record of its processes). ``kill``
removes all of it; ``reap_orphans`` removes what a dead owner left (kata-ci SIGKILLed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from kata_ci.errors import SystemFailure
from kata_ci.executors.agent_client import AgentClient, VirtioSerialChannel
from kata_ci.executors.base import VM, Accel, Backend, BootTimes, Capabilities, VMSpec
from kata_ci.executors.qemu.argv import AGENT_PORT_ID, VMPaths, qemu_argv, virtiofsd_argv
from kata_ci.procs import pid_alive

RECORD = "vm.json"


@functools.cache
def _die_with_parent() -> list[str]:
    """A prefix that makes the VM's processes get SIGKILL when kata-ci dies (killed -9).

    setpriv (util-linux, Essential on Debian) sets the parent-death signal and execs, so the
    pid stays the VM process's own. A Python preexec_fn would do the same but runs Python in
    the forked child, which can deadlock when other threads hold locks at fork time (two VMs
    starting at once in a pipeline). The kernel ties the signal to the spawning *thread*; VMs
    are started from threads that outlive them.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC frequency, when the host has a constant TSC whose rate it knows.

    TCG guests read the host TSC; they need this number to use it as their clocksource.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    mhz = next((line.split(":")[1] for line in info.splitlines() if line.startswith("cpu MHz")),
               "")
    if "constant_tsc" not in flags or "tsc_known_freq" not in flags or not mhz.strip():
        return None
    return round(float(mhz) * 1000)


def tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            data = handle.read()
    except OSError:
        return ""
    return b"\n".join(data.splitlines()[-lines:]).decode(errors="replace")


class QemuVM(VM):
    def __init__(self, spec: VMSpec, accel: Accel, run_root: Path, floor: bool = False) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.spec = spec
        self.accel = accel
        self.floor = floor
        self.paths = VMPaths(run_root / self.id)
        self._qemu: subprocess.Popen[bytes] | None = None
        self._virtiofsd: subprocess.Popen[bytes] | None = None
        self._agent: AgentClient | None = None
        self._lock = threading.Lock()
        self._killed = False
        self._saved_diagnostics = ""
        self._boot_timeout = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float) -> BootTimes:
        started = time.monotonic()
        deadline = started + timeout
        self._boot_timeout = timeout
        self.paths.root.mkdir(parents=True, mode=0o700)
        if self.spec.workspace is not None and not self.floor:
            self._virtiofsd = self._spawn(virtiofsd_argv(self.spec, self.paths),
                                          self.paths.virtiofsd_log)
            self._wait_for(self.paths.virtiofs, deadline, "virtiofsd socket")
        argv = qemu_argv(self.spec, self.paths, self.accel, self.floor, host_tsc_khz())
        self._qemu = self._spawn(argv, self.paths.qemu_log)
        self._record()
        if self.floor:
            return self._wait_floor(started, deadline)
        self._wait_for(self.paths.qmp, deadline, "QMP socket")
        self._wait_agent_port(deadline)
        self._agent = AgentClient(VirtioSerialChannel(str(self.paths.agent)))
        reply = self._agent.health(max(0.1, deadline - time.monotonic()))
        return BootTimes(agent_healthy=time.monotonic() - started,
                         guest_uptime_at_health=reply.uptime_seconds,
                         guest_agent_started=reply.agent_start_seconds)

    @property
    def agent(self) -> AgentClient:
        if self._agent is None:
            raise SystemFailure("VM not started")
        return self._agent

    def processes(self) -> dict[str, int]:
        """Host pids of this VM's processes (for measurements and operators)."""
        found = {"qemu": self._qemu, "virtiofsd": self._virtiofsd}
        return {name: proc.pid for name, proc in found.items() if proc and proc.poll() is None}

    def check(self) -> None:
        if self._killed:
            raise SystemFailure("VM was killed", self._saved_diagnostics)
        if self._qemu is not None and self._qemu.poll() is not None:
            raise SystemFailure(f"VM process exited unexpectedly (status {self._qemu.returncode})",
                                self.diagnostics())
        if self._virtiofsd is not None and self._virtiofsd.poll() is not None:
            raise SystemFailure(f"virtiofsd (workspace file server) exited unexpectedly "
                                f"(status {self._virtiofsd.returncode})", self.diagnostics())

    def stop(self, timeout: float = 2.0) -> None:
        """Shutdown RPC (the guest kills what still runs and syncs), then ``kill``.

        Not waiting for the guest's own power-off is deliberate: after the sync, nothing in
        the guest is worth keeping (rootfs read-only, overlay throw-away, workspace writes
        already on the host), and the guest's reboot path costs ~250 ms under TCG.
        """
        if self._agent is not None and not self._killed:
            with contextlib.suppress(SystemFailure):
                self._agent.shutdown(timeout)
        self.kill()

    def kill(self) -> None:
        # The whole teardown runs under the lock: a second caller (the canceller thread and
        # the main thread both kill) returns only when everything is gone, not half-way.
        with self._lock:
            if self._killed:
                return
            try:
                self._saved_diagnostics = self.diagnostics()
            except Exception:
                self._saved_diagnostics = ""
            self._killed = True
            for proc in (self._qemu, self._virtiofsd):
                if proc is None:
                    continue
                with contextlib.suppress(OSError):
                    if proc.poll() is None:
                        proc.kill()
                with contextlib.suppress(Exception):
                    proc.wait(10)
            if self._agent is not None:
                with contextlib.suppress(Exception):
                    self._agent.close()
            shutil.rmtree(self.paths.root, ignore_errors=True)

    def diagnostics(self, lines: int = 30) -> str:
        if self._killed:
            return self._saved_diagnostics
        parts = [tail(self.paths.console, lines)]
        for label, path in (("qemu", self.paths.qemu_log), ("virtiofsd", self.paths.virtiofsd_log)):
            text = tail(path, 10)
            if text.strip():
                parts.append(f"--- {label} ---\n{text}")
        return "\n".join(p for p in parts if p)

    # -- helpers -----------------------------------------------------------------------------
    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as sink:
            try:
                return subprocess.Popen(
                    [*_die_with_parent(), *argv], stdin=subprocess.DEVNULL, stdout=sink,
                    stderr=subprocess.STDOUT,
                    # Own session: a Ctrl-C on the terminal reaches kata-ci, not the VM, so
                    # cancel can be graceful.
                    start_new_session=True,
                )
            except OSError as exc:
                raise SystemFailure(f"cannot start {argv[0]}: {exc}") from None

    def _record(self) -> None:
        pids = {"owner": os.getpid(), "qemu": self._qemu.pid if self._qemu else None,
                "virtiofsd": self._virtiofsd.pid if self._virtiofsd else None}
        (self.paths.root / RECORD).write_text(json.dumps(pids))

    def _wait_for(self, path: Path, deadline: float, what: str) -> None:
        """Until a unix socket *listens*: its file appears at bind(), before listen(), and
        connecting in between is refused (seen with two VMs starting at once)."""
        while not _listening(path):
            self.check()
            if time.monotonic() > deadline:
                raise SystemFailure(f"no {what} within {self._boot_timeout:g}s",
                                    self.diagnostics())
            time.sleep(0.005)

    def _wait_agent_port(self, deadline: float) -> None:
        """Wait for the guest to open the agent port.

        Bytes sent before the guest opens its end are dropped by the guest driver, so the
        host must not connect before. QMP says when: the VSERPORT_CHANGE event, and
        ``frontend-open`` in query-chardev. Both are used, because events emitted before our
        QMP negotiation finished are not delivered (a host stalled under load would miss it).
        """
        qmp = QEMUMonitorProtocol(str(self.paths.qmp))
        try:
            qmp.connect(negotiate=True)
            next_query = 0.0
            while True:
                self.check()
                now = time.monotonic()
                if now > deadline:
                    raise SystemFailure(f"guest agent did not open its channel within "
                                        f"{self._boot_timeout:g}s", self.diagnostics())
                if now >= next_query:
                    chardevs: list[dict[str, object]] = qmp.cmd("query-chardev")  # type: ignore[assignment]
                    if any(c.get("label") == "agent" and c.get("frontend-open")
                           for c in chardevs):
                        return
                    next_query = now + 1.0
                try:
                    event = qmp.pull_event(wait=0.1)
                except TimeoutError:
                    continue
                data = (event or {}).get("data", {})
                if (event or {}).get("event") == "VSERPORT_CHANGE" and \
                        data.get("id") == AGENT_PORT_ID and data.get("open"):
                    return
        except (OSError, EOFError, QMPError) as exc:
            time.sleep(0.1)  # QEMU closing QMP usually means it is exiting: report why
            self.check()
            raise SystemFailure(f"QMP connection failed: {exc}", self.diagnostics()) from None
        finally:
            with contextlib.suppress(Exception):
                qmp.close()

    def _wait_floor(self, started: float, deadline: float) -> BootTimes:
        assert self._qemu is not None
        try:
            self._qemu.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise SystemFailure("guest did not power off in time", self.diagnostics()) from None
        elapsed = time.monotonic() - started
        if "floor: powering off" not in tail(self.paths.console, 50):
            raise SystemFailure("guest exited without reaching init", self.diagnostics())
        return BootTimes(agent_healthy=elapsed, guest_uptime_at_health=0.0, guest_agent_started=0.0)


class QemuBackend(Backend):
    name = "qemu"
    # Snapshots: vhost-user-fs blocks migration in QEMU 7.2. Hotplug: microvm has no bus for
    # it. vsock: not on these hosts (no vhost-vsock); the agent channel is virtio-serial.
    capabilities = Capabilities(snapshot=False, hotplug=False, vsock=False)

    def __init__(self, accel: Accel, run_root: Path) -> None:
        self.accel = accel
        self.run_root = run_root

    def create(self, spec: VMSpec) -> QemuVM:
        return QemuVM(spec, self.accel, self.run_root)

    def create_floor(self, spec: VMSpec) -> QemuVM:
        """A VM whose init powers off at once: the benchmark floor and the KVM probe."""
        return QemuVM(spec, self.accel, self.run_root, floor=True)


def reap_orphans(run_root: Path) -> list[str]:
    """Kill and remove VMs whose owning process is gone. Returns the reaped VM ids."""
    reaped: list[str] = []
    if not run_root.is_dir():
        return reaped
    for vm_dir in run_root.iterdir():
        try:
            record = json.loads((vm_dir / RECORD).read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(record.get("owner")):
            continue
        for key in ("qemu", "virtiofsd"):
            pid = record.get(key)
            # Only a process whose command line names this VM: pids get reused.
            if pid and _cmdline_mentions(pid, vm_dir.name):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(vm_dir, ignore_errors=True)
        reaped.append(vm_dir.name)
    return reaped


_ACCEPTCON = 0x10000  # __SO_ACCEPTCON in /proc/net/unix: the socket is listening


def _listening(path: Path) -> bool:
    """Whether a unix socket is bound at ``path`` and listening, without connecting to it
    (virtiofsd serves exactly one connection: a probe would use it up)."""
    if not path.exists():
        return False
    try:
        table = Path("/proc/net/unix").read_text()
    except OSError:
        return True  # no way to tell: the file is there
    wanted = str(path)
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == wanted and int(fields[3], 16) & _ACCEPTCON:
            return True
    return False


def _cmdline_mentions(pid: int, vm_id: str) -> bool:
    try:
        return vm_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
