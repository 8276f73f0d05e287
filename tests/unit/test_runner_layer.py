"""The runner image layer: GitHub's actions-runner tarball as a read-only ext4 image (building,
caching, hostile archives), its place in the manifest, and how it reaches QEMU and templates.

The built images are read with debugfs (e2fsprogs, like mkfs.ext4): no loop mount needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from kata_ci.errors import ImagesMissing, KataCIError
from kata_ci.executors.base import VMSpec
from kata_ci.executors.provider import base_spec
from kata_ci.executors.qemu import snapshot
from kata_ci.executors.qemu.argv import GuestFiles, VMPaths, kernel_cmdline, qemu_argv
from kata_ci.images import build as build_mod
from kata_ci.images.artifacts import Artifact, BuildError, Manifest, finished
from kata_ci.images.runner_layer import build_runner_layer, runner_version

NAME = "actions-runner-linux-x64-2.329.0.tar.gz"
PATHS = VMPaths(Path("/run/kata-ci/abc123"))
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
    reason="building a layer needs root (files owned by root) and e2fsprogs")

Member = tuple[tarfile.TarInfo, bytes | None]


def entry(name: str, data: bytes | None = None, mode: int = 0o644,
          kind: bytes = tarfile.REGTYPE, link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.uid, info.gid, info.uname, info.gname = 1000, 1000, "runner", "runner"
    if data is not None:
        info.size = len(data)
    return info, data


def make_tarball(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def runner_members(marker: bytes = b"") -> list[Member]:
    """What GitHub's tarball looks like, in small: scripts at the top, binaries in bin/."""
    return [entry("./bin", mode=0o775, kind=tarfile.DIRTYPE),
            entry("./run.sh", b"#!/bin/sh\necho runner-ok\n" + marker, 0o755),
            entry("./bin/Runner.Listener", b"\x7fELF fake listener", 0o755),
            entry("./bin/setuid-tool", b"#!/bin/sh\n", 0o4755),
            entry("./bin/shared.dll", b"data", 0o666)]


