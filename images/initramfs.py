"""Initramfs: the static PID 1 (guest/init.c) and the agent's Python code, as a newc cpio.

Kept apart from the rootfs so that a change to the agent rebuilds this (in about a second)
and not the rootfs (minutes). Written by hand rather than with cpio(1): deterministic (zero
mtimes, fixed order, owner root) and it can hold /dev/console without root privileges.
"""

from __future__ import annotations

import py_compile
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from kata_ci.images.artifacts import (
    Artifact,
    BuildError,
    Progress,
    artifact_dir,
    file_sha256,
    finished,
    fresh_dir,
    hash_inputs,
    mark_done,
)

RECIPE = "initramfs-v1"


def _guest_dir() -> Path:
    import kata_ci.guest

    return Path(kata_ci.guest.__file__).resolve().parent


def agent_sources() -> dict[str, Path]:
    """Files of the agent as they appear under /opt/kata-ci/agent in the guest."""
    import kata_ci

    guest = _guest_dir()
    files = {"kata_ci/__init__.py": Path(kata_ci.__file__).resolve()}
    for name in ("__init__.py", "agent.py", "roots.py", "transport.py", "agent_pb2.py",
                 "agent_pb2_grpc.py"):
        files[f"kata_ci/guest/{name}"] = guest / name
    return files


def initramfs_key(guest_python: str) -> str:
    sources = agent_sources()
    return hash_inputs([RECIPE, guest_python, _guest_dir() / "init.c",
                        *sources.keys(), *sources.values()])


def build_initramfs(cache: Path, progress: Progress, guest_python: str) -> Artifact:
    key = initramfs_key(guest_python)
    out = artifact_dir(cache, "initramfs", key)
    if finished(out):
        progress(f"initramfs {key}: cached")
        return _artifact(out, key)
    if shutil.which("gcc") is None:
        raise BuildError("gcc is needed to build the guest init: apt-get install build-essential")
    fresh_dir(out)
    init = out / "init"
    compiled = subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-Wall", "-o", str(init), str(_guest_dir() / "init.c")],
        capture_output=True, text=True,
    )
    if compiled.returncode != 0:
        raise BuildError(f"compiling guest/init.c failed:\n{compiled.stderr}")
    writer = CpioWriter()
    for directory in ("dev", "proc", "sys", "lower", "rw", "newroot", "kata-ci"):
        writer.directory(directory)
    writer.device("dev/console", 5, 1)
    writer.file("init", init.read_bytes(), 0o755)
    # The same binary, by another name: the agent starts job commands through it (init.c).
    writer.file("kata-ci/kata-ci-spawn", init.read_bytes(), 0o755)
    with tempfile.TemporaryDirectory() as tmp:
        for rel, src in agent_sources().items():
            _add_parents(writer, f"kata-ci/{rel}")
            writer.file(f"kata-ci/{rel}", src.read_bytes(), 0o644)
            pyc = _compile_for_guest(src, rel, Path(tmp), guest_python)
            if pyc is not None:
                cache_rel = f"kata-ci/{Path(rel).parent}/__pycache__/{pyc.name}"
                _add_parents(writer, cache_rel)
                writer.file(cache_rel, pyc.read_bytes(), 0o644)
    (out / "initramfs.cpio").write_bytes(writer.finish())
    mark_done(out)
    progress(f"initramfs {key}: built")
    return _artifact(out, key)


def _compile_for_guest(src: Path, rel: str, tmp: Path, guest_python: str) -> Path | None:
    """A pyc the guest's python accepts as-is, when our interpreter speaks the same bytecode."""
    major_minor = ".".join(guest_python.split(".")[:2])
    if f"{sys.version_info.major}.{sys.version_info.minor}" != major_minor:
        return None  # the guest compiles in memory at start: slower, still correct
    tag = sys.implementation.cache_tag
    target = tmp / f"{Path(rel).stem}.{tag}.pyc"
    py_compile.compile(str(src), cfile=str(target), dfile=f"/opt/kata-ci/agent/{rel}",
                       doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    return target


def _add_parents(writer: CpioWriter, rel: str) -> None:
    parts = Path(rel).parts[:-1]
    for i in range(1, len(parts) + 1):
        writer.directory("/".join(parts[:i]))


class CpioWriter:
    """Minimal writer of the newc format the kernel unpacks
    (Documentation/driver-api/early-userspace/buffer-format.rst)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.seen: set[str] = set()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if name in self.seen:
            return
        self.seen.add(name)
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.chunks.append(_pad(header + encoded))
        self.chunks.append(_pad(data))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.chunks)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _artifact(out: Path, key: str) -> Artifact:
    path = out / "initramfs.cpio"
    return Artifact(path=str(path), key=key, sha256=file_sha256(path))
