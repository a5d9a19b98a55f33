"""The filesystem through a real FUSE mount, with plain os and shutil calls.

A daemon (``python -m fusedrive.fuse_adapter``) serves each mount; it reports
readiness on a pipe. The ``mounts`` fixture (``fuse_mounts`` in conftest.py)
unmounts (``fusermount3 -u``, then ``-uz``) and reaps every daemon it started,
whatever the test did.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from blockstore import Store, fsck
from fusedrive import Filesystem, request_flush
from fusedrive.schema import ROOT_INO, chunk_prefix, patch_offset

pytestmark = pytest.mark.needs_fuse

if TYPE_CHECKING:
    from conftest import FuseMounts

MiB = 1024 * 1024
EXIT_TIMEOUT = 30.0
_libc = ctypes.CDLL(None, use_errno=True)


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


@pytest.fixture
def mounts(fuse_mounts: FuseMounts) -> FuseMounts:
    """The shared mount fixture (tests/fusedrive/conftest.py): it always unmounts and reaps."""
    return fuse_mounts


@pytest.fixture
def mnt(mounts: FuseMounts) -> Path:
    mounts.volume()
    return mounts.mount("--volume", "v")


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno or 0


def renameat2(old: Path, new: Path, flags: int) -> None:
    fn = _libc.renameat2
    if fn(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(-100, os.fsencode(path), times, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# -- data ---------------------------------------------------------------------------------------
def test_write_read_sparse_truncate_append(mounts: FuseMounts, mnt: Path) -> None:
    data = os.urandom(3 * MiB + 123)
    (mnt / "f").write_bytes(data)
    assert (mnt / "f").read_bytes() == data
    with open(mnt / "f", "r+b") as f:
        f.seek(100_000)
        f.write(b"patch")
    data = data[:100_000] + b"patch" + data[100_005:]
    with open(mnt / "sparse", "wb") as f:
        f.seek(1 << 40)
        f.write(b"end")
    st = os.stat(mnt / "sparse")
    assert st.st_size == (1 << 40) + 3 and st.st_blocks <= 8
    with open(mnt / "sparse", "rb") as f:
        f.seek(12345678)
        assert f.read(4096) == bytes(4096)
    os.truncate(mnt / "f", 70_000)
    os.truncate(mnt / "f", 200_000)
    assert (mnt / "f").read_bytes() == data[:70_000] + bytes(130_000)
    with open(mnt / "log", "a") as f:
        f.write("one\n")
    with open(mnt / "log", "a") as f:
        f.write("two\n")
    fd = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND)
    os.pwrite(fd, b"three\n", 0)  # O_APPEND wins over the offset on Linux
    os.close(fd)
    assert (mnt / "log").read_text() == "one\ntwo\nthree\n"
    mounts.unmount(mnt)
    mounts.mount("--volume", "v")
    assert (mnt / "f").read_bytes() == data[:70_000] + bytes(130_000)
    assert os.stat(mnt / "sparse").st_size == (1 << 40) + 3


def test_writes_of_one_mib_arrive_whole(mounts: FuseMounts, mnt: Path) -> None:
    with open(mnt / "big", "wb", buffering=0) as f:
        for _ in range(4):
            f.write(os.urandom(MiB))
    d = mounts.unmount(mnt)
    assert "largest_write=1048576" in d.output()


def test_o_direct_writes_reach_cached_readers_and_drop_set_id_bits(
    mounts: FuseMounts, mnt: Path
) -> None:
    data = bytearray(os.urandom(MiB))
    (mnt / "f").write_bytes(data)
    os.chmod(mnt / "f", 0o6755)
    with (
        open(mnt / "f", "rb", buffering=0) as cached,
        mmap.mmap(cached.fileno(), MiB, mmap.MAP_SHARED, mmap.PROT_READ) as mapped,
    ):
        assert cached.read() == data == mapped[:]  # the pages are in the page cache now
        fd = os.open(mnt / "f", os.O_RDWR | os.O_DIRECT)  # served with FUSE direct I/O
        try:
            for off in (0, 4096, 300_001, MiB - 10):  # the last one grows the file
                patch = os.urandom(777)
                assert os.pwrite(fd, patch, off) == len(patch)
                data[off : off + len(patch)] = patch
                assert mapped[:] == data[:MiB]  # a live mapping sees each write at once
            assert os.pread(fd, len(data), 0) == data
            # The handle is served with FUSE direct I/O, where the kernel refuses
            # shared mappings (there is no page cache to share).
            with pytest.raises(OSError) as info:
                mmap.mmap(fd, 4096, mmap.MAP_SHARED)
            assert info.value.errno == errno.ENODEV
        finally:
            os.close(fd)
        cached.seek(0)
        assert cached.read() == data  # stale cached pages were dropped
    assert (mnt / "f").read_bytes() == data
    # Root keeps set-ID bits on cached writes (CAP_FSETID); O_DIRECT writes drop them
    # for every writer, as the daemon cannot tell who writes.
    assert stat.S_IMODE(os.stat(mnt / "f").st_mode) == 0o0755
    mounts.unmount(mnt)
    mounts.mount("--volume", "v")
    assert (mnt / "f").read_bytes() == data


def test_the_mount_reads_ahead_a_mib(mnt: Path) -> None:
    from fusedrive.control import find_mount
    from fusedrive.fuse_adapter import READ_AHEAD_KB

    entry = find_mount(os.path.realpath(mnt))
    assert entry is not None and entry.fstype == "fuse.fusedrive"
    setting = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
    assert int(setting.read_text()) == READ_AHEAD_KB == 1024
    data = os.urandom(5 * MiB)
    (mnt / "f").write_bytes(data)
    assert (mnt / "f").read_bytes() == data


def test_statfs_shows_the_capacity(mounts: FuseMounts) -> None:
    mounts.volume("v", capacity=48 * MiB)
    mnt = mounts.mount("--volume", "v")
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 48 * MiB
    assert st.f_namemax == 255
    free = st.f_bfree
    (mnt / "f").write_bytes(os.urandom(4 * MiB))
    assert os.statvfs(mnt).f_bfree == free - 1024
    df = subprocess.run(["df", "-B1", "--output=size", str(mnt)], capture_output=True, text=True)
    assert df.stdout.split()[-1] == str(48 * MiB)


@pytest.mark.parametrize("writeback", [False, True])
def test_enospc_loses_nothing_written_before(mounts: FuseMounts, writeback: bool) -> None:
    """Without the writeback cache write(2) meets ENOSPC; with it, the fsync that
    writes the pages back does (docs/faults.md), and what was fsync'd before stays."""
    mounts.volume("v", capacity=4 * MiB)
    mnt = mounts.mount(
        "--volume", "v", "--writeback-cache" if writeback else "--no-writeback-cache"
    )
    first = os.urandom(3 * MiB)
    (mnt / "a").write_bytes(first)
    fd = os.open(mnt / "b", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, os.urandom(512 * 1024))
        if writeback:
            os.fsync(fd)
            assert os.write(fd, os.urandom(MiB)) == MiB  # the page cache takes it
            assert errno_of(lambda: os.fsync(fd)) == errno.ENOSPC
            os.ftruncate(fd, 512 * 1024)  # what the kernel could not store
        else:
            assert errno_of(lambda: os.write(fd, os.urandom(MiB))) == errno.ENOSPC
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (mnt / "a").read_bytes() == first
    os.unlink(mnt / "a")
    (mnt / "c").write_bytes(os.urandom(3 * MiB))  # the unlinked file's space is back
    mounts.unmount(mnt)
    with Store(mounts.store) as s:
        assert s.get_volume("v").used == 3 * MiB + 512 * 1024
        assert fsck(s).clean


