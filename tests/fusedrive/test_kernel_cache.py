"""The kernel's caches of a fusedrive mount (long entry, negative entry and attribute
timeouts, docs/datapath.md) never show a stale name or size.

Real parts: a fusedrive daemon serving a real FUSE mount (``fuse_mounts``). Every
name is first looked up while missing, so the kernel holds a negative entry for it,
then made by each kind of call; a name removed is missing right away; a block
volume grown by the daemon itself shows its new size at once (the daemon invalidates
the image's attributes: without that, the kernel would show the old size for the
attribute timeout).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from blockstore import MODE_BLOCK, Store
from fusedrive import request_flush
from fusedrive.schema import DISK_IMAGE_NAME

if TYPE_CHECKING:
    from conftest import FuseMounts

pytestmark = pytest.mark.needs_fuse

MiB = 1 << 20


def _missing(p: Path) -> bool:
    try:
        os.lstat(p)
    except FileNotFoundError:
        return True
    return False


def _makers(d: Path) -> dict[str, Callable[[Path], None]]:
    src = d / "source"
    src.write_bytes(b"s")

    def rename(p: Path) -> None:
        src.rename(p)
        src.write_bytes(b"s")

    return {
        "open": lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
        "mkdir": lambda p: os.mkdir(p),
        "mknod": lambda p: os.mknod(p, 0o600 | 0o010000),  # a FIFO
        "symlink": lambda p: os.symlink("target", p),
        "link": lambda p: os.link(src, p),
        "rename": rename,
    }


def test_a_name_looked_up_missing_appears_when_made(fuse_mounts: FuseMounts) -> None:
    fuse_mounts.volume("v")
    mnt = fuse_mounts.mount("--volume", "v")
    for kind, make in _makers(mnt).items():
        p = mnt / f"new-{kind}"
        for _ in range(2):  # twice: the kernel has cached the miss
            assert _missing(p), kind
        make(p)
        assert not _missing(p), kind
        assert p.name in os.listdir(mnt), kind
        (os.rmdir if kind == "mkdir" else os.unlink)(p)
        assert _missing(p), kind
        make(p)  # once more over the entry the removal left
        assert not _missing(p), kind
    # A file made under a name looked up missing has the size written through it.
    p = mnt / "sized"
    assert _missing(p)
    p.write_bytes(b"x" * 12345)
    assert os.stat(p).st_size == 12345
    with open(p, "r+b") as f:
        f.truncate(10)
    assert os.stat(p).st_size == 10


def test_hard_links_and_renames_keep_nlink_and_names_right(fuse_mounts: FuseMounts) -> None:
    fuse_mounts.volume("v")
    mnt = fuse_mounts.mount("--volume", "v")
    a, b, c = mnt / "a", mnt / "b", mnt / "c"
    a.write_bytes(b"data")
    assert os.stat(a).st_nlink == 1
    os.link(a, b)
    assert os.stat(a).st_nlink == os.stat(b).st_nlink == 2
    os.rename(b, c)
    assert _missing(b) and os.stat(c).st_nlink == 2
    os.unlink(a)
    assert _missing(a) and os.stat(c).st_nlink == 1
    with pytest.raises(OSError) as exc:
        os.stat(mnt / "a" / "x")
    assert exc.value.errno == errno.ENOENT


def test_a_grown_block_volume_shows_its_new_size(fuse_mounts: FuseMounts) -> None:
    """The daemon grows a block volume's disk image itself (``refresh``): the kernel
    must not keep the old size for the attribute timeout."""
    with Store(fuse_mounts.store) as s:
        s.create_volume("b", 16 * MiB, mode=MODE_BLOCK)
    mnt = fuse_mounts.mount("--volume", "b")
    image = mnt / DISK_IMAGE_NAME.decode()  # looked up by name: attributes kept 60 s
    assert os.stat(image).st_size == 16 * MiB
    with Store(fuse_mounts.store) as s:
        s.expand_volume("b", 32 * MiB)
    request_flush(mnt)
    assert os.stat(image).st_size == 32 * MiB
