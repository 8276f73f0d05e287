"""A fresh Debian 12 host for the playbook: a debootstrap tree booted with systemd as PID 1 in
a systemd-nspawn container, reached by SSH with a key made for the run.

- **The tree** (bookworm, minbase + systemd, dbus, python3, openssh-server, sudo) is built
  once and cached under ``<kata-ci cache>/ansible-target/<key>/``, the key hashing what went
  into it; each run boots a copy of it, thrown away afterwards.
- **The host here runs no systemd** and has a cgroup v1/hybrid hierarchy: nspawn gets
  ``--register=no`` (no machined) and ``--keep-unit`` (no scope from a service manager). It
  starts in cgroups this module makes for the run (below its own, in each hierarchy), so
  the container's cgroup namespace is rooted there and every process it has can be found
  and killed there at the end.
- **Network**: a namespace of its own (``--private-network``) with ``pasta`` (the one
  `kata-ci images build` put in the host's kata-ci tools) as its way out: what the container
  connects to becomes a socket of the host, so apt and pip reach Debian's mirrors and PyPI
  as the host does, and nothing on the host's loopback (``--no-map-gw``, no port forwarded
  from the namespace). One host port on 127.0.0.1 is forwarded to the container's sshd. The
  services the playbook deploys listen on the container's own loopback: no clash with the
  host's ports, several targets may run at once. The host's own CAs
  (/usr/local/share/ca-certificates, e.g. a TLS-inspecting egress proxy) are trusted in it.
- **Guest images**: the host's finished kernel, rootfs and initramfs artifacts are
  bind-mounted read-only at the same paths under the container's /root/.cache/kata-ci:
  `kata-ci images build` in the container finds its keys there (no 6-9 min kernel build)
  and builds only what the host lacks, into the container's own cache.
- **What kata-ci needs in it** beyond nspawn's defaults (it starts VMs as root, under TCG: no
  /dev/kvm is given):
  - the memory, cpu and pids cgroup controllers writable (nspawn mounts them read-only; they
    are remounted read-write in the container's mount namespace, where its cgroup namespace
    shows only the run's own cgroups): each VM's processes get a cgroup with limits, and
    root refuses to start a VM without one (executors/qemu/confine.py); `images build` builds
    the VM templates, so even the deployment needs them;
  - /dev/loop-control (bound in) and /dev/loop0-63 nodes (made in the container's /dev): the
    worker checks /dev/loop-control at start and loop-mounts each job's workspace quota;
    loop devices are the host's kernel's, numbered host-wide;
  - /dev/net/tun (nspawn has it) and a writable /proc/sys/net (nspawn's, with a network
    namespace of its own) for each VM's network namespace, nftables and pasta.
- **Teardown** always: SIGTERM to nspawn (a clean shutdown of the container), SIGKILL to every
  process left in the run's cgroups after a bound, pasta stopped, the mounts of the run
  released (the container's own, loop mounts included, go with its mount namespace), the
  run directory and the cgroups removed. A run whose test process was killed outright is
  torn down by the next one (reap_stale).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kata_ci import paths

RECIPE = "ansible-target-v2"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "openssh-server", "sudo",
            "ca-certificates")
HOSTNAME = "kata-ci-target"
IMAGE_KINDS = ("kernel", "rootfs", "initramfs")
CONTROLLERS = ("memory", "cpu", "pids")  # what kata-ci limits each VM with (v1)
CGROUP_ROOT = Path("/sys/fs/cgroup")
LOOP_NODES = 64  # /dev/loop0-63 in the container (loop devices are numbered host-wide)
SYSTEM_TOOLS = Path("/usr/local/lib/kata-ci/tools")
RUN_PARENT, RUN_PREFIX = "/var/tmp", "kata-ci-ansible-"
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0

Log = Callable[[str], None]


def cache_root() -> Path:
    return paths.cache_dir() / "ansible-target"


def tree_key() -> str:
    digest = hashlib.sha256("\0".join([RECIPE, SUITE, MIRROR, SECURITY, *PACKAGES]).encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_tree(log: Log) -> Path:
    """The cached Debian tree, built first if this key has none (about a minute)."""
    root = cache_root()
    done = root / tree_key()
    with locked(root / ".build.lock"):
        if (done / "DONE").is_file():
            return done / "tree"
        partial = root / f"{tree_key()}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        log(f"debootstrap {SUITE} into {partial} ({', '.join(PACKAGES)})")
        started = time.monotonic()
        tree = partial / "tree"
        built = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
             str(tree), MIRROR], capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{built.stdout[-3000:]}"
                               f"{built.stderr[-3000:]}")
        _configure_base(tree)
        (partial / "DONE").write_text(f"{time.time()}\n")
        shutil.rmtree(done, ignore_errors=True)
        os.replace(partial, done)
        for stale in root.iterdir():  # older recipes: a tree is ~330 MB
            if stale.is_dir() and stale.name != done.name:
                shutil.rmtree(stale, ignore_errors=True)
        log(f"Debian tree {done.name} built in {time.monotonic() - started:.0f}s")
        return done / "tree"


def _configure_base(tree: Path) -> None:
    """What a fresh Debian 12 install has beyond debootstrap: its usual apt sources (updates
    and security: the guest kernel's key depends on linux-source's version, which must match
    the host's), a host name that resolves, and sshd for keys only."""
    (tree / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY} {SUITE}-security main\n")
    (tree / "etc/hostname").write_text(f"{HOSTNAME}\n")
    (tree / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n"
                                    "::1 localhost ip6-localhost ip6-loopback\n")
    (tree / "etc/ssh/sshd_config.d/kata-ci-target.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def image_binds(cache: Path) -> list[str]:
    """--bind-ro of each finished guest image artifact of the host, at the same place under
    the container's root cache (root's HOME is /root there too)."""
    binds = []
    for kind in IMAGE_KINDS:
        kind_dir = cache / kind
        if not kind_dir.is_dir():
            continue
        for artifact in sorted(kind_dir.iterdir()):
            if (artifact / "DONE").is_file():
                binds.append(f"--bind-ro={artifact}:/root/.cache/kata-ci/{kind}/{artifact.name}")
    return binds


def pasta_binary(cache: Path) -> Path:
    """passt's namespace mode from the host's kata-ci tools (images/tools.py): the current
    manifest's, else the newest finished build."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        tools = Path(json.loads((cache / "manifest.json").read_text())["tools"]["path"])
        if (tools / "bin/pasta").is_file():
            return tools / "bin/pasta"
    built = sorted((d for d in SYSTEM_TOOLS.glob("*") if (d / "DONE").is_file()
                    and (d / "bin/pasta").is_file()), key=lambda d: d.stat().st_mtime)
    if not built:
        raise RuntimeError("no pasta in kata-ci's host tools: run `kata-ci images build` first")
    return built[-1] / "bin/pasta"


def _process_id(pid: int) -> str:
    """pid and start time: the same process, not a later one that got its pid."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
    return f"{pid} {start}"


def reap_stale(log: Log) -> None:
    """Runs whose test process died without its teardown (SIGKILL): torn down now."""
    for run in sorted(Path(RUN_PARENT).glob(f"{RUN_PREFIX}*")):
        try:
            owner = (run / "owner").read_text().strip()
        except OSError:
            continue
        if owner and _process_id(int(owner.split()[0])) == owner:
            continue  # still running
        log(f"tearing down {run}, left by process {owner.split()[0]} which is gone")
        Target(Path(), log, run=run).close()


class Target:
    """One booted copy of the base tree. ``with Target(base, log) as t:`` boots it and waits
    for SSH; leaving the block tears everything down, whatever happened inside."""

    def __init__(self, base: Path, log: Log, extra_args: tuple[str, ...] = (),
                 run: Path | None = None) -> None:
        """``run``: the directory of a run whose owner died (reap_stale), to tear down."""
        self.base = base
        self.log = log
        self.extra_args = extra_args
        # Not kci-*: that prefix is kata-ci's own (VM namespaces and cgroups it reaps).
        self.name = f"ansible-target-{secrets.token_hex(3)}"
        self.run = run or Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=RUN_PARENT))
        self.tree = self.run / "tree"
        self.key = self.run / "id_ed25519"
        self.known_hosts = self.run / "known_hosts"
        self.console = self.run / "console.log"
        self.netns = self.run / "netns"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.pasta: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.cgroups: list[Path] = []
        if run is None:  # who owns the run, and what it made: for reap_stale
            (self.run / "owner").write_text(_process_id(os.getpid()))
        else:
            self.name = (run / "name").read_text().strip() if (run / "name").exists() else ""
            with contextlib.suppress(OSError):
                self.cgroups = [Path(g) for g in (run / "cgroups").read_text().split()]

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> Target:
        try:
            reap_stale(self.log)
            self._prepare()
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self) -> None:
        started = time.monotonic()
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.base), str(self.tree)],
                       check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f",
                        str(self.key)], check=True)
        ssh_dir = self.tree / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        self.port = free_port()
        # The container's own port (its namespace is private); pasta forwards the host's
        # 127.0.0.1:<port> there.
        (self.tree / "etc/ssh/sshd_config.d/kata-ci-port.conf").write_text(
            f"Port {self.port}\n")
        host_key = (self.tree / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key[0]} {host_key[1]}\n")
        # A machine id of its own (systemd makes one at boot when the file is empty).
        (self.tree / "etc/machine-id").write_text("")
        self._trust_local_cas()
        self.log(f"target {self.name}: tree copied to {self.tree} in "
                 f"{time.monotonic() - started:.1f}s")

    def _trust_local_cas(self) -> None:
        """The host's own CAs (/usr/local/share/ca-certificates: e.g. a TLS-inspecting egress
        proxy in front of PyPI) trusted in the target too, as its operator would have set it
        up on that network: the target's connections leave through the host's."""
        local = Path("/usr/local/share/ca-certificates")
        found = sorted(local.rglob("*.crt")) if local.is_dir() else []
        for crt in found:
            dest = self.tree / "usr/local/share/ca-certificates" / crt.relative_to(local)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(crt, dest)
        if found:
            subprocess.run(["chroot", str(self.tree), "update-ca-certificates"], check=True,
                           capture_output=True)

    def nspawn_argv(self) -> list[str]:
        return ["systemd-nspawn", "--quiet", "--boot", f"--directory={self.tree}",
                f"--machine={self.name}", "--register=no", "--keep-unit",
                "--private-network", "--console=read-only", "--link-journal=no",
                "--resolv-conf=copy-host", "--bind=/dev/loop-control",
                *image_binds(paths.cache_dir()), *self.extra_args]

    def _boot(self) -> None:
        pasta = pasta_binary(paths.cache_dir())
        (self.run / "name").write_text(self.name + "\n")
        self._make_cgroups()
        (self.run / "cgroups").write_text("".join(f"{g}\n" for g in self.cgroups))
        argv = self.nspawn_argv()
        self.log("boot: " + " ".join(argv))
        cgroups = list(self.cgroups)

        def enter_cgroups() -> None:  # in the child, before exec: nspawn and all it starts
            for group in cgroups:
                (group / "cgroup.procs").write_text("0\n")

        with self.console.open("wb") as console:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=enter_cgroups)
        started = time.monotonic()
        self.leader = self._wait_leader()
        self._network(pasta, enter_cgroups)
        self._grant()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited ({self.proc.returncode}):\n"
                                   f"{self.console_tail()}")
            if self.pasta is not None and self.pasta.poll() is not None:
                raise RuntimeError(f"pasta exited ({self.pasta.returncode})")
            if self.ssh("true", timeout=10, check=False).returncode == 0:
                break
            if time.monotonic() - started > BOOT_TIMEOUT:
                raise RuntimeError(f"no SSH after {BOOT_TIMEOUT:.0f}s:\n{self.console_tail()}")
            time.sleep(1)
        self.log(f"target {self.name}: SSH on 127.0.0.1:{self.port} answers after "
                 f"{time.monotonic() - started:.1f}s")

    def _wait_leader(self) -> int:
        """The container's PID 1, seen from here: nspawn's child in another PID namespace."""
        assert self.proc is not None
        own = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited ({self.proc.returncode}):\n"
                                   f"{self.console_tail()}")
            for children in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    for pid in children.read_text().split():
                        if os.readlink(f"/proc/{pid}/ns/pid") != own:
                            return int(pid)
            time.sleep(0.05)
        raise RuntimeError("the container's init did not start")

    def _network(self, pasta: Path, enter_cgroups: Callable[[], None]) -> None:
        """pasta in the container's namespace (held by a bind mount of it in the run dir:
        pasta cannot open another process's /proc/PID/ns/net once sandboxed), in the run's
        cgroups like the container."""
        self.netns.touch()
        subprocess.run(["mount", "--bind", f"/proc/{self.leader}/ns/net", str(self.netns)],
                       check=True)
        with (self.run / "pasta.log").open("wb") as errors:
            self.pasta = subprocess.Popen(
                [str(pasta), "--netns", str(self.netns), "--netns-only", "--config-net",
                 "--foreground", "--quiet", "--runas", "0", "-t", f"127.0.0.1/{self.port}",
                 "-u", "none", "-T", "none", "-U", "none", "--no-map-gw", "--no-dhcp",
                 "--no-dhcpv6", "--no-ra"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                start_new_session=True, preexec_fn=enter_cgroups)

    def _make_cgroups(self) -> None:
        """A cgroup of the run's own, below this process's, in each hierarchy that matters:
        the named systemd one and the unified one on a hybrid host (nspawn --keep-unit makes
        its supervisor/payload groups below the cgroup it starts in), and the memory, cpu and
        pids controllers (v1), which kata-ci uses in the container."""
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, where = line.split(":", 2)
            for name in names.split(",") if names else [""]:
                own[name.removeprefix("name=")] = where.lstrip("/")
        if (CGROUP_ROOT / "cgroup.controllers").is_file():  # unified host
            parents = [CGROUP_ROOT / own.get("", "")]
        else:
            parents = [CGROUP_ROOT / h / own.get(k, "") for h, k in (
                ("systemd", "systemd"), ("unified", ""), *((c, c) for c in CONTROLLERS))]
        for parent in parents:
            if (parent / "cgroup.procs").is_file():
                group = parent / self.name
                group.mkdir()
                self.cgroups.append(group)

    def _grant(self) -> None:
        """What kata-ci needs beyond nspawn's defaults, done in the container's mount
        namespace: its memory, cpu and pids cgroup hierarchies read-write (nspawn mounts them
        read-only; its cgroup namespace is rooted at the run's own cgroups, all it can see or
        change there), and /dev/loop0-N block nodes (nspawn has no udev to make them when a
        workspace quota asks /dev/loop-control for a free device)."""
        script = "set -e\n"
        if not (CGROUP_ROOT / "cgroup.controllers").is_file():
            script += "".join(f"mount -o remount,bind,rw /sys/fs/cgroup/{c}\n"
                              for c in CONTROLLERS)
        script += (f"for n in $(seq 0 {LOOP_NODES - 1}); do "
                   "[ -e /dev/loop$n ] || mknod /dev/loop$n b 7 $n; done\n")
        done = subprocess.run(["nsenter", "-t", str(self.leader), "-m", "--", "sh", "-c",
                               script], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cannot grant the container cgroups and loop devices: "
                               f"{done.stderr.strip()}")

    def close(self) -> None:
        """Everything the run made goes, in an order that never deletes through a mount."""
        self._stop()
        self._unmount()
        if self._mounts():
            raise RuntimeError(f"mounts left under {self.run}: not deleting it")
        shutil.rmtree(self.run, ignore_errors=True)
        if self.name:
            shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name,
                          ignore_errors=True)
        self._remove_cgroups()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn: a clean shutdown of the container
            try:
                self.proc.wait(STOP_TIMEOUT)
                self.log(f"target {self.name}: shut down")
            except subprocess.TimeoutExpired:
                self.log(f"target {self.name}: no shutdown after {STOP_TIMEOUT:.0f}s, killed")
        for _ in range(50):
            left = self.processes()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for proc in (self.proc, self.pasta):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        left = self.processes()
        if left:
            raise RuntimeError(f"processes of {self.name} survive SIGKILL: {left}")

    def processes(self) -> list[int]:
        pids: set[int] = set()
        for group in self.cgroups:
            for procs in group.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
        return sorted(pids)

    def _mounts(self) -> list[str]:
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == str(self.run) or point.startswith(f"{self.run}/"):
                found.append(point)
        return found

    def _unmount(self) -> None:
        for point in sorted(self._mounts(), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False)

    def _remove_cgroups(self) -> None:
        for group in self.cgroups:
            if not group.exists():
                continue
            for sub in sorted((p for p in group.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                group.rmdir()
        left = [g for g in self.cgroups if g.exists()]
        if left:
            raise RuntimeError(f"cgroups left: {left}")

    # -- access -------------------------------------------------------------------------------
    def ssh_options(self) -> list[str]:
        return ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5",
                "-o", "LogLevel=ERROR", "-i", str(self.key), "-p", str(self.port)]

    def ssh(self, command: str, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(["ssh", *self.ssh_options(), "root@127.0.0.1", command],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess([command], 124, "", f"timeout after {timeout}s")
        if check and done.returncode != 0:
            raise RuntimeError(f"ssh {command!r}: exit {done.returncode}\n{done.stdout}"
                               f"{done.stderr}")
        return done

    def inventory(self, path: Path, variables: dict[str, object]) -> Path:
        """A one-host inventory (YAML; JSON is YAML): this target is the broker and the worker,
        with ``variables`` as the inventory's group vars (the playbook's defaults fill in the
        rest)."""
        common = (f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                  "-o ConnectTimeout=10")
        host = {"ansible_host": "127.0.0.1", "ansible_port": self.port, "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args": common,
                "ansible_python_interpreter": "/usr/bin/python3"}
        inventory = {"all": {"vars": variables, "children": {
            "broker": {"hosts": {"target": host}},
            "workers": {"hosts": {"target": {}}}}}}
        path.write_text(json.dumps(inventory, indent=2) + "\n")
        return path

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
