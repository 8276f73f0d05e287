"""Escape 1: a job rewrites `.git` in the shared checkout so that the host's next git command
runs its program. Each payload is armed in a real repository (made with real git) the way a
job would leave it, then the host reads the repository as `kata-ci run` does; the payload
writes a marker file if it ever runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from kata_ci.runner.cli.ci import discover
from tests.e2e.conftest import kata_ci_run

CI_FILE = ("changed: {script: [x], rules: [{changes: [a.txt]}]}\n"
           "unchanged: {script: [x], rules: [{changes: ['nothing-*.txt']}]}\n")
PAST = 1_000_000_000  # an old mtime: the file is stat-dirty but its content is unchanged


def git(cwd: Path, *args: str) -> str:
    """The test's own git, before any payload is armed."""
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def checkout(tmp_path: Path, submodule: bool = False) -> Path:
    """keep.txt in both commits; a.txt (and the CI file, and a submodule) in the second."""
    ws = tmp_path / "ws"
    ws.mkdir()
    git(ws, "init", "-q", "-b", "main")
    (ws / "keep.txt").write_text("keep\n")
    git(ws, "add", ".")
    git(ws, "commit", "-q", "-m", "first")
    (ws / "a.txt").write_text("a\n")
    (ws / ".gitlab-ci.yml").write_text(CI_FILE)
    if submodule:
        sub = ws / "sub"
        sub.mkdir()
        git(sub, "init", "-q", "-b", "main")
        (sub / "x").write_text("x\n")
        git(sub, "add", "x")
        git(sub, "commit", "-q", "-m", "sub")
    git(ws, "add", ".")
    git(ws, "commit", "-q", "-m", "second")
    return ws


def program(tmp_path: Path, ws: Path) -> tuple[str, Path]:
    """A program the job wrote into the checkout; it leaves a marker outside it."""
    marker = tmp_path / "marker"
    path = ws / ".git" / "payload.sh"
    path.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {marker}\n")
    path.chmod(0o755)
    return str(path), marker


def set_config(gitdir: Path, key: str, value: str) -> None:
    """`git config --file`: writes the file only, runs nothing."""
    git(gitdir.parent, "config", "--file", str(gitdir / "config"), key, value)


def dirty(ws: Path, name: str = "keep.txt") -> None:
    os.utime(ws / name, (PAST, PAST))


def sign_head(ws: Path) -> None:
    """HEAD re-written with a (bogus) signature: `log --show-signature` calls gpg on it."""
    body = git(ws, "cat-file", "commit", "HEAD").replace(
        "\n\n", "\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n AAAA\n -----END PGP SIGNATURE-----"
        "\n\n", 1)
    sha = subprocess.run(["git", "hash-object", "-t", "commit", "-w", "--stdin"], cwd=ws,
                         input=body + "\n", check=True, capture_output=True,
                         text=True).stdout.strip()
    git(ws, "update-ref", "HEAD", sha)


def arm_fsmonitor(ws: Path, prog: str) -> None:
    set_config(ws / ".git", "core.fsmonitor", prog)


def arm_gpg(ws: Path, prog: str) -> None:
    set_config(ws / ".git", "gpg.program", prog)
    set_config(ws / ".git", "log.showSignature", "true")


def arm_filter(kind: str) -> Callable[[Path, str], None]:
    def arm(ws: Path, prog: str) -> None:
        (ws / ".gitattributes").write_text("*.txt filter=evil\n")
        set_config(ws / ".git", f"filter.evil.{kind}", prog)
        dirty(ws)
    return arm


def arm_include(ws: Path, prog: str) -> None:
    (ws / ".git" / "extra").write_text(f"[core]\n\tfsmonitor = {prog}\n")
    set_config(ws / ".git", "include.path", str(ws / ".git" / "extra"))


def arm_hook(ws: Path, prog: str) -> None:
    shutil.copy(prog, ws / ".git" / "hooks" / "post-index-change")
    dirty(ws)


