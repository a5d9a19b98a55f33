"""The filesystem semantics, driven directly over a real store (no FUSE).

Each test opens a real ``Store`` in a temporary directory and calls ``Filesystem``
the way the FUSE adapter does (inode numbers, handles, lookup counts). Reopening
the filesystem on a fresh ``Store`` stands in for a remount.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from blockstore import MODE_BLOCK, ChunkRef, Store, fsck
from fusedrive import Ctx, Filesystem, FsError, filedata
from fusedrive.errors import ERRNO_OF_STORE_ERROR, errno_of
from fusedrive.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE
from fusedrive.patches import PATCH_MAX, PATCH_SHARE
from fusedrive.schema import (
    FORMAT,
    ROOT_INO,
    SUPERBLOCK_KEY,
    Superblock,
    chunk_index,
    chunk_key,
    chunk_prefix,
    inode_key,
    orphan_key,
    patch_offset,
)

KiB, MiB = 1024, 1024 * 1024
ROOT = ROOT_INO
CTX = Ctx(0, 0)


class Volume:
    """A store holding one volume, with a filesystem open on it (reopened at will)."""

    def __init__(self, path: Path, capacity: int, params: dict[str, str], **fs_args: int) -> None:
        self.path = path
        self.fs_args = fs_args
        self.store = Store(path)
        self.store.create_volume("v", capacity, parameters=params)
        self.fs = Filesystem(self.store.volume("v"), **fs_args)

    def reopen(self, *, clean: bool = True) -> Filesystem:
        """Close (or, ``clean=False``, abandon as a crash would) and open again."""
        if clean:
            self.fs.close()
        self.store.close()
        self.store = Store(self.path)
        self.fs = Filesystem(self.store.volume("v"), **self.fs_args)
        return self.fs

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def make_volume(store_dir: Path) -> Iterator[Callable[..., Volume]]:
    made: list[Volume] = []

    def make(capacity: int = 64 * MiB, params: dict[str, str] | None = None, **kw: int) -> Volume:
        v = Volume(store_dir, capacity, {"chunk_size": "4096", **(params or {})}, **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


@pytest.fixture
def vol(make_volume: Callable[..., Volume]) -> Volume:
    return make_volume()


def create(fs: Filesystem, name: bytes, parent: int = ROOT, mode: int = 0o644) -> tuple[int, int]:
    fh, attrs = fs.create(parent, name, mode, os.O_RDWR, CTX)
    return fh, attrs.ino


def write_file(fs: Filesystem, name: bytes, data: bytes, parent: int = ROOT) -> int:
    fh, ino = create(fs, name, parent)
    fs.write(fh, 0, data)
    fs.release(fh)
    return ino


def read_all(fs: Filesystem, ino: int) -> bytes:
    fh = fs.open(ino, os.O_RDONLY)
    try:
        return fs.read(fh, 0, fs.getattr(ino).size)
    finally:
        fs.release(fh)


def names(fs: Filesystem, ino: int = ROOT) -> list[bytes]:
    fh = fs.opendir(ino)
    try:
        return [n for n, _, _ in fs.readdir(fh, 0)]
    finally:
        fs.releasedir(fh)


def errno_from(fn: Callable[[], object]) -> int:
    with pytest.raises(FsError) as info:
        fn()
    return info.value.errno


def stored_chunks(store: Store, ino: int) -> list[bytes]:
    return [k for k, v in store.volume("v").scan(chunk_prefix(ino)) if isinstance(v, ChunkRef)]


# -- file data --------------------------------------------------------------------------------
def test_write_read_any_offset_and_persist(vol: Volume) -> None:
    fs = vol.fs
    fh, _ = create(fs, b"f")
    model = bytearray()
    for off, n in [(0, 10), (4090, 20), (8192, 4096), (100, 9000), (20000, 1)]:
        data = os.urandom(n)
        assert fs.write(fh, off, data) == n
        if len(model) < off + n:
            model.extend(bytes(off + n - len(model)))
        model[off : off + n] = data
    assert fs.read(fh, 0, 1 << 20) == bytes(model)
    assert fs.read(fh, 4000, 200) == bytes(model[4000:4200])
    assert fs.read(fh, len(model), 10) == b""
    fs.release(fh)
    fs = vol.reopen()
    assert read_all(fs, fs.lookup(ROOT, b"f").ino) == bytes(model)
    assert fsck(vol.store).clean


def test_sparse_file_stores_only_written_chunks(vol: Volume) -> None:
    fs = vol.fs
    fh, ino = create(fs, b"sparse")
    fs.write(fh, 1 << 30, b"end")
    fs.flush()
    assert fs.getattr(ino).size == (1 << 30) + 3
    assert fs.read(fh, 5 << 20, 4096) == bytes(4096)
    assert fs.read(fh, (1 << 30) - 2, 10) == b"\0\0end"
    assert len(stored_chunks(vol.store, ino)) == 1
    assert fs.getattr(ino).blocks == 1  # 3 stored bytes round up to one 512-byte block
    assert vol.store.get_volume("v").used == 3
    fs.write(fh, 8192, bytes(4096))  # an all-zero chunk is a hole: never stored
    fs.flush()
    assert len(stored_chunks(vol.store, ino)) == 1


def test_truncate_down_cuts_the_last_chunk_and_drops_the_rest(vol: Volume) -> None:
    fs = vol.fs
    data = os.urandom(20000)
    ino = write_file(fs, b"t", data)
    fs.flush()
    assert len(stored_chunks(vol.store, ino)) == 5
    fs.setattr(ino, size=5000)
    assert read_all(fs, ino) == data[:5000]
    fs.setattr(ino, size=12000)  # growing again must show zeros, not the old bytes
    assert read_all(fs, ino) == data[:5000] + bytes(7000)
    fs.flush()
    assert len(stored_chunks(vol.store, ino)) == 2
    assert vol.store.get_volume("v").used == 5000
    assert fs.getattr(ino).blocks == (5000 + 511) // 512
    fs = vol.reopen()
    assert read_all(fs, ino) == data[:5000] + bytes(7000)


def test_petabyte_offsets_cost_constant_memory(vol: Volume) -> None:
    fs = vol.fs
    fh, ino = create(fs, b"huge")
    tracemalloc.start()
    try:
        fs.setattr(ino, size=1 << 60)
        fs.write(fh, (1 << 58) + 1, b"x")
        fs.setattr(ino, size=1 << 50)
        assert fs.read(fh, (1 << 50) - 4, 100) == bytes(4)
        fs.write(fh, 1 << 50, b"tail")
        fs.flush()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB
    assert fs.getattr(ino).size == (1 << 50) + 4
    assert fs.read(fh, 1 << 50, 10) == b"tail"
    assert len(stored_chunks(vol.store, ino)) == 1
    assert errno_from(lambda: fs.write(fh, (1 << 63) - 2, b"abc")) == errno.EFBIG


def test_append_handle_writes_at_the_end(vol: Volume) -> None:
    fs = vol.fs
    ino = write_file(fs, b"log", b"first\n")
    fh = fs.open(ino, os.O_WRONLY | os.O_APPEND)
    fs.write(fh, 0, b"second\n")
    fs.release(fh)
    assert read_all(fs, ino) == b"first\nsecond\n"


@pytest.mark.parametrize(
    ("mode", "after"),
    [(0o6755, 0o0755), (0o6745, 0o2745), (0o4700, 0o0700), (0o0755, 0o0755)],
)
def test_o_direct_writes_drop_set_id_bits(vol: Volume, mode: int, after: int) -> None:
    # The kernel clears these itself before cached writes; for O_DIRECT handles
    # (served with FUSE direct I/O) it leaves that to us. Set-group-ID without
    # group execute is mandatory locking, not privilege, and stays.
    fs = vol.fs
    ino = write_file(fs, b"tool", b"#!/bin/sh\n")
    fs.setattr(ino, mode=stat.S_IFREG | mode)
    fh = fs.open(ino, os.O_RDWR)
    fs.write(fh, 0, b"#")
    fs.release(fh)
    assert stat.S_IMODE(fs.getattr(ino).mode) == mode  # cached writes: the kernel's business
    fh = fs.open(ino, os.O_RDWR | os.O_DIRECT)
    fs.write(fh, 0, b"#")
    fs.release(fh)
    assert stat.S_IMODE(fs.getattr(ino).mode) == after
    assert stat.S_IMODE(vol.reopen().getattr(ino).mode) == after


def test_punch_hole_zeroes_and_releases_whole_chunks(vol: Volume) -> None:
    fs = vol.fs
    data = os.urandom(6 * 4096)
    ino = write_file(fs, b"p", data)
    fs.flush()
    fs.fallocate(ino, 3, 1000, 4 * 4096)  # PUNCH_HOLE | KEEP_SIZE
    expect = data[:1000] + bytes(4 * 4096) + data[1000 + 4 * 4096 :]
    assert read_all(fs, ino) == expect
    fs.flush()
    assert len(stored_chunks(vol.store, ino)) == 3  # chunks 1-3 are gone, 0 and 4 zeroed in part
    assert fs.getattr(ino).size == len(data)
    fs.fallocate(ino, 0, 0, 10 * 4096)  # mode 0 extends the size
    assert fs.getattr(ino).size == 10 * 4096
    assert errno_from(lambda: fs.fallocate(ino, 0x10, 0, 1)) == errno.EOPNOTSUPP
    fs = vol.reopen()
    assert read_all(fs, ino)[: len(expect)] == expect


def test_copy_range_shares_aligned_chunks(vol: Volume) -> None:
    fs = vol.fs
    data = os.urandom(5 * 4096 + 100)
    src = write_file(fs, b"src", data)
    dfh, dst = create(fs, b"dst")
    sfh = fs.open(src, os.O_RDONLY)
    fs.flush()
    before = vol.store.stats()
    assert fs.copy_range(sfh, 0, dfh, 0, len(data)) == len(data)
    after = vol.store.stats()
    assert after.chunk_count == before.chunk_count  # shared, not copied
    assert after.referenced_raw_bytes == before.referenced_raw_bytes + len(data)
    assert read_all(fs, dst) == data
    assert fs.copy_range(sfh, 10, dfh, 20000, 9000) == 9000  # unaligned: bytes are copied
    assert read_all(fs, dst)[20000:29000] == data[10:9010]
    assert errno_from(lambda: fs.copy_range(sfh, 0, sfh, 100, 200)) == errno.EINVAL
    fs.release(sfh)
    fs.release(dfh)
    fs = vol.reopen()
    assert read_all(fs, dst)[:4096] == data[:4096]
    assert fsck(vol.store).clean


@pytest.mark.parametrize("chunk_size", [4 * KiB, 16 * KiB])
def test_data_matches_a_model_through_random_operations(
    make_volume: Callable[..., Volume], chunk_size: int
) -> None:
    vol = make_volume(
        params={"chunk_size": str(chunk_size)}, dirty_limit=64 * KiB, cache_limit=32 * KiB
    )
    fs = vol.fs
    fh, ino = create(fs, b"model")
    model = bytearray()
    rng = random.Random(7)
    for step in range(400):
        op = rng.random()
        if op < 0.5:
            off = rng.randrange(0, 60000)
            data = rng.randbytes(rng.randrange(1, 9000))
            if rng.random() < 0.2:
                data = bytes(len(data))
            fs.write(fh, off, data)
            model.extend(bytes(max(0, off + len(data) - len(model))))
            model[off : off + len(data)] = data
        elif op < 0.65:
            size = rng.randrange(0, 70000)
            fs.setattr(ino, size=size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        elif op < 0.75 and model:
            off, n = rng.randrange(0, len(model)), rng.randrange(1, 20000)
            fs.punch_hole(ino, off, n)
            end = min(off + n, len(model))
            model[off:end] = bytes(end - off)
        elif op < 0.8:
            fs.flush()
        else:
            off, n = rng.randrange(0, 70000), rng.randrange(0, 20000)
            assert fs.read(fh, off, n) == bytes(model[off : off + n]), step
    assert fs.read(fh, 0, len(model) + 10) == bytes(model)
    fs.release(fh)
    fs = vol.reopen()
    assert read_all(fs, ino) == bytes(model)
    assert vol.store.get_volume("v").used == sum(
        v.raw_length for _, v in vol.store.volume("v").scan(chunk_prefix(ino))
    )
    assert fsck(vol.store).clean


# -- patches: small writes into stored chunks ----------------------------------------------------
CS64 = {"chunk_size": str(64 * KiB)}


def patch_keys(store: Store, ino: int) -> dict[int, list[tuple[int, int]]]:
    """Stored patches per chunk index: [(offset, length)]."""
    out: dict[int, list[tuple[int, int]]] = {}
    for k, v in store.volume("v").scan(chunk_prefix(ino)):
        off = patch_offset(k)
        if off is not None and isinstance(v, ChunkRef):
            out.setdefault(chunk_index(k), []).append((off, v.raw_length))
    return out


def chunk_ref(store: Store, ino: int, index: int) -> object:
    return store.volume("v").get(chunk_key(ino, index))


def assert_usage_matches(vol: Volume, fs: Filesystem, *inos: int) -> None:
    """Usage and st_blocks agree with the chunks and patches the store holds."""
    total = 0
    for ino in inos:
        stored = sum(v.raw_length for _, v in vol.store.volume("v").scan(chunk_prefix(ino)))
        assert fs.getattr(ino).blocks * 512 == -(-stored // 512) * 512
        total += stored
    assert vol.store.get_volume("v").used == total


def patched_file(vol: Volume, chunks: int = 4) -> tuple[int, int, bytearray]:
    """A file of ``chunks`` stored 64 KiB chunks, flushed: (handle, ino, model)."""
    model = bytearray(os.urandom(chunks * 64 * KiB))
    fh, ino = create(vol.fs, b"f")
    vol.fs.write(fh, 0, bytes(model))
    vol.fs.flush()
    return fh, ino, model


def put(fs: Filesystem, fh: int, model: bytearray, off: int, data: bytes) -> None:
    fs.write(fh, off, data)
    model.extend(bytes(max(0, off + len(data) - len(model))))
    model[off : off + len(data)] = data


def reopen_and_check(vol: Volume, handles: list[int], ino: int, model: bytearray) -> Filesystem:
    """Release ``handles``, reopen with an empty cache, check ``ino`` and fsck."""
    for fh in handles:
        vol.fs.release(fh)
    fs = vol.reopen()
    assert read_all(fs, ino) == bytes(model)
    assert fsck(vol.store).clean
    return fs


def test_small_write_into_a_stored_chunk_stores_only_its_bytes(
    make_volume: Callable[..., Volume],
) -> None:
    vol = make_volume(params=CS64)
    fs = vol.fs
    fh, ino, model = patched_file(vol)
    base = chunk_ref(vol.store, ino, 1)
    alloc, used = fs.getattr(ino).blocks, vol.store.get_volume("v").used
    put(fs, fh, model, 64 * KiB + 5000, os.urandom(4 * KiB))
    assert fs.read(fh, 0, len(model)) == bytes(model)  # buffered: the patch is laid over
    fs.flush()
    assert patch_keys(vol.store, ino) == {1: [(5000, 4 * KiB)]}
    assert chunk_ref(vol.store, ino, 1) == base  # the chunk itself is untouched
    assert vol.store.get_volume("v").used == used + 4 * KiB
    assert fs.getattr(ino).blocks == alloc + 8  # st_blocks counts the patch
    reopen_and_check(vol, [fh], ino, model)  # the store's chunk and patch merged on read


def test_patches_are_merged_into_the_chunk_past_their_limits(
    make_volume: Callable[..., Volume],
) -> None:
    vol = make_volume(params=CS64)
    fs = vol.fs
    fh, ino, model = patched_file(vol)
    # One patch per flush, so the limits are met in the commit, against stored ones.
    for i in range(PATCH_MAX):
        put(fs, fh, model, 2 * 64 * KiB + i * 5000, os.urandom(1000))
        fs.flush()
    assert len(patch_keys(vol.store, ino)[2]) == PATCH_MAX
    base = chunk_ref(vol.store, ino, 2)
    put(fs, fh, model, 2 * 64 * KiB + 60000, os.urandom(10))
    fs.flush()
    assert 2 not in patch_keys(vol.store, ino)  # the chunk was rewritten whole
    assert chunk_ref(vol.store, ino, 2) != base
    # 1/PATCH_SHARE of a chunk in patch bytes is the other limit.
    share = 64 * KiB // PATCH_SHARE
    put(fs, fh, model, 3 * 64 * KiB, os.urandom(share - 1000))
    fs.flush()
    assert patch_keys(vol.store, ino)[3] == [(0, share - 1000)]
    put(fs, fh, model, 3 * 64 * KiB + 40000, os.urandom(1001))
    fs.flush()
    assert 3 not in patch_keys(vol.store, ino)
    # In the live layer the limits make a dirty buffer at once.
    for i in range(PATCH_MAX + 1):
        put(fs, fh, model, i * 5000, os.urandom(100))
    fs.flush()
    assert 0 not in patch_keys(vol.store, ino)
    fs = reopen_and_check(vol, [fh], ino, model)
    assert_usage_matches(vol, fs, ino)


def test_patches_cover_overlap_and_absorb_each_other(make_volume: Callable[..., Volume]) -> None:
    vol = make_volume(params=CS64)
    fs = vol.fs
    fh, ino, model = patched_file(vol)
    put(fs, fh, model, 1000, os.urandom(500))
    put(fs, fh, model, 1200, os.urandom(600))  # overlaps the live one in part: one patch
    put(fs, fh, model, 9000, os.urandom(100))
    for off in range(20000, 32000, 4000):  # small sequential writes grow one patch
        put(fs, fh, model, off, os.urandom(4000))
    fs.flush()
    assert patch_keys(vol.store, ino)[0] == [(1000, 800), (9000, 100), (20000, 12000)]
    put(fs, fh, model, 8000, os.urandom(2000))  # covers the stored patch at 9000
    fs.flush()
    assert patch_keys(vol.store, ino)[0] == [(1000, 800), (8000, 2000), (20000, 12000)]
    put(fs, fh, model, 8000, os.urandom(2500))  # same offset, longer: replaces it
    fs.flush()
    assert patch_keys(vol.store, ino)[0] == [(1000, 800), (8000, 2500), (20000, 12000)]
    base = chunk_ref(vol.store, ino, 0)
    put(fs, fh, model, 1500, os.urandom(1000))  # overlaps a stored patch in part
    fs.flush()
    assert 0 not in patch_keys(vol.store, ino)
    assert chunk_ref(vol.store, ino, 0) != base
    reopen_and_check(vol, [fh], ino, model)


def test_zero_writes_truncate_and_punch_over_patches(make_volume: Callable[..., Volume]) -> None:
    vol = make_volume(params=CS64)
    fs = vol.fs
    fh, ino, model = patched_file(vol)
    put(fs, fh, model, 100, bytes(3000))  # zeros are no patch (a hole is not stored)
    put(fs, fh, model, 64 * KiB + 100, os.urandom(3000))
    put(fs, fh, model, 2 * 64 * KiB + 100, os.urandom(3000))
    put(fs, fh, model, 3 * 64 * KiB + 100, os.urandom(3000))
    fs.flush()
    assert set(patch_keys(vol.store, ino)) == {1, 2, 3}
    assert fs.read(fh, 0, 4000) == bytes(model[:4000])
    fs.setattr(ino, size=3 * 64 * KiB + 1000)  # cuts into chunk 3's patch
    del model[3 * 64 * KiB + 1000 :]
    fs.punch_hole(ino, 2 * 64 * KiB, 64 * KiB)  # chunk 2 whole: a hole, patches too
    model[2 * 64 * KiB : 3 * 64 * KiB] = bytes(64 * KiB)
    fs.flush()
    assert set(patch_keys(vol.store, ino)) == {1}
    assert chunk_ref(vol.store, ino, 2) is None
    assert fs.read(fh, 0, len(model) + 10) == bytes(model)
    fs = reopen_and_check(vol, [fh], ino, model)
    fs.unlink(ROOT, b"f")
    fs = vol.reopen()
    assert vol.store.volume("v").scan(chunk_prefix(ino)) == []
    assert fsck(vol.store).clean


def test_copy_range_never_shares_a_patched_chunk(make_volume: Callable[..., Volume]) -> None:
    vol = make_volume(params=CS64)
    fs = vol.fs
    sfh, src, model = patched_file(vol, chunks=2)
    put(fs, sfh, model, 70000, os.urandom(2000))  # chunk 1 of the source has a patch
    dfh, dst = create(fs, b"dst")
    dmodel = bytearray(os.urandom(2 * 64 * KiB))
    put(fs, dfh, dmodel, 0, bytes(dmodel))
    fs.flush()
    put(fs, dfh, dmodel, 100, os.urandom(500))  # and chunk 0 of the destination
    fs.flush()
    assert patch_keys(vol.store, src) == {1: [(70000 - 64 * KiB, 2000)]}
    assert patch_keys(vol.store, dst) == {0: [(100, 500)]}
    assert fs.copy_range(sfh, 0, dfh, 0, 2 * 64 * KiB) == 2 * 64 * KiB
    assert patch_keys(vol.store, dst) == {}
    assert chunk_ref(vol.store, dst, 0) == chunk_ref(vol.store, src, 0)  # shared
    assert chunk_ref(vol.store, dst, 1) != chunk_ref(vol.store, src, 1)  # patched: copied
    assert read_all(fs, dst) == bytes(model)
    put(fs, dfh, model, 200, os.urandom(100))  # over the copy, not the patch it replaced
    fs.flush()
    assert patch_keys(vol.store, dst) == {0: [(200, 100)]}
    assert read_all(fs, dst) == bytes(model)
    assert_usage_matches(vol, fs, src, dst)
    reopen_and_check(vol, [sfh, dfh], dst, model)


def test_snapshots_and_clones_keep_their_patches(make_volume: Callable[..., Volume]) -> None:
    vol = make_volume(params=CS64)
    fs = vol.fs
    fh, ino, model = patched_file(vol, chunks=2)
    put(fs, fh, model, 3000, os.urandom(1000))
    fs.flush()
    vol.store.create_snapshot("v", "s1")
    then = bytes(model)
    put(fs, fh, model, 3500, os.urandom(2000))  # covers nothing: rewrites chunk 0 whole
    put(fs, fh, model, 64 * KiB + 10, os.urandom(10))
    fs.flush()
    vol.store.clone_snapshot("s1", "c1")
    snap = Filesystem(vol.store.snapshot("s1"))
    assert read_all(snap, ino) == then
    clone = Filesystem(vol.store.volume("c1"))
    assert read_all(clone, ino) == then
    reopen_and_check(vol, [fh], ino, model)


def test_a_filesystem_from_before_patches_is_upgraded_when_opened_for_writing(
    make_volume: Callable[..., Volume],
) -> None:
    vol = make_volume(params=CS64)
    fh, ino, model = patched_file(vol)
    vol.fs.release(fh)
    vol.fs.close()
    sb = Superblock.unpack(vol.store.volume("v").get(SUPERBLOCK_KEY))  # type: ignore[arg-type]
    assert sb.format == FORMAT == 2
    vol.store.volume("v").put(SUPERBLOCK_KEY, replace(sb, format=1).pack())
    ro = Filesystem(vol.store.volume("v"), read_only=True)  # read as it is, not changed
    assert read_all(ro, ino) == bytes(model)
    assert Superblock.unpack(vol.store.volume("v").get(SUPERBLOCK_KEY)).format == 1  # type: ignore[arg-type]
    fs = vol.reopen(clean=False)
    assert Superblock.unpack(vol.store.volume("v").get(SUPERBLOCK_KEY)).format == 2  # type: ignore[arg-type]
    assert read_all(fs, ino) == bytes(model)
    vol.store.volume("v").put(SUPERBLOCK_KEY, replace(sb, format=3).pack())
    with pytest.raises(FsError, match="format 3 is not supported") as info:
        Filesystem(vol.store.volume("v"))
    assert info.value.errno == errno.EIO


def test_dirty_buffers_are_bounded(make_volume: Callable[..., Volume]) -> None:
    vol = make_volume(dirty_limit=64 * KiB)
    fs = vol.fs
    fh, _ = create(fs, b"stream")
    for i in range(64):
        fs.write(fh, i * 8192, os.urandom(8192))
        assert fs.data.pending_bytes() <= 64 * KiB
    assert vol.store.get_volume("v").used >= 400 * KiB  # flushed on the way, not at the end


# -- space ------------------------------------------------------------------------------------
def test_enospc_at_write_time_and_nothing_lost(make_volume: Callable[..., Volume]) -> None:
    vol = make_volume(capacity=256 * KiB)
    fs = vol.fs
    first = os.urandom(200 * KiB)
    fh, ino = create(fs, b"a")
    fs.write(fh, 0, first)
    assert errno_from(lambda: fs.write(fh, 200 * KiB, os.urandom(100 * KiB))) == errno.ENOSPC
    fs.write(fh, 0, os.urandom(10))  # overwriting in place needs no new space
    fs.write(fh, 0, first[:10])
    fs.release(fh)
    fs = vol.reopen()
    assert read_all(fs, ino) == first
    fs.unlink(ROOT, b"a")
    write_file(fs, b"b", os.urandom(250 * KiB))  # space of the unlinked file is reusable
    st = fs.statfs()
    assert st.blocks == 64 and st.bfree <= 2
    assert fsck(vol.store).clean


def nearly_full_of_patches(
    make_volume: Callable[..., Volume],
) -> tuple[Volume, Filesystem, int, int, bytearray]:
    """A 1 MiB volume holding 14 chunks of 64 KiB with two 4 KiB patches each: 112 KiB of
    patches, 16 KiB left. Returns (vol, fs, fh, ino, model)."""
    vol = make_volume(capacity=1 * MiB, params=CS64)
    fs = vol.fs
    fh, ino = create(fs, b"f")
    model = bytearray()
    put(fs, fh, model, 0, os.urandom(14 * 64 * KiB))
    fs.flush()
    for rnd in range(2):
        for index in range(14):
            put(fs, fh, model, index * 64 * KiB + rnd * 8 * KiB, os.urandom(4 * KiB))
        fs.flush()
    return vol, fs, fh, ino, model


def test_a_full_volume_gives_patch_bytes_back_to_writers(
    make_volume: Callable[..., Volume],
) -> None:
    vol, fs, fh, ino, model = nearly_full_of_patches(make_volume)
    assert sum(len(p) for p in patch_keys(vol.store, ino).values()) == 28
    # 64 KiB more file data fits the capacity: the patches are merged to make room.
    put(fs, fh, model, len(model), os.urandom(64 * KiB))
    fs.flush()
    assert patch_keys(vol.store, ino) == {}
    assert vol.store.get_volume("v").used == 15 * 64 * KiB
    assert fs.getattr(ino).blocks * 512 == 15 * 64 * KiB
    put(fs, fh, model, 100, os.urandom(4 * KiB))  # commits learn the merged chunks anew
    fs.flush()
    assert patch_keys(vol.store, ino) == {0: [(100, 4 * KiB)]}
    assert_usage_matches(vol, fs, ino)
    put(fs, fh, model, 100, bytes(4 * KiB))
    fs.flush()
    # Full to the last byte: overwriting in place still works (no patch, no new space).
    put(fs, fh, model, len(model), os.urandom(64 * KiB))
    fs.flush()
    put(fs, fh, model, 5 * 64 * KiB + 100, os.urandom(4 * KiB))
    fs.flush()
    assert patch_keys(vol.store, ino) == {}
    assert errno_from(lambda: fs.write(fh, len(model), b"x")) == errno.ENOSPC
    fs.release(fh)
    fs = vol.reopen()
    assert read_all(fs, ino) == bytes(model)
    assert fs.getattr(ino).blocks * 512 == 16 * 64 * KiB
    assert fsck(vol.store).clean


def test_a_full_volume_merges_only_the_patches_a_write_needs(
    make_volume: Callable[..., Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filedata, "MERGE_SLACK", 0)
    monkeypatch.setattr(filedata, "MERGE_BATCH", 2)
    vol, fs, fh, ino, model = nearly_full_of_patches(make_volume)
    # 20 KiB more may need 84 KiB (a chunk besides): 68 KiB short, 5 batches of 2 chunks.
    put(fs, fh, model, len(model), os.urandom(20 * KiB))
    fs.flush()
    assert sorted(patch_keys(vol.store, ino)) == [10, 11, 12, 13]
    assert_usage_matches(vol, fs, ino)
    for index in (0, 1):  # new patches behind where the merging stopped
        put(fs, fh, model, index * 64 * KiB + 32 * KiB, os.urandom(4 * KiB))
    fs.flush()
    # More than every patch gives back: merging resumes at chunk 10, goes round to
    # chunks 0 and 1, and the write still fails with nothing lost.
    assert errno_from(lambda: fs.write(fh, len(model), os.urandom(200 * KiB))) == errno.ENOSPC
    assert patch_keys(vol.store, ino) == {}
    assert_usage_matches(vol, fs, ino)
    fs = reopen_and_check(vol, [fh], ino, model)
    assert fs.getattr(ino).blocks * 512 == vol.store.get_volume("v").used


def test_statfs_reports_capacity_and_usage(vol: Volume) -> None:
    st = vol.fs.statfs()
    assert (st.bsize, st.frsize, st.namemax) == (4096, 4096, 255)
    assert st.blocks * 4096 == 64 * MiB
    assert st.bfree == st.bavail == st.blocks
    write_file(vol.fs, b"x", os.urandom(1 * MiB))
    assert vol.fs.statfs().bfree == st.blocks - 256  # counted before the flush, too
    vol.fs.flush()
    st2 = vol.fs.statfs()
    assert st2.bfree == st.blocks - 256
    assert st2.files > st2.ffree > 0


# -- directories ------------------------------------------------------------------------------
def test_mkdir_rmdir_and_directory_link_counts(vol: Volume) -> None:
    fs = vol.fs
    d = fs.mkdir(ROOT, b"d", 0o755, CTX)
    assert d.nlink == 2 and fs.getattr(ROOT).nlink == 3
    sub = fs.mkdir(d.ino, b"sub", 0o700, CTX)
    write_file(fs, b"file", b"x", parent=d.ino)
    assert fs.getattr(d.ino).nlink == 3  # files do not count
    assert errno_from(lambda: fs.rmdir(ROOT, b"d")) == errno.ENOTEMPTY
    assert errno_from(lambda: fs.rmdir(d.ino, b"file")) == errno.ENOTDIR
    assert errno_from(lambda: fs.unlink(d.ino, b"sub")) == errno.EISDIR
    assert errno_from(lambda: fs.mkdir(ROOT, b"d", 0o755, CTX)) == errno.EEXIST
    fs.rmdir(d.ino, b"sub")
    assert fs.getattr(d.ino).nlink == 2
    assert fs.getattr(sub.ino).nlink == 0
    assert fs.lookup(d.ino, b"..").ino == ROOT
    fs = vol.reopen()
    assert names(fs, fs.lookup(ROOT, b"d").ino) == [b"file"]
    assert fs.getattr(ROOT).nlink == 3


def test_readdir_offsets_survive_changes(vol: Volume) -> None:
    fs = vol.fs
    for i in range(300):
        write_file(fs, b"f%03d" % i, b"")
    fh = fs.opendir(ROOT)
    first = []
    last = 0
    for name, _, cookie in fs.readdir(fh, 0):
        first.append(name)
        last = cookie
        if len(first) == 100:
            break
    for i in range(0, 300, 3):  # remove a third, seen or not, and add new ones
        fs.unlink(ROOT, b"f%03d" % i)
    for i in range(50):
        write_file(fs, b"new%02d" % i, b"")
    rest = [name for name, _, _ in fs.readdir(fh, last)]
    fs.releasedir(fh)
    seen = first + rest
    assert len(seen) == len(set(seen))
    survivors = {b"f%03d" % i for i in range(300) if i % 3}
    assert survivors <= set(seen)
    fs = vol.reopen()
    assert set(names(fs)) == survivors | {b"new%02d" % i for i in range(50)}


def test_names_longer_than_255_bytes_fail(vol: Volume) -> None:
    fs = vol.fs
    write_file(fs, b"n" * 255, b"ok")
    assert errno_from(lambda: fs.create(ROOT, b"n" * 256, 0o644, 0, CTX)) == errno.ENAMETOOLONG
    assert errno_from(lambda: fs.lookup(ROOT, b"n" * 256)) == errno.ENAMETOOLONG
    assert errno_from(lambda: fs.mkdir(ROOT, b"m" * 300, 0o755, CTX)) == errno.ENAMETOOLONG


# -- rename -----------------------------------------------------------------------------------
def test_rename_over_file_and_empty_directory(vol: Volume) -> None:
    fs = vol.fs
    a = write_file(fs, b"a", b"AAA")
    b = write_file(fs, b"b", b"BBB")
    fs.rename(ROOT, b"a", ROOT, b"b")
    assert fs.lookup(ROOT, b"b").ino == a
    assert errno_from(lambda: fs.lookup(ROOT, b"a")) == errno.ENOENT
    fs.forget(b, 1)  # the kernel lets the replaced inode go
    fs.flush()
    assert vol.store.volume("v").get(inode_key(b)) is None
    d1 = fs.mkdir(ROOT, b"d1", 0o755, CTX)
    d2 = fs.mkdir(ROOT, b"d2", 0o755, CTX)
    inner = fs.mkdir(d1.ino, b"inner", 0o755, CTX)
    fs.rename(ROOT, b"d2", d1.ino, b"inner")  # over an empty directory
    assert fs.lookup(d1.ino, b"inner").ino == d2.ino
    assert fs.getattr(inner.ino).nlink == 0
    assert fs.getattr(d1.ino).nlink == 3 and fs.getattr(ROOT).nlink == 3
    assert fs.lookup(d2.ino, b"..").ino == d1.ino
    assert read_all(fs, a) == b"AAA"


def test_rename_errors(vol: Volume) -> None:
    fs = vol.fs
    write_file(fs, b"f", b"")
    d = fs.mkdir(ROOT, b"d", 0o755, CTX)
    sub = fs.mkdir(d.ino, b"sub", 0o755, CTX)
    full = fs.mkdir(ROOT, b"full", 0o755, CTX)
    write_file(fs, b"x", b"", parent=full.ino)
    assert errno_from(lambda: fs.rename(ROOT, b"d", ROOT, b"f")) == errno.ENOTDIR
    assert errno_from(lambda: fs.rename(ROOT, b"f", ROOT, b"d")) == errno.EISDIR
    assert errno_from(lambda: fs.rename(ROOT, b"d", ROOT, b"full")) == errno.ENOTEMPTY
    assert errno_from(lambda: fs.rename(ROOT, b"d", sub.ino, b"loop")) == errno.EINVAL
    assert errno_from(lambda: fs.rename(ROOT, b"d", d.ino, b"self")) == errno.EINVAL
    assert errno_from(lambda: fs.rename(ROOT, b"f", ROOT, b"full", RENAME_NOREPLACE)) == (
        errno.EEXIST
    )
    assert errno_from(lambda: fs.rename(ROOT, b"f", ROOT, b"none", RENAME_EXCHANGE)) == (
        errno.ENOENT
    )
    assert errno_from(lambda: fs.rename(ROOT, b"f", ROOT, b"g", 3)) == errno.EINVAL
    assert errno_from(lambda: fs.rename(ROOT, b"missing", ROOT, b"g")) == errno.ENOENT
    fs.rename(ROOT, b"f", ROOT, b"g", RENAME_NOREPLACE)
    assert names(fs) == [b"d", b"full", b"g"]


def test_rename_exchange_swaps_file_and_directory(vol: Volume) -> None:
    fs = vol.fs
    a = fs.mkdir(ROOT, b"a", 0o755, CTX)
    b = fs.mkdir(ROOT, b"b", 0o755, CTX)
    f = write_file(fs, b"f", b"data", parent=a.ino)
    sub = fs.mkdir(b.ino, b"sub", 0o755, CTX)
    fs.rename(a.ino, b"f", b.ino, b"sub", RENAME_EXCHANGE)
    assert fs.lookup(a.ino, b"f").ino == sub.ino
    assert fs.lookup(b.ino, b"sub").ino == f
    assert fs.lookup(sub.ino, b"..").ino == a.ino
    assert fs.getattr(a.ino).nlink == 3 and fs.getattr(b.ino).nlink == 2
    fs = vol.reopen()
    assert fs.lookup(fs.lookup(ROOT, b"a").ino, b"f").mode & stat.S_IFDIR


def test_rename_between_hard_links_of_one_inode_does_nothing(vol: Volume) -> None:
    fs = vol.fs
    ino = write_file(fs, b"one", b"x")
    fs.link(ino, ROOT, b"two")
    fs.rename(ROOT, b"one", ROOT, b"two")
    assert names(fs) == [b"one", b"two"]
    assert fs.getattr(ino).nlink == 2


# -- links, special files, metadata ------------------------------------------------------------
def test_hard_links_share_one_inode(vol: Volume) -> None:
    fs = vol.fs
    ino = write_file(fs, b"orig", b"shared")
    d = fs.mkdir(ROOT, b"d", 0o755, CTX)
    assert fs.link(ino, d.ino, b"alias").nlink == 2
    fs.setattr(ino, mode=0o600, uid=1000)
    alias = fs.lookup(d.ino, b"alias")
    assert (alias.ino, alias.mode & 0o777, alias.uid, alias.nlink) == (ino, 0o600, 1000, 2)
    assert errno_from(lambda: fs.link(d.ino, ROOT, b"dirlink")) == errno.EPERM
    fs.unlink(ROOT, b"orig")
    assert fs.getattr(ino).nlink == 1
    assert read_all(fs, ino) == b"shared"
    fs = vol.reopen()
    assert read_all(fs, fs.lookup(fs.lookup(ROOT, b"d").ino, b"alias").ino) == b"shared"


def test_symlinks_and_special_files(vol: Volume) -> None:
    fs = vol.fs
    link = fs.symlink(ROOT, b"l", b"../some/where", CTX)
    assert stat.S_ISLNK(link.mode) and link.size == len(b"../some/where")
    assert fs.readlink(link.ino) == b"../some/where"
    too_long = b"t" * 4096
    assert errno_from(lambda: fs.symlink(ROOT, b"l2", too_long, CTX)) == errno.ENAMETOOLONG
    fifo = fs.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o644, 0, CTX)
    sock = fs.mknod(ROOT, b"sock", stat.S_IFSOCK | 0o755, 0, CTX)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_ISSOCK(sock.mode)
    assert errno_from(lambda: fs.readlink(fifo.ino)) == errno.EINVAL
    fs = vol.reopen()
    assert fs.readlink(fs.lookup(ROOT, b"l").ino) == b"../some/where"
    assert stat.S_ISFIFO(fs.lookup(ROOT, b"fifo").mode)


def test_times_in_nanoseconds_and_ctime_on_change(vol: Volume) -> None:
    fs = vol.fs
    ino = write_file(fs, b"t", b"x")
    fs.setattr(ino, atime_ns=1_234_567_891_123_456_789, mtime_ns=987_654_321_000_000_001)
    a = fs.getattr(ino)
    assert (a.atime_ns, a.mtime_ns) == (1_234_567_891_123_456_789, 987_654_321_000_000_001)
    ctime = a.ctime_ns
    fs.setattr(ino, mode=0o640)
    assert fs.getattr(ino).ctime_ns > ctime
    assert fs.getattr(ino).mtime_ns == 987_654_321_000_000_001  # chmod keeps mtime
    parent_mtime = fs.getattr(ROOT).mtime_ns
    write_file(fs, b"u", b"")
    assert fs.getattr(ROOT).mtime_ns > parent_mtime
    fs = vol.reopen()
    a = fs.lookup(ROOT, b"t")
    assert (a.atime_ns, a.mtime_ns, a.mode & 0o777) == (
        1_234_567_891_123_456_789,
        987_654_321_000_000_001,
        0o640,
    )


def test_setgid_directory_passes_its_group_on(vol: Volume) -> None:
    fs = vol.fs
    d = fs.mkdir(ROOT, b"g", 0o2775, Ctx(0, 50))
    f = fs.create(d.ino, b"f", 0o644, 0, Ctx(1000, 1000))[1]
    sub = fs.mkdir(d.ino, b"sub", 0o755, Ctx(1000, 1000))
    assert (f.uid, f.gid) == (1000, 50)
    assert sub.gid == 50 and sub.mode & stat.S_ISGID


def test_xattrs(vol: Volume) -> None:
    fs = vol.fs
    ino = write_file(fs, b"x", b"")
    assert errno_from(lambda: fs.getxattr(ino, b"user.a")) == errno.ENODATA
    fs.setxattr(ino, b"user.a", b"1")
    fs.setxattr(ino, b"user.b", b"\0binary\xff")
    assert errno_from(lambda: fs.setxattr(ino, b"user.a", b"2", XATTR_CREATE)) == errno.EEXIST
    assert errno_from(lambda: fs.setxattr(ino, b"user.c", b"2", XATTR_REPLACE)) == errno.ENODATA
    fs.setxattr(ino, b"user.a", b"2", XATTR_REPLACE)
    assert fs.listxattr(ino) == [b"user.a", b"user.b"]
    fs.removexattr(ino, b"user.b")
    assert errno_from(lambda: fs.removexattr(ino, b"user.b")) == errno.ENODATA
    fs = vol.reopen()
    ino = fs.lookup(ROOT, b"x").ino
    assert fs.getxattr(ino, b"user.a") == b"2"
    assert fs.listxattr(ino) == [b"user.a"]


# -- lifetime of inodes -----------------------------------------------------------------------
def test_unlinked_open_file_keeps_its_data_until_released(vol: Volume) -> None:
    fs = vol.fs
    data = os.urandom(10000)
    fh, ino = create(fs, b"tmp")
    fs.write(fh, 0, data)
    fs.unlink(ROOT, b"tmp")
    fs.flush()
    assert vol.store.volume("v").get(orphan_key(ino)) == b""
    assert fs.read(fh, 0, 20000) == data
    fs.write(fh, 10000, b"more")
    assert fs.getattr(ino).nlink == 0
    fs.release(fh)
    assert fs.getattr(ino).size == 10004  # the kernel still holds a lookup
    fs.forget(ino, 1)
    fs.flush()
    view = vol.store.volume("v")
    assert view.get(inode_key(ino)) is None and view.get(orphan_key(ino)) is None
    assert stored_chunks(vol.store, ino) == []
    assert vol.store.get_volume("v").used == 0


def test_orphans_of_a_crashed_process_are_released_on_open(vol: Volume) -> None:
    fs = vol.fs
    fh, ino = create(fs, b"tmp")
    fs.write(fh, 0, os.urandom(50000))
    fs.unlink(ROOT, b"tmp")
    fs.flush()  # the orphan is on disk; then the process "dies" with the file open
    assert vol.store.get_volume("v").used == 50000
    vol.reopen(clean=False)
    assert vol.store.volume("v").get(inode_key(ino)) is None
    assert vol.store.get_volume("v").used == 0
    assert fsck(vol.store).clean


def test_unflushed_changes_are_lost_in_a_crash_but_flushed_ones_stay(vol: Volume) -> None:
    fs = vol.fs
    write_file(fs, b"kept", b"durable")
    fs.flush()
    write_file(fs, b"lost", b"volatile")
    fs = vol.reopen(clean=False)
    assert names(fs) == [b"kept"]
    assert read_all(fs, fs.lookup(ROOT, b"kept").ino) == b"durable"
    assert fsck(vol.store).clean


# -- read-only views, snapshots, block volumes ---------------------------------------------------
def test_read_only_and_snapshot_views_refuse_writes(vol: Volume) -> None:
    fs = vol.fs
    ino = write_file(fs, b"f", b"v1")
    fs.flush()
    vol.store.create_snapshot("v", "s1")
    fh = fs.open(ino, os.O_WRONLY)
    fs.write(fh, 0, b"v2")
    fs.release(fh)
    fs.flush()
    snap = Filesystem(vol.store.snapshot("s1"))
    assert snap.read_only
    assert read_all(snap, snap.lookup(ROOT, b"f").ino) == b"v1"
    assert errno_from(lambda: snap.create(ROOT, b"new", 0o644, 0, CTX)) == errno.EROFS
    assert errno_from(lambda: snap.open(ino, os.O_RDWR)) == errno.EROFS
    assert errno_from(lambda: snap.setxattr(ino, b"user.x", b"")) == errno.EROFS
    ro = Filesystem(vol.store.volume("v"), read_only=True)
    assert read_all(ro, ino) == b"v2"
    assert errno_from(lambda: ro.setattr(ino, size=0)) == errno.EROFS
    assert errno_from(lambda: ro.unlink(ROOT, b"f")) == errno.EROFS


def test_snapshot_of_a_never_mounted_volume_is_an_empty_tree(vol: Volume) -> None:
    vol.store.create_volume("empty", 1 * MiB)
    vol.store.create_snapshot("empty", "s")
    fs = Filesystem(vol.store.snapshot("s"))
    assert names(fs) == []
    assert stat.S_ISDIR(fs.getattr(ROOT).mode)
    assert vol.store.snapshot("s").scan() == []  # nothing was written


def test_block_volume_holds_a_sparse_disk_image_that_grows(store_dir: Path) -> None:
    with Store(store_dir) as store:
        store.create_volume("b", 8 * MiB, mode=MODE_BLOCK)
        fs = Filesystem(store.volume("b"))
        img = fs.lookup(ROOT, b"disk.img")
        assert names(fs) == [b"disk.img"] and img.size == 8 * MiB and img.blocks == 0
        fh = fs.open(img.ino, os.O_RDWR)
        fs.write(fh, 4 * MiB, b"superblock")
        fs.release(fh)
        store.expand_volume("b", 16 * MiB)
        fs.refresh()
        assert fs.getattr(img.ino).size == 16 * MiB
        fs.close()
        fs = Filesystem(store.volume("b"))
        fh = fs.open(img.ino, os.O_RDONLY)
        assert fs.read(fh, 4 * MiB, 10) == b"superblock"
        assert fs.getattr(img.ino).size == 16 * MiB


def test_bad_volume_parameters_are_clear_errors(store_dir: Path) -> None:
    with Store(store_dir) as store:
        store.create_volume("odd", MiB, parameters={"chunk_size": "1000"})
        store.create_volume("nan", MiB, parameters={"compression_level": "high"})
        with pytest.raises(FsError) as info:
            Filesystem(store.volume("odd"))
        assert info.value.errno == errno.EINVAL and "chunk_size" in str(info.value)
        with pytest.raises(FsError) as info:
            Filesystem(store.volume("nan"))
        assert "compression_level" in str(info.value)


def test_every_store_error_maps_to_an_errno() -> None:
    from blockstore import OutOfRange, StoreError

    assert errno_of(OutOfRange("x")) == errno.EINVAL
    assert errno_of(StoreError("x")) == errno.EIO
    assert set(ERRNO_OF_STORE_ERROR.values()) >= {errno.ENOENT, errno.ENOSPC, errno.EROFS}
