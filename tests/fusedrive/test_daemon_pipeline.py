"""The daemon's fast paths: chunks prepared ahead of a flush, and chunks fetched ahead of a read.

``FileData.prepare_ahead`` hashes and compresses snapshots of chunks in a thread
pool before the flush needs them; a chunk changed after its snapshot must be
prepared again, and a flush must never wait behind prepares still queued in the
pool. These tests drive ``Filesystem`` directly over a real store with a real
pool. ``Fetcher`` (read-ahead, inline and batched fetches) is exercised through a
real mount: cold sequential reads, reads racing overwrites and flushes.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from blockstore import Store, fsck
from fusedrive import Ctx, Filesystem
from fusedrive.schema import ROOT_INO

if TYPE_CHECKING:
    from conftest import FuseMounts

KiB, MiB = 1024, 1024 * 1024
CS = 4096  # chunk size of the unit-test volumes


class Vol:
    """A store with one volume and a filesystem on it whose writes prepare ahead."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor, dirty_limit: int) -> None:
        self.path = path
        self.store = Store(path)
        self.store.create_volume("v", 64 * MiB, parameters={"chunk_size": str(CS)})
        self.fs = Filesystem(self.store.volume("v"), dirty_limit=dirty_limit, cache_limit=32 * KiB)
        self.fs.data.prepare_pool = pool

    def reopen(self) -> Filesystem:
        self.fs.close()
        self.store.close()
        self.store = Store(self.path)
        self.fs = Filesystem(self.store.volume("v"))
        return self.fs


@pytest.fixture
def make_vol(store_dir: Path) -> Iterator[Callable[..., Vol]]:
    made: list[tuple[Vol, ThreadPoolExecutor]] = []

    def make(dirty_limit: int = 64 * KiB, threads: int = 2) -> Vol:
        pool = ThreadPoolExecutor(threads)
        v = Vol(store_dir, pool, dirty_limit)
        made.append((v, pool))
        return v

    yield make
    for v, pool in made:
        pool.shutdown(wait=True, cancel_futures=True)
        v.store.close()


def new_file(fs: Filesystem, name: bytes) -> tuple[int, int]:
    fh, attrs = fs.create(ROOT_INO, name, 0o644, os.O_RDWR, Ctx(0, 0))
    return fh, attrs.ino


def read_all(fs: Filesystem, ino: int) -> bytes:
    fh = fs.open(ino, os.O_RDONLY)
    try:
        return fs.read(fh, 0, fs.getattr(ino).size + 1)
    finally:
        fs.release(fh)


def test_a_chunk_changed_after_its_snapshot_is_prepared_again(make_vol: Callable[..., Vol]) -> None:
    vol = make_vol(dirty_limit=1 * MiB)
    fs = vol.fs
    fh, ino = new_file(fs, b"f")
    first = os.urandom(3 * CS)
    fs.write(fh, 0, first)  # completes chunks 0, 1 and 2: all sent ahead
    assert set(fs.data.live.files[ino].ready) == {0, 1, 2}
    fs.write(fh, CS + 10, b"changed")  # chunk 1 changes after its snapshot
    fs.setattr(ino, size=2 * CS + 100)  # chunk 2 is cut after its snapshot
    fs.punch_hole(ino, 0, 16)  # chunk 0 is zeroed in part after its snapshot
    assert fs.data.live.files[ino].ready == {}
    fs.write(fh, 3 * CS, os.urandom(CS))  # chunk 3: prepared ahead and left alone
    assert set(fs.data.live.files[ino].ready) == {3}
    want = bytearray(first[: 2 * CS + 100])
    want[CS + 10 : CS + 17] = b"changed"
    want[0:16] = bytes(16)
    want += bytes(3 * CS - len(want))
    fs.release(fh)
    fh = fs.open(ino, os.O_RDWR)
    want += fs.read(fh, 3 * CS, CS)
    fs.release(fh)
    fs.flush()
    assert read_all(fs, ino) == want
    fs = vol.reopen()
    assert read_all(fs, ino) == want
    assert fsck(vol.store).clean


