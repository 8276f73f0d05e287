"""Escape through GitLab artifacts and caches. After a job its workspace is hostile: links
to host files and directories, fifos, files swapped between listing and reading; archiving
must never read, follow or block on them. Before a job an archive is hostile (another job
made it): extracting must never write outside its directory, through a link already there,
or past its bounds. No VM: the host-side code is what is attacked."""

from __future__ import annotations

import gzip
import io
import os
import stat
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ci.errors import UserError
from kata_ci.runner.gitlab_runner import files, selection

SECRET = b"host-secret-7d2e never archived"
SHADOW = Path("/etc/shadow")


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host directory outside the workspace with a secret file."""
    path = tmp_path / "host"
    path.mkdir()
    (path / "secret").write_bytes(SECRET)
    return path


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    (path / "out").mkdir(parents=True)
    (path / "out" / "ok.txt").write_bytes(b"fine\n")
    return path


def _archived(ws: Path, names: list[str]) -> tuple[zipfile.ZipFile, bytes]:
    """The zip of ``names`` and every byte it holds, decompressed."""
    buffer = io.BytesIO()
    files.write_zip(ws, names, buffer, 1 << 20, warn=lambda _: None)
    archive = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    return archive, b"".join(archive.read(n) for n in archive.namelist())


def test_link_to_host_file_is_archived_as_a_link(ws: Path, host: Path) -> None:
    """Links to /etc/shadow and to a host secret are stored as links; neither target's
    content is read into a zip, a gzip or a raw artifact."""
    (ws / "out" / "shadow").symlink_to(SHADOW)
    (ws / "out" / "secret").symlink_to(host / "secret")
    (ws / "out" / "relative").symlink_to(os.path.relpath(host / "secret", ws / "out"))
    names = selection.collect(ws, ["out/", "out/*"]).files
    assert names == ["out", "out/ok.txt", "out/relative", "out/secret", "out/shadow"]
    archive, content = _archived(ws, names)
    for name in ("out/shadow", "out/secret", "out/relative"):
        assert stat.S_ISLNK(archive.getinfo(name).external_attr >> 16)
    assert archive.read("out/shadow") == str(SHADOW).encode()
    assert SECRET not in content
    for line in SHADOW.read_bytes().splitlines():
        if b":" in line and line.split(b":")[1] not in (b"", b"*", b"!", b"!*"):
            assert line not in content  # a hash, had the link been followed
    out = io.BytesIO()
    files.write_gzip(ws, names, out, 1 << 20, warn=lambda _: None)
    assert gzip.decompress(out.getvalue()) == b"fine\n"
    with pytest.raises(UserError, match="not a regular file"):
        files.write_raw(ws, ["out/secret"], io.BytesIO(), 1 << 20)


def test_directory_link_out_collects_nothing_from_it(ws: Path, host: Path) -> None:
    """`out -> /etc` (or a host directory): `out/**`, `out/*`, `out/passwd` and untracked
    collect at most the link itself, nothing beneath it."""
    (ws / "etc").symlink_to("/etc")
    (ws / "hostdir").symlink_to(host)
    for patterns in (["etc/**", "hostdir/**"], ["etc/*", "hostdir/*"],
                     ["etc/passwd", "hostdir/secret"], ["**/passwd", "**/secret"]):
        result = selection.collect(ws, patterns)
        assert set(result.files) <= {"etc", "hostdir"}, patterns
    result = selection.collect(ws, [], untracked=True)
    assert result.files == ["etc", "hostdir", "out/ok.txt"]
    _, content = _archived(ws, result.files)
    assert SECRET not in content and b"root:" not in content


def test_parent_swapped_for_link_after_collect(ws: Path, host: Path) -> None:
    """A directory listed and then replaced by a link to a host directory holding the same
    names: its files are left out with a warning, not read through the link."""
    (ws / "out" / "secret").write_bytes(b"harmless\n")
    names = selection.collect(ws, ["out/"]).files
    (ws / "out" / "secret").unlink()
    (ws / "out" / "ok.txt").unlink()
    (ws / "out").rmdir()
    (ws / "out").symlink_to(host)
    (host / "ok.txt").write_bytes(SECRET)
    said: list[str] = []
    buffer = io.BytesIO()
    assert files.write_zip(ws, names, buffer, 1 << 20, said.append) == 0
    archive = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    assert archive.namelist() == ["out"]  # the link itself
    assert said == ["out/ok.txt: no longer beneath real directories; left out",
                    "out/secret: no longer beneath real directories; left out"]


@pytest.mark.timeout(20)
def test_fifo_neither_blocks_nor_is_archived(ws: Path) -> None:
    """A fifo matched by a pattern, or swapped in for a listed file, is left out with a
    warning: nothing opens it (an open for reading would block with no writer)."""
    os.mkfifo(ws / "out" / "pipe")
    result = selection.collect(ws, ["out/", "out/pipe"])
    assert result.files == ["out", "out/ok.txt"]
    assert "out/pipe: not a file, directory or link; left out" in result.warnings
    listed = ["out/ok.txt"]
    (ws / "out" / "ok.txt").unlink()
    os.mkfifo(ws / "out" / "ok.txt")
    for write in (files.write_zip, files.write_gzip):
        said: list[str] = []
        assert write(ws, listed, io.BytesIO(), 1 << 20, said.append) == 0
        assert said == ["out/ok.txt: not a regular file; left out"]
    with pytest.raises(UserError, match="not a regular file"):
        files.write_raw(ws, listed, io.BytesIO(), 1 << 20)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("swap", ["fifo", "link"])
def test_file_swapped_between_lstat_and_open(ws: Path, host: Path, swap: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is replaced by a fifo or a link to a host secret right after the writer
    looked at it: the open notices (O_PATH, same inode) and leaves it out; nothing blocks,
    the secret is not read."""
    real_stat = os.stat

    def stat_then_swap(path: str, *, dir_fd: int | None = None,
                       follow_symlinks: bool = True) -> os.stat_result:
        info = real_stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
        if path == "ok.txt" and dir_fd is not None:
            (ws / "out" / "ok.txt").unlink()
            if swap == "fifo":
                os.mkfifo(ws / "out" / "ok.txt")
            else:
                (ws / "out" / "ok.txt").symlink_to(host / "secret")
        return info

    for write in (files.write_zip, files.write_gzip):
        (ws / "out" / "ok.txt").unlink()
        (ws / "out" / "ok.txt").write_bytes(b"fine\n")
        monkeypatch.setattr(os, "stat", stat_then_swap)
        said: list[str] = []
        out = io.BytesIO()
        try:
            assert write(ws, ["out/ok.txt"], out, 1 << 20, said.append) == 0
        finally:
            monkeypatch.undo()
        assert said == ["out/ok.txt: not a regular file; left out"]
        assert SECRET not in out.getvalue()


