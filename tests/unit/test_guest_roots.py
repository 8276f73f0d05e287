"""The guest side of OCI image roots that needs no VM: who a job runs as (OCI config.User
against the image's own /etc/passwd and /etc/group), the /etc/hosts it gets, what
PrepareRoot refuses, and mount points made without following the image's links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kata_ci.guest import roots

PASSWD = "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000::/home/builder:/bin/sh\n" \
         "nobody:x:65534:65534::/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nbuilder:x:1000:\ndocker:x:999:builder\nwheel:x:10:root,builder\n"


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(PASSWD)
    (tmp_path / "etc/group").write_text(GROUP)
    return tmp_path


@pytest.mark.parametrize("user, uid, gid, groups, home", [
    ("", 0, 0, (0, 10), "/root"),
    ("builder", 1000, 1000, (10, 999, 1000), "/home/builder"),
    ("1000", 1000, 1000, (10, 999, 1000), "/home/builder"),
    ("builder:docker", 1000, 999, (10, 999), "/home/builder"),
    ("4242", 4242, 0, (0,), "/"),
    ("4242:4343", 4242, 4343, (4343,), "/"),
])
def test_user_forms_resolve_as_docker_does(image_root: Path, user: str, uid: int, gid: int,
                                           groups: tuple[int, ...], home: str) -> None:
    """name, uid, name:group, uid:gid: numeric ids need no entry, names come from the image's
    files, supplementary groups from /etc/group, HOME from passwd (else /)."""
    who = roots.identity(str(image_root), user)
    assert (who.uid, who.gid, who.groups, who.home) == (uid, gid, groups, home)


def test_unknown_user_or_group_name_is_refused(image_root: Path) -> None:
    """A name the image does not know is an error naming it, as Docker's."""
    with pytest.raises(roots.RootError, match="unable to find user ghost"):
        roots.identity(str(image_root), "ghost")
    with pytest.raises(roots.RootError, match="unable to find group ghosts"):
        roots.identity(str(image_root), "builder:ghosts")


def test_image_without_passwd_runs_numeric_users_only(tmp_path: Path) -> None:
    """A distroless-like image with no /etc/passwd: uid 0 and numeric ids work, names do not."""
    assert roots.identity(str(tmp_path), "").uid == 0
    assert roots.identity(str(tmp_path), "65532").uid == 65532
    with pytest.raises(roots.RootError):
        roots.identity(str(tmp_path), "nonroot")


def test_hosts_file_has_localhost_and_aliases() -> None:
    """/etc/hosts: localhost both ways, then every alias on its own line."""
    text = roots.hosts_file({"db": "127.0.0.1", "cache": "127.0.0.1"})
    assert text.splitlines()[0].startswith("127.0.0.1\tlocalhost")
    assert "127.0.0.1\tdb" in text and "127.0.0.1\tcache" in text


@pytest.mark.parametrize("name, size, hosts", [
    ("../x", "", {}), ("Job", "", {}), ("a" * 33, "", {}), ("job", "1g;rm", {}),
    ("job", "", {"bad host\n1.2.3.4 evil": "127.0.0.1"}), ("job", "", {"db": "1.2.3.4\nx"}),
])
def test_prepare_root_refuses_hostile_arguments(name: str, size: str,
                                                hosts: dict[str, str]) -> None:
    """Names that could leave /run/kata-ci/roots, mount options smuggled in a size, hosts
    lines smuggled in an alias or address: refused before anything is mounted."""
    with pytest.raises(roots.RootError):
        roots.check_request(name, size, hosts, 0)


def test_root_count_is_bounded() -> None:
    """At most MAX_ROOTS roots per VM."""
    with pytest.raises(roots.RootError, match="at most"):
        roots.check_request("job", "", {}, roots.MAX_ROOTS)


def test_mount_points_replace_links_instead_of_following_them(tmp_path: Path) -> None:
    """An image whose /proc is a link out of the root and whose /dev is a file: the mount
    points become real directories inside the root; the link's target is untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(str(outside), root / "proc")
    (root / "dev").write_text("not a dir")
    made = roots._directory(str(root), "proc")
    assert made == str(root / "proc") and (root / "proc").is_dir()
    assert not (root / "proc").is_symlink() and outside.is_dir()
    assert Path(roots._directory(str(root), "dev/pts")).is_dir()
    with pytest.raises(roots.RootError):
        roots._directory(str(root), "a/../../x")