def test_a_flush_does_not_wait_behind_queued_prepares(make_vol: Callable[..., Vol]) -> None:
    vol = make_vol(dirty_limit=1 * MiB, threads=1)
    fs = vol.fs
    pool = fs.data.prepare_pool
    assert pool is not None
    gate = threading.Event()
    blocker = pool.submit(gate.wait, 60)  # the pool's only thread is busy
    try:
        fh, ino = new_file(fs, b"f")
        data = os.urandom(8 * CS)
        fs.write(fh, 0, data)
        assert len(fs.data.live.files[ino].ready) == 8
        fs.flush()  # prepares in this thread, cancelling what is still queued
        assert not blocker.done()
        fs.release(fh)
        fs = vol.reopen()
        assert read_all(fs, ino) == data
    finally:
        gate.set()
    assert fsck(vol.store).clean


def test_prepared_ahead_data_matches_a_model(make_vol: Callable[..., Vol]) -> None:
    # A dirty limit of 32 chunks: flushes are due often, so that writes prepare the
    # chunks they create as well as those they complete, and small patches land in
    # chunks already sent ahead.
    vol = make_vol(dirty_limit=32 * CS)
    fs = vol.fs
    fh, ino = new_file(fs, b"model")
    model = bytearray()
    rng = random.Random(11)
    for step in range(800):
        op = rng.random()
        if op < 0.25:  # whole chunks from a chunk boundary, the way sequential writers write
            off = rng.randrange(0, 16) * CS
            data = rng.randbytes(rng.choice([CS, 2 * CS, 3 * CS + 100]))
        elif op < 0.5 and model:  # a small patch inside what is there
            off = rng.randrange(0, len(model))
            data = rng.randbytes(rng.randrange(1, 300))
        elif op < 0.65:
            off = rng.randrange(0, 70000)
            data = rng.randbytes(rng.randrange(1, 9000))
        elif op < 0.73:
            size = rng.randrange(0, 70000)
            fs.setattr(ino, size=size)
            del model[size:]
            model.extend(bytes(size - len(model)))
            continue
        elif op < 0.8 and model:
            off, n = rng.randrange(0, len(model)), rng.randrange(1, 20000)
            fs.punch_hole(ino, off, n)
            end = min(off + n, len(model))
            model[off:end] = bytes(end - off)
            continue
        elif op < 0.85:
            fs.flush()
            continue
        else:
            off, n = rng.randrange(0, 70000), rng.randrange(0, 20000)
            assert fs.read(fh, off, n) == bytes(model[off : off + n]), step
            continue
        fs.write(fh, off, data)
        model.extend(bytes(max(0, off + len(data) - len(model))))
        model[off : off + len(data)] = data
    assert fs.read(fh, 0, len(model) + 10) == bytes(model)
    fs.release(fh)
    fs = vol.reopen()
    assert read_all(fs, ino) == bytes(model)
    assert fsck(vol.store).clean


def test_a_fetch_that_a_commit_overtook_is_not_cached(make_vol: Callable[..., Vol]) -> None:
    vol = make_vol()
    fs = vol.fs
    fh, ino = new_file(fs, b"f")
    old = os.urandom(2 * CS)
    fs.write(fh, 0, old)
    fs.flush()
    data = fs.data
    epoch = data.epoch
    fetched = data.fetch(ino, [0, 1])  # what a worker thread fetches for a read-ahead
    fs.setxattr(ino, b"user.a", b"1")  # a commit that changes no file data ...
    fs.flush()
    assert data.epoch == epoch  # ... keeps fetched chunks good
    new = os.urandom(CS)
    fs.write(fh, 0, new)
    fs.flush()
    assert data.epoch != epoch
    data.fill_cache(ino, fetched, epoch)  # the fetch finishes after the commit
    assert fs.read(fh, 0, 2 * CS) == new + old[CS:]
    fs.release(fh)