def arm_hooks_path(ws: Path, prog: str) -> None:
    (ws / "hooks").mkdir()
    shutil.copy(prog, ws / "hooks" / "post-index-change")
    set_config(ws / ".git", "core.hooksPath", str(ws / "hooks"))
    dirty(ws)


def arm_gitdir_file(ws: Path, prog: str) -> None:
    """`.git` becomes a `gitdir:` file naming a repository outside the checkout."""
    outside = ws.parent / "elsewhere.git"
    shutil.move(ws / ".git", outside)
    (ws / ".git").write_text(f"gitdir: {outside}\n")
    set_config(outside, "core.fsmonitor", prog.replace(str(ws / ".git"), str(outside)))


def arm_submodule(ws: Path, prog: str) -> None:
    set_config(ws / "sub" / ".git", "core.fsmonitor", prog)
    (ws / "sub" / "x").write_text("dirty\n")


PAYLOADS: dict[str, Callable[[Path, str], None]] = {
    "core.fsmonitor": arm_fsmonitor, "gpg.program+log.showSignature": arm_gpg,
    "filter.clean": arm_filter("clean"), "filter.process": arm_filter("process"),
    "include.path": arm_include, "hooks/post-index-change": arm_hook,
    "core.hooksPath": arm_hooks_path, "gitdir-file": arm_gitdir_file,
    "submodule-config": arm_submodule,
}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_payload_in_git_never_runs_on_the_host(tmp_path: Path, payload: str) -> None:
    """The host's reading of the checkout (CI_* variables, rules:changes) runs no program
    the job put in .git, and CI_COMMIT_* and rules:changes are still those of the commit."""
    ws = checkout(tmp_path, submodule=payload == "submodule-config")
    if payload == "gpg.program+log.showSignature":
        sign_head(ws)
    sha = git(ws, "rev-parse", "HEAD")
    prog, marker = program(tmp_path, ws)
    PAYLOADS[payload](ws, prog)
    found = discover(ws, None, None, {}, "push")
    assert not marker.exists(), f"{payload} ran on the host: {marker.read_text()}"
    assert found.gitlab is not None
    jobs = [j.name for j in found.gitlab.jobs]
    if payload == "gitdir-file":  # refused: the defaults of a directory outside git
        assert found.predefined["CI_COMMIT_SHA"] == "0" * 40
        assert jobs == ["changed", "unchanged"]
        return
    assert found.predefined["CI_COMMIT_SHA"] == sha
    assert found.predefined["CI_COMMIT_BRANCH"] == "main"
    assert found.predefined["CI_COMMIT_TITLE"] == "second"
    assert jobs == ["changed"]


@pytest.mark.parametrize("payload", ["core.fsmonitor", "gpg.program+log.showSignature"])
def test_kata_ci_run_listing_runs_no_payload(tmp_path: Path, cli_env: dict[str, str],
                                             payload: str) -> None:
    """`kata-ci run` (listing the jobs, the first thing a user does) in a checkout a job
    armed runs nothing of it and lists the jobs rules:changes selects."""
    ws = checkout(tmp_path)
    if payload == "gpg.program+log.showSignature":
        sign_head(ws)
    prog, marker = program(tmp_path, ws)
    PAYLOADS[payload](ws, prog)
    result = kata_ci_run([], cli_env, ws, timeout=60)
    assert not marker.exists(), f"{payload} ran on the host: {marker.read_text()}"
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "changed" in out and "unchanged" not in out


def test_hardened_git_runs_no_diff_driver_even_for_patches(tmp_path: Path) -> None:
    """diff.external, a textconv driver and core.pager, which plain git runs for a patch,
    stay inert in the hardened git even when it is asked for patches."""
    from kata_ci.runner.core.repo import hardened_git

    ws = checkout(tmp_path)
    prog, marker = program(tmp_path, ws)
    (ws / ".gitattributes").write_text("*.txt diff=evil\n")
    set_config(ws / ".git", "diff.evil.textconv", prog)
    set_config(ws / ".git", "core.pager", prog)
    (ws / "a.txt").write_text("changed\n")
    subprocess.run(["git", "-C", str(ws), "diff", "HEAD~1"], capture_output=True, check=False)
    assert marker.exists()  # the payload is live: plain git runs the textconv driver
    marker.unlink()
    set_config(ws / ".git", "diff.external", prog)
    subprocess.run(["git", "-C", str(ws), "diff", "HEAD~1"], capture_output=True, check=False)
    assert marker.exists()  # and the external diff
    marker.unlink()
    with hardened_git(ws) as (hardened, notice):
        assert hardened is not None and notice == ""
        assert hardened.raw("diff", "HEAD~1") is not None
        assert hardened.raw("log", "-p", "-2") is not None
        assert hardened.raw("show", "--textconv", "HEAD:a.txt") is not None
    assert not marker.exists(), marker.read_text()


