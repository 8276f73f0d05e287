"""How kata-ci talks to registries through skopeo: credentials, TLS, architecture, and what a
failure means in words an operator can act on.

Credentials are the operator's docker-style ``config.json`` merged with a job's own (GitLab's
DOCKER_AUTH_CONFIG, CI_REGISTRY_*) into a temporary 0600 file that exists only while skopeo
runs; without either, skopeo is told to pull anonymously, so root's own ``docker login`` on the
host never leaks into a job's pull.

TLS: a registry with a CA directory in ``cert_dirs`` is always verified against it. One listed
in ``insecure`` may use plain HTTP or an unverified certificate (Docker's
``insecure-registries``). A loopback registry is verified too, and falls back to plain HTTP only
when it answers in plain HTTP (``plain_http=True``, set by the caller after that answer): Docker
allows loopback in clear, and the traffic never leaves the host, but a loopback registry that
does speak TLS has no reason to be trusted blindly.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kata_ci.errors import ImagePullFailure
from kata_ci.images.oci.reference import DOCKER_HUB, Reference

# platform.machine() -> the OCI architecture name; others are spelled alike (riscv64, s390x).
ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
          "armv7l": "arm", "i686": "386", "i386": "386"}
DOCKER_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "docker.io",
                      "registry.hub.docker.com"}
DETAIL_CHARS = 300


@dataclass(frozen=True)
class RegistryConfig:
    auth_file: Path | None = None  # docker-style config.json ("auths" only: no helpers)
    insecure: tuple[str, ...] = ()  # registries allowed plain HTTP / unverified TLS
    cert_dirs: Mapping[str, Path] = field(default_factory=dict)  # registry -> dir of *.crt
    # registry -> the registry pulled from instead (a pull-through cache of Docker Hub, as
    # Docker's registry-mirrors and containerd's hosts.toml); same repository, tag, digest.
    mirrors: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Credentials:
    registry: str
    username: str
    password: str = field(repr=False)


def host_arch() -> str:
    machine = platform.machine()
    return ARCHES.get(machine, machine.lower())


def normalise_registry(name: str) -> str:
    """A registry as an image reference names it: host[:port], lowercase, Docker Hub as
    ``docker.io``, from a config.json key (``https://index.docker.io/v1/``, ``quay.io``), a
    GitLab credential's URL or a reference's registry."""
    text = name.strip()
    netloc = urlsplit(text).netloc if "://" in text else text.split("/", 1)[0]
    host = netloc.rpartition("@")[2].lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def is_loopback(registry: str) -> bool:
    """localhost, 127.0.0.0/8 or [::1], with or without a port."""
    host = registry
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_auths(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ImagePullFailure(f"registry auth file {path} is unreadable: {exc}") from None
    auths = document.get("auths", {}) if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        raise ImagePullFailure(f"registry auth file {path}: \"auths\" is not an object")
    return {normalise_registry(str(k)): v for k, v in auths.items() if isinstance(v, dict)}


@contextlib.contextmanager
def auth_file(config: RegistryConfig, credentials: Sequence[Credentials] = (),
              directory: Path | None = None) -> Iterator[Path | None]:
    """A temporary 0600 config.json: the configured file's ``auths`` with the job's
    credentials over them (the job's win), removed afterwards. None when there is neither."""
    if config.auth_file is None and not credentials:
        yield None
        return
    auths = _read_auths(config.auth_file) if config.auth_file is not None else {}
    for cred in credentials:
        token = base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()
        auths[normalise_registry(cred.registry)] = {"auth": token}
    handle, name = tempfile.mkstemp(prefix="tmp-auth-", suffix=".json", dir=directory)
    try:
        with os.fdopen(handle, "w") as out:  # mkstemp made it 0600
            json.dump({"auths": auths}, out)
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def tls_verified(registry: str, config: RegistryConfig, plain_http: bool = False) -> bool:
    """False where skopeo may skip verification and fall back to HTTP (see the module)."""
    if registry in config.cert_dirs:
        return True
    if registry in config.insecure:
        return False
    return not (plain_http and is_loopback(registry))


def skopeo_args(ref: Reference, config: RegistryConfig, authfile: Path | None, *,
                copy: bool = False, plain_http: bool = False) -> list[str]:
    """Options for ``skopeo inspect`` (or ``copy`` when ``copy``, whose source options are
    spelled --src-...) reading ``ref``: platform, TLS and credentials."""
    src = "--src-" if copy else "--"
    args = ["--override-os", "linux", "--override-arch", host_arch()]
    if not tls_verified(ref.registry, config, plain_http):
        args.append(f"{src}tls-verify=false")
    cert_dir = config.cert_dirs.get(ref.registry)
    if cert_dir is not None:
        args += [f"{src}cert-dir", str(cert_dir)]
    if authfile is not None:
        args += [f"{src}authfile", str(authfile)]
    else:
        args.append(f"{src}no-creds")
    return args


def run_skopeo(argv: Sequence[str], ref: Reference, timeout: float) -> bytes:
    """skopeo's stdout, or ImagePullFailure saying what its failure means for ``ref``."""
    try:
        done = subprocess.run(["skopeo", *argv], capture_output=True, timeout=timeout,
                              check=False)
    except FileNotFoundError:
        raise ImagePullFailure("skopeo is not installed on the host: apt-get install skopeo "
                               "(scripts/setup.sh)") from None
    except subprocess.TimeoutExpired:
        raise ImagePullFailure(f"registry {ref.registry} unreachable: pulling {ref} took "
                               f"longer than {timeout:.0f} s") from None
    if done.returncode != 0:
        raise ImagePullFailure(describe_failure(done.stderr.decode(errors="replace"), ref))
    return done.stdout


def failure_detail(stderr: str) -> str:
    """The line that says what went wrong (skopeo's fatal one, not its retry warnings),
    unquoted from logrus' msg="...", escaped and bounded: it ends up in a job log."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    chosen = next((line for line in lines if "level=fatal" in line),
                  lines[-1] if lines else "skopeo failed without a message")
    found = re.search(r'msg="((?:[^"\\]|\\.)*)"', chosen)
    # Only \" and \\ are undone: \n, \t stay escaped, on one line.
    text = re.sub(r'\\([\\"])', r"\1", found.group(1)) if found else chosen
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS - 3] + "..."


def describe_failure(stderr: str, ref: Reference) -> str:
    detail = failure_detail(stderr)
    low = re.sub(r"sha256:[0-9a-f]{64}", "sha256:...", detail.lower())  # "401" in a digest
    registry = ref.registry
    if "digest did not match" in low or "digest mismatch" in low:
        return f"corrupt layer in {ref}: {detail}"
    if "server gave http response to https client" in low:
        return (f"{registry} speaks plain HTTP: allowed only for loopback or [images] insecure "
                f"registries ({detail})")
    if "x509" in low or "certificate" in low or "tls:" in low:
        return f"TLS verification failed for {registry} (configure a CA in cert_dirs): {detail}"
    if re.search(r"unauthorized|\b401\b|denied|authentication required", low):
        return f"registry {registry} refused the credentials (or needs some): {detail}"
    if "manifest unknown" in low or "name unknown" in low or "not found" in low:
        return f"image {ref} not found (tag or digest unknown at {registry})"
    if any(w in low for w in ("connection refused", "no such host", "timeout", "timed out",
                              "unreachable", "no route to host", "connection reset")):
        return f"registry {registry} unreachable: {detail}"
    return f"pulling {ref} failed: {detail}"
