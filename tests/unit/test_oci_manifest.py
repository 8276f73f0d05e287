"""Manifests, indexes and image configs as hostile input: every wrong type or shape is a
one-line ImagePullFailure naming the image, never a KeyError or TypeError."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kata_ci.errors import ImagePullFailure
from kata_ci.images.oci.manifest import ImageConfig, parse_manifest, pick_platform

D = "sha256:" + "cd" * 32
LAYER = {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": D,
         "size": 10}


def refused(call: Any, *args: Any) -> str:
    with pytest.raises(ImagePullFailure) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message and "img:1" in message, message
    return message


def test_config_fields_are_read_with_their_defaults() -> None:
    """Env, Cmd, User, WorkingDir, Entrypoint, tcp ports and platform; nulls are defaults."""
    config = ImageConfig.from_oci({"architecture": "amd64", "os": "linux", "config": {
        "Env": ["A=1"], "Cmd": None, "Entrypoint": ["/bin/sh"], "User": "1000:1000",
        "ExposedPorts": {"443/tcp": {}, "80": {}, "53/udp": {}, "80/TCP": {}}}}, "img:1")
    assert config == ImageConfig(env=("A=1",), entrypoint=("/bin/sh",), user="1000:1000",
                                 exposed_ports=(80, 443), architecture="amd64", os="linux")
    assert ImageConfig.from_oci(config.to_oci(), "img:1") == config
    assert ImageConfig.from_oci({"config": None}, "img:1") == ImageConfig()


@pytest.mark.parametrize(("document", "said"), [
    ([], "not a JSON object"),
    ({"config": "x"}, '"config" is not an object'),
    ({"config": {"Env": "A=1"}}, "Env is not a list of strings"),
    ({"config": {"Env": ""}}, "Env is not a list of strings"),
    ({"config": []}, '"config" is not an object'),
    ({"config": {"Cmd": ["ok", 1]}}, "Cmd is not a list of strings"),
    ({"config": {"Entrypoint": {"a": 1}}}, "Entrypoint is not a list of strings"),
    ({"config": {"User": 0}}, "User is not a string"),
    ({"config": {"WorkingDir": ["/"]}}, "WorkingDir is not a string"),
    ({"architecture": 64}, "architecture is not a string"),
    ({"config": {"ExposedPorts": ["80/tcp"]}}, "ExposedPorts is not an object"),
    ({"config": {"ExposedPorts": {"http/tcp": {}}}}, "exposed port 'http/tcp'"),
    ({"config": {"ExposedPorts": {"70000/tcp": {}}}}, "exposed port '70000/tcp'"),
    ({"config": {"ExposedPorts": {"80/t-p": {}}}}, "exposed port '80/t-p'"),
])
def test_malformed_configs_are_refused(document: object, said: str) -> None:
    """A config field of the wrong type or shape is refused, saying which."""
    assert said in refused(ImageConfig.from_oci, document, "img:1")


def manifest(**changes: object) -> bytes:
    document: dict[str, object] = {"schemaVersion": 2, "config": {"digest": D},
                                   "layers": [LAYER]}
    document.update(changes)
    return json.dumps(document).encode()


def test_manifest_layers_are_read_in_order() -> None:
    """Config digest and (digest, media type, size) of each layer, lowest first."""
    other = {**LAYER, "digest": "sha256:" + "ef" * 32, "mediaType":
             "application/vnd.oci.image.layer.v1.tar+zstd"}
    parsed = parse_manifest(manifest(layers=[LAYER, other]), "img:1")
    assert parsed.config == D
    assert [layer[0] for layer in parsed.layers] == [D, other["digest"]]


@pytest.mark.parametrize(("raw", "said"), [
    (b"not json", "is not JSON"),
    (b"[]", "is not a JSON object"),
    (b" " * (5 << 20), "larger than 4 MiB"),
    (manifest(schemaVersion=1), "schema 1 images are not supported"),
    (manifest(manifests=[]), "an index inside an index"),
    (manifest(layers=[]), "no config or no layers"),
    (manifest(config="x"), "no config or no layers"),
    (manifest(layers=["x"]), "a layer is not an object"),
    (manifest(layers=[{**LAYER, "size": "10"}]), "a layer has no size"),
    (manifest(layers=[{**LAYER, "digest": "sha256:short"}]), "not a sha256 digest"),
    (manifest(layers=[{**LAYER, "mediaType": "application/vnd.cncf.helm.chart.content"}]),
     "not a container image kata-ci can unpack"),
    (manifest(layers=[LAYER] * 1001), "too large: 1001 layers"),
])
def test_malformed_manifests_are_refused(raw: bytes, said: str) -> None:
    """Anything but a schema 2 image manifest of tar layers is refused, saying why."""
    assert said in refused(parse_manifest, raw, "img:1")


def test_index_picks_linux_arch_and_lists_what_there_is() -> None:
    """The first linux/<arch> entry wins (arm64 only as v8 or bare); none: the offer is named."""
    arm_v7 = {"digest": "sha256:" + "01" * 32,
              "platform": {"os": "linux", "architecture": "arm64", "variant": "v7"}}
    arm = {"digest": D, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
    index = {"manifests": ["junk", {"platform": "x"}, arm_v7, arm,
                           {"digest": "sha256:" + "02" * 32,
                            "platform": {"os": "windows", "architecture": "amd64"}}]}
    assert pick_platform(index, "img:1", "arm64") == D
    message = refused(pick_platform, index, "img:1", "amd64")
    assert "no linux/amd64 variant" in message and "windows/amd64" in message
    assert "linux/arm64/v7" in message
    assert "no manifest list" in refused(pick_platform, {"manifests": {}}, "img:1", "amd64")
