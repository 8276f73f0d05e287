"""A GitLab job's artifacts and caches: collected from its workspace, extracted into one.

After a job every name in its workspace is hostile (links to host files, fifos, devices,
sparse files, links where directories were), so nothing here follows a link, not even one
staying inside (core.beneath follows those): directories are opened one component at a time
with O_NOFOLLOW, links are archived as links, only regular files are opened (seen through
O_PATH first) and reads are bounded. An archive to extract is hostile too (another job made
it): no member climbs out, is written through what is there, or is a device; members and
unpacked bytes are bounded before anything is written. Patterns are gitlab-runner's
(commands/helpers/file_archiver.go): doublestar, a matched directory taken whole, `exclude`
tried on every path taken (so excluding a directory leaves its contents, as in GitLab).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import stat
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Protocol

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.gitlab_runner.selection import (
    Entry,
    Warn,
    entries,
    kind_of,
    open_dir,
    shown,
    size_text,
)
from kata_ci.runner.queue.workspace import _copy, _replace

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_LINK = 4095  # PATH_MAX - 1: anything longer is not a link target
_EXTENDED_TIME = 0x5455  # Info-ZIP's extended timestamp: gitlab-runner writes and reads it





def _open_file(entry: Entry, budget: int, max_bytes: int, say: Warn) -> int | None:
    """A readable descriptor for a regular file, if it still is the one listed: it is looked
    at through O_PATH first, so a fifo or device swapped in is never opened."""
    rel, parent, name, info = entry
    if stat.S_ISREG(info.st_mode) and info.st_size > budget:
        raise UserError(f"the files to archive hold more than {size_text(max_bytes)} (at "
                        f"{shown(rel)}; sparse files count in full)")
    if stat.S_ISREG(info.st_mode):
        pathfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            now = os.fstat(pathfd)
            if stat.S_ISREG(now.st_mode) and (now.st_dev, now.st_ino) == (info.st_dev,
                                                                        info.st_ino):
                return os.open(f"/proc/self/fd/{pathfd}",
                               os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        finally:
            os.close(pathfd)
    say(f"{shown(rel)}: not a regular file; left out")
    return None


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _copy_out(src: BinaryIO, sink: _Sink, size: int) -> int:
    """At most ``size`` bytes (the size listed: a file growing meanwhile is cut there)."""
    done = 0
    while done < size and (chunk := src.read(min(CHUNK, size - done))):
        sink.write(chunk)
        done += len(chunk)
    return done


def _zipinfo(name: str, info: os.stat_result) -> zipfile.ZipInfo:
    mtime = min(max(int(info.st_mtime), 0), 0xFFFFFFFF)
    stamp = time.localtime(mtime)[:6]
    zinfo = zipfile.ZipInfo(name, stamp if 1980 <= stamp[0] <= 2107 else (1980, 1, 1, 0, 0, 0))
    zinfo.create_system = 3  # Unix: the high half of external_attr is st_mode
    zinfo.external_attr = (stat.S_IFMT(info.st_mode) | info.st_mode & 0o777) << 16
    zinfo.extra = struct.pack("<HHBI", _EXTENDED_TIME, 5, 1, mtime)
    return zinfo


def write_zip(root: Path, files: Sequence[str], out: BinaryIO, max_bytes: int,
              warn: Warn | None = None) -> int:
    """``files`` (from collect) as a zip as gitlab-runner writes one: links as links (the
    target as content), modes and mtimes kept. The bytes of file content written; UserError
    past ``max_bytes``."""
    say, total = warn or log.warning, 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive, \
            beneath.opened_root(root) as rootfd:
        for entry in entries(rootfd, files, say):
            rel, parent, name, info = entry
            if stat.S_ISDIR(info.st_mode):
                zinfo = _zipinfo(rel + "/", info)
                zinfo.external_attr |= 0x10  # the MS-DOS directory bit, as Go's zip sets it
                archive.writestr(zinfo, b"")
            elif stat.S_ISLNK(info.st_mode):
                archive.writestr(_zipinfo(rel, info), os.readlink(name, dir_fd=parent))
            elif (fd := _open_file(entry, max_bytes - total, max_bytes, say)) is not None:
                zinfo = _zipinfo(rel, info)
                zinfo.compress_type, zinfo.file_size = zipfile.ZIP_DEFLATED, info.st_size
                with open(fd, "rb") as src, archive.open(zinfo, "w") as sink:
                    total += _copy_out(src, sink, info.st_size)
    return total


def write_gzip(root: Path, files: Sequence[str], out: BinaryIO, max_bytes: int,
               warn: Warn | None = None) -> int:
    """`artifact_format: gzip`: a gzip member per regular file, concatenated, each header
    naming its file (the base name, as gitlab-runner's). The bytes of content written."""
    say, total = warn or log.warning, 0
    with beneath.opened_root(root) as rootfd:
        for entry in entries(rootfd, files, say):
            if (fd := _open_file(entry, max_bytes - total, max_bytes, say)) is not None:
                with open(fd, "rb") as src, gzip.GzipFile(
                        filename=entry[0], mode="wb", fileobj=out,
                        mtime=int(entry[3].st_mtime)) as member:
                    total += _copy_out(src, member, entry[3].st_size)
    return total


def write_raw(root: Path, files: Sequence[str], out: BinaryIO, max_bytes: int,
              warn: Warn | None = None) -> int:
    """`artifact_format: raw`: the bytes of exactly one regular file; anything else is a
    UserError (``warn``, never called, keeps the writers' signatures alike)."""
    if len(files) != 1:
        raise UserError(f"artifact_format raw takes exactly one file; the paths match "
                        f"{len(files)}")
    problems: list[str] = []
    with beneath.opened_root(root) as rootfd:
        for entry in entries(rootfd, files, problems.append):
            if (fd := _open_file(entry, max_bytes, max_bytes, problems.append)) is not None:
                with open(fd, "rb") as src:
                    return _copy_out(src, out, entry[3].st_size)
    raise UserError(problems[0])


def _mtime(member: zipfile.ZipInfo) -> float:
    """The extended timestamp (UTC) when there is one, else the DOS time (local)."""
    extra, i = member.extra, 0
    while i + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, i)
        if kind == _EXTENDED_TIME and size >= 5 and i + 9 <= len(extra) and extra[i + 4] & 1:
            return float(struct.unpack_from("<I", extra, i + 5)[0])
        i += 4 + size
    try:
        return time.mktime((*member.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return 0.0


def _member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, rootfd: int, budget: int,
            dirs: list[tuple[list[str], int, float]], say: Warn) -> int:
    """Create one member beneath ``rootfd``; the bytes written (at most ``budget``)."""
    name = member.filename
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or "\x00" in name or not parts:
        say(f"{shown(name)}: a name leaving the directory; skipped")
        return 0
    if parts[0] == ".git":  # the checkout's own: another job's must not reach host git
        say(f"{shown(name)}: inside .git; skipped")
        return 0
    mode = member.external_attr >> 16 if member.create_system == 3 else 0
    kind = "dir" if member.is_dir() else kind_of(mode) if stat.S_IFMT(mode) else "file"
    if kind == "other" or member.flag_bits & 1 or member.compress_type not in (
            zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # A device or fifo has no place in a workspace; zipfile cannot bound the memory
        # bzip2 or lzma take; an encrypted member has no password.
        say(f"{shown(name)}: not a plain file, directory or link; skipped")
        return 0
    parent = open_dir(rootfd, parts if kind == "dir" else parts[:-1], make=True)
    try:
        if kind == "dir":
            dirs.append((parts, (mode & 0o777 or 0o755) | 0o700, _mtime(member)))
            return 0
        last = parts[-1]
        with suppress(FileNotFoundError):
            if stat.S_ISDIR(os.stat(last, dir_fd=parent, follow_symlinks=False).st_mode):
                say(f"{shown(name)}: would replace a directory; skipped")
                return 0
        if kind == "link":
            target = os.fsdecode(archive.read(member)) if member.file_size <= MAX_LINK else ""
            if not target or "\x00" in target:
                say(f"{shown(name)}: a link without a usable target; skipped")
                return 0
            _replace(parent, last)
            os.symlink(target, last, dir_fd=parent)  # verbatim: no host code follows it
            return 0
        _replace(parent, last)  # unlinked, not written through (a link, a hard link)
        try:
            with archive.open(member) as src:
                return _copy(src, parent, last, mode & 0o777 or 0o644, _mtime(member), budget)
        except BaseException:
            with suppress(OSError):  # a damaged member leaves no half-written file
                os.unlink(last, dir_fd=parent)
            raise
    finally:
        os.close(parent)


def extract_zip(data: BinaryIO | Path, into: Path, max_bytes: int, max_members: int,
                warn: Warn | None = None) -> list[str]:
    """Extract a zip (artifacts, a cache) over the directory ``into``; the warnings (each
    also given to ``warn``). A later member replaces an earlier one or what was there, but
    not a directory. UserError for a damaged archive or one past the bounds, which are
    checked before anything is written: zipfile never yields more than a member states."""
    warnings: list[str] = []

    def say(message: str) -> None:
        warnings.append(message)
        if warn:
            warn(message)

    try:
        with zipfile.ZipFile(data) as archive, beneath.opened_root(into) as rootfd:
            members = archive.infolist()
            if len(members) > max_members:
                raise UserError(f"archive has {len(members)} members, over the limit of "
                                f"{max_members}")
            if sum(m.file_size for m in members) > max_bytes:
                raise UserError(f"archive unpacks to more than {size_text(max_bytes)}")
            written = 0
            dirs: list[tuple[list[str], int, float]] = []
            for member in members:
                written += _member(archive, member, rootfd, max_bytes - written, dirs, say)
            for parts, mode, mtime in reversed(dirs):  # after their contents, as unzip does
                with suppress(OSError):  # no longer a directory: nothing to set
                    fd = open_dir(rootfd, parts)
                    try:
                        os.fchmod(fd, mode)
                        os.utime(fd, (mtime, mtime))
                    finally:
                        os.close(fd)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError) as exc:
        raise UserError(f"archive is damaged: {exc}") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError("archive does not fit on the disk") from None
        raise UserError(f"archive cannot be extracted: {exc.strerror}") from None
    return warnings


def cache_path(cache_root: Path, project_id: int, key: str) -> Path:
    """Where a project's cache ``key`` lives: the key is job-made text, hashed, never a path
    component."""
    if isinstance(project_id, bool) or not isinstance(project_id, int) or project_id < 0:
        raise UserError(f"cache: project id {project_id!r} is not valid")
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return cache_root / str(project_id) / f"{digest}.zip"


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """A file written whole or not at all: a temporary file next to ``path``, synced and
    renamed over it on success, removed on error (no reader sees half a cache)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)  # so that the rename survives a crash
    finally:
        os.close(dirfd)
