"""The reader beneath a workspace root, through openat2(2) and through the fallback that walks
component by component (both run here on one kernel by switching the probe)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath

SECRET = "host-secret-line-9f1c"


@pytest.fixture(params=["openat2", "fallback"], autouse=True)
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "openat2":
        monkeypatch.setattr(beneath, "use_openat2", None)
        if not beneath._have_openat2():
            pytest.skip("this kernel has no openat2 (Linux < 5.6)")
    else:
        monkeypatch.setattr(beneath, "use_openat2", False)
    yield request.param


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A workspace with a file, a subdirectory, and a host file next to it."""
    (tmp_path / "host.txt").write_text(f"{SECRET}\n")
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "b.yml").write_text("b: 1\n")
    (ws / "a.yml").write_text("a: 1\n")
    return ws


def test_links_inside_are_followed(tree: Path) -> None:
    """A relative link that stays in the workspace (also through a directory link and `..`)
    reads its target."""
    (tree / "link.yml").symlink_to("sub/b.yml")
    (tree / "dirlink").symlink_to("sub")
    (tree / "sub" / "up.yml").symlink_to("../a.yml")
    assert beneath.read_text(tree, "link.yml") == "b: 1\n"
    assert beneath.read_text(tree, "dirlink/b.yml") == "b: 1\n"
    assert beneath.read_text(tree, "sub/up.yml") == "a: 1\n"
    assert beneath.read_text(tree, "sub/../a.yml") == "a: 1\n"


def test_dotdot_leaving_is_refused(tree: Path) -> None:
    """`..` past the root, as a path or inside a link's target, is refused without reading."""
    with pytest.raises(beneath.Escape, match="a path leaving the workspace"):
        beneath.read_text(tree, "../host.txt")
    (tree / "out.yml").symlink_to("../host.txt")
    (tree / "sub" / "deep.yml").symlink_to("../../host.txt")
    for rel in ("out.yml", "sub/deep.yml"):
        with pytest.raises(beneath.Escape) as caught:
            beneath.read_text(tree, rel)
        assert str(caught.value) == f"{rel}: a symbolic link leaving the workspace"
        assert SECRET not in str(caught.value)


def test_absolute_links_are_refused(tree: Path) -> None:
    """An absolute link is refused, to a host file and even to a file of the workspace; so is
    a directory link to the host (/etc/passwd through it)."""
    (tree / "abs.yml").symlink_to(tree.parent / "host.txt")
    (tree / "self.yml").symlink_to(tree / "a.yml")
    (tree / "etc").symlink_to("/etc")
    for rel in ("abs.yml", "self.yml", "etc/passwd"):
        with pytest.raises(beneath.Escape, match="symbolic link leaving"):
            beneath.read_bytes(tree, rel)
    with pytest.raises(beneath.Escape):
        beneath.exists(tree, "etc/passwd")
    with pytest.raises(beneath.Escape):
        beneath.listdir(tree, "etc")


def test_loops_are_refused(tree: Path) -> None:
    """Links that point at each other end in a clear error, not a hang or a traceback."""
    (tree / "x").symlink_to("y")
    (tree / "y").symlink_to("x")
    (tree / "self").symlink_to("self")
    for rel in ("x", "self/a"):
        with pytest.raises(UserError, match="too many levels of symbolic links"):
            beneath.read_bytes(tree, rel)


@pytest.mark.timeout(10)
def test_fifo_and_socket_are_refused(tree: Path) -> None:
    """A fifo (which would block the reader) and a socket are refused, not opened."""
    os.mkfifo(tree / "fifo.yml")
    (tree / "via.yml").symlink_to("fifo.yml")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tree / "sock.yml"))
        for rel in ("fifo.yml", "via.yml", "sock.yml"):
            with pytest.raises(UserError, match="not a regular file"):
                beneath.read_bytes(tree, rel)


def test_oversize_is_refused(tree: Path) -> None:
    """A file over the bound is refused before it is read (a sparse 4 GiB file included)."""
    with (tree / "big").open("wb") as handle:
        handle.truncate(4 << 30)
    with pytest.raises(UserError, match="big: larger than 4194304 bytes"):
        beneath.read_bytes(tree, "big")
    (tree / "five").write_bytes(b"12345")
    assert beneath.read_bytes(tree, "five", limit=5) == b"12345"
    with pytest.raises(UserError, match="larger than 4 bytes"):
        beneath.read_bytes(tree, "five", limit=4)


def test_exists_and_listdir(tree: Path) -> None:
    """Missing paths and dangling links inside are absent; a directory lists its names."""
    (tree / "dangling").symlink_to("nowhere")
    assert beneath.exists(tree, "a.yml") and beneath.exists(tree, "sub")
    assert not beneath.exists(tree, "nope") and not beneath.exists(tree, "dangling")
    assert not beneath.exists(tree, "a.yml/x")
    assert beneath.listdir(tree, "sub") == ["b.yml"]
    assert beneath.listdir(tree, "missing") == []


def test_glob_stays_beneath(tree: Path) -> None:
    """`*` and `**` match inside; a directory link out is not descended; a file link out is
    listed but reading it is refused."""
    (tree / "hostdir").symlink_to(tree.parent)
    (tree / "out.yml").symlink_to("../host.txt")
    assert beneath.glob(tree, "**/*.yml") == ["a.yml", "out.yml", "sub/b.yml"]
    assert beneath.glob(tree, "/sub/*.yml") == ["sub/b.yml"]
    assert beneath.glob(tree, "hostdir/*") == []
    assert beneath.glob(tree, "*/host.txt") == []
    with pytest.raises(beneath.Escape):
        beneath.read_bytes(tree, "out.yml")


def test_user_file_outside_follows_links(tree: Path, tmp_path: Path) -> None:
    """A file the user names outside the workspace is read as named (links followed), and one
    inside the workspace is read beneath it."""
    (tmp_path / "mine.yml").symlink_to(tmp_path / "host.txt")
    assert beneath.read_named(tree, tmp_path / "mine.yml") == f"{SECRET}\n"
    (tree / "out.yml").symlink_to(tmp_path / "host.txt")
    with pytest.raises(beneath.Escape):
        beneath.read_named(tree, tree / "out.yml")