def test_file_swapped_for_link_after_collect(ws: Path, host: Path) -> None:
    """A listed file replaced by a link to a host secret: zip stores the link, gzip and
    raw refuse it; the secret is never read."""
    listed = selection.collect(ws, ["out/ok.txt"]).files
    (ws / "out" / "ok.txt").unlink()
    (ws / "out" / "ok.txt").symlink_to(host / "secret")
    archive, content = _archived(ws, listed)
    assert stat.S_ISLNK(archive.getinfo("out/ok.txt").external_attr >> 16)
    assert SECRET not in content
    out = io.BytesIO()
    files.write_gzip(ws, listed, out, 1 << 20, warn=lambda _: None)
    assert out.getvalue() == b""
    with pytest.raises(UserError):
        files.write_raw(ws, listed, io.BytesIO(), 1 << 20)


@pytest.fixture
def into(tmp_path: Path) -> Path:
    path = tmp_path / "into"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory outside ``into`` (also under /tmp by an absolute name) that extraction
    must leave empty."""
    path = Path("/tmp") / f"kata-ci-outside-{uuid.uuid4().hex}"
    path.mkdir()
    yield path
    assert list(path.iterdir()) == [] or all(p.name == "keep" for p in path.iterdir())
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def _hostile(*members: tuple[str, bytes, int]) -> io.BytesIO:
    """A zip of (name, content, st_mode) members, names kept as given."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content, mode in members:
            info = zipfile.ZipInfo(name)
            info.create_system, info.external_attr = 3, mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    buffer.seek(0)
    return buffer


def test_member_names_cannot_leave(into: Path, outside: Path) -> None:
    """`../evil`, `a/../../evil` and `/abs/evil` are skipped with a warning; the others
    are extracted."""
    data = _hostile(("../evil", b"x", 0o100644), (f"{outside}/evil", b"x", 0o100644),
                    ("a/../../evil", b"x", 0o100644), ("good.txt", b"ok", 0o100644))
    warnings = files.extract_zip(data, into, 1 << 20, 10)
    assert (into / "good.txt").read_bytes() == b"ok"
    assert not (into.parent / "evil").exists()
    assert sorted(os.listdir(into)) == ["good.txt"]
    assert len(warnings) == 3 and all("a name leaving the directory" in w for w in warnings)


def test_git_directory_is_not_overwritten(into: Path) -> None:
    """Members under `.git/` (a hooks script, a config with core.fsmonitor) are skipped:
    the host's git must only ever see the checkout's own."""
    (into / ".git").mkdir()
    (into / ".git" / "config").write_bytes(b"[core]\n")
    data = _hostile((".git/config", b"[core]\nfsmonitor = touch /tmp/pwned\n", 0o100644),
                    ("./.git/hooks/post-checkout", b"#!/bin/sh\n", 0o100755),
                    ("src/.git/x", b"nested: a submodule's, not ours", 0o100644))
    warnings = files.extract_zip(data, into, 1 << 20, 10)
    assert (into / ".git" / "config").read_bytes() == b"[core]\n"
    assert not (into / ".git" / "hooks").exists() and (into / "src" / ".git" / "x").exists()
    assert warnings == [".git/config: inside .git; skipped",
                        "./.git/hooks/post-checkout: inside .git; skipped"]


