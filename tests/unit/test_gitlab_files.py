"""GitLab artifacts and caches on the host: which files the patterns select (gitlab-runner's
doublestar semantics), and the zip, gzip and raw archives written from them and read back."""

from __future__ import annotations

import gzip
import io
import os
import stat
import zipfile
import zlib
from pathlib import Path

import pytest

from kata_ci.errors import UserError
from kata_ci.runner.gitlab_runner import files
from kata_ci.runner.gitlab_runner.selection import collect


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """a.txt, d/b.txt, d/e/c.txt, d/e/c.log, .git/config, a link d/l -> b.txt."""
    root = tmp_path / "ws"
    (root / "d" / "e").mkdir(parents=True)
    (root / ".git").mkdir()
    for rel in ("a.txt", "d/b.txt", "d/e/c.txt", "d/e/c.log", ".git/config"):
        (root / rel).write_text(f"content of {rel}\n")
    (root / "d" / "l").symlink_to("b.txt")
    return root


def test_doublestar_spans_directories(ws: Path) -> None:
    """`**` matches any number of directories, none included; `*` alone stays in one."""
    assert collect(ws, ["**/*.txt"]).files == ["a.txt", "d/b.txt", "d/e/c.txt"]
    assert collect(ws, ["d/**/*.txt"]).files == ["d/b.txt", "d/e/c.txt"]
    assert collect(ws, ["*.txt"]).files == ["a.txt"]
    assert collect(ws, ["**/c.*"]).files == ["d/e/c.log", "d/e/c.txt"]


def test_star_question_class_and_braces_stay_in_a_name(ws: Path) -> None:
    """`*`, `?`, `[..]` and `{a,b}` match within one component only."""
    assert collect(ws, ["d/*.txt"]).files == ["d/b.txt"]
    assert collect(ws, ["d/e/c.?xt"]).files == ["d/e/c.txt"]
    assert collect(ws, ["d/e/c.[lt]*"]).files == ["d/e/c.log", "d/e/c.txt"]
    assert collect(ws, ["d/e/c.[!l]*"]).files == ["d/e/c.txt"]
    assert collect(ws, ["{a,d/b}.txt"]).files == ["a.txt", "d/b.txt"]
    assert collect(ws, ["d/*"]).files == ["d/b.txt", "d/e", "d/e/c.log", "d/e/c.txt", "d/l"]


def test_directory_is_taken_whole(ws: Path) -> None:
    """A directory path (with or without `/`, `/**`, `./`) means it and all beneath it."""
    whole = ["d", "d/b.txt", "d/e", "d/e/c.log", "d/e/c.txt", "d/l"]
    for pattern in ("d", "d/", "./d/", "d/**", "d/e/.."):
        assert collect(ws, [pattern]).files == whole, pattern
    assert collect(ws, ["d/e", "d/e/c.txt", "d/**/*.txt"]).files == [
        "d/b.txt", "d/e", "d/e/c.log", "d/e/c.txt"]  # overlapping patterns: once each


def test_exclude_applies_to_every_path_taken(ws: Path) -> None:
    """`exclude` drops matching paths after `paths`; excluding a directory leaves its
    contents (gitlab-runner's behaviour), `dir/**` excludes them."""
    assert collect(ws, ["d/"], exclude=["**/*.log", "d/l"]).files == [
        "d", "d/b.txt", "d/e", "d/e/c.txt"]
    assert collect(ws, ["d/"], exclude=["d/e"]).files == [
        "d", "d/b.txt", "d/e/c.log", "d/e/c.txt", "d/l"]
    assert collect(ws, ["d/"], exclude=["d/e/**"]).files == ["d", "d/b.txt", "d/l"]


def test_untracked_is_what_checkout_did_not_track(ws: Path) -> None:
    """`untracked`: files and links not in the checkout's tracked list, never .git's, no
    directories; combined with paths and exclude."""
    tracked = frozenset({"a.txt", "d/b.txt"})
    assert collect(ws, [], untracked=True, tracked=tracked).files == [
        "d/e/c.log", "d/e/c.txt", "d/l"]
    result = collect(ws, ["a.txt"], exclude=["*/e/*.log"], untracked=True, tracked=tracked)
    assert result.files == ["a.txt", "d/e/c.txt", "d/l"]
    everything = frozenset({"a.txt", "d/b.txt", "d/e/c.txt", "d/e/c.log", "d/l"})
    assert collect(ws, [], untracked=True, tracked=everything).warnings == [
        "untracked: no files"]


def test_untracked_skips_submodules(ws: Path) -> None:
    """A tracked directory (a submodule's gitlink) is not searched for untracked files."""
    (ws / "sub").mkdir()
    (ws / "sub" / "inner.c").write_text("int x;\n")
    (ws / "new.c").write_text("int y;\n")
    tracked = frozenset({"a.txt", "d/b.txt", "d/e/c.txt", "d/e/c.log", "d/l", "sub"})
    assert collect(ws, [], untracked=True, tracked=tracked).files == ["new.c"]


