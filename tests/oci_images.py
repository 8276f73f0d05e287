"""Test fixtures: OCI images made here, byte by byte, and pushed to the fixture registry
(tests/oci_registry.py) through the distribution HTTP API. Layers are Python tarfile archives
(umoci 0.4.7 ``insert`` writes truncated tars): a busybox base from Debian's busybox-static
(/bin/busybox, applets as symlinks to it, /etc/passwd with root and ``builder`` uid 1000,
/etc/group, /tmp 1777), then whatever a test adds. Also raw tar members, for the hostile
layers the unpacker must refuse."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # not at run time: pytest loads tests.oci_registry as a plugin, rewritten
    from tests.oci_registry import RegistryFixture

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "id", "env", "true", "false", "sleep", "mkdir", "rm")
MTIME = 1_700_000_000  # fixed, so that layers are reproducible and mtimes checkable
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# Docker's schema 2, which most images on Docker Hub still are (an oci: layout would convert it)
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class File:
    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


Entry = bytes | Symlink | File | Dir


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """An uncompressed tar of raw members (sizes filled in from the data)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, uid: int = 0,
           gid: int = 0, link: str = "", mtime: int = MTIME) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
    info.linkname, info.mtime = link, mtime
    return info


def layer_tar(entries: Mapping[str, Entry]) -> bytes:
    """An uncompressed layer from path -> entry (bytes: a 0644 root file); directories are
    written as given, parents are not added (as real layers sometimes omit them)."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for name, entry in entries.items():
        if isinstance(entry, bytes):
            entry = File(entry)
        if isinstance(entry, File):
            members.append((member(name, mode=entry.mode, uid=entry.uid, gid=entry.gid),
                            entry.data))
        elif isinstance(entry, Symlink):
            members.append((member(name, tarfile.SYMTYPE, mode=0o777, link=entry.target), None))
        else:
            members.append((member(name, tarfile.DIRTYPE, mode=entry.mode, uid=entry.uid,
                                   gid=entry.gid), None))
    return tar_bytes(members)


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


@functools.cache
def busybox_layer() -> bytes:
    """The base layer, gzip'd, once per session."""
    entries: dict[str, Entry] = {
        "bin": Dir(), "etc": Dir(), "root": Dir(0o700), "tmp": Dir(0o1777),
        "home": Dir(), "home/builder": Dir(0o755, 1000, 1000),
        "bin/busybox": File(BUSYBOX.read_bytes(), 0o755),
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"
                      b"builder:x:1000:1000:builder:/home/builder:/bin/sh\n",
        "etc/group": b"root:x:0:\nbuilder:x:1000:\n",
    }
    for applet in APPLETS:
        entries[f"bin/{applet}"] = Symlink("/bin/busybox")
    return gzipped(layer_tar(entries))