def test_symlinked_git_or_objects_is_refused(tmp_path: Path) -> None:
    """`.git` as a link to a repository elsewhere is not read; a link inside the object store
    keeps git away from the objects (no title, every file changed) but not from the refs."""
    ws = checkout(tmp_path)
    sha = git(ws, "rev-parse", "HEAD")
    pack = ws / ".git" / "objects" / "pack"
    shutil.rmtree(pack)
    pack.symlink_to(tmp_path)
    found = discover(ws, None, None, {}, "push")
    assert found.predefined["CI_COMMIT_SHA"] == sha
    assert found.predefined["CI_COMMIT_TITLE"] == ""
    assert found.repo.notice and "objects/pack" in found.repo.notice
    assert found.gitlab is not None and len(found.gitlab.jobs) == 2
    shutil.move(ws / ".git", tmp_path / "real.git")
    (ws / ".git").symlink_to(tmp_path / "real.git")
    found = discover(ws, None, None, {}, "push")
    assert found.predefined["CI_COMMIT_SHA"] == "0" * 40
    assert "not a plain directory" in found.repo.notice


def test_job_rewriting_git_changes_nothing_for_its_run_and_arms_nothing(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Through the real CLI: job 1 moves HEAD, edits a tracked file and arms core.fsmonitor;
    the later job still gets the run's CI_COMMIT_SHA and rules:changes as read before job 1,
    and the next `kata-ci run` on the host runs nothing of what job 1 left."""
    ws = checkout(tmp_path)
    (ws / "a.txt").write_text("third\n")
    git(ws, "commit", "-q", "-am", "third")  # HEAD~1 must exist once the job moved HEAD back
    sha, prev = git(ws, "rev-parse", "HEAD"), git(ws, "rev-parse", "HEAD~1")
    marker = tmp_path / "marker"
    (ws / ".gitlab-ci.yml").write_text(yaml.safe_dump({
        "variables": {"MARKER": str(marker), "PREV": prev},
        "plant": {"stage": "build", "script": [
            "printf '#!/bin/sh\\necho \"$0\" >> %s\\n' \"$MARKER\" > .git/evil.sh",
            "chmod +x .git/evil.sh",
            "printf '[core]\\n\\tfsmonitor = %s/.git/evil.sh\\n' \"$CI_PROJECT_DIR\""
            " >> .git/config",
            "echo \"$PREV\" > .git/refs/heads/main",
            "echo more >> keep.txt"]},
        "report": {"stage": "test", "rules": [{"changes": ["a.txt"]}],
                   "script": ["echo \"$CI_COMMIT_SHA\" > seen-sha"]},
        "late": {"stage": "test", "rules": [{"changes": ["keep.txt"]}],
                 "script": ["touch late-ran"]}}))
    result = kata_ci_run(["--pipeline"], cli_env, ws, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert (ws / "seen-sha").read_text().strip() == sha
    assert not (ws / "late-ran").exists()
    assert "fsmonitor" in (ws / ".git" / "config").read_text()  # the job did arm it
    assert (ws / ".git/refs/heads/main").read_text().strip() == prev  # and moved HEAD
    listing = kata_ci_run([], cli_env, ws, timeout=60)
    assert not marker.exists(), f"the job's fsmonitor ran on the host: {marker.read_text()}"
    assert listing.returncode == 0, listing.stderr.decode()
