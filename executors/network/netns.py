"""One VM's network namespace: made before QEMU starts, gone with the VM.

Every VM started by root gets a namespace ``/run/netns/kci-<vm id>``, and QEMU runs inside it
(kata-ci-jail --netns). With ``network = "none"`` it holds only a loopback: QEMU itself can
reach nothing, not even the host's loopback (Redis, the Docker socket). With a NIC:

    guest eth0 ── tap0 [namespace: nftables policy, NAT, kata-ci's resolver] up0 ── pasta
                                                                                     │
                                                                  host sockets (connect())

``pasta`` (passt's namespace mode, images/tools.py) gives the namespace its way out: what
leaves through up0 becomes ordinary sockets of the host. So the host's own network is never
changed: no forwarding sysctl, no bridge, no host firewall rule, no route. Forwarding and the
policy live in the namespace, whose nftables the guest and QEMU cannot touch. Everything is
released by removing the namespace (the kernel destroys tap0, up0 and the ruleset with it)
and ending pasta; ``reap`` removes what a SIGKILLed kata-ci left.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute

from kata_ci.errors import SystemFailure
from kata_ci.executors.network import firewall
from kata_ci.executors.network.dns import Resolver
from kata_ci.executors.network.policy import (
    GATEWAY_MAC,
    GATEWAY_V4,
    GATEWAY_V6,
    GUEST_V4,
    GUEST_V6,
    NetworkPolicy,
)

NETNS_DIR = Path("/run/netns")
PREFIX = "kci-"
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def available() -> str | None:
    """None when this process may make network namespaces, else why not."""
    if os.geteuid() != 0:
        return "kata-ci does not run as root (network namespaces need CAP_SYS_ADMIN)"
    return None


def netns_path(vm_id: str) -> Path:
    return NETNS_DIR / f"{PREFIX}{vm_id}"


def in_netns(path: Path, work: Callable[[], T]) -> T:
    """Run ``work`` on a thread of its own that has entered the namespace at ``path``: what
    it opens (sockets, /proc/sys/net files) and starts (processes) belongs to that namespace.
    setns affects only the calling thread; the thread ends with its work, so no other code
    of kata-ci ever runs in a VM's namespace."""
    def enter() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {path}")
        finally:
            os.close(fd)
    return _on_thread(enter, work)


def _on_thread(prepare: Callable[[], None], work: Callable[[], T]) -> T:
    box: dict[str, object] = {}

    def run() -> None:
        try:
            prepare()
            box["value"] = work()
        except BaseException as exc:
            box["error"] = exc
    thread = threading.Thread(target=run, name="kata-ci-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def host_addresses() -> tuple[str, ...]:
    """Every address of kata-ci's own namespace (denied to guests like private ranges)."""
    with IPRoute() as ipr:
        found = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}
    return tuple(sorted(a.split("%")[0] for a in found if a))