def test_escaping_patterns_are_refused_with_a_warning(ws: Path) -> None:
    """`../x` and `/abs` select nothing and warn; the job's own absolute project path is
    understood when given."""
    result = collect(ws, ["../x", "/etc/passwd", "d/../../ws/a.txt", "a.txt"])
    assert result.files == ["a.txt"]
    assert result.warnings == [
        "../x: not beneath the project directory; ignored",
        "/etc/passwd: not beneath the project directory; ignored",
        "d/../../ws/a.txt: not beneath the project directory; ignored"]
    assert collect(ws, ["/builds/p/d/e/c.txt"], project_dir="/builds/p").files == [
        "d/e/c.txt"]
    assert collect(ws, ["/builds/p"], project_dir="/builds/p/").files[0] == ".git"


def test_no_match_is_a_warning(ws: Path) -> None:
    """A pattern matching nothing, or only what is excluded, warns as gitlab-runner does."""
    result = collect(ws, ["out/", "d/e/*.log"], exclude=["d/e/c.log"])
    assert result.files == []
    assert result.warnings == ["out/: no matching files", "d/e/*.log: no matching files"]


def test_bad_patterns_warn(ws: Path) -> None:
    """An unterminated `[` or `{` is a warning naming the pattern, not an exception."""
    result = collect(ws, ["d/[abc", "{a.txt", "a.txt"], exclude=["[x"])
    assert result.files == ["a.txt"]
    assert result.warnings == ["exclude [x: unterminated [; ignored",
                               "d/[abc: unterminated [", "{a.txt: unterminated {"]


def test_patterns_enter_only_directories_that_can_match(ws: Path) -> None:
    """Without `**`, a tree the pattern cannot reach is not walked: one nested deeper than
    any walk may go does not fail `*.txt` or `d/*/c.txt`, but fails `**/*.txt`."""
    deep = ws / "deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY)
    try:
        for _ in range(300):
            os.mkdir("x", dir_fd=fd)
            sub = os.open("x", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)
    assert collect(ws, ["*.txt", "d/*/c.txt"]).files == ["a.txt", "d/e/c.txt"]
    with pytest.raises(UserError, match="nest deeper than"):
        collect(ws, ["**/*.txt"])


def test_max_files(ws: Path) -> None:
    """More paths than max_files is a UserError, not a huge list."""
    assert len(collect(ws, ["d/"], max_files=6).files) == 6
    with pytest.raises(UserError, match="more than 5 files"):
        collect(ws, ["d/"], max_files=5)


def _zip(ws: Path, names: list[str], limit: int = 1 << 20) -> zipfile.ZipFile:
    buffer = io.BytesIO()
    files.write_zip(ws, names, buffer, limit)
    return zipfile.ZipFile(io.BytesIO(buffer.getvalue()))


def test_zip_round_trip(ws: Path, tmp_path: Path) -> None:
    """Content, mode bits, mtimes, directories and links (as links) survive write and
    extract."""
    os.chmod(ws / "d" / "e" / "c.txt", 0o751)
    os.chmod(ws / "d" / "e", 0o750)
    os.utime(ws / "d" / "b.txt", (1_600_000_001, 1_600_000_001))  # odd: DOS time cannot
    names = collect(ws, ["d/"]).files
    archive = _zip(ws, names)
    assert archive.namelist() == ["d/", "d/b.txt", "d/e/", "d/e/c.log", "d/e/c.txt", "d/l"]
    link = archive.getinfo("d/l")
    assert stat.S_ISLNK(link.external_attr >> 16) and archive.read(link) == b"b.txt"
    assert archive.getinfo("d/e/c.txt").external_attr >> 16 == stat.S_IFREG | 0o751
    into = tmp_path / "into"
    into.mkdir()
    buffer = io.BytesIO()
    assert files.write_zip(ws, names, buffer, 1 << 20) == sum(
        len(f"content of {n}\n") for n in ("d/b.txt", "d/e/c.log", "d/e/c.txt"))
    assert files.extract_zip(io.BytesIO(buffer.getvalue()), into, 1 << 20, 100) == []
    assert (into / "d" / "e" / "c.txt").read_text() == "content of d/e/c.txt\n"
    assert stat.S_IMODE((into / "d" / "e" / "c.txt").stat().st_mode) == 0o751
    assert stat.S_IMODE((into / "d" / "e").stat().st_mode) == 0o750
    assert (into / "d" / "b.txt").stat().st_mtime == 1_600_000_001
    assert (into / "d" / "l").is_symlink() and os.readlink(into / "d" / "l") == "b.txt"


