"""Host tools the VM processes run under: the jail helper and the Rust virtiofsd.

- ``bin/kata-ci-jail``, compiled from executors/jail/jail.c: cgroups, identity drop,
  no_new_privs, rlimits and the no-setid seccomp filter before exec (see that file).
- ``bin/pasta``: passt's namespace mode from Debian trixie: a VM namespace's way out to the
  host's network (executors/network/netns.py). Bookworm's 2023 build drops to ``nobody``
  before joining a namespace, so it cannot serve a root-owned one.
- ``bin/virtiofsd``: virtiofsd 1.13 from Debian trixie. Debian 12's QEMU ships only the C
  virtiofsd, removed upstream in QEMU 8.0, without uid/gid mapping or capability control.
  The trixie binary needs glibc 2.39 (bookworm has 2.36), so it runs through trixie's own
  loader and libc, kept beside it; nothing is installed into the system's library paths.
  The packages come through apt with a private sources list naming trixie, checked against
  Debian's archive keyring (debian-archive-keyring carries trixie's keys) like any package.

Where: kata-ci running as root drops the VM processes to other identities, and those cannot
read root's ~/.cache, so root's tools live in /usr/local/lib/kata-ci (root-owned, read-only
to others); an ordinary user's tools live in their own cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from kata_ci.images.artifacts import (
    Artifact,
    BuildError,
    Progress,
    finished,
    fresh_dir,
    hash_inputs,
    mark_done,
)

RECIPE = "tools-v2"
SUITE = "trixie"
PACKAGES = ("virtiofsd", "passt", "libc6")
SYSTEM_TOOLS = Path("/usr/local/lib/kata-ci/tools")
ARCH_LIB = "usr/lib/x86_64-linux-gnu"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def jail_source() -> Path:
    import kata_ci.executors

    return Path(kata_ci.executors.__file__).resolve().parent / "jail" / "jail.c"


def tools_key() -> str:
    return hash_inputs([RECIPE, SUITE, *PACKAGES, jail_source()])


def tools_root(cache: Path) -> Path:
    return SYSTEM_TOOLS if os.geteuid() == 0 else cache / "tools"


def build_tools(cache: Path, progress: Progress, mirror: str | None = None) -> Artifact:
    key = tools_key()
    out = tools_root(cache) / key
    if finished(out):
        progress(f"tools {key}: cached")
        return _artifact(out, key)
    fresh_dir(out)
    os.chmod(out, 0o755)
    bin_dir = out / "bin"
    bin_dir.mkdir()
    _compile_jail(bin_dir / "kata-ci-jail")
    versions = _fetch_virtiofsd(out, mirror or "http://deb.debian.org/debian", progress)
    (out / "VERSIONS").write_text(versions)
    mark_done(out)
    progress(f"tools {key}: built ({versions.strip()})")
    return _artifact(out, key)


def _artifact(out: Path, key: str) -> Artifact:
    versions = (out / "VERSIONS").read_text().strip() if (out / "VERSIONS").is_file() else ""
    return Artifact(path=str(out), key=key, sha256=key, detail=versions.replace("\n", ", "))


def _compile_jail(target: Path) -> None:
    if shutil.which("gcc") is None:
        raise BuildError("gcc is needed to build kata-ci-jail: apt-get install build-essential")
    done = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(target),
                           str(jail_source())], capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"compiling executors/jail/jail.c failed:\n{done.stderr}")
    os.chmod(target, 0o755)


def _fetch_virtiofsd(out: Path, mirror: str, progress: Progress) -> str:
    progress(f"tools: fetching {' '.join(PACKAGES)} from Debian {SUITE}")
    with tempfile.TemporaryDirectory(prefix="kata-ci-apt-") as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        debs = work / "debs"
        debs.mkdir()
        # _apt downloads into a folder it can write; a private temp dir is root's.
        os.chmod(tmp, 0o755)
        os.chmod(debs, 0o777)
        sources = work / "sources.list"
        sources.write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} main\n")
        options = [f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
                   f"-oDir::State::Lists={work / 'lists'}", f"-oDir::Cache={work / 'cache'}",
                   "-oAPT::Get::List-Cleanup=0", "-oDebug::NoLocking=1", "-qq"]
        _run(["apt-get", *options, "update"], work, "apt-get update (trixie)")
        _run(["apt-get", *options, "download", *PACKAGES], debs, "apt-get download")
        versions = []
        for deb in sorted(debs.glob("*.deb")):
            target = out / ("libc" if deb.name.startswith("libc6_") else "root")
            target.mkdir(exist_ok=True)
            _run(["dpkg-deb", "-x", str(deb), str(target)], work, f"dpkg-deb -x {deb.name}")
            versions.append(deb.name.removesuffix("_amd64.deb").replace("_", " "))
    binary = out / "root" / "usr" / "libexec" / "virtiofsd"
    lib = out / "libc" / ARCH_LIB
    if not binary.is_file() or not (lib / "ld-linux-x86-64.so.2").is_file():
        raise BuildError(f"the {SUITE} packages did not contain virtiofsd and its loader")
    pasta = out / "root" / "usr" / "bin" / "pasta"
    if not pasta.is_file():
        raise BuildError(f"the {SUITE} packages did not contain pasta")
    for name, program in (("virtiofsd", binary), ("pasta", pasta)):
        wrapper = out / "bin" / name
        wrapper.write_text(
            f"#!/bin/sh\n# {name} from Debian {SUITE}, through {SUITE}'s loader and libc "
            "(images/tools.py)\n"
            f'exec {lib}/ld-linux-x86-64.so.2 --library-path {lib}:/lib/x86_64-linux-gnu '
            f'{program} "$@"\n')
        os.chmod(wrapper, 0o755)
        check = subprocess.run([str(wrapper), "--help" if name == "pasta" else "--version"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise BuildError(f"{name} from {SUITE} does not start: {check.stderr.strip()}")
    return "\n".join(versions) + "\n"


def _run(argv: list[str], cwd: Path, label: str) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{label} failed (exit {done.returncode}):\n{done.stderr.strip()}")