def image_tree(image: Path, folder: str = "/") -> dict[str, tuple[int, int, int]]:
    """path -> (mode, uid, gid) of everything in an ext4 image, walked with debugfs."""
    found: dict[str, tuple[int, int, int]] = {}
    listing = subprocess.run(["debugfs", "-R", f"ls -p {folder}", str(image)],
                             capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        if not line.startswith("/"):
            continue
        _, _, mode, uid, gid, name, *_ = line.split("/")
        if name in ("", ".", ".."):  # "": the empty slots of lost+found
            continue
        path = f"{folder.rstrip('/')}/{name}"
        found[path] = (int(mode, 8), int(uid), int(gid))
        if stat.S_ISDIR(int(mode, 8)):
            found.update(image_tree(image, path))
    return found


def image_file(image: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                          check=True).stdout


def build(tmp_path: Path, members: list[Member], name: str = NAME,
          said: list[str] | None = None) -> Artifact:
    tarball = make_tarball(tmp_path / name, members)
    return build_runner_layer(tmp_path / "cache", (said if said is not None else []).append,
                              tarball)


@needs_root
def test_layer_holds_the_runner_owned_by_root_with_modes_kept_and_no_setuid(
        tmp_path: Path) -> None:
    """The tarball's files land under /opt/actions-runner, root's (whatever the archive's
    owners), executables still executable, data files not, setuid and group/other write gone."""
    layer = build(tmp_path, runner_members())
    image = Path(layer.path)
    assert image == tmp_path / "cache" / "runner" / layer.key / "runner.ext4"
    assert finished(image.parent) and layer.detail == "2.329.0"
    assert layer.sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    tree = image_tree(image)
    base = "/opt/actions-runner"
    assert {p for p in tree if p.startswith(base + "/")} == {
        f"{base}/.kata-ci-layer.json", f"{base}/run.sh", f"{base}/bin",
        f"{base}/bin/Runner.Listener", f"{base}/bin/setuid-tool", f"{base}/bin/shared.dll"}
    assert all((uid, gid) == (0, 0) for _, uid, gid in tree.values()), tree
    assert tree[f"{base}/run.sh"][0] == stat.S_IFREG | 0o755
    assert tree[f"{base}/bin/Runner.Listener"][0] == stat.S_IFREG | 0o755
    assert tree[f"{base}/bin/setuid-tool"][0] == stat.S_IFREG | 0o755
    assert tree[f"{base}/bin/shared.dll"][0] == stat.S_IFREG | 0o644
    for path in ("/opt", base, f"{base}/bin"):
        assert tree[path][0] == stat.S_IFDIR | 0o755, path
    assert not any(mode & (stat.S_ISUID | stat.S_ISGID) for mode, _, _ in tree.values())
    facts = json.loads(image_file(image, f"{base}/.kata-ci-layer.json"))
    assert facts == {"tarball": NAME, "version": "2.329.0",
                     "sha256": hashlib.sha256((tmp_path / NAME).read_bytes()).hexdigest()}
    assert image_file(image, f"{base}/run.sh").startswith(b"#!/bin/sh\necho runner-ok")


@needs_root
def test_same_tarball_is_not_rebuilt_and_other_bytes_give_another_key(tmp_path: Path) -> None:
    """The key is the tarball's content: the same bytes again reuse the image untouched;
    one byte more is a new layer beside the old one."""
    said: list[str] = []
    first = build(tmp_path, runner_members(), said=said)
    done = (Path(first.path).parent / "DONE").stat().st_mtime_ns
    said.clear()
    assert build(tmp_path, runner_members(), said=said) == first
    assert said == [f"runner layer {first.key}: cached"]
    assert (Path(first.path).parent / "DONE").stat().st_mtime_ns == done
    other = build(tmp_path, runner_members(marker=b"# another release\n"))
    assert other.key != first.key and other.path != first.path
    assert Path(first.path).is_file() and Path(other.path).is_file()


@pytest.mark.parametrize(("name", "version"), [
    (NAME, "2.329.0"), ("actions-runner-linux-arm64-2.311.0.tar.gz", "2.311.0"),
    ("actions-runner-osx-x64-2.300.2.tgz", "2.300.2"), ("runner.tar.gz", "unknown"),
    ("actions-runner-linux-x64-latest.tar.gz", "unknown")])
def test_version_comes_from_githubs_file_name(name: str, version: str) -> None:
    """GitHub names its tarballs actions-runner-OS-ARCH-VERSION.tar.gz; anything else is
    'unknown' rather than a guess."""
    assert runner_version(name) == version


@needs_root
def test_absolute_member_is_kept_inside_the_tree(tmp_path: Path) -> None:
    """A member named /abs/... is neutralised: it lands under /opt/actions-runner, never at
    that path on the host nor at the image's top."""
    target = tmp_path / "outside" / "planted"
    layer = build(tmp_path, [*runner_members(), entry(str(target), b"planted")])
    assert not target.exists()
    tree = image_tree(Path(layer.path))
    assert f"/opt/actions-runner{target}" in tree
    assert set(tree) - {p for p in tree if p.startswith("/opt/actions-runner")} == {
        "/lost+found", "/opt"}


ESCAPE = "escaped-by-test"


@needs_root
@pytest.mark.parametrize("attack", ["dotdot", "symlink", "symlink-relative", "hardlink",
                                    "device", "fifo"])
def test_hostile_tarball_is_refused_and_writes_nothing_outside(
        tmp_path: Path, attack: str) -> None:
    """`../`, a symlink to /etc/passwd (absolute, or relative and climbing) with a file
    written through it, a hard link to it, a device node, a FIFO: refused with a message
    naming the tarball; /etc/passwd is unchanged, nothing lands outside the tree, and no
    image is left that a later build would take as finished."""
    passwd = Path("/etc/passwd").read_bytes()
    hostile = {
        "dotdot": [entry("../../../../../../" + ESCAPE, b"x")],
        "symlink": [entry("passwd", kind=tarfile.SYMTYPE, link="/etc/passwd"),
                    entry("passwd", b"pwned::0:0::/:/bin/sh\n")],
        "symlink-relative": [entry("up", kind=tarfile.SYMTYPE, link="../" * 12 + "etc"),
                             entry("up/passwd", b"pwned::0:0::/:/bin/sh\n")],
        "hardlink": [entry("passwd", kind=tarfile.LNKTYPE, link="/etc/passwd")],
        "device": [entry("mem", kind=tarfile.CHRTYPE, mode=0o666)],
        "fifo": [entry("pipe", kind=tarfile.FIFOTYPE)],
    }[attack]
    try:
        with pytest.raises(BuildError) as refused:
            build(tmp_path, [*runner_members(), *hostile])
    finally:
        if Path("/etc/passwd").read_bytes() != passwd:  # never leave the host broken
            Path("/etc/passwd").write_bytes(passwd)
            pytest.fail("the tarball wrote through its link to /etc/passwd")
    assert NAME in str(refused.value) and "refused" in str(refused.value)
    assert list(tmp_path.rglob(ESCAPE)) == []
    assert list((tmp_path / "cache" / "runner").iterdir()) == []  # not even a partial tree


@needs_root
@pytest.mark.parametrize(("content", "why"), [
    (b"PK\x03\x04 a zip file, not a tarball", "not a gzip'd tar"),
    ("gzip-of-text", "not a gzip'd tar"),
    ("truncated", "not a gzip'd tar"),
    ("empty", "holds no files"),
    ("directories-only", "holds no files")])
def test_a_file_that_is_not_a_runner_tarball_is_a_clear_error(
        tmp_path: Path, content: bytes | str, why: str) -> None:
    """Not a gzip'd tar, a cut-off download, or an archive without a single file: one line
    naming the file, a KataCIError (the CLI prints it, no traceback), nothing built."""
    path = tmp_path / NAME
    if content == "gzip-of-text":
        import gzip
        path.write_bytes(gzip.compress(b"hello, not a tar\n" * 100))
    elif content in ("truncated", "empty", "directories-only"):
        members = {"truncated": runner_members(), "empty": [],
                   "directories-only": [entry("./bin", kind=tarfile.DIRTYPE, mode=0o755)]}
        make_tarball(path, members[str(content)])
        if content == "truncated":
            path.write_bytes(path.read_bytes()[:60])
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    with pytest.raises(KataCIError) as failed:
        build_runner_layer(tmp_path / "cache", lambda _: None, path)
    message = str(failed.value)
    assert NAME in message and why in message and "\n" not in message
    assert list((tmp_path / "cache" / "runner").glob("*")) == []


# -- the manifest -----------------------------------------------------------------------------
def artifact(tmp_path: Path, kind: str, name: str) -> Artifact:
    folder = tmp_path / kind / f"{kind}-key"
    folder.mkdir(parents=True)
    (folder / name).write_bytes(b"x")
    return Artifact(path=str(folder / name), key=f"{kind}-key", sha256="0" * 64, detail=kind)


@pytest.fixture
def images(tmp_path: Path) -> Manifest:
    return Manifest(kernel=artifact(tmp_path, "kernel", "vmlinux"),
                    rootfs=artifact(tmp_path, "rootfs", "rootfs.ext4"),
                    initramfs=artifact(tmp_path, "initramfs", "initramfs.cpio"),
                    tools=artifact(tmp_path, "tools", "bin"))


def test_manifest_round_trips_with_and_without_a_runner_layer(
        tmp_path: Path, images: Manifest) -> None:
    """Without a layer the manifest is written as before (no runner key) and loads with
    runner None; with one, save/load give it back whole."""
    images.save(tmp_path / "a")
    assert "runner" not in json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert Manifest.load(tmp_path / "a") == images and images.runner is None
    layered = dataclasses.replace(images, runner=artifact(tmp_path, "runner", "runner.ext4"))
    layered.save(tmp_path / "b")
    assert json.loads(layered.to_json())["runner"]["key"] == "runner-key"
    assert Manifest.load(tmp_path / "b") == layered


def test_old_manifest_without_runner_loads_and_a_missing_layer_file_is_named(
        tmp_path: Path, images: Manifest) -> None:
    """A manifest written before layers existed still loads; one naming a layer whose image
    is gone is refused, naming that file."""
    record = json.loads(images.to_json())
    (tmp_path / "manifest.json").write_text(json.dumps(record))
    assert Manifest.load(tmp_path).runner is None
    record["runner"] = {"path": str(tmp_path / "gone" / "runner.ext4"), "key": "k",
                        "sha256": "0" * 64, "detail": "2.329.0"}
    (tmp_path / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(ImagesMissing, match=r"gone/runner\.ext4"):
        Manifest.load(tmp_path)


@pytest.fixture
def fake_builds(monkeypatch: pytest.MonkeyPatch, images: Manifest, tmp_path: Path) -> list[str]:
    """build_all over stand-ins for the four images (no kernel build here); layers built by
    the stand-in are counted."""
    built: list[str] = []
    monkeypatch.setattr(build_mod, "build_kernel", lambda cache, progress: images.kernel)
    monkeypatch.setattr(build_mod, "build_rootfs", lambda cache, progress, m: images.rootfs)
    monkeypatch.setattr(build_mod, "guest_python_version", lambda rootfs: "3.11")
    monkeypatch.setattr(build_mod, "build_initramfs", lambda c, p, v: images.initramfs)
    monkeypatch.setattr(build_mod, "build_tools", lambda cache, progress, m: images.tools)
    monkeypatch.setattr(build_mod, "publish", lambda manifest, progress: None)

    def layer(cache: Path, progress: object, tarball: Path) -> Artifact:
        built.append(tarball.name)
        folder = cache / "runner" / "layer-key"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "runner.ext4").write_bytes(b"ext4")
        (folder / "DONE").write_text("now\n")
        return Artifact(str(folder / "runner.ext4"), "layer-key", "1" * 64, "2.329.0")

    monkeypatch.setattr(build_mod, "build_runner_layer", layer)
    return built


def test_a_build_without_the_tarball_keeps_the_layer_until_dropped(
        tmp_path: Path, fake_builds: list[str]) -> None:
    """`images build --runner-tarball` adds the layer; a later plain `images build` keeps it
    (and says so); --no-runner-layer drops it; a layer whose image vanished is dropped."""
    cache = tmp_path / "cache"
    (tmp_path / NAME).write_bytes(b"tarball")
    said: list[str] = []
    with_layer = build_mod.build_all(cache, said.append, runner_tarball=tmp_path / NAME)
    assert fake_builds == [NAME] and with_layer.runner is not None
    assert Manifest.load(cache).runner == with_layer.runner
    assert build_mod.build_all(cache, said.append).runner == with_layer.runner
    assert fake_builds == [NAME] and "kept from the previous build" in said[-1]
    with pytest.raises(KataCIError, match="exclude"):
        build_mod.build_all(cache, said.append, runner_tarball=tmp_path / NAME,
                            drop_runner=True)
    assert build_mod.build_all(cache, said.append, drop_runner=True).runner is None
    assert Manifest.load(cache).runner is None
    assert build_mod.build_all(cache, said.append).runner is None  # dropped stays dropped
    build_mod.build_all(cache, said.append, runner_tarball=tmp_path / NAME)
    Path(with_layer.runner.path).unlink()
    assert build_mod.build_all(cache, said.append).runner is None
    assert "its image is gone" in said[-1]


# -- the VM side ------------------------------------------------------------------------------
def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {"kernel": Path("/k/vmlinux"), "initramfs": Path("/i/init.cpio"),
                               "rootfs": Path("/r/rootfs.ext4")}
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def option_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_a_layer_is_a_second_read_only_disk_after_the_rootfs_and_on_the_cmdline() -> None:
    """With a layer, QEMU gets it read-only as the disk right after the rootfs (/dev/vdb in
    the guest), by the name the backend gives (an inherited fd), and init is told."""
    files = GuestFiles("/proc/self/fd/3", "/proc/self/fd/4", "/proc/self/fd/5",
                       "/proc/self/fd/6", layer="/proc/self/fd/7")
    argv = qemu_argv(spec(layer=Path("/c/runner/k/runner.ext4"), workspace=Path("/w")), PATHS,
                     "tcg", files=files)
    assert option_after(argv, "-drive") == [
        "id=root,file=/proc/self/fd/5,format=raw,if=none,readonly=on",
        "id=layer,file=/proc/self/fd/7,format=raw,if=none,readonly=on"]
    disks = [d for d in option_after(argv, "-device") if d.startswith("virtio-blk-device")]
    assert disks == ["virtio-blk-device,drive=root", "virtio-blk-device,drive=layer"]
    assert "kataci.layer=1" in option_after(argv, "-append")[0].split()


def test_without_a_layer_there_is_no_second_disk_and_no_cmdline_word() -> None:
    """No layer: one disk and nothing about layers, exactly as before layers existed; the
    floor VM has no disks even when the spec names a layer."""
    argv = qemu_argv(spec(), PATHS, "tcg")
    assert option_after(argv, "-drive") == [
        "id=root,file=/r/rootfs.ext4,format=raw,if=none,readonly=on"]
    assert "kataci.layer" not in kernel_cmdline(spec())
    floor = qemu_argv(spec(layer=Path("/l.ext4")), PATHS, "kvm", floor=True)
    assert option_after(floor, "-drive") == [] and "kataci.layer" not in " ".join(floor)


def test_template_key_tells_layers_apart(tmp_path: Path) -> None:
    """A template made without the layer is not restored into a VM with it, nor one made
    with a layer into a VM with another layer (a new tarball means new templates)."""
    for kind, name in (("kernel", "vmlinux"), ("initramfs", "initramfs.cpio"),
                       ("rootfs", "rootfs.ext4"), ("runner/k1", "runner.ext4"),
                       ("runner/k2", "runner.ext4")):
        (tmp_path / kind).mkdir(parents=True)
        (tmp_path / kind / name).write_bytes(b"x" * 100)
    plain = VMSpec(kernel=tmp_path / "kernel/vmlinux",
                   initramfs=tmp_path / "initramfs/initramfs.cpio",
                   rootfs=tmp_path / "rootfs/rootfs.ext4", workspace=tmp_path)
    keys = {snapshot.template_key(dataclasses.replace(plain, layer=layer), "tcg", 2100000,
                                  tmp_path)
            for layer in (None, tmp_path / "runner/k1/runner.ext4",
                          tmp_path / "runner/k2/runner.ext4")}
    assert len(keys) == 3


def test_every_vm_of_a_manifest_with_a_layer_gets_it(tmp_path: Path, images: Manifest) -> None:
    """The provider's base spec carries the manifest's layer (so cold boots, templates and
    restores all have it), and none without one."""
    assert base_spec(images).layer is None
    runner = artifact(tmp_path, "runner", "runner.ext4")
    assert base_spec(dataclasses.replace(images, runner=runner)).layer == Path(runner.path)
