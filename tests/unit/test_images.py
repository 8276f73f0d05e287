"""Image recipe logic: kernel fragments, dropped-option detection, initramfs layout, manifest."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from kata_ci.errors import ImagesMissing
from kata_ci.images.artifacts import Artifact, Manifest, hash_inputs
from kata_ci.images.initramfs import CpioWriter, agent_sources
from kata_ci.images.kernel import dropped_options, fragments, requested_options


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, int]]:
    """name -> (mode, content, rdevmajor<<8|rdevminor), as the kernel's unpacker reads it."""
    entries: dict[str, tuple[int, bytes, int]] = {}
    offset = 0
    while True:
        header = data[offset:offset + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[offset + 110:offset + 110 + namesize - 1].decode()
        offset += 110 + namesize
        offset += -offset % 4
        body = data[offset:offset + filesize]
        offset += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (fields[1], body, fields[9] << 8 | fields[10])


def test_fragments_request_what_the_guest_needs() -> None:
    """The guest cannot boot without these: virtio-mmio, blk, serial port, virtio-fs, overlay."""
    wanted = requested_options(fragments())
    for option in ("CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_CONSOLE",
                   "CONFIG_VIRTIO_FS", "CONFIG_OVERLAY_FS", "CONFIG_TMPFS", "CONFIG_PVH",
                   "CONFIG_DEVTMPFS", "CONFIG_BLK_DEV_INITRD", "CONFIG_UNIX", "CONFIG_EXT4_FS"):
        assert wanted.get(option) == "y", option


def test_later_fragment_wins(tmp_path: Path) -> None:
    """As merge_config.sh: an option set again in a later fragment takes the later value."""
    (tmp_path / "a.conf").write_text("CONFIG_X=y\n# comment\nCONFIG_Y=y\n")
    (tmp_path / "b.conf").write_text("CONFIG_X=n\n")
    assert requested_options([tmp_path / "a.conf", tmp_path / "b.conf"]) == {
        "CONFIG_X": "n", "CONFIG_Y": "y"}


def test_dropped_options_are_reported() -> None:
    """An option Kconfig refused (unmet dependency) is reported with what it became."""
    final = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n"
    assert dropped_options({"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "y"}, final) == [
        "CONFIG_B=y (got unset)", "CONFIG_C=y (got m)"]


def test_cpio_holds_console_device_and_executable_init() -> None:
    """The kernel needs /dev/console in the initramfs to give init its stdio."""
    writer = CpioWriter()
    writer.directory("dev")
    writer.device("dev/console", 5, 1)
    writer.file("init", b"\x7fELF...", 0o755)
    writer.directory("dev")  # added twice: written once
    entries = parse_newc(writer.finish())
    assert list(entries) == ["dev", "dev/console", "init"]
    mode, _, rdev = entries["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5 << 8 | 1)
    assert entries["init"][0] == stat.S_IFREG | 0o755 and entries["init"][1] == b"\x7fELF..."


def test_agent_sources_carry_the_generated_stubs() -> None:
    """The guest gets exactly the host's stubs (same files), so the contract cannot drift."""
    sources = agent_sources()
    for name in ("agent.py", "agent_pb2.py", "agent_pb2_grpc.py", "transport.py"):
        assert sources[f"kata_ci/guest/{name}"].is_file()


def test_hash_inputs_depends_on_file_content(tmp_path: Path) -> None:
    """Changing a recipe file changes the cache key; the same content gives the same key."""
    path = tmp_path / "f.conf"
    path.write_text("A")
    first = hash_inputs(["x", path])
    assert hash_inputs(["x", path]) == first
    path.write_text("B")
    assert hash_inputs(["x", path]) != first


def test_missing_manifest_names_the_build_command(tmp_path: Path) -> None:
    """No images yet: the error says to run `kata-ci images build`."""
    with pytest.raises(ImagesMissing, match="kata-ci images build"):
        Manifest.load(tmp_path)


def test_corrupt_manifest_or_missing_artifact(tmp_path: Path) -> None:
    """A truncated manifest, or one naming a deleted file, is reported, not trusted."""
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ImagesMissing, match="unreadable"):
        Manifest.load(tmp_path)
    art = Artifact(path=str(tmp_path / "gone"), key="k", sha256="s")
    (tmp_path / "manifest.json").write_text(
        json.dumps({n: art.__dict__ for n in ("kernel", "rootfs", "initramfs", "tools")}))
    with pytest.raises(ImagesMissing, match="is missing"):
        Manifest.load(tmp_path)


def test_ordinary_user_without_images_uses_those_root_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ordinary user with an empty cache reads root's published manifest; root, or a user
    with a manifest of their own, reads their own cache."""
    from kata_ci.images import build

    system, cache = tmp_path / "system", tmp_path / "cache"
    system.mkdir()
    cache.mkdir()
    (system / "manifest.json").write_text("{}")
    monkeypatch.setattr(build, "SYSTEM_IMAGES", system)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert build.manifest_dir(cache) == system
    (cache / "manifest.json").write_text("{}")
    assert build.manifest_dir(cache) == cache
    (cache / "manifest.json").unlink()
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert build.manifest_dir(cache) == cache
