"""The runner image layer in real VMs: /opt/actions-runner from a synthetic actions-runner
tarball, in cold-booted and restored VMs alike, writable only in the job's own overlay.

Everything runs over a private cache (KATA_CI_CACHE) whose manifest names the machine's
kernel, rootfs, initramfs and tools plus a layer built here: the machine's own manifests
(~/.cache/kata-ci, the published system images) and templates are never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from kata_ci import paths
from kata_ci.images.artifacts import Artifact, Manifest
from kata_ci.images.runner_layer import build_runner_layer
from tests.e2e.conftest import kata_ci_run, leftovers

NAME = "actions-runner-linux-x64-2.329.0.tar.gz"
# What the job checks inside the VM; each line's output is asserted on the host.
PROBE = """set -e
/opt/actions-runner/run.sh hello
/opt/actions-runner/bin/Runner.Listener
stat -c 'owner %u:%g %a' /opt/actions-runner/bin/Runner.Listener
python3 -c 'import json; print("json", json.load(open(
    "/opt/actions-runner/.kata-ci-layer.json"))["version"])'
"""
WRITE = """set -e
echo 'echo changed-by-job' > /opt/actions-runner/run.sh
echo new > /opt/actions-runner/new-file
echo wrote $(sh /opt/actions-runner/run.sh) $(cat /opt/actions-runner/new-file)
"""
BOOT_MARK = "dmesg | grep -m1 'Freeing unused kernel image' | cut -d']' -f1 | tr -d '[ '"


def synthetic_tarball(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("./run.sh", b'#!/bin/sh\necho runner-ok "$@"\n'),
                           ("./bin/Runner.Listener", b"#!/bin/sh\necho listener-ok\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), 0o755, 1001, 1001
            archive.addfile(info, io.BytesIO(data))
    return path


def sha256(path: Path) -> str:
    """Of the bytes now, not file_sha256's record (which a write would not update)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def layered(tmp_path: Path, manifest: Manifest,
            cli_env: dict[str, str]) -> tuple[dict[str, str], Path, Artifact]:
    """(environment for `kata-ci` over the private cache, that cache, the layer built in it).
    The manifest starts without the layer; ``with_layer`` switches it on."""
    cache = tmp_path / "cache"
    layer = build_runner_layer(cache, lambda _: None, synthetic_tarball(tmp_path / NAME))
    manifest.save(cache)  # the machine's own images, by their paths
    accel = paths.cache_dir() / "accel.json"
    if accel.exists():  # the host's KVM-or-TCG verdict: no probe VM
        shutil.copy(accel, cache / "accel.json")
    return {**cli_env, "KATA_CI_CACHE": str(cache)}, cache, layer


def with_layer(manifest: Manifest, cache: Path, layer: Artifact | None) -> None:
    dataclasses.replace(manifest, runner=layer).save(cache)


def job(env: dict[str, str], work: Path, script: str, *flags: str) -> tuple[str, str]:
    done = kata_ci_run([*flags, "--", "sh", "-c", script], env, work)
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    return done.stdout.decode(), done.stderr.decode()


def test_a_cold_vm_sees_the_layer_and_its_writes_never_reach_the_image(
        tmp_path: Path, manifest: Manifest,
        layered: tuple[dict[str, str], Path, Artifact]) -> None:
    """A cold-booted VM has /opt/actions-runner: run.sh runs, the layer's record is readable,
    files are root's; the job may overwrite and add files there, yet the image on the host
    keeps its bytes and the next VM sees the original run.sh."""
    env, cache, layer = layered
    with_layer(manifest, cache, layer)
    work = tmp_path / "ws"
    work.mkdir()
    before = sha256(Path(layer.path))
    assert before == layer.sha256
    out, _ = job(env, work, PROBE, "--cold")
    assert out.splitlines() == ["runner-ok hello", "listener-ok", "owner 0:0 755",
                                "json 2.329.0"]
    out, _ = job(env, work, WRITE, "--cold")
    assert out == "wrote changed-by-job new\n"
    assert sha256(Path(layer.path)) == before
    out, _ = job(env, work, "/opt/actions-runner/run.sh; ls /opt/actions-runner", "--cold")
    assert out.splitlines() == ["runner-ok", "bin", "run.sh"]
    assert leftovers(env) == []


def test_templates_follow_the_layer_and_a_restored_vm_sees_it(
        tmp_path: Path, manifest: Manifest,
        layered: tuple[dict[str, str], Path, Artifact]) -> None:
    """A template made without the layer is not restored once the manifest has one: a new
    template is built with it, and VMs restored from that one (the same boot log: restores)
    see /opt/actions-runner and run it; their writes leave the image unchanged."""
    env, cache, layer = layered
    work = tmp_path / "ws"
    work.mkdir()
    out, _ = job(env, work, "test -e /opt/actions-runner && echo there || echo absent")
    assert out == "absent\n"
    [plain] = (cache / "templates").glob("*/vm.snap")
    with_layer(manifest, cache, layer)
    before = sha256(Path(layer.path))
    first, said = job(env, work, f"{BOOT_MARK}\n{PROBE}")
    assert "building the VM template" in said  # the template without the layer is not used
    [layered_snap] = (cache / "templates").glob("*/vm.snap")
    assert layered_snap.parent.name != plain.parent.name
    second, said = job(env, work, f"{BOOT_MARK}\n{PROBE}{WRITE}")
    assert "building the VM template" not in said and "could not restore" not in said
    boot_first, *probe_first = first.splitlines()
    boot_second, *probe_second = second.splitlines()
    assert boot_first == boot_second  # both restored from the one template
    assert probe_first == ["runner-ok hello", "listener-ok", "owner 0:0 755", "json 2.329.0"]
    assert probe_second == [*probe_first, "wrote changed-by-job new"]
    assert sha256(Path(layer.path)) == before
    assert leftovers(env) == []
