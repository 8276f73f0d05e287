"""The OCI layer unpacker on real tar archives, no registry: whiteouts, owners and modes, and
hostile layers that try to write, link or delete outside the staging tree."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from kata_ci.errors import ImagePullFailure
from kata_ci.images.oci.unpack import Layer, UnpackStats, unpack_layers
from tests.oci_images import MTIME, Dir, File, Symlink, hostile_layers, layer_tar, member, tar_bytes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking keeps owners: needs root")


def blobs(tmp: Path, datas: Sequence[bytes]) -> list[Layer]:
    tmp.mkdir(parents=True, exist_ok=True)
    layers = []
    for i, data in enumerate(datas):
        path = tmp / f"layer{i}"
        path.write_bytes(data)
        layers.append(Layer(path, "sha256:" + hashlib.sha256(data).hexdigest()))
    return layers


def apply(tmp: Path, datas: Sequence[bytes], **limits: int) -> tuple[Path, UnpackStats]:
    root = tmp / "rootfs"
    root.mkdir(parents=True, exist_ok=True)
    return root, unpack_layers(blobs(tmp, datas), root, label="test-image", **limits)


def failure(tmp: Path, datas: Sequence[bytes], **limits: int) -> str:
    with pytest.raises(ImagePullFailure) as caught:
        apply(tmp, datas, **limits)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_files_links_and_fifo_keep_owner_mode_and_mtime(tmp_path: Path) -> None:
    """Owners, modes (setuid, sticky), mtimes, symlinks, hardlinks and FIFOs come out as tarred."""
    fifo = member("run/pipe", tarfile.FIFOTYPE, mode=0o620, uid=7, gid=8)
    data = tar_bytes([
        (member("bin", tarfile.DIRTYPE, mode=0o755), None),
        (member("bin/su", mode=0o4755, uid=0, gid=0), b"setuid\n"),
        (member("bin/sh", tarfile.SYMTYPE, link="/bin/busybox", uid=3, gid=4), None),
        (member("tmp", tarfile.DIRTYPE, mode=0o1777), None),
        (member("home/builder/notes", mode=0o640, uid=1000, gid=1001), b"mine\n"),
        (member("home/builder/again", tarfile.LNKTYPE, link="/home/builder/notes"), None),
        (fifo, None),
    ])
    root, stats = apply(tmp_path, [gzip.compress(data)])
    su = os.lstat(root / "bin/su")
    assert (stat.S_IMODE(su.st_mode), su.st_uid, su.st_mtime) == (0o4755, 0, MTIME)
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert (os.lstat(root / "bin/sh").st_uid, os.lstat(root / "bin/sh").st_gid) == (3, 4)
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
    assert os.lstat(root / "bin").st_mtime == MTIME  # restored after its entries were made
    notes = os.lstat(root / "home/builder/notes")
    assert (stat.S_IMODE(notes.st_mode), notes.st_uid, notes.st_gid) == (0o640, 1000, 1001)
    assert os.lstat(root / "home/builder/again").st_ino == notes.st_ino
    home = os.lstat(root / "home")  # implied by a member, never listed: root's 0755
    assert (stat.S_IMODE(home.st_mode), home.st_uid) == (0o755, 0)
    pipe = os.lstat(root / "run/pipe")
    assert stat.S_ISFIFO(pipe.st_mode) and (stat.S_IMODE(pipe.st_mode), pipe.st_uid) == (0o620, 7)
    assert (stats.entries, stats.bytes) == (7, 12)


def test_whiteouts_remove_lower_entries(tmp_path: Path) -> None:
    """`.wh.name` removes a lower layer's file or whole directory; siblings stay."""
    lower = layer_tar({"a/x": b"x", "a/y": b"y", "b/deep/z": b"z", "c": b"c"})
    upper = layer_tar({"a/.wh.x": b"", ".wh.b": b"", ".wh.missing": b""})
    root, _ = apply(tmp_path, [lower, upper])
    assert listing(root) == {"a", "a/y", "c"}


def test_opaque_directory_hides_lower_but_keeps_this_layer(tmp_path: Path) -> None:
    """An opaque directory loses lower layers' entries (recursively), keeps its own layer's."""
    lower = layer_tar({"d/old": b"1", "d/sub/old": b"2", "d/gone/old": b"3", "keep": b"k"})
    upper = layer_tar({"d/new": b"n", "d/sub/new": b"s", "d/.wh..wh..opq": b"",
                       "d/later": b"l"})
    root, _ = apply(tmp_path, [lower, upper])
    assert listing(root) == {"keep", "d", "d/new", "d/sub", "d/sub/new", "d/later"}


def test_whiteout_of_same_layer_entry_is_ignored(tmp_path: Path) -> None:
    """Whiteouts hide lower layers only: a file of the same layer stays."""
    root, _ = apply(tmp_path, [layer_tar({"f": b"mine", ".wh.f": b""})])
    assert (root / "f").read_bytes() == b"mine"


