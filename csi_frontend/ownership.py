"""What the node service may touch: which paths it accepts, and which mounts are its own.

The node plugin runs as root with the host's mounts in reach, so a wrong path from a
bug, a race or a stale record must never cost data outside our volumes. The rules,
in one place:

- **Accepted paths** (``PathPolicy``): with allowed prefixes configured
  (``fusedrive-csi serve --allowed-path-prefix``, the kubelet root directory in the
  manifests), a staging or target path must lie strictly below one of them, and so
  must the real directory that will hold it (no symlinked parent leads out).
- **Placement** (``check_placement``): the last component of a path is never a
  symbolic link (it is never followed); a path never lies inside a fusedrive mount
  or inside a path the node state records for any volume (a staging path inside
  another volume's target would write into that volume's data), nor on a pseudo
  filesystem (proc, sysfs, ...).
- **Ours** (``staging_verdict``, ``target_verdict``): a staging or target path is
  ours only if the node state records it for that volume *and* what is mounted
  there (the topmost mount, from ``/proc/self/mountinfo``) is the mount we made:
  at staging, our FUSE mount (type ``fuse.fusedrive``, source ``fusedrive:<id>``,
  and the device number recorded at stage time); at a mount target, a bind of that
  FUSE mount (same device, root ``/``); at a block target, a bind of the volume's
  loop device node. Anything else there is foreign and is never unmounted. A
  target whose volume's daemon died keeps its dead bind below the fresh one the
  heal stacks over it (so a pod never sees the bare directory); such a layer is
  ``STALE``: ours, recognised by the identity recorded in ``retired``.
- **Created paths** (``make_target``, ``remove_created``): the plugin creates a
  target only where nothing exists, with ``O_EXCL``/``mkdir`` (never through a
  symlink), remembers that it did, and later removes only what it created, and
  only while it is empty. An existing target is used only if it is an empty
  directory (an empty regular file for block) that carries no mount.

Errors: a path the node must never use is INVALID_ARGUMENT; a usable path that is
occupied by something not ours (a foreign mount, data) is FAILED_PRECONDITION.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from . import mounts
from .errors import CsiError, invalid
from .mounts import MountEntry
from .state import VolumeRecord

log = logging.getLogger(__name__)

FUSE_FSTYPE = "fuse.fusedrive"
PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "securityfs",
        "debugfs",
        "tracefs",
        "bpf",
        "configfs",
        "fusectl",
        "mqueue",
        "pstore",
        "efivarfs",
        "binfmt_misc",
        "nsfs",
        "autofs",
    }
)


def occupied(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, message)


def fuse_source(volume_id: str) -> str:
    """The source column of a fusedrive FUSE mount of ``volume_id`` (its ``fsname``)."""
    return f"fusedrive:{volume_id}"


def _below(path: str, prefix: str) -> bool:
    return path.startswith(prefix.rstrip("/") + "/")


class PathPolicy:
    """The allowed prefixes for staging and target paths (none: every path is allowed)."""

    def __init__(self, prefixes: Iterable[str] = ()) -> None:
        self.prefixes: list[str] = []
        for p in prefixes:
            if not os.path.isabs(p):
                raise ValueError(f"allowed path prefix must be absolute: {p!r}")
            self.prefixes.append(os.path.normpath(p))

    def check(self, path: str, what: str) -> None:
        if not self.prefixes:
            return
        allowed = ", ".join(self.prefixes)
        if not any(_below(path, p) for p in self.prefixes):
            raise invalid(f"{what} {path} is outside the allowed path prefix ({allowed})")
        parent = os.path.realpath(os.path.dirname(path))
        if not any(
            _below(parent, p)
            or parent == p
            or _below(parent, os.path.realpath(p))
            or parent == os.path.realpath(p)
            for p in self.prefixes
        ):
            raise invalid(
                f"{what} {path} resolves to {parent}, outside the allowed path prefix ({allowed})"
            )


def _lstat(path: str) -> os.stat_result | None:
    """lstat, or None if nothing is there; a dead FUSE mount point counts as present."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
            return os.stat_result((stat.S_IFDIR, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        raise


def present(path: str) -> bool:
    """Something is at ``path`` (a dead FUSE mount point, which fails lstat, included)."""
    return _lstat(path) is not None or mounts.is_mounted(path)


def check_placement(records: Sequence[VolumeRecord], path: str, what: str) -> None:
    """INVALID_ARGUMENT unless ``path`` is a place the node may ever mount at."""
    st = _lstat(path)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise invalid(f"{what} {path} is a symbolic link; the node never follows one")
    parent = os.path.dirname(path)
    holder = mounts.containing_mount(parent)
    if holder is not None and holder.fstype == FUSE_FSTYPE:
        raise invalid(
            f"{what} {path} lies inside a fusedrive volume (mounted at {holder.mountpoint})"
        )
    if holder is not None and holder.fstype in PSEUDO_FILESYSTEMS:
        raise invalid(f"{what} {path} lies on a {holder.fstype} filesystem")
    for rec in records:
        for other in (rec.staging_path, *rec.targets):
            if other and _below(path, other):
                raise invalid(
                    f"{what} {path} lies inside {other}, a path of volume {rec.volume_id!r}"
                )


class Held(enum.Enum):
    OURS = "ours"
    STALE = "stale"  # ours, a bind of a staging mount (or loop device) whose daemon died
    NOTHING = "nothing"  # no mount at the path
    FOREIGN = "foreign"  # a mount we did not make


@dataclass(frozen=True)
class Verdict:
    held: Held
    entry: MountEntry | None
    why: str = ""


def _describe(entry: MountEntry) -> str:
    return f"a {entry.fstype} mount of {entry.source} (device {entry.dev})"


def staging_verdict(rec: VolumeRecord) -> Verdict:
    """Whether the staging path of ``rec`` carries our FUSE mount of that volume."""
    entry = mounts.find_mount(rec.staging_path) if rec.staging_path else None
    if entry is None:
        return Verdict(Held.NOTHING, None, f"nothing is mounted at {rec.staging_path}")
    if (
        entry.fstype == FUSE_FSTYPE
        and entry.source == fuse_source(rec.volume_id)
        and (not rec.staging_dev or entry.dev == rec.staging_dev)
    ):
        return Verdict(Held.OURS, entry)
    return Verdict(
        Held.FOREIGN,
        entry,
        f"{rec.staging_path} carries {_describe(entry)}, "
        f"not the FUSE mount of volume {rec.volume_id!r}",
    )


def _same_device(path: str, device: str) -> bool:
    try:
        st, dev = os.lstat(path), os.stat(device)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == dev.st_rdev


def target_verdict(rec: VolumeRecord, target: str, binding: bool = False) -> Verdict:
    """Whether ``target`` carries a bind of ``rec``'s staging mount (or loop device).

    ``binding``: the bind was just made and is not recorded yet (the check after it).
    """
    entry = mounts.find_mount(target)
    if entry is None:
        return Verdict(Held.NOTHING, None, f"nothing is mounted at {target}")
    if binding or target in rec.targets:
        if rec.block:
            if rec.loop_device and _same_device(target, rec.loop_device):
                return Verdict(Held.OURS, entry)
        elif (
            entry.fstype == FUSE_FSTYPE
            and entry.source == fuse_source(rec.volume_id)
            and entry.root == "/"
            and (not rec.staging_dev or entry.dev == rec.staging_dev)
        ):
            return Verdict(Held.OURS, entry)
        if any(_is_retired(rec, entry, ident) for ident in rec.retired):
            return Verdict(Held.STALE, entry, f"{target} carries a bind of a dead FUSE mount")
    return Verdict(
        Held.FOREIGN,
        entry,
        f"{target} carries {_describe(entry)}, not a publish of volume {rec.volume_id!r}",
    )


def retired_identity(rec: VolumeRecord) -> str:
    """How ``rec``'s current target binds will be recognised once its daemon has died."""
    return f"loop:{rec.loop_device}" if rec.block else f"dev:{rec.staging_dev}"


def _is_retired(rec: VolumeRecord, entry: MountEntry, ident: str) -> bool:
    kind, _, value = ident.partition(":")
    if kind == "dev":
        return (
            entry.fstype == FUSE_FSTYPE
            and entry.source == fuse_source(rec.volume_id)
            and entry.root == "/"
            and entry.dev == value
        )
    if kind == "loop" and value:
        return entry.root == "/" + os.path.basename(value) and entry.fstype in ("devtmpfs", "tmpfs")
    return False


def is_fusedrive_mount(entry: MountEntry | None) -> bool:
    """A fusedrive FUSE mount or a bind of one (whichever volume it serves)."""
    return entry is not None and entry.fstype == FUSE_FSTYPE


# -- directories and files the node creates -------------------------------------------


def _empty_dir(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return not os.listdir(fd)
    finally:
        os.close(fd)


def check_free(path: str, what: str, directory: bool) -> None:
    """An existing path we may mount on: no mount there, empty, of the right type."""
    entry = mounts.find_mount(path)
    if entry is not None:
        raise occupied(f"{what} {path} already carries {_describe(entry)}; it is not ours")
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise invalid(f"{what} {path} is a symbolic link; the node never follows one")
    if directory:
        if not stat.S_ISDIR(st.st_mode):
            raise invalid(f"{what} {path} exists and is not a directory")
        if not _empty_dir(path):
            raise occupied(f"{what} {path} is not empty; the node mounts only on empty directories")
    else:
        if not stat.S_ISREG(st.st_mode):
            raise invalid(f"{what} {path} exists and is not a regular file")
        if st.st_size:
            raise occupied(f"{what} {path} is not empty; the node binds only onto empty files")


def make_target(path: str, directory: bool) -> bool:
    """Create ``path`` (never through a symlink); True if created, False if it was there."""
    try:
        if directory:
            os.mkdir(path, 0o750)
        else:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            os.close(fd)
    except FileExistsError:
        check_free(path, "target_path", directory)
        return False
    except FileNotFoundError:
        raise occupied(f"the directory holding target_path {path} does not exist") from None
    return True


def remove_created(path: str) -> None:
    """Remove a target the node created, if it is still an empty directory or file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("event=target_not_removed target=%s error=%s", path, exc)
        return
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)  # fails unless empty
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(path)
        else:
            log.warning("event=target_not_removed target=%s reason=not_empty_or_not_ours", path)
    except OSError as exc:
        log.warning("event=target_not_removed target=%s error=%s", path, exc)
