"""The kernel writeback cache (opt-in, off by default) through a real mount.

docs/datapath.md, "Kernel writeback cache", says why it is off: with a busy writer,
a snapshot can miss writes that returned before it was asked for. What is tested
here holds on a quiet mount.

With it, a write(2) or a store to a shared mapping returns once the kernel's page
cache holds it; the daemon gets the pages later. These tests write without fsync and
then check that every way the data must reach the store gets it there: a flush
request (what CreateSnapshot and ``fusedrive snapshot create`` do first, so a
snapshot cut right after holds the write), an unmount, and a SIGTERM. They also
check which mounts get the cache and that the kernel's own O_APPEND lands right.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from blockstore import MODE_BLOCK, Store
from fusedrive import request_flush

if TYPE_CHECKING:
    from conftest import FuseMounts

pytestmark = pytest.mark.needs_fuse

MiB = 1 << 20
PAGE = mmap.PAGESIZE


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@contextlib.contextmanager
def _unsynced(mnt: Path) -> Iterator[dict[str, bytes]]:
    """Files written with write(2) and through a shared mapping, never fsync'd or msync'd.

    They stay open (and the mapping mapped) inside the block: a close would make the
    kernel send the pages itself. Yields the bytes each file must hold.
    """
    want: dict[str, bytes] = {}
    with contextlib.ExitStack() as stack:

        def opened(name: str, flags: int) -> int:
            fd = os.open(mnt / name, flags, 0o644)
            stack.callback(_close, fd)
            return fd

        plain = _pattern(3 * PAGE + 100, 1)
        os.write(opened("plain", os.O_WRONLY | os.O_CREAT), plain)
        want["plain"] = plain
        # A partial-page write into a stored file: the kernel reads the page from the
        # daemon first (read-modify-write), through a write-only handle.
        base = _pattern(4 * PAGE, 2)
        (mnt / "rmw").write_bytes(base)
        request_flush(mnt)
        os.pwrite(opened("rmw", os.O_WRONLY), b"middle", PAGE + 10)
        want["rmw"] = base[: PAGE + 10] + b"middle" + base[PAGE + 16 :]
        mapped = _pattern(2 * PAGE, 3)
        mfd = opened("mapped", os.O_RDWR | os.O_CREAT)
        os.ftruncate(mfd, len(mapped))
        m = stack.enter_context(mmap.mmap(mfd, len(mapped)))
        m[:] = mapped
        want["mapped"] = mapped
        yield want


def _close(fd: int) -> None:
    # After a SIGTERM the mount is gone: close reports ENOTCONN, which is not the point.
    with contextlib.suppress(OSError):
        os.close(fd)


def _read_all(mnt: Path, names: list[str]) -> dict[str, bytes]:
    return {n: (mnt / n).read_bytes() for n in names}


def test_a_snapshot_after_a_flush_request_holds_unsynced_writes(fuse_mounts: FuseMounts) -> None:
    """What CreateSnapshot does: flush the staged mount, then snapshot the volume.

    Fails without the syncfs in ``request_flush``: the pages are still in the
    kernel when the daemon commits.
    """
    fuse_mounts.volume("v")
    mnt = fuse_mounts.mount("--volume", "v", "--writeback-cache")
    with _unsynced(mnt) as want:
        request_flush(mnt)
        with Store(fuse_mounts.store) as s:
            s.create_snapshot("v", "s1")
    snap = fuse_mounts.mount("--snapshot", "s1", at="snap")
    assert _read_all(snap, list(want)) == want
    assert _read_all(mnt, list(want)) == want


def test_unsynced_writes_survive_a_sigterm(fuse_mounts: FuseMounts) -> None:
    """The files stay open: nothing but the daemon's own syncfs sends the pages."""
    fuse_mounts.volume("v")
    mnt = fuse_mounts.mount("--volume", "v", "--writeback-cache")
    with _unsynced(mnt) as want:
        d = fuse_mounts.daemon(mnt)
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
    fuse_mounts.discard(mnt)
    again = fuse_mounts.mount("--volume", "v", "--read-only", at="again")
    assert _read_all(again, list(want)) == want


def test_unsynced_writes_survive_an_unmount(fuse_mounts: FuseMounts) -> None:
    fuse_mounts.volume("v")
    mnt = fuse_mounts.mount("--volume", "v", "--writeback-cache")
    with _unsynced(mnt) as want:
        pass  # an unmount needs the files closed (close itself writes back, as fsync)
    fuse_mounts.unmount(mnt)
    again = fuse_mounts.mount("--volume", "v", "--read-only", at="again")
    assert _read_all(again, list(want)) == want


def test_the_kernel_appends_at_its_own_end_of_file(fuse_mounts: FuseMounts) -> None:
    """O_APPEND handles write where the kernel's i_size says, even when the pages go
    back to the daemon through them after another handle wrote past that end."""
    fuse_mounts.volume("v")
    mnt = fuse_mounts.mount("--volume", "v", "--writeback-cache")
    app = os.open(mnt / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rw = os.open(mnt / "log", os.O_RDWR)
    try:
        os.write(app, b"one\n")
        os.pwrite(rw, b"X" * 10, 100)  # a hole, then bytes past the end
        os.write(app, b"two\n")
        assert os.fstat(app).st_size == 114
        os.fsync(app)
    finally:
        os.close(app)
        os.close(rw)
    want = b"one\n" + b"\0" * 96 + b"X" * 10 + b"two\n"
    assert (mnt / "log").read_bytes() == want
    fuse_mounts.unmount(mnt)
    again = fuse_mounts.mount("--volume", "v", "--read-only", at="again")
    assert (again / "log").read_bytes() == want


def _writeback_logged(fuse_mounts: FuseMounts, mnt: Path) -> bool:
    out = fuse_mounts.daemon(mnt).output()
    assert "writeback_cache=" in out, out
    return "writeback_cache=True" in out


def test_which_mounts_get_the_writeback_cache(fuse_mounts: FuseMounts) -> None:
    fuse_mounts.volume("v")
    with Store(fuse_mounts.store) as s:
        s.create_volume("b", 16 * MiB, mode=MODE_BLOCK)
    default = fuse_mounts.mount("--volume", "v", at="default")
    off = fuse_mounts.mount("--volume", "b", at="block")
    assert not _writeback_logged(fuse_mounts, default)
    assert not _writeback_logged(fuse_mounts, off)
    fuse_mounts.unmount(default)
    asked = fuse_mounts.mount("--volume", "v", "--writeback-cache", at="rw")
    assert _writeback_logged(fuse_mounts, asked)
    fuse_mounts.unmount(asked)
    ro = fuse_mounts.mount("--volume", "v", "--read-only", "--writeback-cache", at="ro")
    assert not _writeback_logged(fuse_mounts, ro)
    fuse_mounts.unmount(ro)
    asked_off = fuse_mounts.mount("--volume", "v", "--no-writeback-cache", at="off")
    assert not _writeback_logged(fuse_mounts, asked_off)
    fuse_mounts.unmount(off)
    with pytest.raises(RuntimeError, match="block volume cannot use the writeback cache"):
        fuse_mounts.mount("--volume", "b", "--writeback-cache", at="block2")
