"""fallocate(2) through a real mount (served by the shim in ``fusedrive.fallocate_shim``).

Every mode is run on the same file through a fusedrive mount and on kernel
filesystems as referees (ext4 on a loop device; tmpfs for the modes FUSE refuses):
the result or errno, the size and the contents must agree, and st_blocks must move
the way docs/posix.md says (down for a punched or zeroed range; never up, since
space is not reserved). Then what the shim is for: posix_fallocate without glibc's
zero-writing fallback, and a block volume (ext4 on a loop device over the volume's
image, as the node attaches it) giving the space of deleted files back to the store
through ``fstrim`` and through ``mount -o discard``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockstore import MODE_BLOCK, Store
from csi_frontend import loopdev
from fusedrive.control import request_flush
from tests.fusedrive.conftest import FuseMounts, is_mounted
from tests.smallfs import small_filesystem

pytestmark = [pytest.mark.needs_fuse, pytest.mark.needs_loop]

KiB, MiB = 1024, 1 << 20
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE, UNSHARE_RANGE = (
    0x1, 0x2, 0x8, 0x10, 0x20, 0x40,
)  # fmt: skip
FILE_SIZE = 256 * KiB + 1000
CHUNK = 64 * KiB  # the volume's chunk size (the default)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, off: int, length: int) -> int:
    """0, or the errno fallocate(2) failed with."""
    if _libc.fallocate(fd, mode, off, length) == 0:
        return 0
    return ctypes.get_errno()


# (mode, offset, length): ranges that start and end inside chunks (64 KiB) and blocks,
# cover whole chunks, reach past the end, and lie wholly past it.
SUPPORTED = [
    (0, 100 * KiB, 300 * KiB),  # extends the file
    (0, 10 * KiB, 20 * KiB),  # inside: nothing to do
    (KEEP_SIZE, 200 * KiB, 300 * KiB),  # past the end: the size stays
    (PUNCH_HOLE | KEEP_SIZE, 1000, 3 * 4096),  # within one chunk, unaligned
    (PUNCH_HOLE | KEEP_SIZE, 30 * KiB, 170 * KiB),  # whole chunks 1 and 2, parts of 0 and 3
    (PUNCH_HOLE | KEEP_SIZE, 250 * KiB, 100 * KiB),  # reaches past the end
    (PUNCH_HOLE | KEEP_SIZE, 400 * KiB, 4096),  # wholly past the end
    (ZERO_RANGE, 5000, 140 * KiB),
    (ZERO_RANGE, 240 * KiB, 100 * KiB),  # reaches past the end: extends
    (ZERO_RANGE | KEEP_SIZE, 192 * KiB, 200 * KiB),  # whole chunk 3, past the end
]
# Modes FUSE itself refuses (the kernel answers, the daemon never sees them), or that
# no filesystem accepts (PUNCH_HOLE needs KEEP_SIZE; the flags exclude each other).
UNSUPPORTED = [
    (COLLAPSE_RANGE, 64 * KiB, 64 * KiB),
    (INSERT_RANGE, 64 * KiB, 64 * KiB),
    (UNSHARE_RANGE, 0, 4096),
    (PUNCH_HOLE, 0, 4096),
    (PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE, 0, 4096),
]


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=False)
        path.rmdir()


def _make(path: Path, data: bytes) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    return fd


def _run(path: Path, data: bytes, mode: int, off: int, length: int) -> tuple[int, int, bytes, int]:
    """(errno, size, contents, st_blocks change) of one fallocate on a fresh copy of ``data``.

    st_blocks is read after fsync, and nothing asks for attributes between the
    fallocate and the fsync (the kernel drops them at fallocate: the next stat asks
    the daemon, which knows the committed figure after the fsync).
    """
    fd = _make(path, data)
    try:
        before = os.fstat(fd).st_blocks
        err = fallocate(fd, mode, off, length)
        os.fsync(fd)
        st = os.fstat(fd)
        return err, st.st_size, os.pread(fd, st.st_size + 1, 0), st.st_blocks - before
    finally:
        os.close(fd)


@pytest.fixture
def referees(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    with (
        small_filesystem(tmp_path / "ext4", tmp_path / "ext4.img", 64) as ext4,
        tmpfs(tmp_path / "tmpfs") as tmp,
    ):
        yield ext4, tmp


def test_every_mode_agrees_with_ext4_and_tmpfs(
    fuse_mounts: FuseMounts, referees: tuple[Path, Path]
) -> None:
    ext4, tmp = referees
    fuse_mounts.volume(capacity=64 * MiB)
    mnt = fuse_mounts.mount("--volume", "v")
    data = random.Random(18).randbytes(FILE_SIZE)
    for i, (mode, off, length) in enumerate(SUPPORTED):
        case = f"fallocate(mode={mode:#x}, off={off}, len={length})"
        fu = _run(mnt / f"f{i}", data, mode, off, length)
        ex = _run(ext4 / f"f{i}", data, mode, off, length)
        assert fu[0] == ex[0] == 0, case
        assert fu[1] == ex[1], f"{case}: size"
        assert fu[2] == ex[2], f"{case}: contents"
        # Space is never reserved (docs/posix.md): st_blocks does not grow, where ext4's
        # grows with preallocation. st_blocks counts the stored chunks' bytes before
        # compression: a punched or zeroed range gives them back where it covers a
        # whole chunk or reaches the end of the file (a chunk's zeros at its end are
        # not kept). ext4 gives back the whole blocks of a punched range, and keeps a
        # zeroed range allocated (as unwritten extents).
        assert fu[3] <= 0, f"{case}: st_blocks grew by {fu[3]}"
        zeroes = off < FILE_SIZE and mode & (PUNCH_HOLE | ZERO_RANGE)
        if zeroes and (off + length >= FILE_SIZE or -(-off // CHUNK) < (off + length) // CHUNK):
            assert fu[3] < 0, f"{case}: st_blocks did not shrink"
        if zeroes and mode & PUNCH_HOLE and -(-off // 4096) < (off + length) // 4096:
            assert ex[3] < 0, f"{case}: the referee's st_blocks did not shrink"
    for mode, off, length in UNSUPPORTED:
        case = f"fallocate(mode={mode:#x}, off={off}, len={length})"
        fu = _run(mnt / "u", data, mode, off, length)
        tm = _run(tmp / "u", data, mode, off, length)
        assert fu[0] == tm[0] == errno.EOPNOTSUPP, case
        assert fu[1:3] == (FILE_SIZE, data), f"{case}: the file changed"


def test_punch_reaches_the_page_cache_and_other_opens(fuse_mounts: FuseMounts) -> None:
    """Pages the kernel cached (kept across opens) are dropped for a punched range."""
    fuse_mounts.volume(capacity=64 * MiB)
    mnt = fuse_mounts.mount("--volume", "v")
    data = random.Random(1).randbytes(FILE_SIZE)
    (mnt / "f").write_bytes(data)
    reader = os.open(mnt / "f", os.O_RDONLY)
    try:
        assert os.pread(reader, FILE_SIZE, 0) == data  # now in the page cache
        fd = os.open(mnt / "f", os.O_RDWR)
        try:
            assert fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 10 * KiB, 100 * KiB) == 0
            assert fallocate(fd, ZERO_RANGE | KEEP_SIZE, 150 * KiB, 10) == 0
        finally:
            os.close(fd)
        expect = bytearray(data)
        expect[10 * KiB : 110 * KiB] = bytes(100 * KiB)
        expect[150 * KiB : 150 * KiB + 10] = bytes(10)
        assert os.pread(reader, FILE_SIZE, 0) == expect
    finally:
        os.close(reader)
    # And after a remount, from the store.
    fuse_mounts.unmount(mnt)
    mnt = fuse_mounts.mount("--volume", "v")
    assert (mnt / "f").read_bytes() == expect


def _io_writes() -> int:
    """Write system calls this process has made (``syscw`` in /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/self/io")


@pytest.mark.parametrize("shim", ["on", "off"])
def test_posix_fallocate_writes_nothing_with_the_shim(
    fuse_mounts: FuseMounts, monkeypatch: pytest.MonkeyPatch, shim: str
) -> None:
    """With the shim, posix_fallocate is one request; without it (turned off, as if it
    had not been built) the mount works as before: glibc falls back to writing a byte
    per block, and the daemon says at mount why fallocate is not served."""
    monkeypatch.setenv("FUSEDRIVE_FALLOCATE_SHIM", shim)
    fuse_mounts.volume(capacity=64 * MiB)
    mnt = fuse_mounts.mount("--volume", "v")
    size = 8 * MiB
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        writes = _io_writes()
        os.posix_fallocate(fd, 0, size)
        writes = _io_writes() - writes
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, size, 0) == bytes(size)
        err = fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, 4096)
    finally:
        os.close(fd)
    log = fuse_mounts.daemon(mnt).output()
    if shim == "on":
        assert writes == 0
        assert err == 0
        assert "fallocate_not_served" not in log
    else:
        assert writes >= size // 4096  # one per block at least
        assert err == errno.EOPNOTSUPP
        assert "event=fallocate_not_served" in log and "FUSEDRIVE_FALLOCATE_SHIM=off" in log


