"""A hard size quota for a workspace the runner owns (the queue worker's per-job directory).

The directory becomes the mount point of a fresh ext4 file system in a sparse image file of
the quota's size, loop-mounted nosuid,nodev,noexec for the job's lifetime, then unmounted
and deleted. A job that fills it gets ENOSPC inside the guest (a job failure); the host's
own file system holds at most the image, so at most the quota. No journal and no reserved
blocks (the image is thrown away after the job); the file system's own metadata takes a
few percent of the size. Mounting needs root: the worker checks at start and refuses to
run with a quota it cannot enforce (queue.workspace_quota_mib = 0 turns the quota off).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from kata_ci.errors import SystemFailure, UserError

IMAGE_SUFFIX = ".img"
SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def check(size_mib: int) -> None:
    """At worker start: UserError when a quota is configured but cannot be enforced here."""
    if size_mib <= 0:
        return
    missing = [what for what, ok in (
        ("root (the worker loop-mounts an image per job)", os.geteuid() == 0),
        ("mkfs.ext4 (Debian: apt-get install e2fsprogs)", _tool("mkfs.ext4") is not None),
        ("mount and umount (util-linux)", bool(_tool("mount") and _tool("umount"))),
        ("loop devices (/dev/loop-control)", os.path.exists("/dev/loop-control")),
    ) if not ok]
    if missing:
        raise UserError(f"queue.workspace_quota_mib = {size_mib} needs: {'; '.join(missing)}. "
                        "Set queue.workspace_quota_mib = 0 to run without a workspace quota "
                        "(then only the unpack bound limits a job's disk use)")


def _run(argv: list[str], what: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=120,
                       env={**os.environ, "PATH": f"{os.environ.get('PATH', '')}:{SBIN}"})
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip()[-400:]
        raise SystemFailure(f"workspace quota: {what} failed: {detail}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemFailure(f"workspace quota: {what} failed: {exc}") from None


@contextlib.contextmanager
def limited(directory: Path, size_mib: int) -> Iterator[None]:
    """``directory`` (existing, empty) holds at most ``size_mib`` MiB while inside; its owner
    and mode are kept. Nothing is mounted when ``size_mib`` is 0."""
    if size_mib <= 0:
        yield
        return
    before = os.stat(directory)
    image = directory.with_name(directory.name + IMAGE_SUFFIX)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.ftruncate(fd, size_mib << 20)  # sparse: the host disk is used as data lands
        finally:
            os.close(fd)
        # lazy_itable_init + noinit_itable: the sparse image already reads as zeros, so
        # neither mkfs nor the kernel writes the inode tables out.
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-L", "kata-ci",
              "-E", f"root_owner={before.st_uid}:{before.st_gid},lazy_itable_init=1,"
              "nodiscard", str(image)], "mkfs.ext4")
        _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noexec,noinit_itable",
              str(image), str(directory)], "mount")
        try:
            os.chmod(directory, stat.S_IMODE(before.st_mode))
            shutil.rmtree(directory / "lost+found", ignore_errors=True)  # not the job's
            yield
        finally:
            unmount(directory)
    finally:
        image.unlink(missing_ok=True)


def unmount(directory: Path) -> None:
    """Unmount (the loop device goes with it); lazily if something still holds it."""
    if not os.path.ismount(directory):
        return
    try:
        _run(["umount", str(directory)], "umount")
    except SystemFailure:
        _run(["umount", "--lazy", str(directory)], "umount --lazy")


def discard(path: Path) -> None:
    """Remove a job's workspace or quota image, left mounted or not (a worker that died)."""
    with contextlib.suppress(SystemFailure):
        unmount(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
