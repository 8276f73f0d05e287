"""An image's layers applied in order into a staging tree, as root, against hostile archives.

tarfile's ``data`` filter cannot be used: images legitimately hold absolute symlinks
(``bin/sh -> /bin/busybox``), setuid files and owners other than root, all fine *inside* the
image: the VM is the boundary, and the tree is never used on the host (it lives in a 0700
directory until mkfs.ext4 has copied it). What must never happen is a write outside the tree.
So a member's path is split and checked (a leading ``/`` dropped, ``..`` refused), and every
directory on the way is opened beneath the previous one with O_NOFOLLOW: a symlink where a
directory is expected, from this layer or a lower one, is an error, never followed. Members
are made with *at() calls (O_EXCL for files) relative to that directory's fd.

OCI semantics: ``.wh.<name>`` removes ``name`` of lower layers, ``.wh..wh..opq`` empties its
directory of lower layers' entries; hardlinks point at entries already in the tree; device
nodes are skipped and counted (a guest has devtmpfs); FIFOs, owners, modes (setuid too) and
mtimes are kept; xattrs are not.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kata_ci.errors import ImagePullFailure

DEFAULT_MAX_BYTES = 16 << 30
DEFAULT_MAX_ENTRIES = 2_000_000
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20


@dataclass(frozen=True)
class Layer:
    path: Path  # the blob: tar, gzip'd tar or zstd'd tar
    digest: str  # sha256:... of the blob, checked while it is read


@dataclass
class UnpackStats:
    entries: int = 0
    bytes: int = 0  # file contents, as the archives declare them
    devices_skipped: int = 0
    others_skipped: int = 0  # types tar knows and an image has no use for (sockets, ...)


class Unsafe(Exception):
    """A member that would write outside the tree or through a link: the layer is refused."""


def unpack_layers(layers: Sequence[Layer], root: Path, *, label: str = "image",
                  max_bytes: int = DEFAULT_MAX_BYTES,
                  max_entries: int = DEFAULT_MAX_ENTRIES) -> UnpackStats:
    """Apply ``layers`` in order into ``root`` (an existing directory). ImagePullFailure,
    naming ``label`` and the layer, for a corrupt, unsafe or too large layer."""
    if os.geteuid() != 0:
        raise ImagePullFailure("unpacking an image needs root: its files keep their owners")
    stats = UnpackStats()
    root_fd = os.open(root, DIR_FLAGS)
    try:
        for layer in layers:
            _apply(_Tree(root_fd, stats, max_bytes, max_entries, label), layer)
    finally:
        os.close(root_fd)
    return stats


def _apply(tree: _Tree, layer: Layer) -> None:
    short, label = layer.digest[:19], tree.label
    try:
        with _tar_stream(layer) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            tree.apply_all(archive)
            while stream.read(CHUNK):  # to the end: gzip checks its CRC, the hash its bytes
                pass
    except Unsafe as exc:
        raise ImagePullFailure(f"{label}: layer {short} is unsafe: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, _Corrupt, ValueError,
            OverflowError) as exc:  # hostile headers: NUL bytes, huge times, bad encodings
        raise ImagePullFailure(f"{label}: corrupt layer {layer.digest}: {exc}") from None
    except OSError as exc:  # a full disk, or a name or link count the host refuses
        where = f" {exc.filename}" if exc.filename else ""
        raise ImagePullFailure(f"{label}: layer {short} cannot be unpacked on the host:{where} "
                               f"{exc.strerror or exc}") from None


class _Corrupt(Exception):
    """The blob's bytes are not what its digest says, or do not decompress."""


class _Hashing(io.RawIOBase):
    """A blob read through sha256; at its end the digest must be the layer's."""

    def __init__(self, handle: io.BufferedReader, digest: str) -> None:
        super().__init__()
        self.handle = handle
        self.digest = digest
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.handle.readinto(buffer)
        self.hash.update(memoryview(buffer)[:count])
        if count == 0 and "sha256:" + self.hash.hexdigest() != self.digest:
            raise _Corrupt(f"its content does not match its digest (sha256:"
                           f"{self.hash.hexdigest()[:12]}...)")
        return count


@contextlib.contextmanager
def _tar_stream(layer: Layer) -> Iterator[IO[bytes] | gzip.GzipFile]:
    """The layer's tar bytes, decompressed by what its first bytes say (a media type can lie)."""
    with layer.path.open("rb") as handle:
        magic = handle.read(4)
        handle.seek(0)
        raw = io.BufferedReader(_Hashing(handle, layer.digest), CHUNK)
        if magic.startswith(GZIP_MAGIC):
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped
        elif magic == ZSTD_MAGIC:
            with _zstd(layer) as unzstd:
                yield unzstd
        else:
            yield raw


