"""tarfile's ``data`` extraction filter (PEP 706) on every Python kata-ci supports.

Python has it from 3.11.4; Debian 12's own Python is 3.11.2, where every queued workspace
and runner tarball would otherwise fail (or, worse, be extracted unfiltered). Where the
standard library has the filter it is used; elsewhere ``_data_filter`` applies the same
rules: names stripped of leading slashes and kept beneath the destination (following the
links already there), no links that are absolute or lead out, no device files or fifos, no
setuid/setgid/sticky or group/other write bits, no owner from the archive (root's instead:
3.11.2's extraction cannot leave it unset).
"""

from __future__ import annotations

import copy
import os
import tarfile


class Refused(ValueError):
    """A member the data filter does not extract; the message names it."""


def data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """``member`` as the data filter lets it be extracted beneath ``dest``, or Refused."""
    native = getattr(tarfile, "data_filter", None)
    if native is None:
        return _data_filter(member, dest)
    try:
        return native(member, dest)  # type: ignore[no-any-return]
    except tarfile.FilterError as exc:
        raise Refused(str(exc)) from None


def has_native_filter() -> bool:
    return hasattr(tarfile, "data_filter")


def _inside(path: str, dest: str) -> bool:
    return os.path.commonpath([path, dest]) == dest


def _data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    dest = os.path.realpath(dest)
    name = member.name.lstrip("/" + os.sep)
    shown = repr(member.name[:200])
    target = os.path.realpath(os.path.join(dest, name))
    if not name or os.path.isabs(name) or not _inside(target, dest):
        raise Refused(f"{shown} would be extracted outside the destination")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise Refused(f"{shown} is a special file")
    if member.issym() or member.islnk():
        link = member.linkname
        if os.path.isabs(link):
            raise Refused(f"{shown} is a link to an absolute path")
        base = os.path.dirname(target) if member.issym() else dest
        if not _inside(os.path.realpath(os.path.join(base, link)), dest):
            raise Refused(f"{shown} would link outside the destination")
    mode = member.mode & 0o755
    if member.isreg() or member.islnk():
        if not mode & 0o100:
            mode &= ~0o011  # no execute for others when the owner has none
        mode |= 0o600
    safe = copy.copy(member)
    safe.name, safe.mode = name, mode
    safe.uid = safe.gid = 0
    safe.uname = safe.gname = ""
    return safe
