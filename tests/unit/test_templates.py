"""Template keys and the template store: what makes a template reusable, and what makes it
never restored again (no VM here: the e2e suite restores real ones)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kata_ci.executors.base import VMSpec
from kata_ci.executors.qemu import snapshot
from kata_ci.executors.templates import TemplateStore


@pytest.fixture
def images(tmp_path: Path) -> VMSpec:
    made = {}
    for kind, name in (("kernel", "vmlinux"), ("initramfs", "initramfs.cpio"),
                       ("rootfs", "rootfs.ext4")):
        folder = tmp_path / kind / "k1"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"x" * 100)
        made[kind] = folder / name
    return VMSpec(kernel=made["kernel"], initramfs=made["initramfs"], rootfs=made["rootfs"],
                  workspace=tmp_path / "ws")


def key(spec: VMSpec, tmp_path: Path, accel: str = "tcg") -> str:
    return snapshot.template_key(spec, accel, 2100000, tmp_path)  # type: ignore[arg-type]


def test_jobs_of_one_size_share_a_template(images: VMSpec, tmp_path: Path) -> None:
    """The workspace and where it appears are not part of a template: every job of a size
    restores the same one."""
    other = dataclasses.replace(images, workspace=Path("/srv/else"), guest_workdir="/w")
    assert key(images, tmp_path) == key(other, tmp_path)


def test_another_qemu_version_means_another_template(
        images: VMSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template saved by one QEMU is never restored by another: its version is in the key."""
    before = key(images, tmp_path)
    monkeypatch.setattr(snapshot, "qemu_version", lambda program="": "QEMU emulator 10.1.0")
    assert key(images, tmp_path) != before


@pytest.mark.parametrize("change", ["vcpus", "memory", "accel", "kernel", "overlay"])
def test_size_acceleration_and_images_are_in_the_key(
        images: VMSpec, tmp_path: Path, change: str) -> None:
    """Changing the VM size, the acceleration or an image gives a new template."""
    changed, accel = images, "tcg"
    if change == "vcpus":
        changed = dataclasses.replace(images, vcpus=4)
    elif change == "memory":
        changed = dataclasses.replace(images, memory_mib=2048)
    elif change == "overlay":
        changed = dataclasses.replace(images, overlay_size="25%")
    elif change == "accel":
        accel = "kvm"
    else:
        moved = tmp_path / "kernel" / "k2"
        moved.mkdir()
        (moved / "vmlinux").write_bytes(b"y" * 100)
        changed = dataclasses.replace(images, kernel=moved / "vmlinux")
    assert key(changed, tmp_path, accel) != key(images, tmp_path)


def test_old_qemu_cannot_snapshot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """QEMU 7.2 (Debian 12's own) is refused with the reason; the provider then boots cold."""
    monkeypatch.setattr(snapshot, "qemu_version",
                        lambda program="": "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg)")
    problem = snapshot.snapshot_problem(tmp_path)
    assert problem is not None and "7.2.22 is older than 9.0" in problem


def test_store_shows_only_finished_templates_and_replaces_a_family(tmp_path: Path) -> None:
    """A template is found only once whole (DONE written last); a new key of the same family
    (same size, new inputs) removes the old one; a discarded one is gone."""
    store = TemplateStore(tmp_path / "templates")
    assert store.find("a") is None

    def write(file: Path) -> None:
        assert store.find("a") is None  # not visible while it is written
        file.write_bytes(b"state")

    first = store.build("a", {"family": "tcg-2"}, write)
    assert store.find("a") == first and first.file.read_bytes() == b"state"
    assert first.meta()["family"] == "tcg-2"
    other = store.build("z", {"family": "tcg-4"}, lambda f: f.write_bytes(b"4"))
    second = store.build("b", {"family": "tcg-2"}, lambda f: f.write_bytes(b"new"))
    assert store.find("a") is None and store.find("b") == second
    assert store.find("z") == other
    store.discard(second)
    assert store.find("b") is None


def test_a_failed_build_leaves_no_template(tmp_path: Path) -> None:
    """A build that fails half-way leaves nothing a later job could restore."""
    store = TemplateStore(tmp_path / "templates")

    def broken(file: Path) -> None:
        file.write_bytes(b"half")
        raise RuntimeError("QEMU died")

    with pytest.raises(RuntimeError):
        store.build("a", {}, broken)
    assert store.find("a") is None
    assert [p.name for p in (tmp_path / "templates").iterdir()] == [".a.lock"]
