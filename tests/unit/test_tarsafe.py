"""The data filter kata-ci uses where Python lacks PEP 706's (Debian 12's 3.11.2): the same
refusals and clean-ups as the standard library's, checked against it on this Python."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from kata_ci import tarsafe
from kata_ci.tarsafe import Refused, _data_filter


def member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
           link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.uname = kind, mode, link, 1234, "eve"
    return info


@pytest.mark.parametrize(("name", "kind", "link"), [
    ("../escape", tarfile.REGTYPE, ""),
    ("a/../../escape", tarfile.REGTYPE, ""),
    ("dev", tarfile.CHRTYPE, ""),
    ("fifo", tarfile.FIFOTYPE, ""),
    ("abs-link", tarfile.SYMTYPE, "/etc/passwd"),
    ("out-link", tarfile.SYMTYPE, "../../etc"),
    ("hard", tarfile.LNKTYPE, "../outside"),
])
def test_fallback_refuses_what_the_standard_filter_refuses(tmp_path: Path, name: str,
                                                           kind: bytes, link: str) -> None:
    """Escaping names, devices, fifos and links that are absolute or lead out are refused
    by the fallback, and by the standard library's filter where this Python has it."""
    with pytest.raises(Refused):
        _data_filter(member(name, kind, link=link), str(tmp_path))
    if tarsafe.has_native_filter():
        with pytest.raises(Refused):
            tarsafe.data_filter(member(name, kind, link=link), str(tmp_path))


def test_fallback_follows_links_already_extracted(tmp_path: Path) -> None:
    """A member below a link the archive made earlier that points outside is refused: the
    check resolves what is on disk, not just the name."""
    (tmp_path / "out").symlink_to("/tmp")
    with pytest.raises(Refused):
        _data_filter(member("out/x"), str(tmp_path))


def test_fallback_strips_slashes_modes_and_owners(tmp_path: Path) -> None:
    """A leading slash is dropped, setuid/sticky and group/other write go, the owner is not
    the archive's; what the standard filter keeps, the fallback keeps."""
    safe = _data_filter(member("/bin/tool", mode=0o6777), str(tmp_path))
    assert safe.name == "bin/tool" and safe.mode == 0o755
    assert safe.uid == 0 and safe.uname == ""
    plain = _data_filter(member("notes", mode=0o070), str(tmp_path))
    assert plain.mode == 0o640  # owner read/write; no execute for others without the owner's
    if tarsafe.has_native_filter():
        for name, mode in (("/bin/tool", 0o6777), ("notes", 0o070), ("x", 0o711)):
            assert tarsafe.data_filter(member(name, mode=mode), str(tmp_path)).mode \
                == _data_filter(member(name, mode=mode), str(tmp_path)).mode


def test_fallback_extraction_of_a_whole_archive(tmp_path: Path) -> None:
    """An archive extracted through the fallback (as on Python 3.11.2) lands beneath the
    destination with its files, directories and inside links."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for info, body in ((member("d", tarfile.DIRTYPE, 0o755), b""),
                           (member("d/f", mode=0o644), b"hello"),
                           (member("d/l", tarfile.SYMTYPE, link="f"), b"")):
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data.seek(0)
    dest = tmp_path / "dest"
    dest.mkdir()
    with tarfile.open(fileobj=data) as tar:
        # As images/runner_layer.py does on a Python without the filter argument.
        tar.extractall(dest, members=(_data_filter(m, str(dest)) for m in tar.getmembers()))
    assert (dest / "d" / "l").read_text() == "hello"
