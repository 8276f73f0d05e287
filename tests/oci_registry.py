"""Test fixture: a real OCI registry (Debian's ``docker-registry``, distribution 2.8) on a free
loopback port, with filesystem storage in a private directory. Three flavours: plain HTTP, TLS
with a certificate from a throwaway CA made here with openssl, and htpasswd auth (over plain
HTTP: distribution 2.8 takes it, and loopback is where kata-ci allows plain HTTP). Tests may
stop and restart it, and reach into its storage to tamper with a stored blob. Nothing here
talks to anything but 127.0.0.1."""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from tests.integration.redis_server import free_port

AUTH_USER = "ci-puller"
AUTH_PASSWORD = "s3cret-for-tests"  # a test fixture's, for a registry that lives in a tmp dir


class RegistryFixture:
    """One ``docker-registry serve`` process; ``host`` is ``127.0.0.1:PORT``."""

    def __init__(self, tls: bool = False, auth: bool = False) -> None:
        if shutil.which("docker-registry") is None:
            raise RuntimeError("docker-registry is not installed: apt-get install docker-registry")
        self.dir = Path(tempfile.mkdtemp(prefix="kci-registry-"))
        self.storage = self.dir / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.auth = auth
        self.ca_dir: Path | None = None  # *.crt of the CA that signed the server's certificate
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = self.dir / "config.yml"
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
        ]
        if self.tls:
            cert, key = self._make_certificates()
            lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        if self.auth:
            lines += ["auth:", "  htpasswd:", "    realm: kata-ci-test",
                      f"    path: {self._make_htpasswd()}"]
        self.config.write_text("\n".join(lines) + "\n")

    def _make_certificates(self) -> tuple[Path, Path]:
        """A CA and a server certificate for IP 127.0.0.1 signed by it (P-256: fast)."""
        tls = self.dir / "tls"
        self.ca_dir = self.dir / "ca"
        tls.mkdir()
        self.ca_dir.mkdir()
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

        def openssl(*args: str | Path) -> None:
            subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

        openssl("req", "-x509", *ec, "-keyout", tls / "ca.key", "-out", self.ca_dir / "ca.crt",
                "-days", "2", "-subj", "/CN=kata-ci test registry CA")
        openssl("req", *ec, "-keyout", tls / "server.key", "-out", tls / "server.csr",
                "-subj", "/CN=127.0.0.1")
        ext = tls / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", tls / "server.csr", "-CA", self.ca_dir / "ca.crt",
                "-CAkey", tls / "ca.key", "-CAcreateserial", "-out", tls / "server.crt",
                "-days", "2", "-extfile", ext)
        return tls / "server.crt", tls / "server.key"

    def _make_htpasswd(self) -> Path:
        """bcrypt, the only scheme distribution reads, through libxcrypt (Python's crypt module,
        deprecated but present in 3.11: neither bcrypt nor htpasswd is installed). Cost 4, the
        least: the registry checks the hash on every request."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        hashed = crypt.crypt(AUTH_PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
        path = self.dir / "htpasswd"
        path.write_text(f"{AUTH_USER}:{hashed}\n")
        return path

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited ({self.proc.returncode})")
            try:
                self.request("GET", "/v2/")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not answer /v2/")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RegistryFixture:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- the HTTP API, for pushing fixtures ---------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request as the fixture's owner (with the credentials when auth is on)."""
        url = path if path.startswith("http") else f"{self.scheme}://{self.host}{path}"
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        if self.auth:
            token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        context = None
        if self.tls:
            assert self.ca_dir is not None
            context = ssl.create_default_context(cafile=str(self.ca_dir / "ca.crt"))
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (to tamper with them)."""
        hexa = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"


@pytest.fixture(scope="session")
def oci_registry() -> Iterator[RegistryFixture]:
    """Plain HTTP on loopback, shared by the session (tests that stop it restart it)."""
    with RegistryFixture() as registry:
        yield registry


@pytest.fixture(scope="session")
def oci_tls_registry() -> Iterator[RegistryFixture]:
    with RegistryFixture(tls=True) as registry:
        yield registry


@pytest.fixture(scope="session")
def oci_auth_registry() -> Iterator[RegistryFixture]:
    with RegistryFixture(auth=True) as registry:
        yield registry
