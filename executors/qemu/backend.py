"""QEMU microvm backend: process lifecycle of QEMU + virtiofsd, QMP through qemu.qmp.

A VM owns one run directory (sockets, console, logs, a record of its processes). ``kill``
removes all of it; ``orphans.reap_orphans`` removes what a dead owner left (kata-ci SIGKILLed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kata_ci.errors import RestoreFailed, RestoreStalled, SystemFailure
from kata_ci.executors.agent_client import AgentClient, VirtioSerialChannel
from kata_ci.executors.base import VM, Accel, Backend, BootTimes, Capabilities, VMSpec
from kata_ci.executors.network import netns
from kata_ci.executors.network.netns import VMNetwork
from kata_ci.executors.qemu import qmp, snapshot
from kata_ci.executors.qemu.accel import host_tsc_khz
from kata_ci.executors.qemu.argv import (
    GuestFiles,
    VMPaths,
    qemu_argv,
    snapshot_args,
    virtiofsd_argv,
)
from kata_ci.executors.qemu.confine import (
    Identity,
    VMCgroup,
    fileserver_identity,
    jail_argv,
    limits_for,
    qemu_identity,
    workspace_owner,
)
from kata_ci.executors.qemu.logs import LogPump, tail
from kata_ci.executors.qemu.orphans import RECORD

# What the guest kernel prints when it stops for good while QEMU keeps running: without ACPI
# a power-off is a halt (all vCPUs parked), and a halted guest answers nothing, ever.
HALT_MARKERS = (b"reboot: System halted", b"reboot: Power down")


@dataclass(frozen=True)
class Snapshot:
    """The VM saves itself to ``file`` once booted (a template), or restores from it."""

    file: Path
    restore: bool


class QemuVM(VM):
    def __init__(self, spec: VMSpec, accel: Accel, run_root: Path, tools: Path,
                 floor: bool = False, snapshot: Snapshot | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.spec = spec
        self.accel = accel
        self.floor = floor
        self.snapshot = snapshot
        self.tools = tools
        self.paths = VMPaths(run_root / self.id)
        self._cgroup = VMCgroup(self.id, limits_for(spec.vcpus, spec.memory_mib, accel))
        self._pump = LogPump()
        self._halted = ""
        self._console_tail = b""
        self._qemu: subprocess.Popen[bytes] | None = None
        self._net: VMNetwork | None = None
        self._virtiofsd: subprocess.Popen[bytes] | None = None
        self._agent: AgentClient | None = None
        self._lock = threading.Lock()
        self._killed = False
        self._saved_diagnostics = ""
        self._boot_timeout = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float) -> BootTimes:
        """Boot (or restore) until the agent answers Health and the workspace is mounted; a
        template VM stops once its agent serves, unconnected, for ``save``."""
        started = time.monotonic()
        deadline = started + timeout
        self._boot_timeout = timeout
        restoring = self.snapshot is not None and self.snapshot.restore
        try:
            self._spawn_vm()
            if self.floor:
                return self._wait_floor(started, deadline)
            self._wait_for(self.paths.qmp, deadline, "QMP socket")
            if restoring:
                qmp.restore_snapshot(self.paths.qmp, deadline, self.check)
            else:
                qmp.wait_agent_port(self.paths.qmp, deadline, self.check, lambda: (
                    f"guest agent did not open its channel within {self._boot_timeout:g}s"))
            if self._template:
                return BootTimes(time.monotonic() - started, 0.0, 0.0)
            self._agent = AgentClient(VirtioSerialChannel(str(self.paths.agent)))
            reply = self._agent.health(max(0.1, deadline - time.monotonic()))
        except SystemFailure as exc:
            if not restoring or self._killed:
                raise
            if time.monotonic() >= deadline:  # slow, not broken: the template stays
                raise RestoreStalled(f"the VM was not restored within {timeout:g}s "
                                     f"({exc.args[0]})", self.diagnostics()) from None
            if isinstance(exc, RestoreFailed):
                raise
            # Up to a healthy agent, a failure is the snapshot's: the job may boot cold.
            raise RestoreFailed(f"restore failed: {exc.args[0]}", self.diagnostics()) from None
        if self.spec.workdir is not None:
            self._agent.mount(self.spec.workdir, max(1.0, deadline - time.monotonic()))
        healthy = time.monotonic()
        if self._net is not None:  # pasta came up meanwhile; the job's first packet needs it
            self._net.wait_uplink(deadline)
        return BootTimes(agent_healthy=healthy - started,
                         guest_uptime_at_health=reply.uptime_seconds,
                         guest_agent_started=reply.agent_start_seconds, restored=restoring,
                         network_setup=self._net.setup_seconds if self._net else 0.0,
                         uplink_wait=time.monotonic() - healthy)

    def attach_image(self, disk: Path, index: int) -> None:
        fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
        try:
            qmp.attach_disk(self.paths.qmp, fd, index, self.check)
        finally:
            os.close(fd)

    def save(self, timeout: float) -> None:
        """A template VM (``Snapshot(restore=False)``), started: stop it, write its state."""
        assert self.snapshot is not None and not self.snapshot.restore
        qmp.save_snapshot(self.paths.qmp, time.monotonic() + timeout, self.check)

    @property
    def _template(self) -> bool:
        return self.snapshot is not None and not self.snapshot.restore

    def _spawn_vm(self) -> None:
        identity = qemu_identity()
        self._make_run_dir(identity)
        self._record()  # before anything the reaper would have to find
        cgroups = self._cgroup.create()
        jail = str(self.tools / "bin" / "kata-ci-jail")
        self._make_network(identity)
        if self.spec.workspace is not None and not self.floor:
            self._start_fileserver(jail, cgroups, identity)
        with contextlib.ExitStack() as opened:
            def fd(path: Path | None, flags: int = os.O_RDONLY) -> str | None:
                if path is None:
                    return None
                try:
                    handle = os.open(path, flags | os.O_CLOEXEC, 0o600)
                except OSError as exc:  # e.g. a template removed meanwhile: a cold boot follows
                    raise SystemFailure(f"cannot open {path}: {exc.strerror}") from None
                opened.callback(os.close, handle)
                return f"/proc/self/fd/{handle}"

            console = self._pump.pipe(self.paths.console, self._watch_console)
            opened.callback(os.close, console)
            if identity is not None:  # QEMU reopens it by /proc/self/fd, as its own identity
                os.fchown(console, identity.uid, identity.gid)
            tap = self._net.tap_fd if self._net else None
            files = GuestFiles(kernel=fd(self.spec.kernel) or "", initramfs=fd(self.spec.initramfs)
                               or "", rootfs=fd(self.spec.rootfs),
                               console=f"/proc/self/fd/{console}",
                               tap=str(tap) if tap is not None else None,
                               layer=fd(self.spec.layer))
            argv = jail_argv(Path(jail), identity, cgroups,
                             netns=self._net.path if self._net else None) + qemu_argv(
                self.spec, self.paths, self.accel, self.floor, host_tsc_khz(), files,
                in_run_dir=True)
            paths = [files.kernel, files.initramfs, files.rootfs, files.layer, files.console]
            if self.snapshot is not None:
                # Read-only for a restore; a template's file is new and QEMU only writes it.
                mode = os.O_RDONLY if self.snapshot.restore else \
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL
                paths.append(fd(self.snapshot.file, mode))
                argv += snapshot_args(int(str(paths[-1]).rsplit("/", 1)[1]),
                                      self.snapshot.restore)
            keep = [int(p.rsplit("/", 1)[1]) for p in paths if p]
            if tap is not None:
                os.set_inheritable(tap, True)  # pass_fds: only into QEMU's process
                keep.append(tap)
            self._qemu = self._spawn(argv, self.paths.qemu_log, keep)
            if self._net is not None:
                self._net.release_tap()
        if self._net is not None and not self._template:  # a template has no way out
            pasta = [*jail_argv(Path(jail), None, cgroups), str(self.tools / "bin" / "pasta")]
            self._net.connect(lambda args: self._spawn([*pasta, *args], self.paths.pasta_log, []))
        self._pump.start()
        self._record()

    def _make_network(self, identity: Identity | None) -> None:
        """The VM's network namespace, QEMU's home (executors/network/netns.py). Without
        root there is none: QEMU stays in kata-ci's namespace, and only ``none`` is allowed
        (the runner's configuration never asks for more; this is the backstop)."""
        why_not = netns.available()
        if why_not is not None or self.floor:
            if self.spec.network.nic and not self.floor:
                raise SystemFailure(f"network {self.spec.network.mode!r} is not possible: "
                                    f"{why_not}")
            return
        self._net = VMNetwork(self.id, self.spec.network)
        self._net.create()

    @property
    def agent(self) -> AgentClient:
        if self._agent is None:
            raise SystemFailure("VM not started")
        return self._agent

    def processes(self) -> dict[str, int]:
        """Host pids of this VM's processes (for measurements and operators)."""
        found = {"qemu": self._qemu, "virtiofsd": self._virtiofsd}
        alive = {name: proc.pid for name, proc in found.items() if proc and proc.poll() is None}
        return {**alive, **(self._net.pids if self._net else {})}

    def check(self) -> None:
        if self._halted:
            raise SystemFailure(f"the guest stopped on its own ({self._halted})",
                                self.diagnostics())
        if self._killed:
            raise SystemFailure("VM was killed", self._saved_diagnostics)
        if self._qemu is not None and self._qemu.poll() is not None:
            raise SystemFailure(f"VM process exited unexpectedly (status {self._qemu.returncode})",
                                self.diagnostics())
        if self._virtiofsd is not None and self._virtiofsd.poll() is not None:
            raise SystemFailure(f"virtiofsd (workspace file server) exited unexpectedly "
                                f"(status {self._virtiofsd.returncode})", self.diagnostics())
        if self._net is not None:
            self._net.check()

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
            if self._net is not None:
                self._net.close()
            self._pump.join()
            self._cgroup.remove()
            shutil.rmtree(self.paths.root, ignore_errors=True)

    def diagnostics(self, lines: int = 30) -> str:
        if self._killed:
            return self._saved_diagnostics
        parts = [tail(self.paths.console, lines)]
        for label, path in (("qemu", self.paths.qemu_log), ("virtiofsd", self.paths.virtiofsd_log),
                            ("pasta", self.paths.pasta_log)):
            text = tail(path, 10)
            if text.strip():
                parts.append(f"--- {label} ---\n{text}")
        return "\n".join(p for p in parts if p)

    # -- helpers -----------------------------------------------------------------------------
    def _watch_console(self, data: bytes) -> None:
        """On the log thread: a halted guest is ended at once. Killing QEMU closes the agent
        socket, so the call in flight fails now, not at the job's timeout; ``check`` then
        names the cause. The guest could print the marker itself: it only ends its own VM."""
        window = self._console_tail + data
        self._console_tail = window[-64:]
        marker = next((m for m in HALT_MARKERS if m in window), None)
        if marker is None or self._halted or self.floor:
            return
        self._halted = marker.decode().removeprefix("reboot: ").lower()
        if self._qemu is not None:
            with contextlib.suppress(OSError):
                self._qemu.kill()

    def _make_run_dir(self, identity: Identity | None) -> None:
        """The VM's run dir belongs to QEMU's identity: QEMU makes its QMP and agent sockets
        there, started inside it (``cwd``), so the folders above need not be open to it."""
        self.paths.root.mkdir(parents=True, mode=0o700)
        if identity is not None:
            os.chown(self.paths.root, identity.uid, identity.gid)

    def _start_fileserver(self, jail: str, cgroups: list[Path], qemu: Identity | None) -> None:
        """virtiofsd on a socket kata-ci binds and listens on: the server, possibly another
        identity, needs no access to the run dir; QEMU (its identity owns the socket file)
        connects to it by path."""
        assert self.spec.workspace is not None
        owner = workspace_owner(self.spec.workspace)
        identity = fileserver_identity(owner)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.paths.virtiofs))
            listener.listen(1)
            if qemu is not None:
                os.chown(self.paths.virtiofs, qemu.uid, qemu.gid)
            as_root = identity is None and os.geteuid() == 0
            argv = jail_argv(Path(jail), identity, cgroups, fsize=self.spec.max_file_size,
                             no_setid_files=True) + virtiofsd_argv(
                self.spec, str(self.tools / "bin" / "virtiofsd"), listener.fileno(),
                owner.uid, owner.gid, as_root)
            self._virtiofsd = self._spawn(argv, self.paths.virtiofsd_log, [listener.fileno()])
        finally:
            listener.close()

    def _spawn(self, argv: list[str], log: Path, keep: list[int]) -> subprocess.Popen[bytes]:
        out = self._pump.pipe(log)
        try:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=keep,
                cwd=self.paths.root,
                # Own session: a Ctrl-C on the terminal reaches kata-ci, not the VM, so
                # cancel can be graceful.
                start_new_session=True,
                # Keep SIGXFSZ ignored (Python ignores it): the jail relies on that for
                # --fsize, so a write past the bound fails with EFBIG instead of a kill.
                restore_signals=False,
            )
        except OSError as exc:
            raise SystemFailure(f"cannot start {argv[0]}: {exc}") from None
        finally:
            os.close(out)

    def _record(self) -> None:
        pids = {"owner": os.getpid(), "qemu": self._qemu.pid if self._qemu else None,
                "virtiofsd": self._virtiofsd.pid if self._virtiofsd else None,
                **(self._net.pids if self._net else {})}
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

    def _wait_floor(self, started: float, deadline: float) -> BootTimes:
        assert self._qemu is not None
        try:
            self._qemu.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise SystemFailure("guest did not power off in time", self.diagnostics()) from None
        elapsed = time.monotonic() - started
        self._pump.join()  # the console's last lines are in the pipe
        if "floor: powering off" not in tail(self.paths.console, 50):
            raise SystemFailure("guest exited without reaching init", self.diagnostics())
        return BootTimes(agent_healthy=elapsed, guest_uptime_at_health=0.0, guest_agent_started=0.0)