def test_extract_overwrites_and_later_members_win(tmp_path: Path) -> None:
    """Extraction replaces files already there (by a file or a link); of two members with
    one name the later wins; a member in a directory's place is skipped with a warning."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, pytest.warns(UserWarning, match="Duplicate"):
        archive.writestr("a.txt", "first")
        archive.writestr("a.txt", "second")
        archive.writestr("dir", "a file where a directory is")
        link = zipfile.ZipInfo("b.txt")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "a.txt")
    into = tmp_path / "into"
    (into / "dir").mkdir(parents=True)
    (into / "a.txt").write_text("checked out")
    (into / "b.txt").write_text("checked out")
    warnings = files.extract_zip(buffer, into, 1 << 20, 10)
    assert (into / "a.txt").read_text() == "second"
    assert os.readlink(into / "b.txt") == "a.txt"
    assert warnings == ["dir: would replace a directory; skipped"]


def test_extract_reads_a_path(tmp_path: Path) -> None:
    """extract_zip takes a file path as well as a stream."""
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x/y.txt", "y")
    (tmp_path / "into").mkdir()
    files.extract_zip(path, tmp_path / "into", 100, 10)
    assert (tmp_path / "into" / "x" / "y.txt").read_text() == "y"


def test_write_zip_over_max_bytes(ws: Path) -> None:
    """Content beyond max_bytes is a UserError naming the limit."""
    with pytest.raises(UserError, match="more than 30 bytes"):
        files.write_zip(ws, ["a.txt", "d/b.txt"], io.BytesIO(), 30)


def _gzip_names(data: bytes) -> list[bytes]:
    """FNAME of each member of concatenated gzip data."""
    names = []
    while data:
        assert data[:2] == b"\x1f\x8b" and data[3] & 0x08  # FLG.FNAME
        names.append(data[10:data.index(b"\0", 10)])
        member = zlib.decompressobj(wbits=31)
        member.decompress(data)
        data = member.unused_data
    return names


def test_gzip_one_member_per_file(ws: Path) -> None:
    """artifact_format gzip: one member per regular file, each named, concatenated; a
    link or directory among the files is left out with a warning."""
    out = io.BytesIO()
    said: list[str] = []
    count = files.write_gzip(ws, ["a.txt", "d/e/c.txt", "d/l", "d"], out, 1 << 20, said.append)
    assert gzip.decompress(out.getvalue()) == b"content of a.txt\ncontent of d/e/c.txt\n"
    assert count == len(b"content of a.txt\ncontent of d/e/c.txt\n")
    assert _gzip_names(out.getvalue()) == [b"a.txt", b"c.txt"]
    assert said == ["d/l: not a regular file; left out", "d: not a regular file; left out"]


def test_raw_is_exactly_one_file(ws: Path) -> None:
    """artifact_format raw: one file's bytes; none, several or a link is a UserError."""
    out = io.BytesIO()
    assert files.write_raw(ws, ["d/b.txt"], out, 100) == len(b"content of d/b.txt\n")
    assert out.getvalue() == b"content of d/b.txt\n"
    for names in ([], ["a.txt", "d/b.txt"]):
        with pytest.raises(UserError, match="exactly one file"):
            files.write_raw(ws, names, io.BytesIO(), 100)
    with pytest.raises(UserError, match="d/l: not a regular file"):
        files.write_raw(ws, ["d/l"], io.BytesIO(), 100)
    with pytest.raises(UserError, match="more than 10 bytes"):
        files.write_raw(ws, ["a.txt"], io.BytesIO(), 10)


def test_damaged_zip_is_a_user_error(tmp_path: Path) -> None:
    """A truncated or non-zip archive is a UserError saying it is damaged."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.txt", os.urandom(4096))
    for data in (buffer.getvalue()[:-30], b"not a zip at all"):
        with pytest.raises(UserError, match="archive is damaged"):
            files.extract_zip(io.BytesIO(data), tmp_path, 1 << 20, 10)


def test_cache_path_hashes_the_key(tmp_path: Path) -> None:
    """The cache key, job-made text, never becomes a path component of its own."""
    path = files.cache_path(tmp_path, 42, "../../etc/passwd")
    assert path.parent == tmp_path / "42" and path.suffix == ".zip" and len(path.stem) == 64
    assert files.cache_path(tmp_path, 42, "../../etc/passwd") == path
    assert files.cache_path(tmp_path, 42, "other") != path
    with pytest.raises(UserError):
        files.cache_path(tmp_path, -1, "key")


def test_atomic_write(tmp_path: Path) -> None:
    """A completed write replaces the file; a failed one leaves the old file and no
    temporary file behind."""
    target = tmp_path / "c" / "cache.zip"
    with files.atomic_write(target) as out:
        out.write(b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError), files.atomic_write(target) as out:
        out.write(b"half")
        raise RuntimeError("failed midway")
    assert target.read_bytes() == b"one"
    assert os.listdir(target.parent) == ["cache.zip"]
