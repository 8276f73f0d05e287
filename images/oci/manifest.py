"""What a registry serves, read as hostile input: manifests, indexes (manifest lists) and the
image config. Every field is type-checked; a wrong type or shape is an ImagePullFailure that
names the image, never a KeyError or TypeError from deep inside a pull."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kata_ci.errors import ImagePullFailure
from kata_ci.images.oci.reference import DIGEST

MAX_DOCUMENT = 4 << 20  # a manifest or a config; real ones are kilobytes
MAX_LAYERS = 1000  # Docker's overlay stops at 128
LAYER_TYPES = ("tar", "tar+gzip", "tar.gzip", "tar+zstd")  # the media types' endings


@dataclass(frozen=True)
class ImageConfig:
    """What the job needs from the image config: its process defaults."""

    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    exposed_ports: tuple[int, ...] = ()  # tcp only: the job reaches services over tcp
    architecture: str = ""
    os: str = ""

    @classmethod
    def from_oci(cls, document: object, label: str) -> ImageConfig:
        """From the config blob (``{"architecture", "os", "config": {"Env", ...}}``)."""
        def bad(what: str) -> ImagePullFailure:
            return ImagePullFailure(f"image {label} has a malformed config: {what}")

        if not isinstance(document, dict):
            raise bad("not a JSON object")
        inner = _or(document.get("config"), {})  # null is absent; "", 0, [] are wrong
        if not isinstance(inner, dict):
            raise bad("\"config\" is not an object")

        def text(source: dict[str, Any], key: str) -> str:
            value = _or(source.get(key), "")
            if not isinstance(value, str):
                raise bad(f"{key} is not a string")
            return value

        def strings(key: str) -> tuple[str, ...]:
            value = _or(inner.get(key), [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad(f"{key} is not a list of strings")
            return tuple(value)

        return cls(env=strings("Env"), working_dir=text(inner, "WorkingDir"),
                   user=text(inner, "User"), entrypoint=strings("Entrypoint"),
                   cmd=strings("Cmd"), exposed_ports=_ports(inner.get("ExposedPorts"), bad),
                   architecture=text(document, "architecture"), os=text(document, "os"))

    def to_oci(self) -> dict[str, Any]:
        """The same facts in the config blob's shape (from_oci reads them back)."""
        return {"architecture": self.architecture, "os": self.os, "config": {
            "Env": list(self.env), "WorkingDir": self.working_dir, "User": self.user,
            "Entrypoint": list(self.entrypoint), "Cmd": list(self.cmd),
            "ExposedPorts": {f"{port}/tcp": {} for port in self.exposed_ports}}}


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _ports(value: object, bad: Any) -> tuple[int, ...]:
    """``{"80/tcp": {}, "53/udp": {}, "8080": {}}`` -> (80, 8080): no protocol means tcp."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad("ExposedPorts is not an object")
    ports = set()
    for key in value:
        number, _, proto = str(key).partition("/")
        valid_proto = proto == "" or proto.isalpha()
        if not number.isdigit() or not 0 < int(number) < 65536 or not valid_proto:
            raise bad(f"exposed port {str(key)[:40]!r}")
        if proto.lower() in ("", "tcp"):
            ports.add(int(number))
    return tuple(sorted(ports))


@dataclass(frozen=True)
class Manifest:
    config: str  # digest of the config blob
    layers: tuple[tuple[str, str, int], ...]  # (digest, media type, size), lowest first


def bounded_json(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_DOCUMENT:
        raise ImagePullFailure(f"{what} is larger than {MAX_DOCUMENT >> 20} MiB")
    try:
        document = json.loads(raw)
    except ValueError:
        raise ImagePullFailure(f"{what} is not JSON") from None
    if not isinstance(document, dict):
        raise ImagePullFailure(f"{what} is not a JSON object")
    return document


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not DIGEST.fullmatch(value):
        raise ImagePullFailure(f"{what}: not a sha256 digest")
    return value


def parse_manifest(raw: bytes, label: str) -> Manifest:
    """An image manifest (OCI or Docker schema 2); indexes and schema 1 are refused."""
    what = f"the manifest of {label}"
    document = bounded_json(raw, what)
    if document.get("schemaVersion") != 2:
        raise ImagePullFailure(f"{what} is not schema 2 (Docker schema 1 images are not "
                               "supported: push the image again with a current tool)")
    if "manifests" in document:
        raise ImagePullFailure(f"{what} is an index inside an index: not supported")
    config, layers = document.get("config"), document.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list) or not layers:
        raise ImagePullFailure(f"{what} has no config or no layers")
    if len(layers) > MAX_LAYERS:
        raise ImagePullFailure(f"image {label} is too large: {len(layers)} layers")
    found = []
    for layer in layers:
        if not isinstance(layer, dict):
            raise ImagePullFailure(f"{what}: a layer is not an object")
        media = layer.get("mediaType", "")
        size = layer.get("size")
        if not isinstance(media, str) or not media.endswith(LAYER_TYPES):
            raise ImagePullFailure(f"image {label} has a layer of type {str(media)[:80]!r}: "
                                   "not a container image kata-ci can unpack")
        if not isinstance(size, int) or size < 0:
            raise ImagePullFailure(f"{what}: a layer has no size")
        found.append((_digest(layer.get("digest"), what), media, size))
    return Manifest(_digest(config.get("digest"), what), tuple(found))


def pick_platform(index: dict[str, Any], label: str, arch: str) -> str:
    """The digest of the linux/``arch`` manifest in an index (the first one listed, as
    Docker picks); ImagePullFailure listing what there is otherwise."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImagePullFailure(f"the index of {label} has no manifest list")
    offered = []
    for entry in entries:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(platform, dict):
            continue
        system, machine = platform.get("os"), platform.get("architecture")
        variant = platform.get("variant") or ""
        offered.append(f"{system}/{machine}" + (f"/{variant}" if variant else ""))
        if (system, machine) == ("linux", arch) and (arch != "arm64" or variant in ("", "v8")):
            return _digest(entry.get("digest"), f"the index of {label}")
    listed = ", ".join(offered[:8]) or "none"
    raise ImagePullFailure(f"image {label} has no linux/{arch} variant (wrong architecture: "
                           f"it offers {listed[:200]})")
