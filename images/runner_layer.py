"""The runner image layer: GitHub's actions-runner tarball as a read-only ext4 image that every
VM sees at /opt/actions-runner, above the base rootfs (guest/init.c stacks it in the overlay).

A layer and not part of the rootfs: the tarball is the operator's (some hosts cannot download
it), changes on GitHub's schedule, and rebuilding a layer takes seconds where the rootfs takes
minutes. The tarball is someone else's archive, so it is extracted with tarfile's ``data``
filter (no absolute names, no ``..``, no links leaving the tree, no device nodes, no setid
bits) and then every file is made root's: nothing of the archive's owners or modes can grant
a guest user more than the files' own read/execute bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import zlib
from pathlib import Path

from kata_ci import tarsafe
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
    run_step,
)

RECIPE = "runner-layer-v1"
KIND = "runner"
IMAGE_NAME = "runner.ext4"
GUEST_DIR = "opt/actions-runner"  # relative to the guest's /
LAYER_JSON = ".kata-ci-layer.json"  # inside GUEST_DIR: what the guest can read about the layer
RECORD = "layer.json"  # beside the image: the same facts, for a cached build
# actions-runner-linux-x64-2.329.0.tar.gz (also -linux-arm64-, -osx-..., .tgz)
VERSION_RE = re.compile(r"actions-runner-(?:[A-Za-z0-9_]+-)*?(\d+(?:\.\d+){1,3})\.(?:tar\.gz|tgz)")


def tarball_sha256(tarball: Path) -> str:
    """Streamed, and nothing is written beside the operator's file (unlike file_sha256)."""
    digest = hashlib.sha256()
    with tarball.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def runner_version(name: str) -> str:
    found = VERSION_RE.fullmatch(name)
    return found.group(1) if found else "unknown"


def layer_key(tarball_digest: str) -> str:
    """The tarball's bytes and this recipe; not its name (a renamed copy is the same layer)."""
    return hash_inputs([RECIPE, tarball_digest, Path(__file__).resolve()])


def build_runner_layer(cache: Path, progress: Progress, tarball: Path) -> Artifact:
    """``<cache>/runner/<key>/runner.ext4`` from ``tarball``, or the one already built from
    the same bytes. BuildError (naming the file) for an archive that is not a runner's."""
    try:
        digest = tarball_sha256(tarball)
    except OSError as exc:
        raise BuildError(f"runner tarball {tarball}: {exc.strerror or exc}") from None
    key = layer_key(digest)
    out = artifact_dir(cache, KIND, key)
    if finished(out):
        progress(f"runner layer {key}: cached")
        return _artifact(out, key)
    if shutil.which("mkfs.ext4") is None:
        raise BuildError("mkfs.ext4 is needed for the runner layer: apt-get install e2fsprogs")
    if os.geteuid() != 0:
        # Every file must be root's in the image, and mkfs.ext4 -d copies the owners it finds.
        raise BuildError("building the runner layer needs root (its files are owned by root)")
    fresh_dir(out)
    tree = out / "tree"
    dest = tree / GUEST_DIR
    dest.mkdir(parents=True)
    facts = {"tarball": tarball.name, "sha256": digest, "version": runner_version(tarball.name)}
    text = json.dumps(facts, indent=2, sort_keys=True) + "\n"
    progress(f"runner layer {key}: extracting {tarball.name}")
    try:
        _extract(tarball, dest)
        _root_dirs(tree)
        inside = dest / LAYER_JSON
        if inside.is_symlink() or inside.exists():  # the archive's own, possibly a link
            if inside.is_dir() and not inside.is_symlink():
                shutil.rmtree(inside)
            else:
                inside.unlink()
        inside.write_text(text)
        os.chmod(inside, 0o644)
        (out / RECORD).write_text(text)
        image = out / IMAGE_NAME
        with image.open("wb") as handle:
            handle.truncate(_image_bytes(tree))
        run_step(["mkfs.ext4", "-q", "-F", "-L", "kataci-runner", "-O", "^has_journal",
                  "-E", "root_owner=0:0", "-d", tree, image],
                 out / "build.log", progress, "runner layer: mkfs.ext4")
    except BaseException:
        # Never DONE, so never used. A refused tarball leaves nothing; a failed mkfs leaves
        # its log, which the message names.
        if not (out / "build.log").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    mark_done(out)
    progress(f"runner layer {key}: built ({facts['version']})")
    return _artifact(out, key)


def _extract(tarball: Path, dest: Path) -> None:
    """The archive into ``dest`` through the data filter; a hostile or broken archive is a
    BuildError naming the file, never a traceback nor a file outside ``dest``."""
    try:
        with tarfile.open(tarball, mode="r:gz") as archive:
            members = archive.getmembers()
            if not any(m.isfile() for m in members):
                raise BuildError(f"runner tarball {tarball.name} holds no files")
            if tarsafe.has_native_filter():
                archive.extractall(dest, filter="data")
            else:  # each member checked just before it is written (links made so far count)
                archive.extractall(dest, members=(tarsafe.data_filter(m, str(dest))
                                                  for m in members))
    except (tarsafe.Refused, getattr(tarfile, "FilterError", tarsafe.Refused)) as exc:
        raise BuildError(f"runner tarball {tarball.name} refused: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BuildError(f"runner tarball {tarball.name} is not a gzip'd tar archive "
                         f"({exc})") from None
    except OSError as exc:  # gzip.BadGzipFile is one, and so is a full disk
        raise BuildError(f"runner tarball {tarball.name}: {exc}") from None
    _own_by_root(dest)


def _own_by_root(dest: Path) -> None:
    """Root's, whatever the archive said; modes kept but never setid, sticky or writable by
    group/others (the data filter does this already for files: again here, for directories
    it leaves at the umask's mercy and in case it changes). Only files, directories and
    symlinks can be here; anything else would be the filter's bug, and is refused."""
    for folder, dirs, files in os.walk(dest):
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            os.lchown(path, 0, 0)
            if stat.S_ISLNK(info.st_mode):
                continue
            if stat.S_ISDIR(info.st_mode):
                os.chmod(path, 0o755)
            elif stat.S_ISREG(info.st_mode):
                os.chmod(path, stat.S_IMODE(info.st_mode) & 0o755 | 0o600)
            else:
                raise BuildError(f"unexpected file type in the runner layer: {name}")
    os.chown(dest, 0, 0)
    os.chmod(dest, 0o755)


def _root_dirs(tree: Path) -> None:
    """/, /opt: root's 0755. These are the guest's own / and /opt once stacked (a directory
    in both layers shows the upper one's owner and mode)."""
    for folder in (tree, tree / "opt"):
        os.chown(folder, 0, 0)
        os.chmod(folder, 0o755)


def _image_bytes(tree: Path) -> int:
    """Contents, plus a block per entry (small files and inodes), a quarter and 16 MiB for
    ext4's own metadata. Read-only: the free space is never used."""
    total = 0
    for folder, dirs, files in os.walk(tree):
        for name in [*dirs, *files]:
            total += os.lstat(os.path.join(folder, name)).st_size + 4096
    size = total * 5 // 4 + (16 << 20)
    return size + (-size % (1 << 20))  # whole MiB: whole ext4 blocks, no tail QEMU rounds off


def _artifact(out: Path, key: str) -> Artifact:
    image = out / IMAGE_NAME
    try:
        version = str(json.loads((out / RECORD).read_text()).get("version", "unknown"))
    except (OSError, ValueError, AttributeError):
        version = "unknown"
    return Artifact(path=str(image), key=key, sha256=file_sha256(image), detail=version)
