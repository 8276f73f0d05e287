#!/usr/bin/env python3
"""The kata-ci checkout as ansible/site.yml deploys it, made on the controller.

    source_tarball.py CHECKOUT OUTDIR   ->   {"sha256": "...", "path": "OUTDIR/kata-ci-....tar.gz"}

The files git knows in CHECKOUT (tracked, and untracked ones that .gitignore does not exclude:
the work tree as `kata-ci submit` would see it), read from the work tree; never .git, .venv,
caches or build output. CHECKOUT without git (an unpacked archive): every file but those
(SKIPPED). The archive is reproducible: same contents and modes, same bytes
(sorted names, fixed owner and mtime, gzip without a timestamp), so its sha256 names the
content and the playbook re-deploys only when that changed. Standard library only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

MTIME = 946684800  # 2000-01-01: fixed, and after 1980 (zip-based tools refuse earlier stamps)
KEEP = 5  # tarballs left in OUTDIR (the newest)
SKIPPED = {".git", ".venv", "__pycache__", "build", ".mypy_cache", ".ruff_cache",
           ".pytest_cache"}


def files(checkout: Path) -> list[str]:
    if not (checkout / ".git").exists():
        return sorted(_walk(checkout))
    listed = subprocess.run(
        ["git", "-C", str(checkout), "ls-files", "-z", "--cached", "--others",
         "--exclude-standard"], check=True, capture_output=True).stdout
    names = {n for n in listed.decode().split("\0") if n}
    # Tracked but deleted in the work tree: not deployed.
    return sorted(n for n in names if os.path.lexists(checkout / n))


def _walk(checkout: Path) -> list[str]:
    found = []
    for top, dirs, names in os.walk(checkout):
        dirs[:] = [d for d in dirs if d not in SKIPPED and not d.endswith(".egg-info")]
        for name in names:
            if not name.endswith(".pyc"):
                found.append(os.path.relpath(os.path.join(top, name), checkout))
    return found


def archive(checkout: Path) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in files(checkout):
            path = checkout / name
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                info.mode = 0o777
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                data = path.read_bytes()
                info.size = len(data)
                info.mode = 0o755 if st.st_mode & 0o100 else 0o644
                tar.addfile(info, io.BytesIO(data))
    packed = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue()


def main() -> int:
    checkout, outdir = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    data = archive(checkout)
    digest = hashlib.sha256(data).hexdigest()
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / f"kata-ci-{digest[:16]}.tar.gz"
    if not target.is_file():
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        partial.write_bytes(data)
        os.replace(partial, target)  # whole or absent, even with two runs at once
    os.utime(target)
    old = sorted(outdir.glob("kata-ci-*.tar.gz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in old[KEEP:]:
        stale.unlink(missing_ok=True)
    json.dump({"sha256": digest, "path": str(target)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