@contextlib.contextmanager
def _zstd(layer: Layer) -> Iterator[IO[bytes]]:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise ImagePullFailure(f"layer {layer.digest[:19]}: zstd layers are not supported yet "
                               "(no zstd on the host: apt-get install zstd)")
    with layer.path.open("rb") as handle:  # hashed first: zstd reads the file itself
        raw = io.BufferedReader(_Hashing(handle, layer.digest), CHUNK)
        while raw.read(CHUNK):
            pass
    proc = subprocess.Popen([zstd, "-dcq", "--", str(layer.path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        yield proc.stdout
    except BaseException:
        proc.kill()  # the layer was refused: its exit says nothing more
        raise
    finally:
        proc.stdout.close()
        code = proc.wait()
    if code != 0:
        raise _Corrupt(f"zstd could not decompress it (exit {code})")


def split_name(name: str) -> tuple[str, ...]:
    """A member's path as components beneath the root: leading ``/`` and ``.`` dropped,
    ``..`` refused wherever it is (even where it would stay inside). A NUL byte fails later,
    in the first os call, as a ValueError: a corrupt layer."""
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise Unsafe(f"{name[:200]!r} leaves the image root (..)")
    return parts


@dataclass
class _Tree:
    """The staging root as a directory fd, and the layer being applied to it."""

    root_fd: int
    stats: UnpackStats
    max_bytes: int
    max_entries: int
    label: str
    created: set[tuple[str, ...]] = field(default_factory=set)  # by this layer: whiteouts spare
    dir_times: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    _cached: tuple[tuple[str, ...], int] | None = None  # the last parent opened (tars are sorted)

    def forget(self) -> None:
        """Drop the open parent: after anything was removed it may no longer be in the tree."""
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def apply_all(self, archive: tarfile.TarFile) -> None:
        try:
            while (info := archive.next()) is not None:
                self._count(info)
                self._member(info, archive)
                # tarfile keeps every member it read (millions, in some images): not needed.
                archive.members.clear()  # type: ignore[attr-defined]
            self._restore_dir_times()
        finally:
            self.forget()

    def _count(self, info: tarfile.TarInfo) -> None:
        self.stats.entries += 1
        self.stats.bytes += max(info.size, 0)
        if self.stats.entries > self.max_entries:
            raise ImagePullFailure(f"{self.label} is too large: more than {self.max_entries} "
                                   "entries")
        if self.stats.bytes > self.max_bytes:
            raise ImagePullFailure(f"{self.label} is too large: more than "
                                   f"{self.max_bytes >> 20} MiB unpacked")

    def parent(self, parts: tuple[str, ...], create: bool) -> int:
        """A borrowed fd of directory ``parts``, valid until the next call or removal."""
        if self._cached is not None and self._cached[0] == parts:
            return self._cached[1]
        self.forget()
        fd = self.open_dir(parts, create)
        self._cached = (parts, fd)
        return fd

    def open_dir(self, parts: tuple[str, ...], create: bool) -> int:
        """An fd of directory ``parts`` (the caller closes it), walked from the root one
        O_NOFOLLOW open at a time; missing ones are made (root's, 0755) if ``create``.
        Unsafe if one is a symlink or not a directory."""
        fd = os.dup(self.root_fd)
        for depth, name in enumerate(parts):
            fd = self._step(fd, name, create, parts[:depth + 1])  # closes the one it is given
        return fd

    def _step(self, fd: int, name: str, create: bool, where: tuple[str, ...]) -> int:
        try:
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o700, dir_fd=fd)
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.fchmod(child, 0o755)  # mkdir's mode went through the umask
                self.created.add(where)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Unsafe(f"{'/'.join(where)} is a symlink or a file where a directory is "
                             "needed (never followed)") from None
            raise
        finally:
            os.close(fd)
        return child

    def _member(self, info: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        parts = split_name(info.name)
        if not parts:  # the root itself ("./"): its owner, mode and time
            if info.isdir():
                self._own(self.root_fd, info)
                self.dir_times.append(((), int(info.mtime)))
            return
        leaf = parts[-1]
        if leaf.startswith(WHITEOUT):
            self._whiteout(parts)
            return
        if info.ischr() or info.isblk():
            self.stats.devices_skipped += 1
            return
        if not (info.isreg() or info.isdir() or info.issym() or info.islnk() or info.isfifo()):
            self.stats.others_skipped += 1
            return
        if not (0 <= info.uid < 0xFFFFFFFF and 0 <= info.gid < 0xFFFFFFFF):
            raise Unsafe(f"{info.name[:200]!r} has an owner out of range")
        source = self._link_source(info) if info.islnk() else ()
        if info.islnk() and source == parts:
            return  # a link to itself: the file is already there
        for depth in range(1, len(parts) + 1):
            self.created.add(parts[:depth])
        pfd = self.parent(parts[:-1], create=True)
        existing = _lstat(leaf, pfd)
        if info.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                self._remove(leaf, pfd, existing)
                os.mkdir(leaf, 0o700, dir_fd=pfd)
            self.dir_times.append((parts, int(info.mtime)))
            fd = os.open(leaf, DIR_FLAGS, dir_fd=pfd)
            try:
                self._own(fd, info)
            finally:
                os.close(fd)
            return
        self._remove(leaf, pfd, existing)
        pfd = self.parent(parts[:-1], create=True)  # removing a directory forgot the cache
        if info.isreg():
            self._file(info, archive, leaf, pfd)
        elif info.issym():
            os.symlink(info.linkname, leaf, dir_fd=pfd)  # verbatim: /bin/busybox is fine
            os.chown(leaf, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(leaf, ns=_ns(info), dir_fd=pfd, follow_symlinks=False)
        elif info.islnk():
            src_fd = self.open_dir(source[:-1], create=False)
            try:
                os.link(source[-1], leaf, src_dir_fd=src_fd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            finally:
                os.close(src_fd)
        else:  # FIFO
            os.mkfifo(leaf, 0o600, dir_fd=pfd)
            os.chown(leaf, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
            # chmod by name: it is the FIFO just made, in a tree only root can write to.
            os.chmod(leaf, stat.S_IMODE(info.mode), dir_fd=pfd)
            os.utime(leaf, ns=_ns(info), dir_fd=pfd, follow_symlinks=False)

    def _link_source(self, info: tarfile.TarInfo) -> tuple[str, ...]:
        """The hardlink's target beneath the root, which must be a non-directory already
        there (from this layer or a lower one)."""
        source = split_name(info.linkname)
        found = None
        with contextlib.suppress(FileNotFoundError):
            found = _lstat(source[-1], self.parent(source[:-1], create=False)) if source else None
        if found is None or stat.S_ISDIR(found.st_mode):
            raise Unsafe(f"hardlink {info.name[:200]!r} points at {info.linkname[:200]!r}, "
                         "which is not a file in the image")
        return source

    def _file(self, info: tarfile.TarInfo, archive: tarfile.TarFile, leaf: str,
              pfd: int) -> None:
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=pfd)
        try:
            source = archive.extractfile(info)
            if source is not None:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    shutil.copyfileobj(source, out, CHUNK)
            self._own(fd, info)
            os.utime(fd, ns=_ns(info))
        finally:
            os.close(fd)

    def _own(self, fd: int, info: tarfile.TarInfo) -> None:
        os.fchown(fd, info.uid, info.gid)
        os.fchmod(fd, stat.S_IMODE(info.mode))  # after chown, which clears setuid

    def _remove(self, leaf: str, pfd: int, existing: os.stat_result | None) -> None:
        if existing is None:
            return
        if not stat.S_ISDIR(existing.st_mode):
            os.unlink(leaf, dir_fd=pfd)
            return
        try:
            shutil.rmtree(leaf, dir_fd=pfd)  # fd-based: never follows a link inside either
        finally:
            self.forget()  # pfd may be the cached fd: callers fetch their parent again

    def _whiteout(self, parts: tuple[str, ...]) -> None:
        folder, leaf = parts[:-1], parts[-1]
        try:
            pfd = self.parent(folder, create=False)
        except FileNotFoundError:
            return  # nothing below to hide
        if leaf == OPAQUE:
            self._clear_lower(folder)
            return
        name = leaf[len(WHITEOUT):]
        if name.startswith(WHITEOUT) or name in ("", ".", ".."):
            return  # aufs' own bookkeeping (.wh..wh.plnk, ...): not an entry
        if (*folder, name) in self.created:
            return  # whiteouts hide lower layers only
        self._remove(name, pfd, _lstat(name, pfd))

    def _clear_lower(self, folder: tuple[str, ...]) -> None:
        """Remove what lower layers put in ``folder``; this layer's entries stay (and the
        lower contents of a directory this layer also has are cleared in turn)."""
        for name in os.listdir(self.parent(folder, create=False)):
            pfd = self.parent(folder, create=False)  # again: a removal forgets it
            found = _lstat(name, pfd)
            if (*folder, name) not in self.created:
                self._remove(name, pfd, found)
            elif found is not None and stat.S_ISDIR(found.st_mode):
                self._clear_lower((*folder, name))

    def _restore_dir_times(self) -> None:
        """Directory mtimes last: creating their entries moved them."""
        for parts, mtime in reversed(self.dir_times):
            try:
                fd = self.parent(parts, create=False)
            except (FileNotFoundError, Unsafe):
                continue  # removed or replaced later in the same layer
            os.utime(fd, ns=(mtime * 10**9, mtime * 10**9))


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    with contextlib.suppress(FileNotFoundError):
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    return None


def _ns(info: tarfile.TarInfo) -> tuple[int, int]:
    return int(info.mtime) * 10**9, int(info.mtime) * 10**9
