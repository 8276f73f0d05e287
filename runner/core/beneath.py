"""Host-side access to files beneath a workspace the job controls.

A job may replace any file of its workspace with a symbolic link (to /etc/shadow, to a
fifo, to a 4 GiB sparse file) before the host reads it. Everything the host reads or writes
inside a workspace goes through here: a path is resolved beneath the root, links that stay
beneath are followed, an absolute link or a `..` that climbs out is refused, non-regular
files are never opened for reading, and reads are bounded. Errors name the path relative to
the workspace, never what a link points to or what the target holds.

openat2(2) with RESOLVE_BENEATH does the resolution in the kernel (Linux >= 5.6); without
it each component is opened with O_NOFOLLOW from its parent's descriptor and links are
resolved here, with the same rules.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

from kata_ci.errors import UserError

MAX_READ = 4 << 20  # CI files are small; a job cannot make the host read 4 GiB into memory
MAX_LINKS = 40  # as the kernel's own limit on links followed in one lookup
MAX_DEPTH = 256  # directory nesting walked by glob and pack

_SYS_OPENAT2 = 437  # the same number on every architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_MAGIC = set("*?[")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class Escape(UserError):
    """A path or symbolic link that leaves the workspace."""


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                     ctypes.c_size_t]
# None: not probed yet. Tests set it to False to run the fallback on a kernel that has it.
use_openat2: bool | None = None


def _openat2(dirfd: int, path: str, flags: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    for _ in range(8):  # EAGAIN: a rename raced with a `..`; the kernel asks to retry
        fd = _syscall(_SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how),
                      ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def _have_openat2() -> bool:
    global use_openat2
    if use_openat2 is None:
        try:
            os.close(_openat2(-100, ".", os.O_PATH))  # AT_FDCWD
            use_openat2 = True
        except OSError as exc:  # ENOSYS: old kernel; EPERM: a seccomp filter refusing it
            use_openat2 = exc.errno not in (errno.ENOSYS, errno.EPERM)
    return use_openat2


def _parts(rel: str | PurePath) -> list[str]:
    return [p for p in str(rel).split("/") if p not in ("", ".")]


def _shown(rel: str | PurePath) -> str:
    return "/".join(_parts(rel)) or "."


def _escape(rel: str | PurePath) -> Escape:
    path = os.path.normpath(str(rel))
    if str(rel).startswith("/") or path == ".." or path.startswith("../"):
        return Escape(f"{_shown(rel)}: a path leaving the workspace")
    return Escape(f"{_shown(rel)}: a symbolic link leaving the workspace")


def _fallback(rootfd: int, rel: str, flags: int) -> int:
    """Component by component from the root: O_NOFOLLOW opens, links resolved by hand
    (relative targets only), `..` pops the chain of directories opened so far."""
    if str(rel).startswith("/"):
        raise OSError(errno.EXDEV, "absolute path", rel)
    pending = _parts(rel)
    chain = [os.dup(rootfd)]
    links = 0
    final = False  # whether chain[-1] was opened with ``flags``
    try:
        while pending:
            name = pending.pop(0)
            if name == "..":
                if len(chain) == 1:
                    raise OSError(errno.EXDEV, "leaves the root", rel)
                os.close(chain.pop())
                final = False
                continue
            here = chain[-1]
            info = os.stat(name, dir_fd=here, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                target = os.readlink(name, dir_fd=here)
                if target.startswith("/"):
                    raise OSError(errno.EXDEV, "absolute link", rel)
                pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
                continue
            last = not pending
            if not last and not stat.S_ISDIR(info.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
            fd = os.open(name, (flags if last else os.O_PATH | os.O_DIRECTORY)
                         | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                os.close(fd)  # swapped between the stat and the open
                raise OSError(errno.EAGAIN, "changed while being opened", rel)
            chain.append(fd)
            final = last
        if final:
            return os.dup(chain[-1])
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=chain[-1])  # "." or ending in ".."
    finally:
        for fd in chain:
            os.close(fd)


def open_fd(rootfd: int, rel: str | PurePath, flags: int = os.O_PATH) -> int:
    """A descriptor for ``rel`` resolved beneath ``rootfd``. OSError as the kernel says it,
    except an escape, which is an Escape (UserError)."""
    path = "/".join(_parts(rel)) or "."
    if str(rel).startswith("/"):
        raise _escape(rel)
    try:
        if _have_openat2():
            return _openat2(rootfd, path, flags)
        return _fallback(rootfd, path, flags)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise _escape(rel) from None
        raise


def _failed(rel: str | PurePath, exc: OSError) -> UserError:
    if exc.errno == errno.ENOENT:
        return UserError(f"{_shown(rel)}: no such file in the workspace")
    if exc.errno == errno.ELOOP:
        return UserError(f"{_shown(rel)}: too many levels of symbolic links")
    return UserError(f"{_shown(rel)}: {exc.strerror}")


@contextmanager
def opened_root(root: Path) -> Iterator[int]:
    """The workspace root as a directory descriptor (the root itself is the user's choice
    and is followed)."""
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"workspace {root}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _reopen(pathfd: int, label: str) -> int:
    """A readable descriptor for a regular file held as O_PATH: a fifo, device or socket is
    never opened (a fifo would block the host, a device open can have effects)."""
    info = os.fstat(pathfd)
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise UserError(f"{label}: {kind}")
    try:  # the same inode, not a new lookup: nothing can be swapped in between
        return os.open(f"/proc/self/fd/{pathfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise UserError(f"{label}: cannot be read safely without /proc") from None


def open_read(rootfd: int, rel: str | PurePath) -> int:
    """A readable descriptor for the regular file ``rel`` beneath ``rootfd``; UserError for
    an escape, a missing or non-regular file."""
    try:
        pathfd = open_fd(rootfd, rel)
    except OSError as exc:
        raise _failed(rel, exc) from None
    try:
        return _reopen(pathfd, _shown(rel))
    except OSError as exc:
        raise _failed(rel, exc) from None
    finally:
        os.close(pathfd)


def read_fd(fd: int, label: str, limit: int) -> bytes:
    """At most ``limit`` bytes; UserError beyond (checked before reading, and while reading
    in case the file grows)."""
    too_big = UserError(f"{label}: larger than {limit} bytes, the limit for a file the "
                        "host reads from a workspace")
    if os.fstat(fd).st_size > limit:
        raise too_big
    chunks, total = [], 0
    while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise too_big
    return b"".join(chunks)


def read_bytes(root: Path, rel: str | PurePath, limit: int = MAX_READ) -> bytes:
    with opened_root(root) as rootfd:
        fd = open_read(rootfd, rel)
        try:
            return read_fd(fd, _shown(rel), limit)
        finally:
            os.close(fd)


def read_text(root: Path, rel: str | PurePath, limit: int = MAX_READ) -> str:
    return _decode(read_bytes(root, rel, limit), _shown(rel))


def _decode(data: bytes, label: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise UserError(f"{label}: not UTF-8 text (byte {exc.start})") from None


def exists(root: Path, rel: str | PurePath) -> bool:
    """Whether ``rel`` resolves to something beneath the root; False when missing (a
    dangling link inside included); Escape when it leaves."""
    with opened_root(root) as rootfd:
        try:
            os.close(open_fd(rootfd, rel))
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise _failed(rel, exc) from None
    return True


def listdir(root: Path, rel: str | PurePath) -> list[str]:
    """Names in the directory ``rel`` (empty if it does not exist)."""
    with opened_root(root) as rootfd:
        try:
            fd = open_fd(rootfd, rel, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _failed(rel, exc) from None
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)


def relative(root: Path, path: Path) -> str | None:
    """``path`` (as a user named it) relative to the workspace when it lies inside it,
    lexically or once its directory is resolved; None when it is outside."""
    absolute = Path(os.path.abspath(path))
    if absolute.is_relative_to(root):
        return str(absolute.relative_to(root))
    try:
        resolved = absolute.parent.resolve() / absolute.name
    except (OSError, RuntimeError):  # a loop: not a way into the workspace
        return None
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else None


def read_named(root: Path, path: Path, limit: int = MAX_READ) -> str:
    """A file the user named (--gitlab-ci, --workflow, --env-file): beneath the workspace
    when it is in it; otherwise the user's own file (read_user_file)."""
    rel = relative(root, path)
    return read_text(root, rel, limit) if rel is not None else read_user_file(path, limit)