def image_config(config: Mapping[str, Any], architecture: str, diff_ids: list[str]) -> bytes:
    document = {"architecture": architecture, "os": "linux", "config": dict(config),
                "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    return json.dumps(document, sort_keys=True).encode()


def push_blob(registry: RegistryFixture, repo: str, data: bytes) -> str:
    digest = sha256(data)
    _, headers, _ = registry.request("POST", f"/v2/{repo}/blobs/uploads/")
    location = headers["Location"]
    joiner = "&" if "?" in location else "?"
    registry.request("PUT", f"{location}{joiner}digest={digest}", data,
                     {"Content-Type": "application/octet-stream"})
    return digest


def push_manifest(registry: RegistryFixture, repo: str, tag: str, body: bytes,
                  media_type: str) -> str:
    registry.request("PUT", f"/v2/{repo}/manifests/{tag}", body, {"Content-Type": media_type})
    return sha256(body)


def build_image(registry: RegistryFixture, repo: str, tag: str,
                files: Mapping[str, Entry] | None = None,
                config: Mapping[str, Any] | None = None, base: str | None = "busybox",
                extra_layers: Sequence[bytes] = (), architecture: str = "amd64",
                docker: bool = False) -> str:
    """Push ``repo:tag``: the busybox base (unless ``base`` is None), a gzip'd layer of
    ``files`` (if any), then ``extra_layers`` (raw tars, gzip'd here), in that order, with
    ``config`` as the image config's ``config``; Docker's media types if ``docker``. Returns
    the manifest digest."""
    kinds = ((DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP) if docker else
             (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP))
    raw_layers: list[bytes] = []
    if base == "busybox":
        raw_layers.append(gzip.decompress(busybox_layer()))
    elif base is not None:
        raise ValueError(f"unknown base {base}")
    if files:
        raw_layers.append(layer_tar(files))
    raw_layers.extend(extra_layers)
    blobs = [busybox_layer() if i == 0 and base else gzipped(raw)
             for i, raw in enumerate(raw_layers)]
    config_blob = image_config(config or {}, architecture, [sha256(r) for r in raw_layers])
    layers = []
    for blob in blobs:
        layers.append({"mediaType": kinds[2], "digest": push_blob(registry, repo, blob),
                       "size": len(blob)})
    manifest = {
        "schemaVersion": 2, "mediaType": kinds[0],
        "config": {"mediaType": kinds[1], "digest": push_blob(registry, repo, config_blob),
                   "size": len(config_blob)},
        "layers": layers,
    }
    return push_manifest(registry, repo, tag, json.dumps(manifest).encode(), kinds[0])


def build_index(registry: RegistryFixture, repo: str, tag: str,
                platforms: Mapping[str, str], docker: bool = False) -> str:
    """An image index over already pushed manifests: architecture -> manifest digest (a
    Docker manifest list over Docker manifests if ``docker``)."""
    child, kind = (DOCKER_MANIFEST, DOCKER_LIST) if docker else (OCI_MANIFEST, OCI_INDEX)
    manifests = []
    for arch, digest in platforms.items():
        _, _, body = registry.request("GET", f"/v2/{repo}/manifests/{digest}",
                                      headers={"Accept": child})
        manifests.append({"mediaType": child, "digest": digest, "size": len(body),
                          "platform": {"architecture": arch, "os": "linux"}})
    index = {"schemaVersion": 2, "mediaType": kind, "manifests": manifests}
    return push_manifest(registry, repo, tag, json.dumps(index).encode(), kind)


def layer_digests(registry: RegistryFixture, repo: str, digest: str) -> list[str]:
    _, _, body = registry.request("GET", f"/v2/{repo}/manifests/{digest}",
                                  headers={"Accept": OCI_MANIFEST})
    return [str(layer["digest"]) for layer in json.loads(body)["layers"]]


def hostile_layers(outside: Path) -> dict[str, list[bytes]]:
    """Layer stacks (uncompressed tars, applied in order) that each try to write, link or
    delete outside the tree; ``outside`` is a host directory holding a file ``secret``."""
    sym, lnk, reg = tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.REGTYPE
    escape = b"escaped\n"
    return {
        "dotdot": [tar_bytes([(member("../escaped"), escape)])],
        "dotdot-inside": [tar_bytes([(member("etc/../../escaped"), escape)])],
        "symlink-parent": [tar_bytes([(member("evil", sym, link=str(outside)), None),
                                      (member("evil/escaped"), escape)])],
        "symlink-parent-relative": [tar_bytes([
            (member("evil", sym, link="../../../../../../../../" + str(outside)), None),
            (member("evil/escaped"), escape)])],
        "symlink-parent-next-layer": [tar_bytes([(member("evil", sym, link=str(outside)), None)]),
                                      tar_bytes([(member("evil/escaped"), escape)])],
        "symlink-grandparent": [tar_bytes([(member("a", sym, link=str(outside)), None),
                                           (member("a/b/escaped"), escape)])],
        "hardlink-dotdot": [tar_bytes([(member("stolen", lnk, link=f"../{outside.name}/secret"),
                                        None)])],
        "hardlink-absolute": [tar_bytes([(member("stolen", lnk, link=str(outside / "secret")),
                                          None)])],
        "hardlink-through-symlink": [tar_bytes([(member("evil", sym, link=str(outside)), None),
                                                (member("stolen", lnk, link="evil/secret"),
                                                 None)])],
        "whiteout-through-symlink": [tar_bytes([(member("evil", sym, link=str(outside)), None)]),
                                     tar_bytes([(member("evil/.wh.secret"), b"")])],
        "opaque-through-symlink": [tar_bytes([(member("evil", sym, link=str(outside)), None)]),
                                   tar_bytes([(member("evil/.wh..wh..opq", reg), b"")])],
    }
