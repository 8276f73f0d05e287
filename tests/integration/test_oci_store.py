"""The image store against a real registry (Debian's docker-registry on loopback): pulls by tag
and digest into slot-sized ext4 disks, pull policies with the registry stopped, concurrent
pulls, platforms, TLS, auth, corrupt blobs, and prune. Images are made by tests/oci_images.py;
what needs no registry is in tests/unit/test_oci_registry.py."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kata_ci.errors import ImagePullFailure
from kata_ci.images.oci import store as store_module
from kata_ci.images.oci.registry import Credentials, RegistryConfig
from kata_ci.images.oci.store import SLOT_BYTES, ImageStore
from tests.integration.redis_server import free_port
from tests.oci_images import (
    Dir,
    Entry,
    File,
    build_image,
    build_index,
    layer_tar,
    member,
    tar_bytes,
)

if TYPE_CHECKING:
    from tests.oci_registry import RegistryFixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking keeps owners: needs root")
REPO_ROOT = Path(__file__).resolve().parents[2]


class Said(list[str]):
    """Progress lines (a store's callback), thread-safe by list.append."""

    def starting(self, prefix: str) -> int:
        """How many lines start with ``prefix``."""
        return sum(1 for line in self if line.startswith(prefix))


@pytest.fixture
def said() -> Said:
    return Said()


@pytest.fixture
def store(tmp_path: Path, said: Said) -> ImageStore:
    # No retries: an unreachable registry fails at once instead of after 1 s + 2 s.
    return ImageStore(tmp_path / "store", progress=said.append, retries=0)


def failure(store: ImageStore, reference: str, **kwargs: object) -> str:
    with pytest.raises(ImagePullFailure) as caught:
        store.pull(reference, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message and len(message) < 700, message
    return message


def debugfs(disk: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["debugfs", "-R", command, str(disk)], capture_output=True, text=True,
                          check=True)


def leftovers(store: ImageStore) -> list[str]:
    """What a failed pull must not leave: work dirs, disks, records."""
    names = [p.name for p in store.root.glob("tmp-*")]
    names += [p.name for p in (store.root / "images").iterdir()]
    return names + [p.name for p in (store.root / "refs").glob("tmp-*")]


def test_pull_by_tag_builds_a_slot_sized_read_only_disk(
        oci_registry: RegistryFixture, store: ImageStore, said: Said) -> None:
    """A tag pull yields a SLOT_BYTES sparse ext4 with files, owners, links and config intact."""
    files: dict[str, Entry] = {
        "usr": Dir(), "usr/bin": Dir(), "usr/bin/suid": File(b"#!/bin/sh\n", 0o4755),
        "home/builder/mine": File(b"mine\n", 0o600, 1000, 1000)}
    config = {"Env": ["PATH=/bin", "A=1"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["id"],
              "User": "builder", "WorkingDir": "/home/builder",
              "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "22": {}}}
    special = tar_bytes([(member("usr/bin/suid-too", tarfile.LNKTYPE, link="usr/bin/suid"),
                          None), (member("run/fifo", tarfile.FIFOTYPE, mode=0o640), None)])
    digest = build_image(oci_registry, "kata-ci/plain", "v1", files, config,
                         extra_layers=[special])
    image = store.pull(f"{oci_registry.host}/kata-ci/plain:v1")
    assert image.digest == digest and image.reference == f"{oci_registry.host}/kata-ci/plain:v1"
    assert os.stat(image.disk).st_size == SLOT_BYTES
    assert os.stat(image.disk).st_blocks * 512 < 256 << 20  # the rest is a hole
    assert image.size_bytes < 256 << 20
    assert "builder:x:1000:1000" in debugfs(image.disk, "cat /etc/passwd").stdout
    suid = debugfs(image.disk, "stat /usr/bin/suid").stdout  # hardlinked: one inode
    assert "Mode:  04755" in suid and "User:     0" in suid
    assert "User:  1000" in debugfs(image.disk, "stat /home/builder/mine").stdout
    assert "Links: 2" in suid and "Type: FIFO" in debugfs(image.disk, "stat /run/fifo").stdout
    assert "/bin/busybox" in debugfs(image.disk, "stat /bin/sh").stdout  # link kept verbatim
    assert image.config.env == ("PATH=/bin", "A=1") and image.config.user == "builder"
    assert image.config.entrypoint == ("/bin/sh", "-c") and image.config.cmd == ("id",)
    assert image.config.working_dir == "/home/builder"
    assert image.config.exposed_ports == (22, 8080)
    assert (image.config.os, image.config.architecture) == ("linux", "amd64")
    assert [line.split(" ")[0] for line in said] == [
        "resolving", "pulling", "unpacking", "building", "cached"]
    assert "(3 layers," in said[1]
    assert store.images() == [image]


def test_whiteouts_across_layers_reach_the_disk(oci_registry: RegistryFixture,
                                                store: ImageStore) -> None:
    """Files, directories and opaque contents whited out by an upper layer are not on the disk."""
    lower = layer_tar({"etc/hello": b"hi\n", "opt/old": Dir(), "opt/old/x": b"x",
                       "srv/a": b"a", "srv/b": b"b"})
    upper = layer_tar({"etc/.wh.hello": b"", "opt/.wh.old": b"", "srv/.wh..wh..opq": b"",
                       "srv/c": b"c"})
    build_image(oci_registry, "kata-ci/layers", "v1", extra_layers=[lower, upper])
    image = store.pull(f"{oci_registry.host}/kata-ci/layers:v1")
    for gone in ("/etc/hello", "/opt/old", "/srv/a", "/srv/b"):
        assert "not found" in debugfs(image.disk, f"stat {gone}").stderr, gone
    assert debugfs(image.disk, "cat /srv/c").stdout == "c"


def test_cached_images_need_no_registry(oci_registry: RegistryFixture, tmp_path: Path,
                                        said: Said) -> None:
    """Registry stopped: cached digests and if-not-present tags work, always fails 'unreachable'."""
    digest = build_image(oci_registry, "kata-ci/offline", "v1", {"etc/o": b"o"})
    store = ImageStore(tmp_path / "store", progress=said.append, retries=0)
    by_digest = f"{oci_registry.host}/kata-ci/offline@{digest}"
    first = store.pull(by_digest)
    store.pull(f"{oci_registry.host}/kata-ci/offline:v1")  # records the tag
    said.clear()
    oci_registry.stop()
    try:
        again = store.pull(by_digest, policy="always")
        assert again.disk == first.disk and said.starting("resolving") == 0
        tagged = store.pull(f"{oci_registry.host}/kata-ci/offline:v1", policy="if-not-present")
        assert tagged.digest == digest
        message = failure(store, f"{oci_registry.host}/kata-ci/offline:v1", policy="always")
        assert f"registry {oci_registry.host} unreachable" in message
    finally:
        oci_registry.start()


def test_never_pulls_only_from_the_cache(oci_registry: RegistryFixture,
                                         store: ImageStore) -> None:
    """pull_policy never: uncached fails saying so, without a registry; cached is used."""
    build_image(oci_registry, "kata-ci/never", "v1", {"etc/n": b"n"})
    ref = f"{oci_registry.host}/kata-ci/never:v1"
    assert "not cached and pull_policy is never" in failure(store, ref, policy="never")
    store.pull(ref)
    assert store.pull(ref, policy="never").disk.is_file()


CHILD = """
import sys, time
from pathlib import Path
from kata_ci.images.oci.store import ImageStore
root, ref, go = sys.argv[1:4]
def say(line):
    print(line, flush=True)
    if line.startswith("unpacking"):
        time.sleep(0.5)  # holding the lock: the other pullers must be waiting on it
store = ImageStore(Path(root), progress=say, retries=0)
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.005)
print("DIGEST", store.pull(ref).digest, flush=True)
"""


def test_concurrent_pulls_build_once(oci_registry: RegistryFixture, tmp_path: Path) -> None:
    """4 threads and 2 processes pulling one new image: one builds the disk, five wait for it."""
    digest = build_image(oci_registry, "kata-ci/concurrent", "v1", {"etc/c": b"c"})
    ref = f"{oci_registry.host}/kata-ci/concurrent:v1"
    root, go = tmp_path / "store", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), ref, str(go)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    said, start, digests = Said(), threading.Event(), []

    def say(line: str) -> None:
        said.append(line)
        if line.startswith("unpacking"):
            time.sleep(0.5)

    def puller() -> None:
        store = ImageStore(root, progress=say, retries=0)
        start.wait()
        digests.append(store.pull(ref).digest)

    threads = [threading.Thread(target=puller) for _ in range(4)]
    for thread in threads:
        thread.start()
    go.touch()
    start.set()
    for thread in threads:
        thread.join(60)
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        said.extend(out.splitlines())
        digests += [line.split()[1] for line in out.splitlines() if line.startswith("DIGEST")]
    assert digests == [digest] * 6
    assert said.starting("building disk") == 1 and said.starting("unpacking") == 1, said
    assert said.starting("using cached") == 5
    assert not list(root.glob("tmp-*"))


def test_index_picks_this_hosts_platform(oci_registry: RegistryFixture, store: ImageStore,
                                         said: Said) -> None:
    """A multi-arch index yields linux/amd64, by tag and by index digest (then offline too)."""
    amd = build_image(oci_registry, "kata-ci/multi", "amd", {"etc/arch": b"amd64\n"})
    arm = build_image(oci_registry, "kata-ci/multi", "arm", {"etc/arch": b"arm64\n"},
                      architecture="arm64")
    index = build_index(oci_registry, "kata-ci/multi", "v1", {"arm64": arm, "amd64": amd})
    image = store.pull(f"{oci_registry.host}/kata-ci/multi:v1")
    assert image.digest == amd
    assert debugfs(image.disk, "cat /etc/arch").stdout == "amd64\n"
    pinned = f"{oci_registry.host}/kata-ci/multi@{index}"
    assert store.pull(pinned).digest == amd
    said.clear()
    oci_registry.stop()
    try:
        assert store.pull(pinned).digest == amd and said.starting("resolving") == 0
    finally:
        oci_registry.start()


def test_docker_schema2_images_keep_their_digests(oci_registry: RegistryFixture,
                                                  store: ImageStore) -> None:
    """A Docker manifest list and schema 2 manifest pull with the digests the registry named."""
    amd = build_image(oci_registry, "kata-ci/docker", "amd", {"etc/d": b"docker\n"},
                      docker=True)
    arm = build_image(oci_registry, "kata-ci/docker", "arm", {"etc/d": b"arm\n"},
                      architecture="arm64", docker=True)
    build_index(oci_registry, "kata-ci/docker", "v1", {"amd64": amd, "arm64": arm}, docker=True)
    image = store.pull(f"{oci_registry.host}/kata-ci/docker:v1")
    assert image.digest == amd and image.disk == store.disk_path(amd)
    assert debugfs(image.disk, "cat /etc/d").stdout == "docker\n"


def test_other_architectures_are_refused(oci_registry: RegistryFixture,
                                         store: ImageStore) -> None:
    """An arm64-only image or index fails naming the architecture and leaves nothing behind."""
    arm = build_image(oci_registry, "kata-ci/armonly", "v1", {"etc/a": b"a"},
                      architecture="arm64")
    build_index(oci_registry, "kata-ci/armonly", "index", {"arm64": arm})
    single = failure(store, f"{oci_registry.host}/kata-ci/armonly:v1")
    assert "linux/arm64" in single and "architecture" in single and "linux/amd64" in single
    listed = failure(store, f"{oci_registry.host}/kata-ci/armonly:index")
    assert "no linux/amd64 variant" in listed and "linux/arm64" in listed
    assert leftovers(store) == []


def test_unknown_images_and_dead_registries(oci_registry: RegistryFixture,
                                            store: ImageStore) -> None:
    """An unknown repository or tag is 'not found'; a port nobody listens on 'unreachable'."""
    build_image(oci_registry, "kata-ci/known", "v1", {"etc/k": b"k"})
    for ref in ("kata-ci/nosuchrepo:v1", "kata-ci/known:nosuchtag"):
        message = failure(store, f"{oci_registry.host}/{ref}")
        assert message == (f"image {oci_registry.host}/{ref} not found (tag or digest unknown "
                           f"at {oci_registry.host})")
    dead = f"127.0.0.1:{free_port()}"
    assert f"registry {dead} unreachable" in failure(store, f"{dead}/kata-ci/known:v1")
    assert leftovers(store) == []


def test_too_large_images_are_refused(oci_registry: RegistryFixture, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Too many entries, or an ext4 larger than the image slot: 'too large', nothing left."""
    build_image(oci_registry, "kata-ci/large", "v1", {f"etc/f{i}": b"f" for i in range(50)})
    ref = f"{oci_registry.host}/kata-ci/large:v1"
    few = ImageStore(tmp_path / "few", retries=0, max_entries=40)
    assert "too large: more than 40 entries" in failure(few, ref)
    assert leftovers(few) == []
    monkeypatch.setattr(store_module, "SLOT_BYTES", 8 << 20)
    small = ImageStore(tmp_path / "small", retries=0)
    assert "too large: its disk would be" in failure(small, ref)
    assert leftovers(small) == []


def test_host_failures_are_pull_failures(oci_registry: RegistryFixture, store: ImageStore,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A host-side OSError (here a full disk) during a pull is one ImagePullFailure line."""
    build_image(oci_registry, "kata-ci/nospace", "v1", {"etc/n": b"n"})

    def full(*args: object, **kwargs: object) -> str:
        raise OSError(28, "No space left on device", "/store/tmp-x")

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    message = failure(store, f"{oci_registry.host}/kata-ci/nospace:v1")
    assert message.endswith("the host's image store failed: No space left on device "
                            "(/store/tmp-x)"), message
    assert leftovers(store) == []


def test_tls_registry_needs_its_ca(oci_tls_registry: RegistryFixture, tmp_path: Path) -> None:
    """A TLS registry pulls with its CA in cert_dirs and fails 'TLS verification' without it."""
    assert oci_tls_registry.ca_dir is not None
    digest = build_image(oci_tls_registry, "kata-ci/tls", "v1", {"etc/t": b"t"})
    ref = f"{oci_tls_registry.host}/kata-ci/tls:v1"
    bare = ImageStore(tmp_path / "bare", retries=0)
    message = failure(bare, ref)
    assert message.startswith(f"TLS verification failed for {oci_tls_registry.host} "
                              "(configure a CA in cert_dirs)"), message
    config = RegistryConfig(cert_dirs={oci_tls_registry.host: oci_tls_registry.ca_dir})
    assert ImageStore(tmp_path / "ca", config, retries=0).pull(ref).digest == digest


def test_auth_registry_takes_job_credentials(oci_auth_registry: RegistryFixture,
                                             tmp_path: Path) -> None:
    """An htpasswd registry pulls with job or operator credentials; none or wrong: 'refused'."""
    from tests.oci_registry import AUTH_PASSWORD, AUTH_USER
    digest = build_image(oci_auth_registry, "kata-ci/private", "v1", {"etc/p": b"p"})
    ref = f"{oci_auth_registry.host}/kata-ci/private:v1"
    store = ImageStore(tmp_path / "store", retries=0)
    wanted = f"registry {oci_auth_registry.host} refused the credentials (or needs some)"
    assert failure(store, ref).startswith(wanted)
    wrong = [Credentials(oci_auth_registry.host, AUTH_USER, "wrong")]
    assert failure(store, ref, credentials=wrong).startswith(wanted)
    good = [Credentials(oci_auth_registry.host, AUTH_USER, AUTH_PASSWORD)]
    assert store.pull(ref, credentials=good).digest == digest
    assert not list(store.root.glob("tmp-*"))  # the auth file went with the pull
    token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    operator = tmp_path / "config.json"
    operator.write_text(json.dumps({"auths": {oci_auth_registry.host: {"auth": token}}}))
    configured = ImageStore(tmp_path / "operator", RegistryConfig(auth_file=operator), retries=0)
    assert failure(configured, ref, credentials=wrong).startswith(wanted)  # the job's win
    assert configured.pull(ref).digest == digest


def test_prune_removes_unused_and_skips_held(oci_registry: RegistryFixture, store: ImageStore,
                                            said: Said) -> None:
    """prune drops idle images, their refs and stale tmp-*; keeps fresh and held ones."""
    old, held, fresh = (store.pull(f"{oci_registry.host}/kata-ci/prune:{tag}") for tag in (
        build_image(oci_registry, "kata-ci/prune", tag, {"etc/tag": tag.encode()}) and tag
        for tag in ("old", "held", "fresh")))
    for image in (old, held):
        meta = store.meta_path(image.digest)
        record = json.loads(meta.read_text())
        record["last_used"] -= 7200
        meta.write_text(json.dumps(record))
    stale, recent = store.root / "tmp-killed", store.root / "tmp-running"
    stale.mkdir()
    recent.mkdir()
    os.utime(stale, (time.time() - 7200,) * 2)
    assert [i.digest for i in store.prune(3600, dry_run=True)] == sorted([old.digest,
                                                                         held.digest])
    assert old.disk.is_file() and stale.is_dir()
    with store.in_use(held):
        removed = store.prune(3600)
    assert [i.digest for i in removed] == [old.digest]
    assert not old.disk.exists() and not store.meta_path(old.digest).exists()
    assert held.disk.is_file() and fresh.disk.is_file()
    assert any("in use, kept" in line for line in said)
    assert not stale.exists() and recent.is_dir()
    refs = [json.loads(p.read_text())["digest"] for p in (store.root / "refs").glob("*.json")]
    assert old.digest not in refs and held.digest in refs
    assert {i.digest for i in store.images()} == {held.digest, fresh.digest}