# -- names --------------------------------------------------------------------------------------
def test_directories_links_and_special_files(mnt: Path) -> None:
    (mnt / "d" / "sub").mkdir(parents=True)
    (mnt / "d" / "file").write_text("x")
    assert os.stat(mnt / "d").st_nlink == 3
    assert errno_of(lambda: os.rmdir(mnt / "d")) == errno.ENOTEMPTY
    os.link(mnt / "d" / "file", mnt / "hard")
    os.chmod(mnt / "hard", 0o600)
    st = os.stat(mnt / "d" / "file")
    assert st.st_nlink == 2 and stat.S_IMODE(st.st_mode) == 0o600
    os.symlink("d/file", mnt / "sym")
    assert os.readlink(mnt / "sym") == "d/file"
    assert (mnt / "sym").read_text() == "x"
    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(mnt / "sock"))
    assert stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)
    (mnt / ("n" * 255)).write_text("ok")
    assert errno_of(lambda: (mnt / ("n" * 256)).write_text("no")) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.mkdir(mnt / ("m" * 300))) == errno.ENAMETOOLONG
    deep = mnt.joinpath(*(["p" * 200] * 15))  # a 3000-byte path works
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("deep")
    assert (deep / "leaf").read_text() == "deep"


def test_rename_flags(mnt: Path) -> None:
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    (mnt / "dir").mkdir()
    (mnt / "full").mkdir()
    (mnt / "full" / "x").write_text("")
    assert errno_of(lambda: renameat2(mnt / "a", mnt / "b", 1)) == errno.EEXIST  # NOREPLACE
    renameat2(mnt / "a", mnt / "dir", 2)  # EXCHANGE a file with a directory
    assert (mnt / "dir").read_text() == "A" and (mnt / "a").is_dir()
    os.rename(mnt / "dir", mnt / "b")  # over a file
    assert (mnt / "b").read_text() == "A"
    (mnt / "empty").mkdir()
    os.rename(mnt / "a", mnt / "empty")  # a directory over an empty directory
    assert errno_of(lambda: os.rename(mnt / "empty", mnt / "full")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rename(mnt / "empty", mnt / "b")) == errno.ENOTDIR
    assert errno_of(lambda: os.rename(mnt / "b", mnt / "full")) == errno.EISDIR
    assert errno_of(lambda: os.rename(mnt / "full", mnt / "full" / "in")) == errno.EINVAL
    assert sorted(os.listdir(mnt)) == ["b", "empty", "full"]