def read_user_file(path: Path, limit: int = MAX_READ) -> str:
    """A file outside any workspace, links followed as the user made them; still bounded
    and regular files only."""
    try:
        pathfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            fd = _reopen(pathfd, str(path))
        finally:
            os.close(pathfd)
        try:
            return _decode(read_fd(fd, str(path), limit), str(path))
        finally:
            os.close(fd)
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None


def glob(root: Path, pattern: str) -> list[str]:
    """Paths (relative, sorted) matching ``pattern``: `*`, `?`, `[..]` within a component,
    `**` for any number of directories. Directory links are not descended by `**`; links
    in other positions only when they stay beneath. Matches may be links: read them with
    read_bytes, which refuses those leaving the workspace."""
    parts = _parts(pattern)
    if not parts:
        return []
    if not any(_MAGIC & set(p) for p in parts):
        return ["/".join(parts)] if exists(root, "/".join(parts)) else []
    found: set[str] = set()
    with opened_root(root) as rootfd:
        _match(rootfd, open_fd(rootfd, ".", os.O_RDONLY | os.O_DIRECTORY), "", parts, found, 0)
    return sorted(found, key=lambda rel: rel.split("/"))  # pathlib's order


def _match(rootfd: int, dirfd: int, prefix: str, parts: list[str], found: set[str],
           depth: int) -> None:
    """Match ``parts`` in the directory ``dirfd`` (closed here), whose path is ``prefix``."""
    if depth > MAX_DEPTH:
        os.close(dirfd)
        raise UserError(f"{prefix}: directories nest deeper than {MAX_DEPTH}")
    try:
        head, rest = parts[0], parts[1:]
        entries = _entries(dirfd)
        if head == "**":
            if rest:
                _match(rootfd, os.dup(dirfd), prefix, rest, found, depth + 1)
            for name, mode in entries:
                if not rest:
                    found.add(prefix + name)
                if stat.S_ISDIR(mode):  # a real directory, never a link
                    _match(rootfd, _subdir(dirfd, name), f"{prefix}{name}/", parts, found,
                           depth + 1)
            return
        names = [n for n, _ in entries if fnmatch.fnmatchcase(n, head)] \
            if _MAGIC & set(head) else [n for n, _ in entries if n == head]
        for name in names:
            if not rest:
                found.add(prefix + name)
                continue
            try:
                sub = open_fd(rootfd, prefix + name, os.O_RDONLY | os.O_DIRECTORY)
            except (OSError, Escape):
                continue  # not a directory, or a link leaving the workspace: no match
            _match(rootfd, sub, f"{prefix}{name}/", rest, found, depth + 1)
    finally:
        os.close(dirfd)


