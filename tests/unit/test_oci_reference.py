"""Image reference parsing: distribution's grammar with Docker Hub's defaults, and refusal of
anything else with a one-line message naming the reference."""

from __future__ import annotations

import pytest

from kata_ci.errors import ImagePullFailure
from kata_ci.images.oci.reference import Reference, parse_reference

D = "sha256:" + "ab" * 32
E = "sha256:" + "0f" * 32


@pytest.mark.parametrize(("text", "expected"), [
    ("busybox", Reference("docker.io", "library/busybox", "latest", None)),
    ("busybox:1.36", Reference("docker.io", "library/busybox", "1.36", None)),
    ("library/busybox", Reference("docker.io", "library/busybox", "latest", None)),
    ("user/repo:v_1-2.3", Reference("docker.io", "user/repo", "v_1-2.3", None)),
    ("docker.io/busybox", Reference("docker.io", "library/busybox", "latest", None)),
    ("index.docker.io/busybox", Reference("docker.io", "library/busybox", "latest", None)),
    ("index.docker.io/user/repo:x", Reference("docker.io", "user/repo", "x", None)),
    ("quay.io/coreos/etcd:v3.5", Reference("quay.io", "coreos/etcd", "v3.5", None)),
    ("quay.io/etcd", Reference("quay.io", "etcd", "latest", None)),  # no library/ there
    ("localhost/foo", Reference("localhost", "foo", "latest", None)),
    ("localhost:5000/foo/bar:1", Reference("localhost:5000", "foo/bar", "1", None)),
    ("127.0.0.1:5000/a/b/c", Reference("127.0.0.1:5000", "a/b/c", "latest", None)),
    ("[::1]:5000/foo:t", Reference("[::1]:5000", "foo", "t", None)),
    ("Registry.Example.com/foo", Reference("Registry.Example.com", "foo", "latest", None)),
    (f"registry.example:443/a/b@{D}", Reference("registry.example:443", "a/b", None, D)),
    (f"busybox:1@{D}", Reference("docker.io", "library/busybox", "1", D)),
    ("foo_bar/a.b-c__d---e", Reference("docker.io", "foo_bar/a.b-c__d---e", "latest", None)),
    ("foo/bar", Reference("docker.io", "foo/bar", "latest", None)),  # no dot: a Hub user
])
def test_valid_references_normalise(text: str, expected: Reference) -> None:
    """Each accepted form gives the registry, repository, tag and digest Docker would use."""
    assert parse_reference(text) == expected


@pytest.mark.parametrize("text", [
    "", " busybox", "busybox ", "Busybox", "docker.io/Foo", "busybox:", "busybox:-x",
    "busybox:.x", "busybox:" + "a" * 129, "busybox:a b", "busybox@sha256:abc",
    "busybox@md5:" + "ab" * 16, "busybox@SHA256:" + "AB" * 32, f"busybox@{D}x", "a//b",
    "-foo", "foo-", "foo.", "../etc", "foo/../bar", "http://foo/bar", "foo\nbar",
    "localhost:abc/foo", "bad_host.example/foo", "a" * 256, f"busybox@{D}@{D}", "/foo",
    "foo/", "foo:bar:baz",
])
def test_malformed_references_are_refused(text: str) -> None:
    """Text outside the grammar: an ImagePullFailure quoting it, on one line."""
    with pytest.raises(ImagePullFailure) as caught:
        parse_reference(text)
    message = str(caught.value)
    assert message.startswith("invalid image reference ") and "\n" not in message
    assert repr(text[:300])[:40] in message


def test_transport_canonical_and_with_digest() -> None:
    """skopeo gets the digest when known; canonical keeps tag and digest; with_digest pins."""
    tagged = parse_reference("busybox:1")
    assert tagged.transport() == "docker://docker.io/library/busybox:1"
    assert tagged.canonical() == "docker.io/library/busybox:1" == str(tagged)
    both = parse_reference(f"busybox:1@{D}")
    assert both.transport() == f"docker://docker.io/library/busybox@{D}"
    assert both.canonical() == f"docker.io/library/busybox:1@{D}"
    pinned = tagged.with_digest(E)
    assert pinned.transport() == f"docker://docker.io/library/busybox@{E}"
    assert (pinned.tag, pinned.digest) == ("1", E)
    assert parse_reference(pinned.canonical()) == pinned
    with pytest.raises(ImagePullFailure) as caught:
        tagged.with_digest("sha256:nothex\n")
    assert str(caught.value) == ("invalid digest 'sha256:nothex\\n' for "
                                 "docker.io/library/busybox:1")
