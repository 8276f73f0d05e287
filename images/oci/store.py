"""The image store: a job's ``image:`` as a read-only ext4 disk, cached by manifest digest.

Layout under ``root`` (0700: the disks hold whatever the images hold):

* ``images/<hex>.ext4`` the disk, ``images/<hex>.json`` what it is (written after the disk:
  an image exists once both do) with ``last_used`` for prune (prune.py);
* ``refs/<sha256 of the canonical reference>.json`` reference -> digest, for ``if-not-present``
  and for digests of an index;
* ``locks/<hex>.lock`` flock per digest: concurrent pulls of one image (threads or processes)
  build it once, the others wait and find it; prune skips one somebody holds;
* ``tmp-*`` a pull in progress (skopeo's copy, the 0700 staging tree, the disk being built),
  removed when it ends, or by prune when a killed pull left it.

A pull copies the platform manifest by digest with skopeo into a ``dir:`` layout, which keeps
the manifest byte for byte (an ``oci:`` layout converts a Docker manifest, changing its
digest), so the digest the registry named is checked against the bytes; skopeo checks every
blob and unpack.py checks them again as it reads them.

Every disk is ``SLOT_BYTES`` long (sparse): the VM's image slot is made in a snapshot template
before the job's image is known, and a block device keeps the size it was created with. The
ext4 inside is as large as its contents need; the rest is a hole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kata_ci.errors import ImagePullFailure
from kata_ci.images.oci.manifest import (
    ImageConfig,
    Manifest,
    bounded_json,
    parse_manifest,
    pick_platform,
)
from kata_ci.images.oci.prune import list_images, prune_images
from kata_ci.images.oci.reference import DIGEST, Reference, parse_reference
from kata_ci.images.oci.registry import (
    Credentials,
    RegistryConfig,
    auth_file,
    host_arch,
    is_loopback,
    run_skopeo,
    skopeo_args,
)
from kata_ci.images.oci.unpack import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, Layer, unpack_layers

__all__ = ["SLOT_BYTES", "Image", "ImageConfig", "ImageStore", "Policy"]

SLOT_BYTES = 64 << 30
Policy = Literal["always", "if-not-present", "never"]
POLICIES = ("always", "if-not-present", "never")
MAX_CONFIG = 8 << 20
BLOCK = 4096


@dataclass(frozen=True)
class Image:
    reference: str  # canonical; the one this pull asked for (images(): the first pull's)
    digest: str  # of the platform manifest
    disk: Path  # SLOT_BYTES long, ext4 labelled kataci-img, read-only
    config: ImageConfig
    size_bytes: int  # of the ext4 file system inside the disk


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ImageStore:
    def __init__(self, root: Path, registries: RegistryConfig | None = None,
                 progress: Callable[[str], None] | None = None, *, timeout: float = 600.0,
                 retries: int = 2, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.root = root
        self.registries = registries or RegistryConfig()
        self.say = progress or (lambda line: None)
        self.timeout, self.retries = timeout, retries
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._plain_http: set[str] = set()  # loopback registries found answering in clear
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("images", "refs", "locks"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)

    # --- paths, records, locks -----------------------------------------------------------

    def disk_path(self, digest: str) -> Path:
        return self.root / "images" / f"{digest.removeprefix('sha256:')}.ext4"

    def meta_path(self, digest: str) -> Path:
        return self.root / "images" / f"{digest.removeprefix('sha256:')}.json"

    def ref_path(self, ref: Reference) -> Path:
        return self.root / "refs" / f"{hashlib.sha256(ref.canonical().encode()).hexdigest()}.json"

    @contextlib.contextmanager
    def lock(self, digest: str, *, shared: bool = False,
             blocking: bool = True) -> Iterator[bool]:
        """flock on locks/<hex>.lock: True when held, False when ``blocking`` is off and
        somebody else holds it. Lock files stay: removing one races with its next user."""
        path = self.root / "locks" / f"{digest.removeprefix('sha256:')}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else
                                                                  fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def in_use(self, image: Image) -> contextlib.AbstractContextManager[bool]:
        """Hold while a VM has ``image``'s disk: prune leaves it alone."""
        return self.lock(image.digest, shared=True)

    def load(self, digest: str) -> tuple[Image, dict[str, Any]] | None:
        """The cached image and its record, or None (absent, half-made or unreadable)."""
        disk = self.disk_path(digest)
        try:
            record = json.loads(self.meta_path(digest).read_text())
            config = ImageConfig.from_oci(record["config"], str(record["reference"]))
            image = Image(str(record["reference"]), digest, disk, config,
                          int(record["size_bytes"]))
        except (OSError, ValueError, KeyError, TypeError, ImagePullFailure):
            return None
        return (image, record) if disk.is_file() else None

    def write_json(self, path: Path, document: dict[str, Any]) -> None:
        """Atomically (a tmp-* beside it, fsync'd, renamed over)."""
        handle, name = tempfile.mkstemp(prefix="tmp-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(document, out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise

    def _known(self, ref: Reference) -> str | None:
        """The digest ``ref`` names without asking a registry: its own when that image is
        cached, else what the last pull of the same reference resolved to."""
        if ref.digest is not None and self.meta_path(ref.digest).is_file():
            return ref.digest
        try:
            digest = json.loads(self.ref_path(ref).read_text()).get("digest")
        except (OSError, ValueError, AttributeError):
            return None
        return digest if isinstance(digest, str) and DIGEST.fullmatch(digest) else None

    def _use(self, ref: Reference, digest: str, *, held: bool = False) -> Image | None:
        """The cached image, its last use recorded; None if it is not (or no longer) here.
        ``held``: the caller has the digest's lock (flock would wait for itself)."""
        if not self.meta_path(digest).is_file():
            return None
        with contextlib.nullcontext(True) if held else self.lock(digest, shared=True):
            loaded = self.load(digest)
            if loaded is None:
                return None
            image, record = loaded
            record["last_used"] = time.time()
            self.write_json(self.meta_path(digest), record)
        self.write_json(self.ref_path(ref), {"reference": ref.canonical(), "digest": digest,
                                             "updated": time.time()})
        self.say(f"using cached {ref} ({digest})")
        return Image(ref.canonical(), digest, image.disk, image.config, image.size_bytes)

    # --- pulling ---------------------------------------------------------------------------

    def pull(self, reference: str, policy: Policy = "always",
             credentials: Sequence[Credentials] = ()) -> Image:
        """The image ``reference`` names, from the cache or the registry per ``policy``
        (GitLab's pull_policy). ImagePullFailure, one line saying what to fix, otherwise."""
        if policy not in POLICIES:
            raise ImagePullFailure(f"unknown pull_policy {policy!r} (always, if-not-present, "
                                   "never)")
        ref = parse_reference(reference)
        try:
            return self._pull(ref, policy, credentials)
        except OSError as exc:  # the host's side: a full disk, a store made unwritable
            where = f" ({exc.filename})" if exc.filename else ""
            raise ImagePullFailure(f"image {ref}: the host's image store failed: "
                                   f"{exc.strerror or exc}{where}") from None

    def _pull(self, ref: Reference, policy: Policy,
              credentials: Sequence[Credentials]) -> Image:
        if ref.digest is not None or policy != "always":
            known = self._known(ref)
            image = self._use(ref, known) if known is not None else None
            if image is not None:
                return image
        if policy == "never":
            raise ImagePullFailure(f"image {ref} is not cached and pull_policy is never "
                                   "(allow if-not-present, or pull it once)")
        with auth_file(self.registries, credentials, directory=self.root) as authfile:
            digest, raw = self._resolve(ref, authfile)
            image = self._use(ref, digest)
            if image is not None:
                return image
            pinned = ref.with_digest(digest)
            if raw is None:
                raw = self._skopeo("inspect", pinned, authfile, ["--raw", pinned.transport()])
                if sha256(raw) != digest:
                    raise ImagePullFailure(f"corrupt layer in {ref}: the registry's manifest "
                                           f"does not match {digest}")
            manifest = parse_manifest(raw, str(ref))
            return self._pull_new(ref, pinned, manifest, authfile)

    def _skopeo(self, command: str, ref: Reference, authfile: Path | None,
                args: list[str], tmpdir: Path | None = None) -> bytes:
        """skopeo against ``ref``'s registry; a loopback registry answering in plain HTTP is
        asked again in plain HTTP (and remembered)."""
        def argv(plain: bool) -> list[str]:
            flags = skopeo_args(ref, self.registries, authfile, copy=command == "copy",
                                plain_http=plain)
            head = ["--tmpdir", str(tmpdir)] if tmpdir is not None else []
            return [*head, command, *flags, "--retry-times", str(self.retries), *args]

        plain = ref.registry in self._plain_http
        try:
            return run_skopeo(argv(plain), ref, self.timeout)
        except ImagePullFailure as exc:
            if plain or not is_loopback(ref.registry) or "speaks plain HTTP" not in str(exc):
                raise
        self._plain_http.add(ref.registry)
        return run_skopeo(argv(True), ref, self.timeout)

    def _resolve(self, ref: Reference, authfile: Path | None) -> tuple[str, bytes | None]:
        """The digest of ``ref``'s manifest for this platform, and the manifest when it came
        with the answer (not when the reference names an index)."""
        self.say(f"resolving {ref}")
        raw = self._skopeo("inspect", ref, authfile, ["--raw", ref.transport()])
        if ref.digest is not None and sha256(raw) != ref.digest:
            raise ImagePullFailure(f"corrupt layer in {ref}: the registry's manifest does not "
                                   "match the digest")
        document = bounded_json(raw, f"the manifest of {ref}")
        if "manifests" in document:
            return pick_platform(document, str(ref), host_arch()), None
        return sha256(raw), raw

    def _pull_new(self, ref: Reference, pinned: Reference, manifest: Manifest,
                  authfile: Path | None) -> Image:
        total = sum(size for _, _, size in manifest.layers)
        if total > self.max_bytes:
            raise ImagePullFailure(f"image {ref} is too large: its layers are {total >> 20} "
                                   f"MiB compressed (at most {self.max_bytes >> 20} MiB)")
        assert pinned.digest is not None
        digest = pinned.digest
        with self.lock(digest):
            image = self._use(ref, digest, held=True)  # made by a pull that held it first
            if image is not None:
                return image
            self.say(f"pulling {ref} ({len(manifest.layers)} layers, {total / 1e6:.1f} MB)")
            work = Path(tempfile.mkdtemp(prefix="tmp-", dir=self.root))  # 0700
            try:
                image = self._build(ref, pinned, manifest, work, authfile)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        self.write_json(self.ref_path(ref), {"reference": ref.canonical(), "digest": digest,
                                             "updated": time.time()})
        self.say(f"cached {ref} as {digest}")
        return image

    def _build(self, ref: Reference, pinned: Reference, manifest: Manifest, work: Path,
               authfile: Path | None) -> Image:
        """Copy, check, unpack, make the disk, and move it into place; ``work`` is removed by
        the caller whatever happens, and nothing is in images/ until the disk is whole."""
        assert pinned.digest is not None
        digest, blobs = pinned.digest, work / "blobs"
        self._skopeo("copy", pinned, authfile, [pinned.transport(), f"dir:{blobs}"], work)
        if sha256((blobs / "manifest.json").read_bytes()) != digest:
            raise ImagePullFailure(f"corrupt layer in {ref}: the manifest copied does not "
                                   f"match {digest}")
        config = ImageConfig.from_oci(self._config_blob(blobs, manifest, ref), str(ref))
        arch = host_arch()
        if (config.os, config.architecture) != ("linux", arch):
            raise ImagePullFailure(f"image {ref} is for {config.os or '?'}/"
                                   f"{config.architecture or '?'} (wrong architecture): this "
                                   f"host runs linux/{arch} VMs")
        self.say(f"unpacking {ref}")
        tree = work / "rootfs"
        tree.mkdir()
        os.chmod(tree, 0o755)  # the image's / unless its first layer says otherwise
        layers = [Layer(blobs / d.removeprefix("sha256:"), d) for d, _, _ in manifest.layers]
        stats = unpack_layers(layers, tree, label=f"image {ref}", max_bytes=self.max_bytes,
                              max_entries=self.max_entries)
        for path in blobs.iterdir():  # the compressed copy is not needed for the disk
            path.unlink()
        if stats.devices_skipped:
            self.say(f"{ref}: {stats.devices_skipped} device nodes skipped (the VM has /dev)")
        self.say(f"building disk for {ref}")
        size = make_disk(tree, work / "disk.ext4", str(ref))
        shutil.rmtree(tree)
        os.replace(work / "disk.ext4", self.disk_path(digest))
        now = time.time()
        record = {"reference": ref.canonical(), "digest": digest, "config": config.to_oci(),
                  "size_bytes": size, "created": now, "last_used": now}
        try:
            self.write_json(self.meta_path(digest), record)
            _fsync_dir(self.root / "images")
        except BaseException:
            self.disk_path(digest).unlink(missing_ok=True)
            raise
        return Image(ref.canonical(), digest, self.disk_path(digest), config, size)

    def _config_blob(self, blobs: Path, manifest: Manifest, ref: Reference) -> object:
        path = blobs / manifest.config.removeprefix("sha256:")
        if path.stat().st_size > MAX_CONFIG:
            raise ImagePullFailure(f"the config of {ref} is larger than {MAX_CONFIG >> 20} MiB")
        raw = path.read_bytes()
        if sha256(raw) != manifest.config:
            raise ImagePullFailure(f"corrupt layer in {ref}: the config does not match "
                                   f"{manifest.config}")
        return bounded_json(raw, f"the config of {ref}")

    # --- the cache -------------------------------------------------------------------------

    def images(self) -> list[Image]:
        """Every cached image, as first pulled."""
        return list_images(self)

    def prune(self, older_than_seconds: float, dry_run: bool = False) -> list[Image]:
        """Remove images unused for ``older_than_seconds`` (those somebody holds stay), their
        references, and what killed pulls left; the images removed (or, dry, to remove)."""
        return prune_images(self, older_than_seconds, dry_run)


def make_disk(tree: Path, disk: Path, label: str) -> int:
    """``tree`` as a read-only ext4 in ``disk``, extended (sparse) to SLOT_BYTES and fsync'd;
    the file system's size. Sized from the tree: its blocks plus a fifth, an inode (256
    bytes) per entry plus a fifth and 1024 spare, and 16 MiB for ext4's own metadata."""
    used, entries = _usage(tree)
    inodes = entries * 6 // 5 + 1024
    size = used * 6 // 5 + inodes * 256 + (16 << 20)
    size += -size % (1 << 20)
    if size > SLOT_BYTES:
        raise ImagePullFailure(f"{label} is too large: its disk would be {size >> 30} GiB, the "
                               f"image slot holds {SLOT_BYTES >> 30} GiB")
    with disk.open("wb") as handle:
        handle.truncate(size)
    argv = ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-N", str(inodes), "-O", "^has_journal",
            "-E", "root_owner=0:0", "-L", "kataci-img", "-d", str(tree), str(disk),
            f"{size // 1024}k"]
    try:
        done = subprocess.run(argv, capture_output=True, check=False)
    except FileNotFoundError:
        raise ImagePullFailure("mkfs.ext4 is not installed on the host: apt-get install "
                               "e2fsprogs") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise ImagePullFailure(f"building the disk of {label} failed: mkfs.ext4: "
                               f"{(lines or ['exit ' + str(done.returncode)])[-1][:200]}")
    with disk.open("r+b") as handle:
        handle.truncate(SLOT_BYTES)
        os.fsync(handle.fileno())
    return size


def _usage(tree: Path) -> tuple[int, int]:
    """Bytes the tree's entries take in whole blocks, and how many entries there are."""
    used, entries = 0, 0
    stack = [str(tree)]
    while stack:
        with os.scandir(stack.pop()) as listing:
            for entry in listing:
                info = entry.stat(follow_symlinks=False)
                entries += 1
                used += max(info.st_blocks * 512, -(-info.st_size // BLOCK) * BLOCK)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return used, entries


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
