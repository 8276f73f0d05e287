"""How kata-ci talks to registries, without one: which registries may skip TLS, the temporary
auth file, and what skopeo's failures (lines as skopeo 1.9 prints them) mean for a job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kata_ci.images.oci.reference import parse_reference
from kata_ci.images.oci.registry import (
    Credentials,
    RegistryConfig,
    auth_file,
    describe_failure,
    is_loopback,
    skopeo_args,
)

REF = parse_reference("registry.example/team/app:1")
HEX = "401f" * 16  # a digest holding "401" must not read as an HTTP status
FATAL = 'time="2026-01-01T00:00:00Z" level=fatal msg="{}"'


@pytest.mark.parametrize(("detail", "expected"), [
    (f'reading manifest sha256:{HEX} in registry.example/team/app: manifest unknown: manifest '
     'unknown', "image registry.example/team/app:1 not found (tag or digest unknown at "
     "registry.example)"),
    ('pinging container registry registry.example: Get \\"https://registry.example/v2/\\": '
     'dial tcp 10.0.0.1:443: connect: connection refused', "registry registry.example "
     "unreachable: pinging container registry registry.example: Get "
     '"https://registry.example/v2/": dial tcp 10.0.0.1:443: connect: connection refused'),
    ('pinging container registry registry.example: Get \\"https://registry.example/v2/\\": '
     'x509: certificate signed by unknown authority', "TLS verification failed for "
     "registry.example (configure a CA in cert_dirs): pinging"),
    ("reading manifest 1 in registry.example/team/app: unauthorized: authentication required",
     "registry registry.example refused the credentials (or needs some): reading"),
    (f"writing blob: happened during read: Digest did not match, expected sha256:{HEX}, got "
     f"sha256:{HEX}", "corrupt layer in registry.example/team/app:1: writing blob"),
    ("something new\\tand odd", "pulling registry.example/team/app:1 failed: something "
     "new\\tand odd"),
])
def test_skopeo_failures_become_one_line_to_act_on(detail: str, expected: str) -> None:
    """Each skopeo failure maps to its message; retry warnings before the fatal line are ignored."""
    stderr = 'level=warning msg="Failed, retrying in 1s ... (1/2). Error: x"\n' + FATAL.format(
        detail) + "\n"
    message = describe_failure(stderr, REF)
    assert message.startswith(expected), message
    assert "\n" not in message and "\t" not in message


def test_skopeo_detail_is_bounded() -> None:
    """A very long skopeo message is cut to about 300 characters."""
    message = describe_failure(FATAL.format("z" * 5000), REF)
    assert message.endswith("...") and len(message) < 400


def test_plain_http_only_for_loopback_or_listed() -> None:
    """TLS is skipped only for listed registries, or loopback once it answered in plain HTTP."""
    remote, local = parse_reference("registry.example/a:1"), parse_reference("localhost:5000/a")
    plain = RegistryConfig()
    for flags in (skopeo_args(remote, plain, None), skopeo_args(remote, plain, None,
                                                               plain_http=True, copy=True)):
        assert not any("tls-verify=false" in f for f in flags)
    assert "--tls-verify=false" not in skopeo_args(local, plain, None)
    assert "--src-tls-verify=false" in skopeo_args(local, plain, None, plain_http=True, copy=True)
    listed = RegistryConfig(insecure=("registry.example",))
    assert "--tls-verify=false" in skopeo_args(remote, listed, None)
    pinned = RegistryConfig(cert_dirs={"localhost:5000": Path("/ca")})
    flags = skopeo_args(local, pinned, None, plain_http=True)
    assert "--tls-verify=false" not in flags and flags[-3:-1] == ["--cert-dir", "/ca"]
    line = ('level=fatal msg="pinging container registry registry.example: Get '
            '\\"https://registry.example/v2/\\": http: server gave HTTP response to HTTPS client"')
    assert describe_failure(line, remote).startswith(
        "registry.example speaks plain HTTP: allowed only for loopback or [images] insecure")

def test_loopback_is_only_loopback() -> None:
    """localhost, 127.0.0.0/8 and [::1] (with or without a port) are loopback; nothing else."""
    for name in ("localhost", "localhost:5000", "127.0.0.1", "127.9.9.9:80", "[::1]:5000"):
        assert is_loopback(name), name
    for name in ("localhost.example", "10.0.0.1:5000", "[::2]:5000", "127.example", "0.0.0.0"):
        assert not is_loopback(name), name

def test_auth_file_merges_operator_and_job_credentials(tmp_path: Path) -> None:
    """The temporary config.json is 0600, holds the operator's auths with the job's over them
    (Docker Hub's legacy key included), and is gone afterwards."""
    operator = tmp_path / "config.json"
    operator.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": "b3A6b3A="}, "quay.io": {"auth": "cTpx"}},
        "credHelpers": {"gcr.io": "gcloud"}}))
    config = RegistryConfig(auth_file=operator)
    job = [Credentials("docker.io", "job", "pw")]
    with auth_file(config, job, directory=tmp_path) as path:
        assert path is not None and os.stat(path).st_mode & 0o777 == 0o600
        auths = json.loads(path.read_text())["auths"]
        assert auths == {"docker.io": {"auth": "am9iOnB3"}, "quay.io": {"auth": "cTpx"}}
    assert not path.exists()
    with auth_file(RegistryConfig(), ()) as nothing:
        assert nothing is None