def _volume_used(store: Path, name: str) -> int:
    with Store(store) as s:
        return s.get_volume(name).used


def _settled_used(store: Path, mnt: Path, name: str, below: int) -> int:
    """The volume's used bytes once the daemon has committed what it was sent.

    Discards reach the daemon after ``fstrim`` or the journal commit returns (ext4
    issues them from a work queue), so flush and look again until the figure drops
    below ``below`` or stops changing for a while; the caller asserts on it.
    """
    last, steady = -1, 0
    for _ in range(60):
        request_flush(mnt)
        used = _volume_used(store, name)
        if used < below:
            return used
        steady = steady + 1 if used == last else 0
        if steady >= 10:
            return used
        last = used
        time.sleep(0.5)
    return last


@pytest.mark.parametrize("how", ["fstrim", "discard"])
def test_block_volume_space_comes_back(fuse_mounts: FuseMounts, tmp_path: Path, how: str) -> None:
    """ext4 on a loop device over a block volume's image: 64 MiB of random data
    written, the file removed, then ``fstrim`` (or ``-o discard`` on its own): the
    volume's stored bytes drop back to where they were before the write."""
    with Store(fuse_mounts.store) as s:
        s.create_volume("b", 256 * MiB, mode=MODE_BLOCK)
    mnt = fuse_mounts.mount("--volume", "b")
    dev = loopdev.attach(mnt / "disk.img")
    ext = tmp_path / "ext"
    ext.mkdir()
    try:
        queue = Path("/sys/block") / Path(dev.name).name / "queue"
        assert int((queue / "discard_max_bytes").read_text()) > 0
        subprocess.run(["mkfs.ext4", "-q", "-F", dev.name], check=True, capture_output=True)
        opts = ["-o", "discard"] if how == "discard" else []
        subprocess.run(["mount", "-t", "ext4", *opts, dev.name, str(ext)], check=True)
        try:
            os.sync()
            request_flush(mnt)
            empty = _volume_used(fuse_mounts.store, "b")
            rng = random.Random(64)
            with open(ext / "big", "wb") as f:
                for _ in range(64):
                    f.write(rng.randbytes(MiB))
                f.flush()
                os.fsync(f.fileno())
            request_flush(mnt)
            full = _volume_used(fuse_mounts.store, "b")
            assert full >= empty + 64 * MiB
            (ext / "big").unlink()
            os.sync()  # the journal commit frees the blocks (and, with -o discard, trims them)
            if how == "fstrim":
                out = subprocess.run(
                    ["fstrim", "-v", str(ext)], check=True, capture_output=True, text=True
                ).stdout
                assert "trimmed" in out, out
            after = _settled_used(fuse_mounts.store, mnt, "b", empty + 4 * MiB)
            assert after < empty + 4 * MiB, (empty, full, after)
        finally:
            if subprocess.run(["umount", str(ext)], check=False).returncode != 0 and is_mounted(
                ext
            ):
                subprocess.run(["umount", "--lazy", str(ext)], check=False)
    finally:
        loopdev.detach(dev.name)
