"""A job's workspace on its way through the queue: packed by `submit`, unpacked by the worker.

The checkout travels as tar.gz in Redis, uncommitted changes included, as `kata-ci run` would
see it; no git server is needed. A checkout that earlier jobs wrote to is hostile input on
both ends, so both are bounded by what the files hold once unpacked (a 4 GiB sparse file
packs to a few MiB), not by the archive's size:

- pack never follows a link (links travel as links), never opens a fifo, socket or device
  (they are left out), stores no owner, setuid bit or device number;
- unpack writes only beneath its directory (every path resolved there, links leaving it
  refused, tarfile's "data" filter on top), counts the bytes it writes and the members it
  creates and stops at the bounds, reads at most a bounded amount of header per member, and
  never restores setuid bits, owners or device nodes.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import pwd
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from kata_ci import tarsafe
from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.core.config import QueueConfig

MAX_WORKSPACE = 256 << 20  # the packed size: Redis is not flooded
HEADER_LIMIT = 1 << 20  # tar stream a member's headers may take (pax names, xattrs...)
CHUNK = 1 << 20


@dataclass(frozen=True)
class Bounds:
    """Unpacked bytes (sparse files counted in full) and members (files, links, dirs)."""

    max_bytes: int = 1 << 30
    max_members: int = 100_000

    @classmethod
    def of(cls, queue: QueueConfig) -> Bounds:
        return cls(queue.unpack_limit_mib << 20, queue.unpack_max_members)


def pack(directory: Path, bounds: Bounds = Bounds()) -> bytes:
    """The workspace as tar.gz. Refused over the bounds (unpacked) or MAX_WORKSPACE
    (packed); fifos, sockets and devices are left out."""
    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=3) as tar, \
                beneath.opened_root(directory) as root:
            _pack_into(tar, root, directory, bounds)
    except OSError as exc:
        raise UserError(f"workspace {directory}: {exc}") from None
    data = buffer.getvalue()
    if len(data) > MAX_WORKSPACE:
        raise UserError(f"workspace {directory} packs to {len(data) >> 20} MiB, over the "
                        f"{MAX_WORKSPACE >> 20} MiB limit")
    return data


def _pack_into(tar: tarfile.TarFile, root: int, directory: Path, bounds: Bounds) -> None:
    total = members = 0
    for entry in beneath.walk(root):
        mode = entry.info.st_mode
        info = tarfile.TarInfo(entry.rel)
        info.mode, info.mtime = stat.S_IMODE(mode) & 0o777, int(entry.info.st_mtime)
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(entry.name, dir_fd=entry.dirfd)
        elif not stat.S_ISREG(mode):
            continue  # nothing a job needs, and opening one could block or act
        members += 1
        if members > bounds.max_members:
            raise UserError(f"workspace {directory}: more than {bounds.max_members} files, "
                            "directories and links (queue.unpack_max_members)")
        if not stat.S_ISREG(mode):
            tar.addfile(info)
            continue
        total += entry.info.st_size
        if total > bounds.max_bytes:
            raise UserError(f"workspace {directory}: its files hold more than "
                            f"{bounds.max_bytes >> 20} MiB unpacked (sparse files count in "
                            f"full; queue.unpack_limit_mib), at {entry.rel}")
        _add_file(tar, info, entry)


def _add_file(tar: tarfile.TarFile, info: tarfile.TarInfo, entry: beneath.Entry) -> None:
    try:
        fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=entry.dirfd)
    except OSError as exc:
        raise UserError(f"{entry.rel}: {exc.strerror}") from None
    with open(fd, "rb") as handle:
        now = os.fstat(fd)
        if (now.st_ino, now.st_dev) != (entry.info.st_ino, entry.info.st_dev) \
                or now.st_size != entry.info.st_size:
            raise UserError(f"{entry.rel}: changed while the workspace was packed")
        info.size = now.st_size
        try:
            tar.addfile(info, handle)
        except OSError as exc:  # shrank while being read
            raise UserError(f"{entry.rel}: changed while the workspace was packed "
                            f"({exc})") from None


class _Metered:
    """The decompressed tar stream, of which tarfile may read only what was allowed: a
    header cannot claim a gigabyte of memory, data cannot exceed the member's size."""

    def __init__(self, raw: gzip.GzipFile) -> None:
        self.raw = raw
        self.left = HEADER_LIMIT  # tarfile reads the first header when it opens

    def allow(self, count: int) -> None:
        self.left = count

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(CHUNK if size < 0 else size)
        self.left -= len(data)
        if self.left < 0:
            raise UserError("workspace archive: a header or member larger than it may be")
        return data


