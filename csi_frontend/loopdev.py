"""Loop devices for raw block volumes.

A block volume's FUSE mount holds one file, the disk image; the node attaches a
loop device to it at stage time and bind-mounts the device node onto the
publish target. The backing file is found again after a restart through
``losetup --json``, so attachments are never leaked or duplicated.

Every ``losetup`` call ends its options with ``--`` or passes the device as an
option's value (``--detach=/dev/loopN``), so no path is ever read as an option.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)


class LoopError(Exception):
    """losetup failed; the message carries its stderr."""


@dataclass(frozen=True)
class LoopDevice:
    name: str  # /dev/loopN
    backing_file: str
    read_only: bool
    backing_dev: str = ""  # "major:minor" of the backing file's filesystem
    backing_ino: int = 0


def _losetup(args: list[str]) -> str:
    proc = subprocess.run(["losetup", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LoopError(f"losetup {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def list_devices() -> list[LoopDevice]:
    out = _losetup(["--json", "--list", "--output", "NAME,BACK-FILE,RO,BACK-INO,BACK-MAJ:MIN"])
    if not out.strip():
        return []
    devices = []
    for d in json.loads(out).get("loopdevices", []):
        back = (d.get("back-file") or "").removesuffix(" (deleted)")
        ro = d.get("ro") in (True, 1, "1")
        ino = d.get("back-ino")
        devices.append(
            LoopDevice(
                d["name"],
                back,
                ro,
                str(d.get("back-maj:min") or "").strip(),
                int(ino) if str(ino or "").isdigit() else 0,
            )
        )
    return devices


def find_by_backing_file(path: str | os.PathLike[str]) -> LoopDevice | None:
    """The loop device attached to the file now at ``path``.

    The file's identity decides: its device and inode number. A device attached to
    an earlier file of the same name (the image on a FUSE mount whose daemon died,
    kept attached while someone holds the device) is not it; a device attached to
    this very file from a mount namespace that is gone (a restarted plugin
    container's) is, although ``losetup`` then names its backing file by the path
    inside that detached mount (``/disk.img``). The name is compared only when the
    identity cannot be known.
    """
    target = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(target)
        now = (f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", st.st_ino)
    except OSError:
        now = None
    for dev in list_devices():
        if now is not None and dev.backing_dev:
            if (dev.backing_dev, dev.backing_ino) == now:
                return dev
        elif dev.backing_file == target:
            return dev
    return None


def attach(path: str | os.PathLike[str], read_only: bool = False) -> LoopDevice:
    """Attach a loop device to ``path``, or return the one already attached."""
    existing = find_by_backing_file(path)
    if existing is not None:
        return existing
    args = ["--find", "--show"]
    if read_only:
        args.append("--read-only")
    name = _losetup([*args, "--", os.fspath(path)]).strip()
    log.info("event=loop_attached device=%s file=%s ro=%s", name, path, read_only)
    return LoopDevice(name, os.path.realpath(os.fspath(path)), read_only)


def detach(device: str) -> None:
    try:
        _losetup([f"--detach={device}"])
    except LoopError as exc:
        if "No such device" in str(exc) or "not a block device" in str(exc):
            return
        raise
    log.info("event=loop_detached device=%s", device)


def diskseq(device: str) -> int | None:
    """The kernel's sequence number of ``device``'s current attachment (None if detached).

    It grows with every attachment of any disk, so ``(device, diskseq)`` names one
    attachment: a device detached and attached again to something else has another.
    """
    name = os.path.basename(device)
    try:
        if not os.path.exists(f"/sys/block/{name}/loop/backing_file"):
            return None
        with open(f"/sys/block/{name}/diskseq") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def refresh_size(device: str) -> None:
    """Make the loop device see its backing file's new size (online expansion)."""
    _losetup([f"--set-capacity={device}"])


def size_bytes(device: str) -> int:
    name = os.path.basename(device)
    with open(f"/sys/block/{name}/size") as f:
        return int(f.read().strip()) * 512
