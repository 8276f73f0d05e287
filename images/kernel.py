"""Guest kernel: Debian's linux-source-6.1, ``make tinyconfig`` plus the fragments in
``images/kernel/fragments``, checked so that no requested option is silently dropped.

Output: an uncompressed ``vmlinux`` that QEMU boots through the PVH entry point (no
decompression, no firmware), and its ``.config``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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

FRAGMENTS = HERE / "kernel" / "fragments"
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
_OPTION = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(.*)$")
# Bumped when the build procedure itself changes in a way that changes the output.
RECIPE = "kernel-v1"


def fragments() -> list[Path]:
    return sorted(FRAGMENTS.glob("*.conf"))


def requested_options(paths: list[Path]) -> dict[str, str]:
    """Options the fragments ask for, last fragment winning (merge_config.sh semantics)."""
    wanted: dict[str, str] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            match = _OPTION.match(line.strip())
            if match:
                wanted[match.group(1)] = match.group(2)
    return wanted


def dropped_options(wanted: dict[str, str], final_config: str) -> list[str]:
    """Options Kconfig refused (unmet dependency, renamed symbol): reported, never ignored."""
    have: dict[str, str] = {}
    for line in final_config.splitlines():
        match = _OPTION.match(line)
        if match:
            have[match.group(1)] = match.group(2)
    # "=n" is met by an option Kconfig leaves unset ("# CONFIG_X is not set").
    return [f"{k}={v} (got {have.get(k, 'unset')})" for k, v in wanted.items()
            if have.get(k, "n") != v]


def source_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            capture_output=True, text=True, check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        raise BuildError(
            f"{SOURCE_PACKAGE} is not installed: apt-get install {SOURCE_PACKAGE}"
        ) from None
    return out.stdout.strip()


def kernel_key() -> str:
    return hash_inputs([RECIPE, source_version(), *fragments()])


def build_kernel(cache: Path, progress: Progress, jobs: int | None = None) -> Artifact:
    key = kernel_key()
    out = artifact_dir(cache, "kernel", key)
    vmlinux = out / "vmlinux"
    if finished(out):
        progress(f"kernel {key}: cached")
        return _artifact(out, key)
    if not SOURCE_TARBALL.is_file():
        raise BuildError(f"{SOURCE_TARBALL} missing: apt-get install {SOURCE_PACKAGE}")
    fresh_dir(out)
    log = out / "build.log"
    tree = out / "src"
    tree.mkdir()
    run_step(["tar", "-xf", SOURCE_TARBALL, "-C", tree, "--strip-components=1"],
             log, progress, "kernel: unpack source")
    jobs = jobs or os.cpu_count() or 1
    make: list[str | Path] = ["make", "-C", tree, f"-j{jobs}"]
    run_step([*make, "tinyconfig"], log, progress, "kernel: tinyconfig")
    run_step([tree / "scripts/kconfig/merge_config.sh", "-m", "-O", tree, tree / ".config",
              *fragments()], log, progress, "kernel: merge fragments", cwd=tree)
    run_step([*make, "olddefconfig"], log, progress, "kernel: olddefconfig")
    final = (tree / ".config").read_text()
    dropped = dropped_options(requested_options(fragments()), final)
    if dropped:
        raise BuildError("kernel config dropped requested options:\n  " + "\n  ".join(dropped))
    run_step([*make, "vmlinux"], log, progress, f"kernel: make -j{jobs} vmlinux")
    shutil.copy2(tree / "vmlinux", vmlinux)
    subprocess.run(["strip", "--strip-debug", str(vmlinux)], check=False)
    (out / "config").write_text(final)
    release = (tree / "include/config/kernel.release").read_text().strip()
    (out / "release").write_text(release + "\n")
    shutil.rmtree(tree)  # ~1 GiB of objects; the key lets us rebuild if ever needed
    mark_done(out)
    return _artifact(out, key)


def _artifact(out: Path, key: str) -> Artifact:
    vmlinux = out / "vmlinux"
    release = (out / "release").read_text().strip()
    return Artifact(path=str(vmlinux), key=key, sha256=file_sha256(vmlinux), detail=release)
