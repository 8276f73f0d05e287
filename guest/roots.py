"""OCI image roots in the guest: the agent's PrepareRoot, and who a job runs as in one.

As Kata's agent does for a container's rootfs: the image is a read-only ext4 disk the host
hot-added as a virtio-scsi LUN; it is mounted read-only under an overlay whose upper layer is
a tmpfs of its own, so the job may change any file while the disk serves the next VM
unchanged. The agent and its Python stay in kata-ci's root: a job command enters the image
root through kata-ci-spawn --in (guest/init.c), chroot first, the image's user last.

Imported on the first PrepareRoot only (ctypes is not free under TCG), never at agent start.
Everything in the image is the job's: a missing or linked mount point (an image whose /proc
is a symlink) is replaced in the overlay, never followed, so kata-ci's mounts land inside
the root where they belong.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import stat
import time
from dataclasses import dataclass

ROOTS = "/run/kata-ci/roots"
NAME = re.compile(r"[a-z0-9-]{1,32}")
MAX_ROOTS = 16
# linux/mount.h
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC = 4096, 16384
SIZE = re.compile(r"[0-9]{1,12}[kmgKMG%]?")
HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,252})")
ADDRESS = re.compile(r"[0-9A-Fa-f:.]{2,45}")


class RootError(Exception):
    """What went wrong, for the RPC's status; ``code`` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


_libc: ctypes.CDLL | None = None


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)  # find_library would run ldconfig
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                   ctypes.c_ulong(flags), data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise RootError("FAILED_PRECONDITION",
                        f"mount {source} on {target}: {os.strerror(err)}")


def find_disk(scsi_id: int, wait: float) -> str:
    """/dev/sdX of LUN 0 of SCSI target ``scsi_id``, once the kernel has added it."""
    deadline = time.monotonic() + wait
    while True:
        found = glob.glob(f"/sys/bus/scsi/devices/*:0:{scsi_id}:0/block/*")
        if found:
            dev = "/dev/" + os.path.basename(found[0])
            if os.path.exists(dev):
                return dev
        if time.monotonic() >= deadline:
            raise RootError("DEADLINE_EXCEEDED",
                            f"no disk at SCSI target {scsi_id} after {wait:g}s")
        time.sleep(0.02)


def _directory(root: str, rel: str, mode: int = 0o755) -> str:
    """``root/rel`` as a real directory of the root, made component by component; a
    symlink or a file in the way is replaced (in the overlay: the image is untouched)."""
    path = root
    for part in [p for p in rel.split("/") if p and p != "."]:
        if part == "..":
            raise RootError("INVALID_ARGUMENT", f"path {rel!r} leaves the root")
        path = os.path.join(path, part)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, mode)
            continue
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(path)
            os.mkdir(path, mode)
    return path


def _replace_file(directory: str, name: str, text: str) -> None:
    path = os.path.join(directory, name)
    if os.path.lexists(path) and not os.path.isdir(path):
        os.unlink(path)  # a link is removed, never written through
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def hosts_file(hosts: dict[str, str]) -> str:
    lines = ["127.0.0.1\tlocalhost kata-ci", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for name, address in sorted(hosts.items()):
        lines.append(f"{address}\t{name}")
    return "\n".join(lines) + "\n"


def check_request(name: str, overlay_size: str, hosts: dict[str, str], count: int) -> None:
    if not NAME.fullmatch(name):
        raise RootError("INVALID_ARGUMENT", f"root name {name!r}: expected [a-z0-9-]{{1,32}}")
    if count >= MAX_ROOTS:
        raise RootError("INVALID_ARGUMENT", f"at most {MAX_ROOTS} roots")
    if overlay_size and not SIZE.fullmatch(overlay_size):
        raise RootError("INVALID_ARGUMENT", f"overlay size {overlay_size!r}")
    for host, address in hosts.items():
        if not HOSTNAME.fullmatch(host) or not ADDRESS.fullmatch(address):
            raise RootError("INVALID_ARGUMENT", f"hosts entry {host!r} -> {address!r}")


def prepare(name: str, scsi_id: int, overlay_size: str, hosts: dict[str, str],
            workdir: str, wait: float) -> str:
    """Mount the image of ``scsi_id`` as root ``name``; returns its path."""
    base = os.path.join(ROOTS, name)
    if os.path.exists(base):
        raise RootError("ALREADY_EXISTS", f"root {name!r} exists")
    dev = find_disk(scsi_id, wait)
    lower, rw, root = (os.path.join(base, d) for d in ("lower", "rw", "root"))
    for path in (lower, rw, root):
        os.makedirs(path, 0o755)
    # noload: the disk is read-only, with no journal to replay (images/oci/store.py).
    _mount(dev, lower, "ext4", MS_RDONLY | MS_NODEV, "noload")
    _mount("tmpfs", rw, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={overlay_size or '50%'},mode=0755")
    os.mkdir(os.path.join(rw, "upper"), 0o755)
    os.mkdir(os.path.join(rw, "work"), 0o755)
    _mount("overlay", root, "overlay", 0,
           f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work")
    _mount("proc", _directory(root, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("sysfs", _directory(root, "sys"), "sysfs",
           MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("/dev", _directory(root, "dev"), None, MS_BIND | MS_REC)  # with pts and shm
    tmp = _directory(root, "tmp", 0o1777)
    os.chmod(tmp, 0o1777)
    if workdir and workdir != "/":
        _mount(workdir, _directory(root, workdir), None, MS_BIND)
    etc = _directory(root, "etc")
    try:
        with open("/etc/resolv.conf") as handle:
            resolv = handle.read()
    except OSError:
        resolv = ""
    _replace_file(etc, "resolv.conf", resolv)
    _replace_file(etc, "hosts", hosts_file(hosts))
    return root


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read(1 << 20)
    except OSError:
        return ""


def identity(root: str, user: str) -> Identity:
    """OCI config.User in ``root`` (see ``resolve``)."""
    return resolve(_read(os.path.join(root, "etc/passwd")),
                   _read(os.path.join(root, "etc/group")), user)


def _entries(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if ":" in line]


def resolve(passwd_text: str, group_text: str, user: str) -> Identity:
    """OCI config.User: "", name, uid, name:group, uid:gid (docker's rules: a numeric uid
    need not exist; a name must; supplementary groups from /etc/group). Pure: the host uses
    it too, on the files of an image disk, to map the workspace's owner to the job's user."""
    passwd, groups = _entries(passwd_text), _entries(group_text)
    name, _, group = (user or "0").partition(":")
    entry = next((e for e in passwd if len(e) >= 7 and (e[0] == name or e[2] == name)), None)
    if entry is None and not name.isdigit():
        raise RootError("NOT_FOUND", f"unable to find user {name}: no matching entries in "
                                     "the image's /etc/passwd")
    uid = int(entry[2]) if entry is not None and entry[2].isdigit() else int(name)
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    home = entry[5] if entry is not None and entry[5] else "/"
    if group:
        found = next((g for g in groups if len(g) >= 3 and (g[0] == group or g[2] == group)),
                     None)
        if found is None and not group.isdigit():
            raise RootError("NOT_FOUND", f"unable to find group {group}: no matching "
                                         "entries in the image's /etc/group")
        gid = int(found[2]) if found is not None and found[2].isdigit() else int(group)
    login = entry[0] if entry is not None else ""
    extra = tuple(sorted({int(g[2]) for g in groups if len(g) >= 4 and g[2].isdigit()
                          and login and login in g[3].split(",")} | {gid}))
    return Identity(uid, gid, extra, home)