class VMNetwork:
    """The namespace of one VM. ``create`` makes it (with tap0, addresses and the ruleset
    when the policy has a NIC); ``connect`` starts the resolver and pasta; ``close`` removes
    everything. ``close`` is idempotent and never raises."""

    def __init__(self, vm_id: str, policy: NetworkPolicy) -> None:
        self.vm_id = vm_id
        self.policy = policy
        self.path = netns_path(vm_id)
        self._resolver: Resolver | None = None
        self._pasta: subprocess.Popen[bytes] | None = None
        self._listeners: list[socket.socket] = []
        self._closed = False
        self.setup_seconds = 0.0
        self.tap_fd: int | None = None
        self._hosts: tuple[str, ...] = ()

    def create(self) -> None:
        """The namespace, made on a thread that unshares into it and bind-mounts it at
        ``path``; with a NIC also tap0, kata-ci's link addresses, forwarding (inside the
        namespace only), the ruleset, and the resolver's sockets on the gateway addresses.
        tap0 lives as long as its file descriptor (``tap_fd``, handed to QEMU): QEMU's
        identity needs no access to /dev/net/tun, and no tap outlives the VM."""
        started = time.monotonic()
        NETNS_DIR.mkdir(parents=True, exist_ok=True)

        def unshare() -> None:
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            self.path.touch(mode=0o444, exist_ok=False)
            if _libc.mount(b"/proc/thread-self/ns/net", bytes(self.path), None, MS_BIND,
                           None) != 0:
                err = ctypes.get_errno()
                self.path.unlink()
                raise OSError(err, f"bind-mount the namespace at {self.path}")

        # Read once, here in kata-ci's namespace: the ruleset and the resolver both deny them.
        self._hosts = host_addresses() if self.policy.nic else ()
        try:
            _on_thread(unshare, lambda: self._configure(self._hosts))
        except (OSError, subprocess.CalledProcessError) as exc:
            self.close()
            raise SystemFailure(f"cannot set up the VM's network namespace: {exc}") from None
        self.setup_seconds = time.monotonic() - started

    def _configure(self, hosts: tuple[str, ...]) -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            if not self.policy.nic:
                return
            self.tap_fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fcntl.ioctl(self.tap_fd, TUNSETIFF, struct.pack(
                "16sH", firewall.GUEST_IF.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            index = ipr.link_lookup(ifname=firewall.GUEST_IF)[0]
            # Two known ends: no duplicate address detection, no router advertisements.
            _sysctl(f"net/ipv6/conf/{firewall.GUEST_IF}/accept_dad", "0")
            _sysctl(f"net/ipv6/conf/{firewall.GUEST_IF}/accept_ra", "0")
            # A fixed MAC: a guest restored from a snapshot keeps its neighbour entry valid.
            ipr.link("set", index=index, address=GATEWAY_MAC, state="up")
            ipr.addr("add", index=index, address=str(GATEWAY_V4),
                     prefixlen=GUEST_V4.network.prefixlen)
            ipr.addr("add", index=index, address=str(GATEWAY_V6),
                     prefixlen=GUEST_V6.network.prefixlen)
        _sysctl("net/ipv4/ip_forward", "1")
        _sysctl("net/ipv6/conf/all/forwarding", "1")
        subprocess.run(["nft", "-f", "-"], input=firewall.ruleset(self.policy, hosts).encode(),
                       check=True, capture_output=True)
        for family, address in ((socket.AF_INET, str(GATEWAY_V4)),
                                (socket.AF_INET6, str(GATEWAY_V6))):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the address may be new
                sock.bind((address, 53))
                if kind == socket.SOCK_STREAM:
                    sock.listen(8)

    def connect(self, spawn: Callable[[list[str]], subprocess.Popen[bytes]]) -> None:
        """The way out: kata-ci's resolver on the gateway, and pasta joining the namespace.
        ``spawn`` starts pasta with the arguments given (the backend's jail and log)."""
        if not self.policy.nic:
            return
        self._resolver = Resolver(self.policy, self._listeners, self._hosts, self.nft)
        self._resolver.start()
        self._pasta = spawn(pasta_args(self.path))

    def release_tap(self) -> None:
        """QEMU holds tap0 now; kata-ci's copy would keep the device after QEMU ends."""
        if self.tap_fd is not None:
            os.close(self.tap_fd)
            self.tap_fd = None
    def wait_uplink(self, deadline: float) -> None:
        """Until pasta has configured up0 (its default route is there)."""
        if self._pasta is None:
            return
        while not in_netns(self.path, _has_default_route):
            if self._pasta.poll() is not None:
                raise SystemFailure(f"pasta (the VM's network) exited with status "
                                    f"{self._pasta.returncode}")
            if time.monotonic() > deadline:
                raise SystemFailure("the VM's network (pasta) did not come up in time")
            time.sleep(0.005)

    def check(self) -> None:
        if self._pasta is not None and self._pasta.poll() is not None and not self._closed:
            raise SystemFailure(f"pasta (the VM's network) exited unexpectedly (status "
                                f"{self._pasta.returncode})")

    def nft(self, commands: str) -> None:
        """Apply nft ``commands`` in the namespace (the resolver admitting addresses)."""
        if commands and not self._closed:
            in_netns(self.path, lambda: subprocess.run(
                ["nft", "-f", "-"], input=commands.encode(), check=True, capture_output=True))

    @property
    def pids(self) -> dict[str, int]:
        return {"pasta": self._pasta.pid} if self._pasta and self._pasta.poll() is None else {}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resolver is not None:
            self._resolver.close()
        for sock in self._listeners:
            sock.close()
        self.release_tap()
        if self._pasta is not None:
            with contextlib.suppress(OSError):
                self._pasta.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._pasta.wait(5)
        remove_netns(self.vm_id)


def pasta_args(path: Path) -> list[str]:
    """pasta into ``path`` as up0, configured like the host's default interface.

    No port forwarding either way (-t/-u/-T/-U none: by default pasta would splice the
    namespace's loopback to the host's, Redis included); no mapping of the gateway address
    to the host; no DHCP, DHCPv6 or router advertisements (nobody asks). ``--runas 0``: pasta
    must keep the right to enter a root-owned namespace; it then drops every capability but
    CAP_SYS_ADMIN and CAP_NET_BIND_SERVICE, enters empty mount, PID, IPC and UTS namespaces
    and a seccomp filter of its own (README, security model)."""
    return ["--netns", str(path), "--netns-only", "-I", firewall.UPLINK_IF, "--config-net",
            "--foreground", "--quiet", "--runas", "0",
            "-t", "none", "-u", "none", "-T", "none", "-U", "none",
            "--no-map-gw", "--no-dhcp", "--no-dhcpv6", "--no-ra"]


def remove_netns(vm_id: str) -> bool:
    """Unmount and delete a VM's namespace file. Once no process holds it, the kernel frees
    the namespace with its interfaces and ruleset. Whether there was one."""
    path = netns_path(vm_id)
    if not path.exists():
        return False
    _libc.umount2(bytes(path), MNT_DETACH)
    with contextlib.suppress(OSError):
        path.unlink()
    return True


def stale_netns() -> list[str]:
    """VM ids of every kata-ci namespace on this host."""
    if not NETNS_DIR.is_dir():
        return []
    return [p.name[len(PREFIX):] for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX)]


def _has_default_route() -> bool:
    with IPRoute() as ipr:
        return any(r.get("dst_len") == 0 for r in ipr.get_routes(family=socket.AF_INET)) or \
            any(r.get("dst_len") == 0 for r in ipr.get_routes(family=socket.AF_INET6)
                if r.get_attr("RTA_GATEWAY"))


def _sysctl(key: str, value: str) -> None:
    Path("/proc/sys", key).write_text(value)