def test_readdir_while_removing_returns_each_entry_once(mnt: Path) -> None:
    for i in range(600):
        (mnt / f"f{i:04d}").touch()
    seen = []
    with os.scandir(mnt) as it:
        for entry in it:
            seen.append(entry.name)
            os.unlink(entry.path)
    assert sorted(seen) == [f"f{i:04d}" for i in range(600)]
    assert os.listdir(mnt) == []


# -- metadata -------------------------------------------------------------------------------------
def test_owner_mode_and_nanosecond_times(mnt: Path) -> None:
    f = mnt / "t"
    f.write_text("x")
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o4750)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4750)
    os.utime(f, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (
        1_600_000_000_123_456_789,
        1_500_000_000_987_654_321,
    )
    utimensat(f, (0, UTIME_OMIT), (7, 42))  # atime kept, mtime set
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_600_000_000_123_456_789, 7_000_000_042)
    before = time.time_ns()
    utimensat(f, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(f)
    assert st.st_atime_ns >= before - 10**9 and st.st_mtime_ns == 7_000_000_042
    assert st.st_ctime_ns >= before - 10**9


def test_xattrs(mnt: Path) -> None:
    f = mnt / "x"
    f.write_text("")
    os.setxattr(f, "user.color", b"blue")
    assert os.getxattr(f, "user.color") == b"blue"
    assert errno_of(lambda: os.getxattr(f, "user.none")) == errno.ENODATA
    assert errno_of(lambda: os.setxattr(f, "user.color", b"red", os.XATTR_CREATE)) == errno.EEXIST
    assert errno_of(lambda: os.setxattr(f, "user.new", b"x", os.XATTR_REPLACE)) == errno.ENODATA
    os.setxattr(f, "user.other", b"1")
    assert sorted(os.listxattr(f)) == ["user.color", "user.other"]
    os.removexattr(f, "user.other")
    assert os.listxattr(f) == ["user.color"]


def test_permissions_are_enforced_for_other_users(mnt: Path) -> None:
    (mnt / "public").write_text("readable")
    (mnt / "private").write_text("secret")
    os.chmod(mnt / "private", 0o600)
    script = (
        "import os, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "d = sys.argv[1]\n"
        "print(open(d + '/public').read())\n"
        "for p in ('/private', '/new'):\n"
        "    try:\n"
        "        open(d + p, 'a' if p == '/new' else 'r')\n"
        "    except PermissionError:\n"
        "        print('EACCES')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(mnt)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["readable", "EACCES", "EACCES"]


# -- lifetime, durability, flushing -------------------------------------------------------------
def test_unlinked_open_file_keeps_data_until_close(mounts: FuseMounts, mnt: Path) -> None:
    data = os.urandom(2 * MiB)
    with open(mnt / "tmp", "w+b") as f:
        f.write(data)
        f.flush()
        os.unlink(mnt / "tmp")
        assert not (mnt / "tmp").exists()
        f.seek(0)
        assert f.read() == data
        os.fsync(f.fileno())
    mounts.unmount(mnt)
    with Store(mounts.store) as s:
        assert s.get_volume("v").used == 0


def test_fsync_survives_sigkill_of_the_daemon(mounts: FuseMounts, mnt: Path) -> None:
    (mnt / "d").mkdir()
    fd = os.open(mnt / "d", os.O_RDONLY)
    try:
        os.fsync(fd)  # fsyncdir
    finally:
        os.close(fd)
    data = os.urandom(5 * MiB)
    with open(mnt / "durable", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    (mnt / "maybe").write_bytes(os.urandom(100_000))  # neither flushed nor fsync'd
    daemon = mounts.daemon(mnt)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(EXIT_TIMEOUT)
    subprocess.run(["fusermount3", "-uz", str(mnt)], check=True)
    assert not is_mounted(mnt)
    with Store(mounts.store) as s:
        assert fsck(s).clean
    mounts.mount("--volume", "v")
    assert (mnt / "durable").read_bytes() == data
    assert (mnt / "d").is_dir()


def test_small_writes_after_sigkill_are_a_prefix_and_fsyncd_ones_stay(
    mounts: FuseMounts, mnt: Path
) -> None:
    """Small writes into stored chunks are patches: a crash keeps every fsync'd one,
    and what survives of the rest is the file as it was after some later write."""
    rng = random.Random(5)
    model = bytearray(rng.randbytes(16 * 64 * 1024))
    path = mnt / "patched"
    path.write_bytes(model)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        states = [hashlib.sha256(model).digest()]
        synced = 0
        for i in range(300):
            off, n = rng.randrange(len(model) - 5000), rng.choice([1, 512, 4096, 5000])
            body = rng.randbytes(n)
            os.pwrite(fd, body, off)
            model[off : off + n] = body
            states.append(hashlib.sha256(model).digest())
            if i % 25 == 24 and i < 250:
                os.fsync(fd)
                synced = len(states) - 1
    finally:
        os.close(fd)
    ino = path.stat().st_ino
    daemon = mounts.daemon(mnt)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(EXIT_TIMEOUT)
    subprocess.run(["fusermount3", "-uz", str(mnt)], check=True)
    with Store(mounts.store) as s:
        assert fsck(s).clean
        keys = [k for k, _ in s.volume("v").scan(chunk_prefix(ino))]
    assert any(patch_offset(k) is not None for k in keys)  # the writes were patches
    mounts.mount("--volume", "v")
    got = hashlib.sha256(path.read_bytes()).digest()
    assert got in states[synced:], "the file is not the state after any write since the fsync"


def test_sigterm_flushes_and_unmounts(mounts: FuseMounts, mnt: Path) -> None:
    data = os.urandom(MiB)
    (mnt / "f").write_bytes(data)
    daemon = mounts.daemon(mnt)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.output()
    assert not is_mounted(mnt)
    mounts.mount("--volume", "v")
    assert (mnt / "f").read_bytes() == data


def test_request_flush_makes_a_snapshot_hold_every_write(mounts: FuseMounts, mnt: Path) -> None:
    data = os.urandom(300_000)
    (mnt / "f").write_bytes(data)
    (mnt / "dir").mkdir()
    request_flush(mnt)
    with Store(mounts.store) as s:
        s.create_snapshot("v", "snap")
        fs = Filesystem(s.snapshot("snap"))
        attrs = fs.lookup(ROOT_INO, b"f")
        fh = fs.open(attrs.ino, os.O_RDONLY)
        assert fs.read(fh, 0, attrs.size) == data
        assert fs.lookup(ROOT_INO, b"dir").mode & stat.S_IFDIR
    assert errno_of(lambda: request_flush(mounts.tmp)) == errno.ENOENT  # not a mount


def test_request_flush_with_the_mount_device_flushes_and_never_trusts_another(
    mounts: FuseMounts, mnt: Path
) -> None:
    """The CSI plugin passes the device it recorded at staging: the right one skips the
    mount table; a wrong one (the mount is gone, or something else is there) is checked
    the slow way and refused like any other path that is not a fusedrive mount."""
    from fusedrive.control import find_mount

    entry = find_mount(os.path.realpath(mnt))
    assert entry is not None
    data = os.urandom(100_000)
    (mnt / "f").write_bytes(data)
    request_flush(mnt, entry.device)
    with Store(mounts.store) as s:
        s.create_snapshot("v", "snap")
        fs = Filesystem(s.snapshot("snap"))
        attrs = fs.lookup(ROOT_INO, b"f")
        assert fs.read(fs.open(attrs.ino, os.O_RDONLY), 0, attrs.size) == data
    plain = mounts.tmp / "plain"
    plain.mkdir()
    assert errno_of(lambda: request_flush(plain, entry.device)) == errno.ENOENT
    assert not os.listxattr(plain)  # nothing was set on the plain directory


def test_read_only_and_snapshot_mounts(mounts: FuseMounts, mnt: Path) -> None:
    (mnt / "f").write_text("version 1")
    request_flush(mnt)
    with Store(mounts.store) as s:
        s.create_snapshot("v", "s1")
    (mnt / "f").write_text("version 2")
    snap = mounts.mount("--snapshot", "s1", at="snap")
    assert (snap / "f").read_text() == "version 1"
    assert errno_of(lambda: (snap / "f").write_text("no")) == errno.EROFS
    assert errno_of(lambda: (snap / "new").touch()) == errno.EROFS
    request_flush(snap)  # a read-only mount has nothing to flush
    mounts.unmount(mnt)
    ro = mounts.mount("--volume", "v", "--read-only", at="ro")
    assert (ro / "f").read_text() == "version 2"
    assert errno_of(lambda: os.mkdir(ro / "d")) == errno.EROFS
    assert errno_of(lambda: os.setxattr(ro / "f", "user.a", b"1")) == errno.EROFS


def test_second_read_write_mount_of_a_volume_is_refused(mounts: FuseMounts, mnt: Path) -> None:
    with pytest.raises(RuntimeError, match="already mounted read-write"):
        mounts.mount("--volume", "v", at="again")
    assert not is_mounted(mounts.points / "again")
    assert (mnt / ".").is_dir()