class QemuBackend(Backend):
    name = "qemu"

    def __init__(self, accel: Accel, run_root: Path, tools: Path) -> None:
        self.accel = accel
        self.run_root = run_root
        self.tools = tools  # images/tools.py: kata-ci-jail, virtiofsd
        # Hotplug: microvm has no bus for it. vsock: not on these hosts (no vhost-vsock); the
        # agent channel is virtio-serial. Snapshots: QEMU and virtiofsd versions decide.
        self._snapshot_problem = snapshot.snapshot_problem(tools)
        self.capabilities = Capabilities(snapshot=self._snapshot_problem is None,
                                         hotplug=False, vsock=False)

    def create(self, spec: VMSpec) -> QemuVM:
        return QemuVM(spec, self.accel, self.run_root, self.tools)

    def create_floor(self, spec: VMSpec) -> QemuVM:
        """A VM whose init powers off at once: the benchmark floor and the KVM probe."""
        return QemuVM(spec, self.accel, self.run_root, self.tools, floor=True)

    def snapshot_problem(self) -> str | None:
        return self._snapshot_problem

    def template_key(self, spec: VMSpec) -> str:
        return snapshot.template_key(spec, self.accel, host_tsc_khz(), self.tools)

    def template_meta(self, spec: VMSpec) -> dict[str, object]:
        return snapshot.meta(spec, self.accel)

    def save_template(self, spec: VMSpec, file: Path, timeout: float) -> None:
        with snapshot.placeholder_dir() as empty:
            vm = QemuVM(snapshot.template_spec(spec, Path(empty)), self.accel, self.run_root,
                        self.tools, snapshot=Snapshot(file, restore=False))
            try:
                vm.start(timeout)
                vm.save(timeout)
            except SystemFailure as exc:
                raise SystemFailure(f"building the VM template failed: {exc.args[0]}",
                                    exc.diagnostics) from None
            finally:
                vm.kill()

    def restore(self, spec: VMSpec, file: Path) -> QemuVM:
        return QemuVM(spec, self.accel, self.run_root, self.tools,
                      snapshot=Snapshot(file, restore=True))


def _listening(path: Path) -> bool:
    """Whether a unix socket at ``path`` accepts connections. Only used for QMP, which takes
    a new client once the probe's connection closes. (QEMU binds its sockets by relative
    name inside the run dir, so /proc/net/unix cannot tell one VM's from another's.)"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