def unpack(data: bytes, into: Path, bounds: Bounds = Bounds()) -> None:
    """Extract a packed workspace into the (empty) directory ``into``; UserError on a
    damaged or hostile archive or past the bounds, with what was written left in place."""
    stream = _Metered(gzip.GzipFile(fileobj=io.BytesIO(data)))
    written, members = 0, 0
    dirs: list[tuple[str, int, float]] = []
    try:
        with tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|") as tar, \
                beneath.opened_root(into) as root:
            while True:
                stream.allow(HEADER_LIMIT)
                member = tar.next()
                if member is None:
                    break
                members += 1
                if members > bounds.max_members:
                    raise UserError(f"workspace archive: more than {bounds.max_members} "
                                    "members (queue.unpack_max_members)")
                member = _filtered(member, into)
                if member.isreg() and written + member.size > bounds.max_bytes:
                    raise _too_big(bounds)
                stream.allow(member.size + HEADER_LIMIT)
                written += _extract(tar, member, root, bounds.max_bytes - written, dirs)
            for rel, mode, mtime in reversed(dirs):  # after their contents, as tar does
                fd = beneath.open_fd(root, rel, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fchmod(fd, mode)
                    os.utime(fd, (_time(mtime), _time(mtime)))
                finally:
                    os.close(fd)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserError(f"workspace archive is damaged: {exc}") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError("workspace archive does not fit in the workspace quota") from None
        raise UserError(f"workspace archive: {exc.strerror}: {_name(exc.filename)}") from None


def _too_big(bounds: Bounds) -> UserError:
    return UserError(f"workspace archive: more than {bounds.max_bytes >> 20} MiB unpacked "
                     "(queue.unpack_limit_mib)")


def _name(value: object) -> str:
    return repr(str(value)[:200])


def _filtered(member: tarfile.TarInfo, into: Path) -> tarfile.TarInfo:
    """tarfile's data filter (no absolute or escaping names, no links out, no devices,
    no setuid, no owners), then our own check of the name."""
    try:
        member = tarsafe.data_filter(member, str(into))
    except tarsafe.Refused as exc:
        raise UserError(f"workspace archive refused: {exc}") from None
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UserError(f"workspace archive refused: {_name(member.name)} climbs out")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise UserError(f"workspace archive refused: {_name(member.name)} is not a file, "
                        "directory or link")
    return member


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, root: int, budget: int,
             dirs: list[tuple[str, int, float]]) -> int:
    """Create one member beneath ``root``; the bytes written (at most ``budget``)."""
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if not parts:
        return 0  # the root itself
    rel, name = "/".join(parts), parts[-1]
    parent = _makedirs(root, parts[:-1])
    try:
        if member.isdir():
            _replace(parent, name, directory=True)
            dirs.append((rel, (member.mode or 0o755) & 0o755 | 0o700, member.mtime))
            return 0
        if member.issym():
            target = member.linkname
            if target.startswith("/") or os.path.normpath(
                    os.path.join(os.path.dirname(rel), target)).split("/")[0] == "..":
                raise UserError(f"workspace archive refused: link {_name(rel)} leaves it")
            _replace(parent, name)
            os.symlink(target, name, dir_fd=parent)
            return 0
        # A hard link becomes a copy: nothing in the workspace shares an inode with another
        # path (nor is counted once for two files).
        src: IO[bytes] = open(beneath.open_read(root, member.linkname), "rb") \
            if member.islnk() else tar.extractfile(member) or io.BytesIO()  # noqa: SIM115
        with src:
            _replace(parent, name)
            return _copy(src, parent, name, (member.mode or 0o644) & 0o755, member.mtime,
                         budget)
    finally:
        os.close(parent)


def _makedirs(root: int, parts: list[str]) -> int:
    """The directory ``parts`` beneath ``root`` (made as needed; links in it followed only
    while they stay beneath), as an O_PATH descriptor."""
    here = beneath.open_fd(root, ".", os.O_PATH | os.O_DIRECTORY)
    for depth, part in enumerate(parts, 1):
        try:
            os.mkdir(part, 0o700, dir_fd=here)
        except FileExistsError:
            pass
        finally:
            os.close(here)
        here = beneath.open_fd(root, "/".join(parts[:depth]), os.O_PATH | os.O_DIRECTORY)
    return here


def _replace(parent: int, name: str, directory: bool = False) -> None:
    """Make room for ``name``: a later member replaces an earlier one, never a directory."""
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        if directory:
            os.mkdir(name, 0o700, dir_fd=parent)
        return
    if stat.S_ISDIR(info.st_mode):
        if not directory:
            raise UserError(f"workspace archive refused: {_name(name)} replaces a directory")
        return
    os.unlink(name, dir_fd=parent)
    if directory:
        os.mkdir(name, 0o700, dir_fd=parent)


def _copy(src: IO[bytes], parent: int, name: str, mode: int, mtime: float,
          budget: int) -> int:
    """Write ``src`` to a new file, counting what is written: never more than ``budget``.
    Runs of zeros become holes, so the disk holds what the data needs."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=parent)
    written = 0
    try:
        while chunk := src.read(CHUNK):
            if written + len(chunk) > budget:
                raise UserError("workspace archive: more unpacked bytes than allowed "
                                "(queue.unpack_limit_mib)")
            if chunk.count(0) == len(chunk):
                os.lseek(fd, len(chunk), os.SEEK_CUR)
            else:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            written += len(chunk)
        os.ftruncate(fd, written)
        os.fchmod(fd, mode)
        os.utime(fd, (_time(mtime), _time(mtime)))
    finally:
        os.close(fd)
    return written


def _time(mtime: float) -> float:
    """A header's mtime, or the epoch when it is out of what the host can store."""
    return mtime if 0 <= mtime < 1 << 33 else 0.0


SERVICE_USER = "kata-ci"  # executors/qemu/confine.py: the VMs' own unprivileged identity


def hand_over(root: Path) -> None:
    """A worker (root) gives a freshly unpacked workspace to the kata-ci user, so its file
    server runs as that user, not as root (the file server runs as the workspace's owner).
    Runs before any job saw the files: nothing here can be a link the job planted."""
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return  # the VM start says what is missing
    os.lchown(root, entry.pw_uid, entry.pw_gid)
    for parent, dirs, files in os.walk(root, followlinks=False):
        for name in (*dirs, *files):
            os.lchown(os.path.join(parent, name), entry.pw_uid, entry.pw_gid)