def test_replacing_entries_never_writes_through(tmp_path: Path) -> None:
    """Replacing a lower symlink or directory never writes through a link to the host."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host\n")
    lower = layer_tar({"link": Symlink(str(outside / "secret")), "d": Dir(),
                       "d/l": Symlink(str(outside))})
    upper = layer_tar({"link": b"image\n", "d": b"now a file\n"})
    root, _ = apply(tmp_path, [lower, upper])
    assert (root / "link").read_bytes() == b"image\n" and not (root / "link").is_symlink()
    assert (root / "d").read_bytes() == b"now a file\n"
    assert (outside / "secret").read_text() == "host\n"
    assert sorted(os.listdir(outside)) == ["secret"]


def test_hardlink_to_a_symlink_links_the_symlink(tmp_path: Path) -> None:
    """A hardlink to a symlink links the symlink itself, never the host file it names."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host\n")
    data = tar_bytes([(member("s", tarfile.SYMTYPE, link=str(outside / "secret")), None),
                      (member("h", tarfile.LNKTYPE, link="s"), None)])
    root, _ = apply(tmp_path, [data])
    assert (root / "h").is_symlink() and os.readlink(root / "h") == str(outside / "secret")
    assert os.stat(outside / "secret").st_nlink == 1


def test_absolute_member_names_land_inside(tmp_path: Path) -> None:
    """A leading `/` is dropped: /etc/motd is the image's etc/motd."""
    root, _ = apply(tmp_path, [tar_bytes([(member("/etc/motd"), b"hi\n")])])
    assert (root / "etc/motd").read_bytes() == b"hi\n"


@pytest.mark.parametrize("case", sorted(hostile_layers(Path("/x"))))
def test_hostile_layers_are_refused_and_touch_nothing_outside(tmp_path: Path, case: str) -> None:
    """Each escape (.., symlinked parents, hardlinks, whiteouts) is refused; the host unchanged."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host\n")
    message = failure(tmp_path, hostile_layers(outside)[case])
    assert "test-image" in message and "unsafe" in message
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "host\n"
    assert os.stat(outside / "secret").st_nlink == 1
    assert not (tmp_path / "escaped").exists()


def test_device_nodes_are_skipped_and_counted(tmp_path: Path) -> None:
    """Character and block devices are counted and never created on the host."""
    data = tar_bytes([(member("dev/null", tarfile.CHRTYPE, mode=0o666), None),
                      (member("dev/sda", tarfile.BLKTYPE, mode=0o660), None),
                      (member("dev/ok"), b"")])
    root, stats = apply(tmp_path, [data])
    assert listing(root) == {"dev", "dev/ok"}
    assert stats.devices_skipped == 2


@pytest.mark.parametrize(("limits", "said"), [({"max_entries": 3}, "more than 3 entries"),
                                              ({"max_bytes": 100}, "MiB unpacked")])
def test_limits_refuse_a_too_large_image(tmp_path: Path, limits: dict[str, int],
                                         said: str) -> None:
    """Entry count and declared content size are bounded: the image is 'too large'."""
    data = layer_tar({f"f{i}": b"0123456789" * 5 for i in range(4)})
    _, stats = apply(tmp_path / "fits", [data])  # the same layer within the defaults
    assert (stats.entries, stats.bytes) == (4, 200)
    message = failure(tmp_path, [data], **limits)
    assert "too large" in message and said in message


def test_truncated_or_tampered_layers_are_corrupt(tmp_path: Path) -> None:
    """A tar cut mid-file, a cut gzip stream, bytes not matching the digest: 'corrupt layer'."""
    data = layer_tar({"big": os.urandom(20000)})
    cut = data[:8000]
    zipped = gzip.compress(data)
    for name, blob in (("tar", cut), ("gzip", zipped[: len(zipped) // 2])):
        message = failure(tmp_path / name, [blob])
        assert "corrupt layer sha256:" in message, message
    layer = blobs(tmp_path / "tampered", [data])[0]
    layer.path.write_bytes(data[:-1] + b"\x01")
    root = tmp_path / "tampered/rootfs"
    root.mkdir()
    with pytest.raises(ImagePullFailure) as caught:
        unpack_layers([layer], root)
    assert f"corrupt layer {layer.digest}: its content does not match its digest" in str(
        caught.value) and "\n" not in str(caught.value)


def test_hostile_headers_are_corrupt_not_tracebacks(tmp_path: Path) -> None:
    """An owner beyond 32 bits is refused with a message, not an OverflowError."""
    message = failure(tmp_path, [tar_bytes([(member("f", uid=1 << 40), b"")])])
    assert "owner out of range" in message


def test_zstd_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """zstd layers unpack through the zstd binary, and fail clearly without one."""
    if shutil.which("zstd") is None:
        pytest.skip("no zstd binary on this host")
    data = layer_tar({"etc/z": File(b"zstd\n", 0o600)})
    packed = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                            check=True).stdout
    root, _ = apply(tmp_path / "with", [packed])
    assert (root / "etc/z").read_bytes() == b"zstd\n"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "zstd layers are not supported yet" in failure(tmp_path, [packed])
