"""Guest rootfs: debootstrap minbase + ``rootfs/packages.txt`` + the host's exact grpcio and
protobuf wheels + ``rootfs/overlay``, packed as an ext4 image that every VM opens read-only.

The Python libraries go to ``/opt/kata-ci/site`` and are byte-compiled by the guest's own
python3 with unchecked-hash pycs: the image is read-only, so a pyc missing or checked at run
time would cost every boot a recompile or a stat storm under TCG.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kata_ci.images.artifacts import (
    HERE,
    Artifact,
    BuildError,
    Progress,
    artifact_dir,
    file_sha256,
    finished,
    fresh_dir,
    hash_inputs,
    mark_done,
    run_step,
)

RECIPE_DIR = HERE / "rootfs"
SUITE = "bookworm"
RECIPE = "rootfs-v1"
GUEST_LIBS = ("grpcio", "protobuf")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def packages() -> list[str]:
    lines = (RECIPE_DIR / "packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def overlay_files() -> list[Path]:
    return sorted(p for p in (RECIPE_DIR / "overlay").rglob("*") if p.is_file())


def guest_pins() -> list[str]:
    """The host's own versions: the guest runs exactly these (checked again at Health)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in GUEST_LIBS]


def host_mirror() -> str:
    """The Debian mirror the host's apt uses, so the guest comes from the same registry."""
    for source in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if not source.is_file():
            continue
        for line in source.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1:
                return words[1]
            if len(words) > 2 and words[0] == "deb" and "security" not in words[1]:
                return words[1]
    return DEFAULT_MIRROR


def rootfs_key() -> str:
    overlay = [f"{p.relative_to(RECIPE_DIR)}" for p in overlay_files()]
    return hash_inputs([RECIPE, SUITE, *packages(), *guest_pins(), *overlay, *overlay_files()])


def build_rootfs(cache: Path, progress: Progress, mirror: str | None = None) -> Artifact:
    key = rootfs_key()
    out = artifact_dir(cache, "rootfs", key)
    if finished(out):
        progress(f"rootfs {key}: cached")
        return _artifact(out, key)
    if shutil.which("debootstrap") is None or shutil.which("mkfs.ext4") is None:
        raise BuildError(
            "debootstrap and mkfs.ext4 are needed: apt-get install debootstrap e2fsprogs")
    if os.geteuid() != 0:
        raise BuildError("building the rootfs needs root (debootstrap chroots)")
    fresh_dir(out)
    log = out / "build.log"
    root = out / "root"
    run_step(["debootstrap", "--variant=minbase", f"--include={','.join(packages())}",
              SUITE, root, mirror or host_mirror()], log, progress, "rootfs: debootstrap")
    site = root / "opt/kata-ci/site"
    run_step([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
              "--target", site, "--only-binary=:all:", "--implementation", "cp",
              "--python-version", _guest_python(root), "--platform", "manylinux2014_x86_64",
              "--platform", "manylinux_2_28_x86_64", *guest_pins()],
             log, progress, "rootfs: guest grpcio/protobuf")
    run_step(["chroot", root, "python3", "-m", "compileall", "-q", "-j0",
              "--invalidation-mode", "unchecked-hash", "/opt/kata-ci/site"],
             log, progress, "rootfs: byte-compile")
    shutil.copytree(RECIPE_DIR / "overlay", root, dirs_exist_ok=True)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                 "usr/share/man", "usr/share/info"):
        shutil.rmtree(root / junk, ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    image = out / "rootfs.ext4"
    size = _tree_bytes(root) * 5 // 4 + (128 << 20)
    with image.open("wb") as handle:
        handle.truncate(size)
    run_step(["mkfs.ext4", "-q", "-F", "-L", "kataci-root", "-O", "^has_journal",
              "-d", root, image], log, progress, "rootfs: mkfs.ext4")
    (out / "python-version").write_text(_guest_python(root) + "\n")
    (out / "detail").write_text(f"debian {SUITE}, python {_guest_python(root)}, "
                                f"{', '.join(guest_pins())}\n")
    shutil.rmtree(root)
    mark_done(out)
    return _artifact(out, key)


def guest_python_version(rootfs: Artifact) -> str:
    """Python X.Y of a built rootfs; the initramfs byte-compiles the agent for it."""
    return (Path(rootfs.path).parent / "python-version").read_text().strip()


def _guest_python(root: Path) -> str:
    found = sorted(p.name for p in (root / "usr/lib").glob("python3.*") if p.is_dir())
    if not found:
        raise BuildError(f"no python3 in {root}")
    return found[-1].removeprefix("python")


def _tree_bytes(root: Path) -> int:
    out = subprocess.run(["du", "-sb", str(root)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _artifact(out: Path, key: str) -> Artifact:
    image = out / "rootfs.ext4"
    return Artifact(path=str(image), key=key, sha256=file_sha256(image),
                    detail=(out / "detail").read_text().strip())