# -- through a mount ----------------------------------------------------------------------------
def pread_direct(fd: int, off: int, n: int) -> bytes:
    """An O_DIRECT read: it reaches the daemon whatever the page cache holds."""
    buf = mmap.mmap(-1, n)  # page aligned, as O_DIRECT wants
    try:
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        buf.close()


@pytest.mark.needs_fuse
def test_cold_sequential_reads_see_every_write(fuse_mounts: FuseMounts) -> None:
    fuse_mounts.volume("v", capacity=64 * MiB)
    mnt = fuse_mounts.mount("--volume", "v", at="v")
    size = 12 * MiB
    data = bytearray(os.urandom(size))
    data[3 * MiB : 4 * MiB] = bytes(MiB)  # a hole in the middle
    with open(mnt / "f", "wb") as f:
        f.write(data[: 3 * MiB])
        f.seek(4 * MiB)
        f.write(data[4 * MiB :])
        os.fsync(f.fileno())
    fuse_mounts.unmount(mnt)
    mnt = fuse_mounts.mount("--volume", "v", at="v")  # an empty chunk cache
    assert (mnt / "f").read_bytes() == data  # buffered: the kernel's read-ahead sizes
    fd = os.open(mnt / "f", os.O_RDWR | os.O_DIRECT)
    try:
        rng = random.Random(5)
        off = 0
        block = 256 * KiB
        while off < size:
            # Overwrite ahead of the reader, where read-ahead is fetching or has
            # fetched, and sometimes commit at once: the reader must see the change.
            ahead = off + rng.randrange(1, 32) * 64 * KiB
            if rng.random() < 0.5:
                patch = os.urandom(64 * KiB)  # a whole chunk: no fetch needed, none waited for
            else:
                ahead += rng.randrange(0, 1000)
                patch = os.urandom(rng.randrange(1, 5000))
            if ahead < size:
                os.pwrite(fd, patch, ahead)
                end = min(ahead + len(patch), size)
                data[ahead:end] = patch[: end - ahead]
                if rng.random() < 0.3:
                    os.fsync(fd)
            assert pread_direct(fd, off, block) == data[off : off + block], off
            off += block
    finally:
        os.close(fd)
    fuse_mounts.unmount(mnt)
    mnt = fuse_mounts.mount("--volume", "v", at="v")
    assert (mnt / "f").read_bytes() == data
    fuse_mounts.unmount(mnt)
    with Store(fuse_mounts.store) as s:
        assert fsck(s).clean


def test_concurrent_writers_at_full_buffers_get_a_flush(store_dir: Path) -> None:
    """Several writes at once finding the dirty buffers full (what the writeback
    cache's write back sends) must make a flush happen, not wait for each other.

    Before ``Flusher.flushing``, a writer took the lock held by another writer's
    ``wait_idle`` for a flush running, waited its turn instead of flushing, and the
    writers handed the lock around forever (a daemon seen spinning for minutes).
    The deadline only bounds a hang; nothing here is a timing measure.
    """
    import trio

    from fusedrive.fuse_adapter import Operations

    with Store(store_dir) as store:
        store.create_volume("v", 64 * MiB, parameters={"chunk_size": str(CS)})
        fs = Filesystem(store.volume("v"), dirty_limit=16 * KiB, cache_limit=32 * KiB)
        ops = Operations(fs)
        try:
            fh, _ = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, Ctx(0, 0))
            want = random.Random(7).randbytes(512 * KiB)

            async def writer(first: int) -> None:
                for off in range(first * 4 * KiB, len(want), 8 * 4 * KiB):
                    await ops.write(fh, off, want[off : off + 4 * KiB])

            async def main() -> None:
                with trio.fail_after(120):
                    async with trio.open_nursery() as nursery:
                        for first in range(8):
                            nursery.start_soon(writer, first)

            trio.run(main)
            fs.release(fh)
            fs.close()
        finally:
            ops.flusher.close()
        fs2 = Filesystem(store.volume("v"))
        ino = fs2.lookup(ROOT_INO, b"f").ino
        fh2 = fs2.open(ino, os.O_RDONLY)
        assert fs2.read(fh2, 0, len(want)) == want
        fs2.close()
