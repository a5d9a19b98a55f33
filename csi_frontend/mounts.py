"""Mount table reading and the mount operations the node service performs.

Everything here acts on the host's mount namespace through util-linux
(``mount``/``umount``) and reads ``/proc/self/mountinfo``. Paths are always
absolute and already validated by the caller (``node.py`` keeps them inside the
directories the CO gave).

Invariant: ``unmount`` never returns while the path is still a mount point; a
mount whose FUSE daemon died (``ENOTCONN``) is detached lazily instead.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class MountError(Exception):
    """A mount or unmount command failed; the message says which and why."""


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options.split(",")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a = left.split(" ")
            b = right.split(" ")
            if len(a) < 6 or len(b) < 3:
                continue
            entries.append(
                MountEntry(
                    mount_id=int(a[0]),
                    parent_id=int(a[1]),
                    root=_unescape(a[3]),
                    mountpoint=_unescape(a[4]),
                    options=a[5],
                    fstype=b[0],
                    source=_unescape(b[1]),
                    super_options=b[2],
                )
            )
    return entries


def find_mount(path: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path``, if any."""
    target = os.path.normpath(os.fspath(path))
    found = None
    for entry in mount_table():
        if entry.mountpoint == target:
            found = entry
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return find_mount(path) is not None


def is_healthy(path: str | os.PathLike[str]) -> bool:
    """False when the mount's daemon is gone (stat fails with ENOTCONN or EIO)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
            return False
        raise
    return True


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise MountError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")


def bind_mount(
    source: str | os.PathLike[str], target: str | os.PathLike[str], read_only: bool = False
) -> None:
    """Bind ``source`` onto ``target``; read-only binds are remounted ro (kernel rule)."""
    _run(["mount", "--bind", os.fspath(source), os.fspath(target)])
    if read_only:
        try:
            _run(["mount", "-o", "remount,bind,ro", os.fspath(target)])
        except MountError:
            unmount(target)
            raise
    log.info("event=bind_mount source=%s target=%s ro=%s", source, target, read_only)


def unmount(target: str | os.PathLike[str]) -> None:
    """Unmount every mount stacked on ``target``; lazily if the mount is dead."""
    path = os.fspath(target)
    for _ in range(16):
        if not is_mounted(path):
            return
        try:
            _run(["umount", path])
        except MountError as exc:
            if "not mounted" in str(exc):
                return
            log.warning("event=unmount_retry_lazy target=%s error=%s", path, exc)
            _run(["umount", "--lazy", path])
    if is_mounted(path):
        raise MountError(f"{path} is still mounted after 16 unmounts")


def ensure_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def ensure_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.touch()
