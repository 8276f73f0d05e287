"""Which workspace files a GitLab job's `artifacts:`/`cache:` select, as gitlab-runner's
commands/helpers/file_archiver.go selects them: doublestar patterns, a matched directory
taken whole, `exclude` tried on every path taken (so excluding a directory leaves its
contents, as in GitLab), `untracked` from the files git tracked at checkout.

After a job every name in its workspace is hostile (links to host files, fifos, devices,
links where directories were), so nothing here follows a link, not even one staying inside
(core.beneath follows those): directories are opened one component at a time with
O_NOFOLLOW, and what is found is named, never opened, here (files.py reads it).
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.queue.workspace import _replace

log = logging.getLogger(__name__)
Warn = Callable[[str], None]
Entry = tuple[str, int, str, os.stat_result]  # path, parent dirfd, name, lstat
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAGIC = set("*?[{\\")

@dataclass
class Collected:
    files: list[str]  # relative, sorted: files, links and directories
    warnings: list[str]


def shown(name: str) -> str:
    """A job-made name in a warning: control characters cannot forge log lines."""
    return name if name.isprintable() else repr(name)


def size_text(count: int) -> str:
    return f"{count >> 20} MiB" if count >= 1 << 20 else f"{count} bytes"


def _regex(pattern: str) -> str:
    """doublestar as a regular expression over a relative path: `*`, `?`, `[..]`, `{a,b}`,
    `\\x`; `**` as a whole component is any number of directories, none included (so
    `out/**` matches `out`); `a**b` is `a*b`."""
    out: list[str] = []
    i, depth, n = 0, 0, len(pattern)
    while i < n:
        c, i = pattern[i], i + 1
        if c == "*":
            start = i - 1
            while i < n and pattern[i] == "*":
                i += 1
            alone = (start == 0 or pattern[start - 1] == "/") and (i == n or pattern[i] == "/")
            if i - start == 1 or not alone:
                out.append("[^/]*")
            elif i < n:
                out.append("(?:[^/]*/)*")  # with its slash, which it repeats
                i += 1
            elif out and out[-1] == "/":
                out[-1] = "(?:/.*)?"
            else:
                out.append(".*")
        elif c == "[":
            negate = i < n and pattern[i] in "!^"
            i += negate
            items: list[str] = []
            while i < n and (pattern[i] != "]" or not items):
                i += pattern[i] == "\\" and i + 1 < n
                items.append(re.escape(pattern[i]) if pattern[i] != "-" else "-")
                i += 1
            if i >= n:
                raise ValueError("unterminated [")
            out.append(("[^/" if negate else "(?!/)[") + "".join(items) + "]")
            i += 1
        elif c == "\\":
            if i == n:
                raise ValueError("trailing \\")
            out.append(re.escape(pattern[i]))
            i += 1
        elif c == "{" or (c in ",}" and depth):
            depth += {"{": 1, ",": 0, "}": -1}[c]
            out.append({"{": "(?:", ",": "|", "}": ")"}[c])
        else:
            out.append("[^/]" if c == "?" else re.escape(c))
    if depth:
        raise ValueError("unterminated {")
    return "".join(out)


MAX_STARS_PER_NAME = 3  # each more multiplies the backtracking of one match by a name's length
MAX_STARS = 8
MAX_ALTERNATIVES = 16
MAX_GLOBSTARS = 2  # `**` components: each is a loop over a path's depth


def _compile(pattern: str) -> re.Pattern[str]:
    """The pattern as a regex, refused (ValueError) when its wildcards could make one match
    backtrack for minutes: the job writes both the pattern and the names it is tried on."""
    stars = [len(re.findall(r"\*+", part)) for part in pattern.split("/")]
    if max(stars, default=0) > MAX_STARS_PER_NAME or sum(stars) > MAX_STARS or \
            pattern.count("{") + pattern.count(",") > MAX_ALTERNATIVES or \
            sum(part.startswith("**") for part in pattern.split("/")) > MAX_GLOBSTARS:
        raise ValueError(f"too many wildcards (at most {MAX_STARS_PER_NAME} per name, "
                         f"{MAX_STARS} in all, {MAX_GLOBSTARS} `**`)")
    return re.compile(_regex(pattern), re.DOTALL)  # DOTALL: a name may hold a newline


def _relative(pattern: str, project_dir: str | None) -> str | None:
    """The pattern relative to the project directory, cleaned lexically as gitlab-runner's
    filepath.Abs/Rel do ("" for the directory itself); None when it leaves it."""
    top = (project_dir or "").rstrip("/")
    if top and (pattern + "/").startswith(top + "/"):
        pattern = pattern[len(top):].lstrip("/")
    if pattern.startswith("/"):
        return None
    clean = posixpath.normpath(pattern or ".")
    if clean == ".." or clean.startswith("../"):
        return None
    return "" if clean == "." else clean


def open_dir(rootfd: int, parts: Sequence[str], make: bool = False) -> int:
    """A readable descriptor for the real directory ``parts`` beneath ``rootfd``. OSError
    when a component is missing, a link or not a directory; with ``make``, missing ones are
    made and links or files in the way replaced by directories, never followed."""
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=rootfd)
    try:
        for part in parts:
            try:
                sub = os.open(part, _DIR_FLAGS, dir_fd=here)
            except OSError as exc:
                if not make or exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    raise
                if exc.errno == errno.ENOENT:
                    os.mkdir(part, 0o755, dir_fd=here)
                else:
                    _replace(here, part, directory=True)
                sub = os.open(part, _DIR_FLAGS, dir_fd=here)
            os.close(here)
            here = sub
    except BaseException:
        os.close(here)
        raise
    return here


def kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "link"
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _always(rel: str, depth: int) -> bool:
    return True


def _scan(dirfd: int, prefix: str, depth: int, rx: re.Pattern[str] | None,
          descend: Callable[[str, int], bool]) -> Iterator[tuple[str, str]]:
    """(path, kind) of what ``rx`` matches (all when None) beneath ``dirfd`` (closed here),
    a matched directory taken whole. Only real directories that ``descend`` allows are
    entered."""
    try:
        if depth > beneath.MAX_DEPTH:
            raise UserError(f"{shown(prefix)}: directories nest deeper than {beneath.MAX_DEPTH}")
        with os.scandir(dirfd) as entries:
            for entry in entries:
                rel = prefix + entry.name
                try:
                    kind = kind_of(entry.stat(follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    continue
                hit = rx is None or rx.fullmatch(rel) is not None
                if hit:
                    yield rel, kind
                if kind != "dir":
                    continue
                sub_descend: Callable[[str, int], bool] = _always
                if rx is not None and hit:  # a matched directory is taken whole
                    sub_rx = None
                elif descend(rel, depth):
                    sub_rx, sub_descend = rx, descend
                else:
                    continue
                try:
                    sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dirfd)
                except OSError:
                    continue  # replaced meanwhile: not entered
                yield from _scan(sub, rel + "/", depth + 1, sub_rx, sub_descend)
    finally:
        os.close(dirfd)


def _expand(rootfd: int, pattern: str) -> Iterator[tuple[str, str]]:
    """What one cleaned pattern matches. Its literal leading directories are opened without
    following links; below them only directories that can still match are entered (all of
    them when it has `**` or braces)."""
    rx = _compile(pattern) if pattern else None  # "": the whole project directory
    parts = pattern.split("/") if pattern else []
    lit = next((i for i, p in enumerate(parts) if _MAGIC & set(p)), len(parts))
    base, rest = "/".join(parts[:lit]), parts[lit:]
    try:
        dirfd: int | None = open_dir(rootfd, parts[:lit])
    except OSError:
        dirfd = None
    if base and rx is not None and rx.fullmatch(base):  # the path itself, a directory whole
        for _, _, _, info in entries(rootfd, [base], lambda _: None):
            yield base, kind_of(info.st_mode)
        rx = None
    if dirfd is None:
        return
    pruned = rx is not None and "**" not in rest and "{" not in pattern
    comps = [_compile(p) for p in rest] if pruned else []  # braces may hold a `/`

    def descend(rel: str, depth: int) -> bool:
        return not pruned or (depth + 1 < len(comps) and bool(
            comps[depth].fullmatch(rel.rsplit("/", 1)[-1])))

    yield from _scan(dirfd, base + "/" if base else "", 0, rx, descend)


def collect(root: Path, paths: Sequence[str], exclude: Sequence[str] = (),
            untracked: bool = False, tracked: frozenset[str] = frozenset(),
            max_files: int = 100_000, project_dir: str | None = None) -> Collected:
    """What `artifacts:`/`cache:` ``paths``, ``exclude`` and ``untracked`` select beneath
    ``root``. ``tracked``: what git tracked at checkout (git never runs on a workspace after
    a job: its .git/config could run commands on the host). ``project_dir``: the job's name
    for ``root``, so that `$CI_PROJECT_DIR/out` is `out`. UserError past ``max_files``."""
    warnings: list[str] = []
    found: set[str] = set()
    excluded: list[re.Pattern[str]] = []
    for pattern in exclude:
        try:
            rel = _relative(pattern, project_dir)
            if rel is None:
                raise ValueError("not beneath the project directory")
            excluded.append(_compile(rel))
        except ValueError as exc:
            warnings.append(f"exclude {shown(pattern)}: {exc}; ignored")

    def take(rel: str, kind: str) -> bool:
        if any(rx.fullmatch(rel) for rx in excluded):
            return False
        if kind == "other":
            warnings.append(f"{shown(rel)}: not a file, directory or link; left out")
            return False
        try:
            rel.encode()  # a zip name is UTF-8
        except UnicodeEncodeError:
            warnings.append(f"{shown(rel)}: a name that is not UTF-8; left out")
            return False
        found.add(rel)
        if len(found) > max_files:
            raise UserError(f"more than {max_files} files and directories to archive")
        return True

    with beneath.opened_root(root) as rootfd:
        for pattern in paths:
            rel = _relative(pattern, project_dir)
            if rel is None:
                warnings.append(f"{shown(pattern)}: not beneath the project directory; ignored")
                continue
            try:
                _compile(rel)
            except ValueError as exc:  # GitLab warns and goes on
                warnings.append(f"{shown(pattern)}: {exc}")
                continue
            if not sum(take(name, kind) for name, kind in _expand(rootfd, rel)):
                warnings.append(f"{shown(pattern)}: no matching files")
        if untracked:  # as `git ls-files -o`: files and links, ignored ones included

            def outside_git(rel: str, depth: int) -> bool:
                return rel != ".git" and rel not in tracked  # a tracked directory: a submodule

            listing = _scan(open_dir(rootfd, []), "", 0, None, outside_git)
            if not sum(take(name, kind) for name, kind in listing
                       if kind in ("file", "link") and name not in tracked and name != ".git"):
                warnings.append("untracked: no files")
    return Collected(sorted(found), warnings)

def entries(rootfd: int, files: Sequence[str], say: Warn) -> Iterator[Entry]:
    """Each of ``files`` still there beneath real directories (the others left out with a
    warning); the parent descriptor is open while it is yielded."""
    for rel in files:
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise UserError(f"{shown(rel)}: not a plain relative path")
        try:
            parent = open_dir(rootfd, parts[:-1])
        except OSError:
            say(f"{shown(rel)}: no longer beneath real directories; left out")
            continue
        try:
            info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            yield rel, parent, parts[-1], info
        except FileNotFoundError:
            say(f"{shown(rel)}: gone; left out")
        finally:
            os.close(parent)
