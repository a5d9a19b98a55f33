"""Mount table reading and the mount operations the node service performs.

Reads ``/proc/self/mountinfo``; binds and unmounts with the mount(2)/umount2(2)
system calls directly, so no option parsing can mistake a path for an option and
no symlink in a path's last component is ever followed (binds are made on
``O_PATH|O_NOFOLLOW`` descriptors, unmounts use ``UMOUNT_NOFOLLOW``). Which mount
is ours is decided in ``ownership.py``; this module acts on what it is given.

Invariant: ``unmount`` removes exactly one mount, the topmost at the path, and
detaches lazily only a busy mount with nothing mounted below it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from dataclasses import dataclass

log = logging.getLogger(__name__)


class MountError(Exception):
    """A mount or unmount command failed; the message says which and why."""


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    dev: str  # major:minor of the mounted filesystem; a bind shares its source's
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
                    dev=a[2],
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
    """False when the mount's daemon is gone (statfs fails with ENOTCONN or EIO).

    statfs, not stat: FUSE always asks the daemon for it, where a stat may be answered
    from attributes the kernel cached before the daemon died.
    """
    try:
        os.statvfs(path)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
            return False
        raise
    return True


def submounts(path: str | os.PathLike[str]) -> list[MountEntry]:
    """Mounts strictly below ``path`` (a lazy unmount of ``path`` would take them along)."""
    prefix = os.path.normpath(os.fspath(path)).rstrip("/") + "/"
    return [e for e in mount_table() if e.mountpoint.startswith(prefix)]


def containing_mount(path: str | os.PathLike[str]) -> MountEntry | None:
    """The mount that holds ``path`` (the longest mount point above or at it, topmost)."""
    target = os.path.normpath(os.fspath(path))
    best: MountEntry | None = None
    for entry in mount_table():
        mp = entry.mountpoint
        holds = target == mp or mp == "/" or target.startswith(mp.rstrip("/") + "/")
        if holds and (best is None or len(mp) >= len(best.mountpoint)):
            best = entry
    return best


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8


def _syscall_mount(source: str | None, target: str, flags: int) -> None:
    src = os.fsencode(source) if source is not None else None
    if _libc.mount(src, os.fsencode(target), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _umount2(path: str, flags: int) -> None:
    if _libc.umount2(os.fsencode(path), flags | UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def open_nofollow(path: str | os.PathLike[str]) -> int:
    """An O_PATH descriptor of ``path``; refuses a symlink as the last component."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
            os.close(fd)
            raise
        mode = stat.S_IFDIR  # the root of a dead FUSE mount (stacked over when healing)
    if stat.S_ISLNK(mode):
        os.close(fd)
        raise MountError(f"{os.fspath(path)} is a symbolic link")
    return fd


def bind_mount(
    source: str | os.PathLike[str], target: str | os.PathLike[str], read_only: bool = False
) -> None:
    """Bind ``source`` onto ``target``; read-only binds are remounted ro (kernel rule).

    Both paths are opened first without following a symlink in their last component,
    and the mount is made on those descriptors (``/proc/self/fd/N``), so a path swapped
    for a symlink between the caller's checks and the mount cannot redirect it.
    """
    src = open_nofollow(source)
    try:
        dst = open_nofollow(target)
        try:
            _syscall_mount(f"/proc/self/fd/{src}", f"/proc/self/fd/{dst}", MS_BIND)
        except OSError as exc:
            raise MountError(f"bind mount {source} on {target}: {exc.strerror}") from None
        finally:
            os.close(dst)
    finally:
        os.close(src)
    if read_only:
        top = open_nofollow(target)  # now the root of the new bind
        try:
            _syscall_mount(None, f"/proc/self/fd/{top}", MS_BIND | MS_REMOUNT | MS_RDONLY)
        except OSError as exc:
            os.close(top)
            top = -1
            unmount(target)
            raise MountError(f"remount {target} read-only: {exc.strerror}") from None
        finally:
            if top >= 0:
                os.close(top)
    log.info("event=bind_mount source=%s target=%s ro=%s", source, target, read_only)


def unmount(target: str | os.PathLike[str]) -> None:
    """Remove the one mount on top of ``target`` (never following a symlink there).

    A busy mount (a dead FUSE mount a process still holds, say) is detached lazily, but
    only when no other mount lies below it: a lazy unmount takes submounts along, and
    those may belong to someone else. Returns at once when nothing is mounted there.
    """
    path = os.path.normpath(os.fspath(target))
    if not is_mounted(path):
        return
    try:
        _umount2(path, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL and not is_mounted(path):
            return
        if exc.errno != errno.EBUSY:
            raise MountError(f"unmount {path}: {exc.strerror}") from None
        below = submounts(path)
        if below:
            raise MountError(
                f"unmount {path}: busy, and other mounts lie inside it "
                f"({', '.join(e.mountpoint for e in below[:3])})"
            ) from None
        log.warning("event=unmount_lazy target=%s", path)
        try:
            _umount2(path, MNT_DETACH)
        except OSError as exc2:
            raise MountError(f"unmount {path}: {exc2.strerror}") from None
    log.info("event=unmounted target=%s", path)
