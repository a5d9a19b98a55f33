"""A small real filesystem for fault tests: ext4 on a loop device, mounted at a path.

``small_filesystem(mountpoint, image, size_mib)`` makes an ext4 image of ``size_mib``
MiB (no blocks reserved for root: the test fills all of it), attaches it to a loop
device, mounts it at ``mountpoint`` and yields; whatever happens inside, it unmounts
(lazily as the last resort) and detaches the loop device it attached. Needs root and
loop devices (mark tests ``needs_loop``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@contextlib.contextmanager
def small_filesystem(mountpoint: Path, image: Path, size_mib: int) -> Iterator[Path]:
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0", str(image)],
        check=True,
        capture_output=True,
    )
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "ext4", dev, str(mountpoint)], check=True)
        try:
            yield mountpoint
        finally:
            res = subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
            if res.returncode != 0 and _mounted(mountpoint):
                subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)
    finally:
        subprocess.run(["losetup", "--detach", dev], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            os.unlink(image)
