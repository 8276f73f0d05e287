"""Attacks on the host through an OCI image (images/oci/): a registry serving tampered blobs,
layers that try to write, link or delete outside the unpack tree (every stack of
tests/oci_images.hostile_layers), each pulled for real from a registry on loopback. The host
directory they aim at stays as it was, and the cache holds nothing of the attempt."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kata_ci.errors import ImagePullFailure
from kata_ci.images.oci.store import ImageStore
from tests.oci_images import build_image, hostile_layers, layer_digests
from tests.oci_registry import RegistryFixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking keeps owners: needs root")
CASES = sorted(hostile_layers(Path("/nonexistent")))


def leftovers(store: ImageStore) -> list[str]:
    names = [p.name for p in store.root.glob("tmp-*")]
    images = store.root / "images"
    names += [p.name for p in images.iterdir()] if images.is_dir() else []
    return names


def refused(store: ImageStore, reference: str) -> str:
    with pytest.raises(ImagePullFailure) as caught:
        store.pull(reference)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("case", CASES)
def test_hostile_layers_touch_nothing_outside(oci_registry: RegistryFixture, tmp_path: Path,
                                              case: str) -> None:
    """A layer stack escaping the tree (.., absolute links, symlinked parents across layers,
    hard links out, whiteouts through links): refused, the target untouched, nothing cached."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    before = sorted(p.name for p in outside.iterdir())
    tag = f"{case}-{time.time_ns()}"
    build_image(oci_registry, "kata-ci/hostile", tag, extra_layers=hostile_layers(outside)[case])
    store = ImageStore(tmp_path / "store", retries=0)
    assert "unsafe" in refused(store, f"{oci_registry.host}/kata-ci/hostile:{tag}")
    assert sorted(p.name for p in outside.iterdir()) == before
    assert (outside / "secret").read_text() == "host secret\n"
    assert not (tmp_path / "escaped").exists() and leftovers(store) == []


def test_tampered_blob_is_refused_and_leaves_nothing(oci_registry: RegistryFixture,
                                                     tmp_path: Path) -> None:
    """A registry serving a layer whose bytes differ from its digest: 'corrupt layer', and
    no disk, record or work directory is left in the cache."""
    digest = build_image(oci_registry, "kata-ci/corrupt", "v1",
                         {"etc/unique": f"{time.time_ns()}".encode() * 100})
    tampered = oci_registry.blob_path(layer_digests(oci_registry, "kata-ci/corrupt", digest)[1])
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    store = ImageStore(tmp_path / "store", retries=0)
    message = refused(store, f"{oci_registry.host}/kata-ci/corrupt:v1")
    assert message.startswith("corrupt layer in "), message
    assert leftovers(store) == []