def test_links_in_into_are_replaced_not_followed(into: Path, outside: Path) -> None:
    """A link already in ``into`` (to a directory or a file outside) where a member goes
    is replaced: nothing is written through it."""
    (into / "link").symlink_to(outside)
    (outside / "keep").write_bytes(b"untouched")
    (into / "file").symlink_to(outside / "keep")
    data = _hostile(("link/pwned", b"x", 0o100644), ("file", b"new", 0o100644))
    files.extract_zip(data, into, 1 << 20, 10)
    assert (outside / "keep").read_bytes() == b"untouched"
    assert not (outside / "pwned").exists()
    assert not (into / "link").is_symlink() and (into / "link" / "pwned").read_bytes() == b"x"
    assert not (into / "file").is_symlink() and (into / "file").read_bytes() == b"new"


def test_link_members_are_links_and_never_followed(into: Path, outside: Path) -> None:
    """A link member pointing outside is created as that link (harmless: nothing on the
    host follows it); a later member beneath it replaces it instead of going through."""
    data = _hostile(("l", str(outside).encode(), 0o120777),
                    ("abs", b"/etc/shadow", 0o120777), ("l/pwned", b"x", 0o100644))
    files.extract_zip(data, into, 1 << 20, 10)
    assert os.readlink(into / "abs") == "/etc/shadow"
    assert not (into / "l").is_symlink() and (into / "l" / "pwned").exists()
    assert not (outside / "pwned").exists()


def test_zip_bomb_is_refused_before_writing(into: Path) -> None:
    """10 MiB of zeros (a few KiB compressed) against a 1 MiB bound: UserError and
    nothing written."""
    data = _hostile(("small", b"a", 0o100644), ("bomb", bytes(10 << 20), 0o100644))
    assert len(data.getvalue()) < 64 << 10
    with pytest.raises(UserError, match="unpacks to more than 1 MiB"):
        files.extract_zip(data, into, 1 << 20, 10)
    assert os.listdir(into) == []


def test_zip_bomb_lying_about_its_size(into: Path) -> None:
    """A member stating 1000 bytes that inflates to 10 MiB yields at most 1000 bytes,
    then fails its checksum: UserError, no half-written file left."""
    raw = bytearray(_hostile(("bomb", bytes(10 << 20), 0o100644)).getvalue())
    central = raw.rindex(b"PK\x01\x02")
    raw[central + 24:central + 28] = (1000).to_bytes(4, "little")  # uncompressed size
    with pytest.raises(UserError, match="archive is damaged"):
        files.extract_zip(io.BytesIO(bytes(raw)), into, 1 << 20, 10)
    assert os.listdir(into) == []


def test_member_count_is_bounded(into: Path) -> None:
    """More members than max_members: UserError before anything is written."""
    data = _hostile(*((f"f{i}", b"", 0o100644) for i in range(11)))
    with pytest.raises(UserError, match="11 members, over the limit of 10"):
        files.extract_zip(data, into, 1 << 20, 10)
    assert os.listdir(into) == []


def test_device_and_fifo_members_are_skipped(into: Path) -> None:
    """Character, block device, fifo and socket members are skipped with a warning."""
    data = _hostile(("null", b"", stat.S_IFCHR | 0o666), ("sda", b"", stat.S_IFBLK | 0o660),
                    ("pipe", b"", stat.S_IFIFO | 0o644), ("sock", b"", stat.S_IFSOCK | 0o755),
                    ("ok", b"ok", 0o100644))
    warnings = files.extract_zip(data, into, 1 << 20, 10)
    assert os.listdir(into) == ["ok"]
    assert [w.split(":")[0] for w in warnings] == ["null", "sda", "pipe", "sock"]


def test_modes_are_masked(into: Path) -> None:
    """setuid, setgid and sticky bits in an archive are not restored."""
    data = _hostile(("suid", b"#!/bin/sh\n", stat.S_IFREG | 0o6755),
                    ("d/", b"", stat.S_IFDIR | 0o1777))
    files.extract_zip(data, into, 1 << 20, 10)
    assert stat.S_IMODE((into / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((into / "d").stat().st_mode) == 0o777


@pytest.mark.timeout(20)
def test_a_pattern_built_to_backtrack_is_refused_not_run(ws: Path) -> None:
    """`*a*a*a*a*a*a*a*ab` against a long name of a's would backtrack for hours in the
    worker: it is refused with a warning, and a pattern within the bounds stays fast."""
    (ws / ("a" * 200)).write_text("x")
    deep = ws.joinpath(*["a"] * 60)
    deep.mkdir(parents=True)
    result = selection.collect(ws, ["*a*a*a*a*a*a*a*ab", "**/**/**/**/x"])
    assert result.files == []
    assert sum("too many wildcards" in w for w in result.warnings) == 2
    assert selection.collect(ws, ["*a*a*ab", "**/a/**/x"]).files == []