def _entries(dirfd: int) -> list[tuple[str, int]]:
    """(name, lstat mode) of a directory's entries (one removed meanwhile is left out)."""
    out = []
    with os.scandir(dirfd) as scan:
        for entry in scan:
            try:
                out.append((entry.name, entry.stat(follow_symlinks=False).st_mode))
            except FileNotFoundError:
                continue
    return out


def _subdir(dirfd: int, name: str) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=dirfd)


@dataclass(frozen=True)
class Entry:
    """One entry met by walk: ``dirfd`` (its directory) is open only while it is yielded."""

    rel: str
    name: str
    dirfd: int
    info: os.stat_result  # lstat: a link is a link


def walk(rootfd: int) -> Iterator[Entry]:
    """Every entry beneath the root, a directory before its contents, names sorted; links
    are entries, never followed. UserError past MAX_DEPTH."""
    yield from _walk(open_fd(rootfd, ".", os.O_RDONLY | os.O_DIRECTORY), "", 0)


def _walk(dirfd: int, prefix: str, depth: int) -> Iterator[Entry]:
    try:
        if depth > MAX_DEPTH:
            raise UserError(f"{prefix}: directories nest deeper than {MAX_DEPTH}")
        for name in sorted(os.listdir(dirfd)):
            try:
                info = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield Entry(prefix + name, name, dirfd, info)
            if stat.S_ISDIR(info.st_mode):
                yield from _walk(_subdir(dirfd, name), f"{prefix}{name}/", depth + 1)
    finally:
        os.close(dirfd)
