"""Segment reads: runs of neighbouring records are read past the page cache, small reads
through it, and a file system that refuses O_DIRECT still gets every byte."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
from pathlib import Path

import pytest

from blockstore import Store
from blockstore.segments import DIRECT_READ_BYTES

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]

CHUNK = 65536


def resident_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (mincore over a shared mapping)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def filled(store_dir: Path):
    """A store with 32 incompressible 64 KiB chunks written one after another."""
    store = Store(store_dir)
    store.create_volume("v", 64 << 20)
    view = store.volume("v")
    blobs = {b"k%02d" % i: os.urandom(CHUNK) for i in range(32)}
    for key, data in blobs.items():
        view.put_chunk(key, data)
    (segment,) = (store_dir / "segments").glob("*.seg")
    yield store, blobs, segment
    store.close()


def test_a_run_of_records_is_read_past_the_page_cache(filled) -> None:
    store, blobs, segment = filled
    view = store.volume("v")
    drop_from_page_cache(segment)
    if resident_bytes(segment):
        pytest.skip("this file system keeps file pages in memory whatever is asked")
    assert 32 * CHUNK >= DIRECT_READ_BYTES  # one run, long enough to be read direct
    got = view.read_chunk_ranges([(b"k00", b"k99")])
    assert got == [sorted(blobs.items())]
    assert resident_bytes(segment) == 0
    assert view.read_chunk(b"k05") == blobs[b"k05"]  # one record: a buffered read
    assert resident_bytes(segment) >= CHUNK


def test_several_runs_in_one_read_each_get_their_own_bytes(filled) -> None:
    store, blobs, _ = filled
    view = store.volume("v")
    keys = [b"k%02d" % i for i in [*range(0, 8), *range(12, 14), *range(16, 32)]]
    random.Random(7).shuffle(keys)  # asked out of disk order: read in runs, answered in order
    assert view.read_chunks(keys) == [blobs[k] for k in keys]


def test_a_file_system_refusing_direct_reads_gets_buffered_ones(
    filled, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, blobs, segment = filled
    real_open = os.open

    def no_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct)
    store.segments.close()  # forget the descriptors opened while writing
    drop_from_page_cache(segment)
    got = store.volume("v").read_chunk_ranges([(b"k00", b"k99")])
    assert got == [sorted(blobs.items())]
    assert resident_bytes(segment) >= 32 * CHUNK  # read through the page cache
