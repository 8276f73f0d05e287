"""The workspace's git facts (HEAD, branch, tag, title, changed files), read once per run by
a git that runs nothing the workspace controls.

Why: the checkout is shared read-write with jobs, which are root in their VM. Everything in
`.git` is hostile: its config (`core.fsmonitor`, `gpg.program` + `log.showSignature`,
`filter.*.clean`/`process`, `include.path`, `core.hooksPath`, `diff.external`, textconv,
`core.pager`...), its hooks, a `.git` *file* (`gitdir:` anywhere on the host), symbolic links,
submodules with their own config. A plain `git -C workspace ...` on the host reads and runs
all of it as the user running kata-ci (root, as the README sets it up).

How (a hardened invocation of the host's git, not a pure reader: dulwich also runs filter
drivers, and neither it nor a reader of our own would give git's exact worktree diff):

1. `.git` must be a real directory (not a link, not a `gitdir:` file: worktrees and submodule
   checkouts get the defaults of a directory outside git, with a notice). An enclosing
   repository above the workspace is used only when its `.git` belongs to us, as git's own
   safe.directory rule says.
2. A private GIT_DIR in a fresh 0700 temporary directory gets copies of HEAD, packed-refs,
   refs/{heads,tags,remotes}, shallow and the index, each read with O_NOFOLLOW from its
   parent directory's descriptor, regular files only, bounded. Nothing else is copied: no
   config (not even parsed), no hooks, no info/attributes, no worktrees, no replace refs.
3. Objects stay where they are, named by `objects/info/alternates`, after checking that the
   object store is plain directories and regular files (no links, fifos, devices) without
   alternates of its own (git would follow those anywhere). Objects are data: nothing in an
   object store makes git run a program. Otherwise no objects are given: sha and branch are
   still right, the title is empty and `rules: changes` counts every file as changed.
4. git runs with a config we write (fsmonitor off, hooks in /dev/null, no signatures, no
   submodule recursion, no index writes), GIT_CONFIG_NOSYSTEM, GIT_CONFIG_GLOBAL=/dev/null,
   HOME in the temporary directory, an environment built from nothing (no inherited GIT_*),
   `--no-ext-diff --no-textconv --ignore-submodules=all`, GIT_PAGER=cat, stdin closed, no
   controlling terminal and a timeout. With no filter, diff or textconv driver configured,
   a `.gitattributes` naming one does nothing; worktree symlinks are compared as links.

Given up, knowingly: clean/smudge filters, textconv and the repository's eol/autocrlf settings
are not applied when listing changed files (a file only they would make equal counts as
changed); changed submodules are not listed; worktrees, submodule checkouts and clones with
alternates (`--shared`, `--reference`) lose some or all facts. Limit: a job running at the
same time in the same checkout (a second `kata-ci run`) could swap a checked object-store
entry for a link before git reads it: git then reads other data, and still runs nothing.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

GIT_TIMEOUT = 60.0  # one git command; a huge worktree diff stays well under it
MAX_SMALL = 4096  # HEAD and one loose ref: 41 bytes, or `ref: <name>`
MAX_PACKED = 64 << 20  # packed-refs, shallow
MAX_INDEX = 512 << 20  # the largest monorepo indexes are ~100 MB
MAX_MESSAGE = 64 << 10  # a commit message passed to every job's environment
MAX_REFS = 100_000  # loose ref files and directories copied
MAX_OBJECT_ENTRIES = 4_000_000  # entries walked when checking the object store
MAX_DEPTH = 32
REF_DIRS = ("heads", "tags", "remotes")
_HEX = re.compile(rb"[0-9a-f]{40}(?:[0-9a-f]{24})?\b")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Our GIT_DIR's whole config: nothing here can name a program; the keys that could, unset,
# mean "do nothing". core.hooksPath=/dev/null: no hook can be found there.
_CONFIG = """[core]
\trepositoryformatversion = {version}
\tbare = false
\tfsmonitor = false
\thooksPath = /dev/null
\tuntrackedCache = false
\tattributesFile = /dev/null
\texcludesFile = /dev/null
\tpager = cat
[log]
\tshowSignature = false
[diff]
\tignoreSubmodules = all
\tautoRefreshIndex = false
[submodule]
\trecurse = false
[gc]
\tauto = 0
[maintenance]
\tauto = false
[protocol]
\tallow = never
{extensions}"""


@dataclass(frozen=True)
class RepoSnapshot:
    """What git says about the workspace, once per run, before any job touched it."""

    sha: str = ""  # HEAD's commit; "" outside git or on an unborn branch
    branch: str = ""  # as `rev-parse --abbrev-ref HEAD`: "HEAD" when detached
    tag: str = ""  # a tag exactly at HEAD, looked up when detached
    default_branch: str = ""  # origin's HEAD, else main or master if they exist
    title: str = ""  # HEAD's subject line
    message: str = ""  # HEAD's full message (bounded, no NUL: it becomes an env value)
    author: str = ""  # `Name <email>` of HEAD's author
    timestamp: str = ""  # HEAD's committer date, ISO 8601 (strict)
    changed: tuple[str, ...] | None = None  # worktree vs HEAD~1; None: unknown (all changed)
    notice: str = ""  # why some facts could not be read safely, for the user


class _Unusable(Exception):
    """A part of `.git` the host will not read; the message says which and why."""


def read_repo(workspace: Path, changes: bool = True) -> RepoSnapshot:
    """The facts of the repository holding ``workspace`` (changed files only if
    ``changes``); an empty snapshot outside git, or when git is not installed."""
    with hardened_git(workspace) as (git, notice):
        return RepoSnapshot(notice=notice) if git is None else _facts(git, changes, notice)


@contextmanager
def hardened_git(workspace: Path) -> Iterator[tuple[Git | None, str]]:
    """(the host's git over a private copy of the repository holding ``workspace``, a
    notice when part of it was refused); (None, why) outside git or when nothing of it can
    be read safely. The copy is removed on exit."""
    search = _host_path()
    git = shutil.which("git", path=search)
    if git is None:
        yield None, ""
        return
    if Path(git).resolve().is_relative_to(workspace):
        yield None, f"{git}: the git found on PATH lies in the workspace: not run"
        return
    with tempfile.TemporaryDirectory(prefix="kata-ci-git-") as tmp:
        git_tool, notice = _prepare(workspace, Path(tmp), git, search)
        yield git_tool, notice


def _prepare(workspace: Path, tmp: Path, git: str, search: str) -> tuple[Git | None, str]:
    try:
        found = _find(workspace)
        if found is None:
            return None, ""
        top, gitfd = found
        try:
            notice = _private_gitdir(gitfd, top, tmp / "git")
        finally:
            os.close(gitfd)
    except _Unusable as exc:
        return None, f"{exc}: the repository is not read (CI_COMMIT_* get their defaults, " \
                     "rules:changes match every file)"
    except OSError as exc:
        return None, f"cannot read {workspace}/.git: {exc.strerror}"
    return Git(git, tmp, top, search), notice


def _host_path() -> str:
    """PATH without relative entries: an empty or `.` entry would find a `git` the job
    wrote into the workspace (kata-ci is often started from inside it)."""
    entries = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(e for e in entries if os.path.isabs(e))


def _find(workspace: Path) -> tuple[Path, int] | None:
    """(worktree top, descriptor of its real `.git` directory), as git's discovery would
    find it: the workspace's own `.git` first, else an enclosing one on the same
    filesystem that is ours."""
    top, device = workspace, os.stat(workspace).st_dev
    while True:
        topfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                info = os.stat(".git", dir_fd=topfd, follow_symlinks=False)
            except FileNotFoundError:
                info = None
            if info is not None:
                shown = f"{top}/.git"
                if stat.S_ISREG(info.st_mode):
                    raise _Unusable(f"{shown} is a `gitdir:` file (a worktree or submodule "
                                    "checkout) naming a repository outside the workspace")
                if not stat.S_ISDIR(info.st_mode):
                    raise _Unusable(f"{shown} is not a plain directory")
                if top != workspace and info.st_uid not in _own_uids():
                    return None  # git's safe.directory rule: not a repository to trust
                return top, _open_dir(topfd, ".git", shown)
        finally:
            os.close(topfd)
        if top.parent == top or os.stat(top.parent).st_dev != device:
            return None
        top = top.parent


def _own_uids() -> set[int]:
    uids = {os.geteuid()}
    sudo = os.environ.get("SUDO_UID", "")
    if os.geteuid() == 0 and sudo.isdigit():
        uids.add(int(sudo))  # as git allows root under sudo
    return uids


def _open_dir(dirfd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _DIR, dir_fd=dirfd)
    except OSError as exc:  # ELOOP: a symbolic link; ENOTDIR: a file
        if exc.errno == errno.ENOENT:
            raise
        raise _Unusable(f"{shown} is not a plain directory") from None


def _copy(dirfd: int, name: str, shown: str, dest: Path | None, limit: int) -> bytes | None:
    """Copy the regular file ``name`` (never a link, fifo or device) to ``dest`` (None: read
    only); its first MAX_SMALL bytes, or None when it does not exist."""
    try:
        pathfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(pathfd)
        if not stat.S_ISREG(info.st_mode):
            raise _Unusable(f"{shown} is not a regular file")
        # The inode we just checked, not a new lookup of the name: nothing can be swapped in.
        fd = os.open(f"/proc/self/fd/{pathfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(pathfd)
    head, total = b"", 0
    with os.fdopen(fd, "rb") as src, open(dest or os.devnull, "xb" if dest else "wb") as out:
        while chunk := src.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise _Unusable(f"{shown} is larger than {limit} bytes")
            head = head or chunk[:MAX_SMALL]
            out.write(chunk)
    return head


def _private_gitdir(gitfd: int, top: Path, private: Path) -> str:
    """Fill ``private`` with copies of what git needs; a notice when the objects are not
    given to git."""
    (private / "refs").mkdir(parents=True)
    (private / "objects" / "info").mkdir(parents=True)
    shown = f"{top}/.git"
    head = _copy(gitfd, "HEAD", f"{shown}/HEAD", private / "HEAD", MAX_SMALL)
    if head is None:
        raise _Unusable(f"{shown} has no HEAD")
    seen = [head]
    for name in ("packed-refs", "shallow", "index"):
        content = _copy(gitfd, name, f"{shown}/{name}", private / name,
                        MAX_INDEX if name == "index" else MAX_PACKED)
        seen.append(b"" if content is None or name == "index" else content)
    for name in os.listdir(gitfd):  # a split index keeps its entries here
        if re.fullmatch(r"sharedindex\.[0-9a-f]{40,64}", name):
            _copy(gitfd, name, f"{shown}/{name}", private / name, MAX_INDEX)
    refs = _open_dir(gitfd, "refs", f"{shown}/refs")
    try:
        budget = [MAX_REFS]
        for sub in REF_DIRS:
            try:
                subfd = _open_dir(refs, sub, f"{shown}/refs/{sub}")
            except FileNotFoundError:
                continue
            _copy_refs(subfd, f"{shown}/refs/{sub}", private / "refs" / sub, 0, budget, seen)
    finally:
        os.close(refs)
    # The object format, from the ref values (the repository's config is never read).
    sha256 = any(len(m.group()) == 64 for s in seen for m in [_HEX.search(s)] if m)
    (private / "config").write_text(_CONFIG.format(
        version=1 if sha256 else 0,
        extensions="[extensions]\n\tobjectFormat = sha256\n" if sha256 else ""))
    objects = f"{top}/.git/objects"
    if "\n" in objects or objects.startswith('"'):
        return f"{objects}: a path an alternates file cannot hold: git is not given its objects"
    try:
        _check_objects(gitfd, f"{shown}/objects")
    except _Unusable as exc:
        return f"{exc}: git is not given its objects (CI_COMMIT_TITLE is empty, " \
               "rules:changes match every file)"
    (private / "objects" / "info" / "alternates").write_text(objects + "\n")
    return ""


def _copy_refs(dirfd: int, shown: str, dest: Path, depth: int, budget: list[int],
               seen: list[bytes]) -> None:
    """Loose refs, recursively: real directories and regular files only (a symbolic link,
    once git's way of writing a symbolic ref, is left out)."""
    try:
        if depth > MAX_DEPTH:
            raise _Unusable(f"{shown}: refs nest deeper than {MAX_DEPTH}")
        dest.mkdir()
        with os.scandir(dirfd) as entries:
            for entry in entries:
                budget[0] -= 1
                if budget[0] < 0:
                    raise _Unusable(f"{shown}: more than {MAX_REFS} loose refs")
                if entry.is_dir(follow_symlinks=False):
                    sub = _open_dir(dirfd, entry.name, f"{shown}/{entry.name}")
                    _copy_refs(sub, f"{shown}/{entry.name}", dest / entry.name, depth + 1,
                               budget, seen)
                elif entry.is_file(follow_symlinks=False):
                    content = _copy(dirfd, entry.name, f"{shown}/{entry.name}",
                                    dest / entry.name, MAX_SMALL)
                    seen.append(content or b"")
    finally:
        os.close(dirfd)


def _check_objects(gitfd: int, shown: str) -> None:
    """The object store holds only what git reads as plain data: real directories and
    regular files, and no alternates of its own."""
    objects = _open_dir(gitfd, "objects", shown)
    budget = [MAX_OBJECT_ENTRIES]
    try:
        _walk_plain(objects, shown, 0, budget)
        try:
            info = _open_dir(objects, "info", f"{shown}/info")
        except FileNotFoundError:
            return
        try:
            copied = _copy(info, "alternates", f"{shown}/info/alternates", None, MAX_SMALL)
        finally:
            os.close(info)
        if copied and any(line.strip() and not line.startswith(b"#")
                          for line in copied.splitlines()):
            raise _Unusable(f"{shown}/info/alternates names other object stores")
    finally:
        os.close(objects)


def _walk_plain(dirfd: int, shown: str, depth: int, budget: list[int]) -> None:
    if depth > 3:  # objects/info/commit-graphs/<file> is the deepest git reads
        return
    with os.scandir(dirfd) as entries:
        for entry in entries:
            budget[0] -= 1
            if budget[0] < 0:
                raise _Unusable(f"{shown}: more than {MAX_OBJECT_ENTRIES} entries")
            if entry.is_dir(follow_symlinks=False):
                sub = _open_dir(dirfd, entry.name, f"{shown}/{entry.name}")
                try:
                    _walk_plain(sub, f"{shown}/{entry.name}", depth + 1, budget)
                finally:
                    os.close(sub)
            elif not entry.is_file(follow_symlinks=False):
                raise _Unusable(f"{shown}/{entry.name} is not a regular file or directory")


class Git:
    """The host's git on the private GIT_DIR, in an environment built from nothing."""

    def __init__(self, git: str, tmp: Path, top: Path, search: str) -> None:
        self.git = git
        self.top = top
        home = tmp / "home"
        home.mkdir()
        self.env = {
            "PATH": search, "HOME": str(home),
            "XDG_CONFIG_HOME": str(home), "LC_ALL": "C", "GIT_DIR": str(tmp / "git"),
            "GIT_WORK_TREE": str(top), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_ATTR_NOSYSTEM": "1", "GIT_PAGER": "cat",
            "PAGER": "cat", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0",
            "GIT_NO_REPLACE_OBJECTS": "1",
        }

    def raw(self, *args: str) -> bytes | None:
        """Standard output; None when git failed or took too long."""
        try:
            done = subprocess.run([self.git, "--no-pager", *args], cwd=self.top, env=self.env,
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=GIT_TIMEOUT, start_new_session=True, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    def __call__(self, *args: str) -> str:
        """Output as text without the final newline; "" when git failed."""
        out = self.raw(*args)
        return "" if out is None else out.decode("utf-8", "replace").rstrip("\n")


def _facts(git: Git, changes: bool, notice: str) -> RepoSnapshot:
    """The same questions kata-ci always asked git, now of the private GIT_DIR."""
    sha = git("rev-parse", "--verify", "--quiet", "HEAD")
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    tag = git("describe", "--tags", "--exact-match", "HEAD") if branch == "HEAD" else ""
    default = git("symbolic-ref", "--short", "refs/remotes/origin/HEAD")
    default = default.split("/", 1)[-1] if default else next(
        (b for b in ("main", "master") if git("rev-parse", "--verify", "--quiet", b)), "")
    title = git("log", "-1", "--format=%s", "--no-show-signature", "--no-notes", "HEAD",
                "--") if sha else ""
    message = author = timestamp = ""
    if sha:  # one more question of the same git: %x00 cannot occur in the author or date
        out = git.raw("log", "-1", "--format=%an <%ae>%x00%cI%x00%B", "--no-show-signature",
                      "--no-notes", "HEAD", "--")
        parts = (out or b"").split(b"\0", 2)
        if len(parts) == 3:
            author, timestamp, message = (
                p[:MAX_MESSAGE].decode("utf-8", "replace").replace("\0", "") for p in parts)
            message = message.rstrip("\n")  # the newlines git's message and format end with
    changed = None
    if changes and sha:
        diff = git.raw("diff", "--name-only", "-z", "--no-ext-diff", "--no-textconv",
                       "--ignore-submodules=all", "HEAD~1", "--")
        changed = None if diff is None else tuple(
            os.fsdecode(name) for name in diff.split(b"\0") if name)
    return RepoSnapshot(sha=sha, branch=branch, tag=tag, default_branch=default,
                        title=title, message=message, author=author, timestamp=timestamp,
                        changed=changed, notice=notice)
