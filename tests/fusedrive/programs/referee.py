"""The referee for the real-program tier: the same scenario on a plain directory.

Each test runs a real program (PostgreSQL, SQLite, git, tar, rsync, cp, the shell)
twice with the same helper: once on a fusedrive mount and once on a plain directory
of the machine's own filesystem, the referee. What the program leaves behind is
compared between the two (``manifest`` / ``assert_same_tree``), and each program's
own integrity check (``pg_amcheck``, ``PRAGMA integrity_check``, ``git fsck``,
``tar --compare``, ``rsync --checksum``) must pass on both.

A ``Site`` is one of the two places. ``Site.cycle()`` unmounts and mounts the
fusedrive volume again (data must survive it); on the plain directory it does
nothing. Plain directories live in /tmp with mode 0755 (so the ``postgres`` user can
reach them) and are removed by the fixture that made them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MiB = 1 << 20
TIMEOUT = 300.0  # generous: the machine is shared


@dataclass
class Site:
    """Where a scenario runs: ``kind`` is "fusedrive" or "plain"."""

    kind: str
    root: Path
    remount: Callable[[], None] | None = None
    # fusedrive only: SIGKILL the FUSE daemon by its PID and detach the dead mount;
    # then mount the volume again.
    kill_daemon: Callable[[], None] | None = None
    mount: Callable[[], None] | None = None

    def cycle(self) -> None:
        """Unmount and mount again (fusedrive; nothing on the referee): data must survive."""
        if self.remount is not None:
            self.remount()

    def __str__(self) -> str:
        return f"{self.kind}:{self.root}"


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    input: str | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run a program; on failure the assertion message carries its output."""
    full_env = None if env is None else {**os.environ, **env}
    p = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=full_env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        errors="replace",
    )
    if check:
        assert p.returncode == 0, (
            f"{' '.join(map(str, args))} (in {cwd}) exited {p.returncode}\n"
            f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
        )
    return p


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


ACL_ACCESS = "system.posix_acl_access"
_ACL_ENTRY = struct.Struct("<HHI")  # tag, permissions, id (after a 4-byte version header)
_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER = 0x01, 0x04, 0x20


def acl_says_only_mode(acl: bytes, mode: int) -> bool:
    """An access ACL of just owner, group and other entries, equal to ``mode``'s bits:
    Linux filesystems do not store one (getfacl shows the same either way)."""
    body = acl[4:]
    if len(body) != 3 * _ACL_ENTRY.size:
        return False
    entries = {tag: perm for tag, perm, _ in _ACL_ENTRY.iter_unpack(body)}
    return entries == {
        _ACL_USER_OBJ: (mode >> 6) & 7,
        _ACL_GROUP_OBJ: (mode >> 3) & 7,
        _ACL_OTHER: mode & 7,
    }


def xattrs_of(path: Path, mode: int) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        try:
            value = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            value = f"<{e.strerror}>".encode()
        if n == ACL_ACCESS and acl_says_only_mode(value, mode):
            continue
        out.append((n, value))
    return tuple(out)


@dataclass(frozen=True)
class Entry:
    """What a tree comparison looks at for one path (atime and ctime are left out)."""

    kind: str
    mode: str
    uid: int
    gid: int
    mtime_ns: int | None
    size: int | None
    content: str | None  # sha256 of a file, target of a symlink
    nlink: int | None  # files only: hard links must stay links
    xattrs: tuple[tuple[str, bytes], ...] = ()


def manifest(
    root: Path,
    *,
    times: bool = True,
    dir_times: bool = True,
    xattrs: bool = False,
    skip: Callable[[str], bool] = lambda rel: False,
) -> dict[str, Entry]:
    """Every path under ``root`` (relative, ``root`` itself excluded) and its Entry."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if skip(rel):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                kind, size, content, nlink = "dir", None, None, None
            elif stat.S_ISLNK(st.st_mode):
                kind, size, content, nlink = "symlink", None, os.readlink(p), None
            elif stat.S_ISREG(st.st_mode):
                kind, size, content, nlink = "file", st.st_size, sha256_of(p), st.st_nlink
            else:
                kind, size, content, nlink = f"other:{stat.S_IFMT(st.st_mode):o}", None, None, None
            with_time = times and (dir_times or kind != "dir")
            out[rel] = Entry(
                kind=kind,
                mode=oct(stat.S_IMODE(st.st_mode)),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime_ns=st.st_mtime_ns if with_time else None,
                size=size,
                content=content,
                nlink=nlink,
                xattrs=xattrs_of(p, st.st_mode) if xattrs else (),
            )
    return out


def differences(want: Mapping[str, Entry], got: Mapping[str, Entry], limit: int = 20) -> list[str]:
    """Human-readable differences, field by field, at most ``limit`` of them."""
    out: list[str] = []
    for rel in sorted(want.keys() | got.keys()):
        a, b = want.get(rel), got.get(rel)
        if a == b:
            continue
        if a is None or b is None:
            out.append(f"{rel}: {'missing' if b is None else 'extra'}")
        else:
            fields = [
                f"{f}: want {getattr(a, f)!r} got {getattr(b, f)!r}"
                for f in a.__dataclass_fields__
                if getattr(a, f) != getattr(b, f)
            ]
            out.append(f"{rel}: " + "; ".join(fields))
        if len(out) >= limit:
            out.append("...")
            break
    return out


def assert_same_tree(
    want: Mapping[str, Entry],
    got: Mapping[str, Entry],
    what: str = "trees",
    sides: str = "referee, fusedrive",
) -> None:
    diff = differences(want, got)
    total = sum(1 for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    assert not diff, f"{what}: {total} paths differ (want: {sides}):\n" + "\n".join(diff)


def diff_r(a: Path, b: Path, *opts: str) -> None:
    """``diff -r`` (symlinks compared as links) must find no difference."""
    p = run(["diff", "-r", "--no-dereference", *opts, a, b], check=False)
    assert p.returncode == 0, f"diff -r {a} {b}:\n{p.stdout[-4000:]}{p.stderr[-2000:]}"
