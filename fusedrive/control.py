"""Asking a live fusedrive mount to do something, from any other process.

The only request is a flush: ``request_flush(mountpoint)`` returns once the daemon
serving ``mountpoint`` has committed every write that returned before the call
(so a snapshot cut right after holds them all), and has picked up a change of the
volume's capacity (a block volume's image grows with it) and compression level.

Mechanism: first ``syncfs(2)`` on the mount, which makes the kernel write back the
pages it holds dirty (a mount with the writeback cache, docs/datapath.md: writes
that returned may not have reached the daemon yet) and the times it keeps for them
(a write back that failed earlier, which the kernel reports to syncfs once, is
logged: the file's own fsync and close report it, and no page is left to store);
then ``setxattr(mountpoint, "trusted.fusedrive.flush", b"1")``. The kernel
passes it to the daemon as a setxattr request on the root inode, which the daemon
answers only after the flush has committed; the attribute is never stored. The
``trusted.`` namespace needs CAP_SYS_ADMIN, so pods cannot use it to make the
daemon flush in a loop. A read-only mount (or a read-only bind mount of a live
one) holds no buffered writes; the kernel refuses the request there with EROFS,
which counts as success. Callers that bind-mount a volume elsewhere should ask
the mount the daemon serves (the staging path), not a read-only bind.

This module imports neither pyfuse3 nor trio: the CSI plugin and the command line
use it without loading the FUSE stack. It also holds the package's one reader of
the kernel's mount table (``find_mount``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FLUSH_XATTR = "trusted.fusedrive.flush"
FLUSH_XATTR_BYTES = FLUSH_XATTR.encode()
FSTYPE = "fuse.fusedrive"


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, the fields fusedrive needs."""

    device: str  # major:minor
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_mount(mountpoint: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount exactly at ``mountpoint`` (compared as given: pass a resolved path).

    Reads /proc/self/mountinfo and never touches the mount itself: stat(2) of a FUSE
    mount waits for its daemon, which may be dead or be the caller.
    """
    target = os.fspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) > 4 and len(rfields) > 1 and _unescape(fields[4]) == target:
                found = MountEntry(fields[2], rfields[0], _unescape(rfields[1]))
    return found


def device_mounted(device: str) -> bool:
    """Whether any mount in this process's mount namespace is of file system ``device``.

    ``device`` is a ``major:minor`` from ``find_mount``; bind mounts share it.
    """
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split(" ", 3)[2] == device for line in f)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class WriteBackFailed(OSError):
    """syncfs(2) reported a page the kernel could not write back (ENOSPC, EIO).

    The kernel reports such a failure to the file's next fsync and close, and once
    to a syncfs of the file system; it does not keep the page dirty, so nothing is
    left for a later flush to store.
    """


def syncfs(path: str | os.PathLike[str]) -> None:
    """syncfs(2) the file system holding ``path``.

    For a fusedrive mount with the writeback cache this sends the daemon every dirty
    page and the times the kernel kept for them. ``OSError`` if ``path`` cannot be
    opened (ENOTCONN: the daemon is gone), ``WriteBackFailed`` if a write back
    failed since the last syncfs. Python's ``os`` has no syncfs.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise WriteBackFailed(err, f"syncfs of {os.fspath(path)}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _is_device(path: Path, device: str) -> bool:
    """Whether the file system at ``path`` is device ``major:minor`` (one stat(2)); False
    if it cannot be told (a dead daemon: the checks after say what is wrong)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" == device


def request_flush(mountpoint: Path, device: str = "") -> None:
    """Make the fusedrive mount at ``mountpoint`` commit its buffered writes.

    ``device``: the mount's ``major:minor`` as ``find_mount`` gave it when the caller
    mounted it (the CSI plugin keeps it); if the path still is that device, one
    stat(2) proves the mount is the caller's, instead of a read of the mount table
    (0.3 ms here; a snapshot's whole flush request takes about 1 ms). Anonymous
    device numbers are not reused while a mount holds one.

    Raises ``OSError``: ENOENT if ``mountpoint`` is not a fusedrive mount, ENOTCONN
    if its daemon is gone, or the error the flush itself failed with (e.g. ENOSPC,
    EIO). Returns at once for read-only mounts.
    """
    mp = Path(mountpoint)
    if not (device and _is_device(mp, device)):
        entry = find_mount(os.path.realpath(mp))
        fstype = entry.fstype if entry is not None else None
        if fstype != FSTYPE:
            raise OSError(
                errno.ENOENT, f"{mp} is not a fusedrive mount (found {fstype or 'no mount'})"
            )
    try:
        try:
            syncfs(mp)
        except WriteBackFailed as exc:
            # Reported to the files' own fsync and close; nothing is left to store.
            log.warning("event=write_back_failed_earlier mountpoint=%s error=%s", mp, exc)
        os.setxattr(mp, FLUSH_XATTR, b"1")
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return
        raise OSError(exc.errno, f"flush of {mp} failed: {os.strerror(exc.errno or 0)}") from exc
    log.debug("event=flush_requested mountpoint=%s", mp)
