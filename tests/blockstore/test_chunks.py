"""Chunks and the chunk paths: codecs, hashes, holes, size limits, release, fsck.

Unit tests of ``blockstore/chunks.py`` and of what the store does with chunks:
incompressible data is stored raw, compressible data with the store's zstd
level, every read is verified against the hash (a damaged record raises
``Corrupt``, never returns wrong bytes), all-zero data is a hole, and oversized
chunks are refused. Release of a large dead layer proceeds in bounded steps, and
``fsck`` finds and repairs what can be repaired while only reporting what
cannot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import lmdb
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockstore import (
    HOLE,
    MAX_CHUNK_SIZE,
    ChunkRef,
    Corrupt,
    InvalidArgument,
    NotFound,
    Store,
    fsck,
)
from blockstore import chunks as ch
from blockstore import layers as ly
from blockstore.segments import aligned, pack_location, unpack_location

log = logging.getLogger(__name__)

TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(800))


@pytest.fixture
def store(store_dir: Path) -> Iterator[Store]:
    s = Store(store_dir)
    try:
        yield s
    finally:
        s.close()


def raw_record(store: Store, digest: bytes) -> bytes:
    path, offset, length = store.locate_chunk(digest)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_record(store: Store, digest: bytes, record: bytes) -> None:
    """Make the store find ``record`` as ``digest``'s stored bytes, behind its back.

    An existing record is overwritten in place when it fits its slot; otherwise the
    bytes are appended to a segment the way the store appends them.
    """
    with store.env.begin() as txn:
        location = txn.get(digest, db=store.dbs.chunks)
    if location is not None:
        seg, offset, length = unpack_location(location)
        if aligned(len(record)) <= aligned(max(length, 1)):
            store.segments.write(seg, offset, record)
            write_behind(store, store.dbs.chunks, digest, pack_location(seg, offset, len(record)))
            return
    with store._write() as t:
        t.txn.put(digest, t.append(record), db=store.dbs.chunks)


def write_behind(store: Store, db: object, key: bytes, value: bytes | None) -> None:
    """Change one record behind the store's back, as damage or a bug would."""
    with store.env.begin(write=True) as txn:
        if value is None:
            assert txn.delete(key, db=db)
        else:
            txn.put(key, value, db=db)


def empty(store: Store) -> bool:
    st = store.stats()
    return (st.chunk_count, st.entries, st.layers, st.stored_bytes, st.gc_pending_layers) == (
        0,
        0,
        0,
        0,
        0,
    )


def delete_everything(store: Store) -> None:
    for snap in store.list_snapshots():
        store.delete_snapshot(snap.name)
    for vol in store.list_volumes():
        store.delete_volume(vol.name)
    store.gc()


# -- prepare / decode -------------------------------------------------------


def test_incompressible_data_is_stored_raw(store: Store) -> None:
    data = os.urandom(65536)
    prep = ch.prepare(data)
    assert (prep.codec, prep.payload, prep.raw_length) == (ch.CODEC_RAW, data, len(data))
    assert prep.digest == ch.digest_of(data)
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    v.put_chunk(b"k", data)
    assert raw_record(store, prep.digest) == bytes((ch.CODEC_RAW,)) + data
    assert store.stats().stored_bytes == len(data) + 1
    assert v.read_chunk(b"k") == data


def test_text_is_compressed(store: Store) -> None:
    prep = store.prepare_chunk(TEXT)
    assert prep.codec == ch.CODEC_ZSTD
    assert len(prep.payload) < len(TEXT) // 4
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    v.put_chunk(b"k", prep)
    st = store.stats()
    assert st.unique_raw_bytes == len(TEXT)
    assert st.stored_bytes == len(prep.payload) + 1
    assert st.compression_ratio > 4
    assert v.read_chunk(b"k") == TEXT
    assert ch.decode(prep.digest, raw_record(store, prep.digest), len(TEXT)) == TEXT


def test_compression_that_saves_too_little_is_dropped() -> None:
    # 4 KiB of random bytes plus a short compressible tail: zstd saves a few bytes,
    # less than the 1/32 the codec demands.
    data = os.urandom(4096) + b"a" * 64
    prep = ch.prepare(data)
    assert prep.codec == ch.CODEC_RAW


@pytest.mark.parametrize(
    ("name", "data", "codec"),
    [
        ("random", os.urandom(65536), ch.CODEC_RAW),
        ("text", TEXT[:65536], ch.CODEC_ZSTD),
        ("zeros then random", bytes(32768) + os.urandom(32768), ch.CODEC_ZSTD),
        ("random then text", os.urandom(32768) + TEXT[:32768], ch.CODEC_ZSTD),
        ("one random block repeated", os.urandom(16384) * 4, ch.CODEC_ZSTD),
        ("small random", os.urandom(8192), ch.CODEC_RAW),
        ("small text", TEXT[:8192], ch.CODEC_ZSTD),
    ],
)
def test_the_probe_skips_compressing_only_incompressible_chunks(
    name: str, data: bytes, codec: int
) -> None:
    prep = ch.prepare(data, 3)
    assert prep.codec == codec, name
    assert ch.decode(prep.digest, bytes((prep.codec,)) + prep.payload, len(data)) == data
    if codec == ch.CODEC_ZSTD:
        assert len(prep.payload) <= len(data) * 31 / 32


def test_the_probe_judges_large_chunks_only() -> None:
    assert ch.looks_incompressible(os.urandom(65536))
    assert not ch.looks_incompressible(TEXT[:65536])
    assert not ch.looks_incompressible(os.urandom(8192)), "small chunks are compressed outright"


def test_compression_level_comes_from_the_store(store_dir: Path) -> None:
    with Store(store_dir, compression_level=0) as s:
        assert s.compression_level == 0
        assert s.prepare_chunk(TEXT).codec == ch.CODEC_RAW
        # An explicit level overrides the store's.
        assert s.prepare_chunk(TEXT, level=1).codec == ch.CODEC_ZSTD
        s.create_volume("v", 1 << 20)
        s.volume("v").put_chunk(b"raw", TEXT)
    # Reopening without a level keeps the stored one.
    with Store(store_dir) as s:
        assert s.compression_level == 0
    with Store(store_dir, compression_level=19) as s:
        assert s.compression_level == 19
        prep = s.prepare_chunk(TEXT + b"!")
        assert prep.payload == zstandard.ZstdCompressor(level=19).compress(TEXT + b"!")
        s.volume("v").put_chunk(b"z19", prep)
    with Store(store_dir) as s:
        assert s.compression_level == 19
        # Chunks written at either level read back alike.
        v = s.volume("v")
        assert v.read_chunk(b"raw") == TEXT
        assert v.read_chunk(b"z19") == TEXT + b"!"
        assert fsck(s).clean


def test_a_new_store_hashes_chunks_with_blake3(store: Store) -> None:
    assert store.chunk_hash == "blake3"
    store.create_volume("v", 1 << 20)
    store.volume("v").put_chunk(b"k", TEXT)
    ref = store.volume("v").get(b"k")
    assert isinstance(ref, ChunkRef)
    assert ref.digest == blake3.blake3(TEXT).digest()
    assert ref.digest != hashlib.sha256(TEXT).digest()


@pytest.mark.parametrize("made_with", ["sha256", "blake3"])
def test_a_store_keeps_the_hash_it_was_made_with(store_dir: Path, made_with: str) -> None:
    with Store(store_dir, chunk_hash=made_with) as s:
        s.create_volume("v", 1 << 20)
        s.volume("v").put_chunk(b"a", TEXT)
    other = "blake3" if made_with == "sha256" else "sha256"
    # The argument applies to new stores only: reopening never rehashes or misreads.
    with Store(store_dir, chunk_hash=other) as s:
        assert s.chunk_hash == made_with
        v = s.volume("v")
        v.put_chunk(b"b", TEXT)  # the same bytes dedup against the first chunk
        assert s.stats().chunk_count == 1
        ref = v.get(b"b")
        assert isinstance(ref, ChunkRef)
        assert ref.digest == ch.digest_of(TEXT, made_with)
        assert v.read_chunk(b"a") == v.read_chunk(b"b") == TEXT
        assert fsck(s).clean


def test_a_store_made_before_the_hash_was_recorded_is_read_as_sha256(store_dir: Path) -> None:
    with Store(store_dir, chunk_hash="sha256") as s:
        s.create_volume("v", 1 << 20)
        s.volume("v").put_chunk(b"a", TEXT)
        write_behind(s, s.dbs.meta, b"chunk_hash", None)
    with Store(store_dir) as s:
        assert s.chunk_hash == "sha256"
        assert s.volume("v").read_chunk(b"a") == TEXT
        assert fsck(s).clean


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_store_that_cannot_be_used_is_not_left_open(store_dir: Path) -> None:
    with Store(store_dir) as s:
        write_behind(s, s.dbs.meta, b"format", struct.pack(">Q", 99))
    before = open_fds()
    failures = []  # kept: a traceback keeps the half-made store alive, closed or not
    for _ in range(3):
        with pytest.raises(InvalidArgument, match="store format 99 is not supported") as info:
            Store(store_dir)
        failures.append(info)
    assert open_fds() == before  # the LMDB environment was closed, not left to the GC
    with lmdb.open(str(store_dir), max_dbs=16) as env, env.begin(write=True) as txn:
        # Put the format back by hand: the store opens again.
        txn.put(b"format", struct.pack(">Q", 1), db=env.open_db(b"meta", txn=txn))
    with Store(store_dir) as s:
        assert s.chunk_hash == "blake3"


def test_an_unknown_chunk_hash_is_refused(store_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown chunk hash 'md5'"):
        Store(store_dir, chunk_hash="md5")
    with Store(store_dir) as s:
        write_behind(s, s.dbs.meta, b"chunk_hash", b"crc32")
    with pytest.raises(Corrupt, match="unknown chunk hash 'crc32'"):
        Store(store_dir)


def test_same_data_at_two_levels_is_one_chunk(store_dir: Path) -> None:
    """Dedup is on the raw bytes: the stored codec of the first writer wins."""
    with Store(store_dir, compression_level=0) as s:
        s.create_volume("v", 1 << 20)
        s.volume("v").put_chunk(b"a", TEXT)
    with Store(store_dir, compression_level=3) as s:
        v = s.volume("v")
        v.put_chunk(b"b", TEXT)
        st = s.stats()
        assert (st.chunk_count, st.referenced_raw_bytes) == (1, 2 * len(TEXT))
        assert st.stored_bytes == len(TEXT) + 1
        assert v.read_chunk(b"a") == v.read_chunk(b"b") == TEXT


# -- verification on read ----------------------------------------------------


def _damage_flip_last(stored: bytes, other: bytes) -> bytes:
    return stored[:-1] + bytes((stored[-1] ^ 0x01,))


def _damage_flip_first_payload(stored: bytes, other: bytes) -> bytes:
    return stored[:1] + bytes((stored[1] ^ 0x80,)) + stored[2:]


def _damage_truncate(stored: bytes, other: bytes) -> bytes:
    return stored[: len(stored) // 2]


def _damage_empty(stored: bytes, other: bytes) -> bytes:
    return b""


def _damage_unknown_codec(stored: bytes, other: bytes) -> bytes:
    return b"\x07" + stored[1:]


def _damage_swap(stored: bytes, other: bytes) -> bytes:
    # A well-formed record of other data: decodes fine, hash must catch it.
    return other


def _damage_other_codec(stored: bytes, other: bytes) -> bytes:
    return bytes((ch.CODEC_ZSTD if stored[0] == ch.CODEC_RAW else ch.CODEC_RAW,)) + stored[1:]


DAMAGES = [
    _damage_flip_last,
    _damage_flip_first_payload,
    _damage_truncate,
    _damage_empty,
    _damage_unknown_codec,
    _damage_swap,
    _damage_other_codec,
]


@pytest.mark.parametrize("compressible", [False, True], ids=["raw", "zstd"])
@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__[8:])
def test_damaged_chunk_reads_raise_corrupt(
    store: Store, compressible: bool, damage: object
) -> None:
    assert callable(damage)
    data = TEXT if compressible else os.urandom(8192)
    other = TEXT[::-1] if compressible else os.urandom(8192)
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    v.put_chunk(b"k", data)
    v.put_chunk(b"other", other)
    ref = v.get(b"k")
    assert isinstance(ref, ChunkRef)
    other_ref = v.get(b"other")
    assert isinstance(other_ref, ChunkRef)
    stored = raw_record(store, ref.digest)
    assert stored[0] == (ch.CODEC_ZSTD if compressible else ch.CODEC_RAW)
    write_record(store, ref.digest, damage(stored, raw_record(store, other_ref.digest)))
    with pytest.raises(Corrupt):
        v.read_chunk(b"k")
    with pytest.raises(Corrupt):
        store.read_chunk(ref)
    assert v.read_chunk(b"other") == other
    report = fsck(store, repair=True)
    assert report.unfixable, "a corrupt chunk is reported"
    # ... and not repaired away: the reference and the failing read stay.
    assert v.get(b"k") == ref
    with pytest.raises(Corrupt):
        v.read_chunk(b"k")


# -- reading many chunks at once -------------------------------------------------


def test_read_chunks_returns_each_chunk_in_the_order_asked(store: Store) -> None:
    store.create_volume("v", 64 << 20)
    v = store.volume("v")
    datas = {b"k%03d" % i: os.urandom(65536 if i % 3 else 5000) for i in range(96)}
    datas[b"text"] = TEXT
    with v.batch() as b:  # one transaction: neighbours on disk
        for key, data in datas.items():
            b.put_chunk(key, store.prepare_chunk(data))
    keys = list(datas)
    order = keys[::-1] + keys[:7] + [b"absent", b"k001"]
    got = v.read_chunks(order)
    assert got == [datas.get(k) for k in order]
    assert got[-2] is None
    # 96 chunks of up to 64 KiB span more than one bounded pread.
    assert sum(len(d) for d in datas.values()) > 4 << 20
    assert [v.read_chunk(k) for k in keys] == list(datas.values())


def test_read_chunks_verifies_every_chunk(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    datas = [os.urandom(8192) for _ in range(5)]
    with v.batch() as b:
        for i, data in enumerate(datas):
            b.put_chunk(b"k%d" % i, store.prepare_chunk(data))
    ref = v.get(b"k2")
    assert isinstance(ref, ChunkRef)
    stored = raw_record(store, ref.digest)
    write_record(store, ref.digest, stored[:100] + bytes([stored[100] ^ 1]) + stored[101:])
    with pytest.raises(Corrupt):
        v.read_chunks([b"k0", b"k1", b"k2", b"k3"])
    assert v.read_chunks([b"k0", b"k1", b"k3", b"k4"]) == [datas[i] for i in (0, 1, 3, 4)]
    v.put(b"plain", b"value")
    with pytest.raises(InvalidArgument):
        v.read_chunks([b"k0", b"plain"])


# -- giving space back ---------------------------------------------------------------


def test_coalesce_joins_touching_ranges_per_segment() -> None:
    from blockstore.segments import coalesce

    ranges = [(2, 8192, 4096), (1, 0, 4096), (1, 4096, 8192), (1, 20480, 4096), (2, 0, 8192)]
    assert coalesce(ranges) == [(1, 0, 12288), (1, 20480, 4096), (2, 0, 12288)]
    assert coalesce([]) == []


def test_overwritten_chunks_are_punched_out_in_the_background(store: Store) -> None:
    store.create_volume("v", 64 << 20)
    v = store.volume("v")
    with v.batch() as b:
        for i in range(64):
            b.put_chunk(b"k%d" % i, store.prepare_chunk(os.urandom(65536)))
    before = store.stats().file_bytes
    with v.batch() as b:
        for i in range(64):
            b.put_chunk(b"k%d" % i, store.prepare_chunk(os.urandom(65536)))
    store.segments.settle()
    after = store.stats().file_bytes
    # The first 64 records (4 MiB) were punched out: the files hold about as much as before.
    assert after < before + (1 << 20), (before, after)
    assert not fsck(store).problems
    assert fsck(store).reclaimable_bytes < 64 * 4096


def test_space_is_given_back_only_after_older_readers_finish(store: Store) -> None:
    """A reader whose transaction began before an overwrite still reads the old chunk."""
    store.create_volume("v", 64 << 20)
    v = store.volume("v")
    old = os.urandom(65536)
    v.put_chunk(b"k", old)
    ref = v.get(b"k")
    assert isinstance(ref, ChunkRef)
    with store._read() as txn:  # a reader from before the overwrite
        v.put_chunk(b"k", os.urandom(65536))  # frees the old chunk's record
        time.sleep(0.3)  # the reclaimer would have punched it by now
        assert store._read_chunks(txn, [ref]) == [old]
        before = store.stats().file_bytes
    store.segments.settle()  # the reader is gone: the record is punched now
    assert store.stats().file_bytes <= before - 65536
    assert not fsck(store).problems


def test_a_failed_punch_is_logged_and_later_space_is_still_given_back(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    store.create_volume("v", 64 << 20)
    v = store.volume("v")
    with caplog.at_level(logging.WARNING, logger="blockstore.segments"):
        store.segments.release([(0xDEAD, 0, 4096)], [], 0)  # no such segment file
        store.segments.settle()
    assert "punch_failed" in caplog.text
    with v.batch() as b:
        for i in range(16):
            b.put_chunk(b"k%d" % i, store.prepare_chunk(os.urandom(65536)))
    with v.batch() as b:
        for i in range(16):
            b.put_chunk(b"k%d" % i, store.prepare_chunk(os.urandom(65536)))
    report = fsck(store)  # waits for the reclaimer first
    assert not report.problems
    assert report.reclaimable_bytes < 16 * 4096, "the reclaimer kept working"


def test_close_waits_for_space_to_be_given_back(store_dir: Path) -> None:
    with Store(store_dir) as s:
        s.create_volume("v", 64 << 20)
        v = s.volume("v")
        for _ in range(3):
            with v.batch() as b:
                for i in range(32):
                    b.put_chunk(b"k%d" % i, s.prepare_chunk(os.urandom(65536)))
    with Store(store_dir) as s:
        report = fsck(s)
        assert not report.problems
        assert report.reclaimable_bytes < 32 * 4096, "nothing freed before close was left behind"


def test_decode_checks_length_and_output_bound() -> None:
    data = b"abc" * 1000
    prep = ch.prepare(data)
    stored = bytes((prep.codec,)) + prep.payload
    assert ch.decode(prep.digest, stored, len(data)) == data
    with pytest.raises(Corrupt):
        ch.decode(prep.digest, stored, len(data) + 1)
    # A record that decompresses past MAX_CHUNK_SIZE is refused, not expanded.
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(MAX_CHUNK_SIZE + 1))
    with pytest.raises(Corrupt):
        ch.decode(ch.digest_of(b"x"), bytes((ch.CODEC_ZSTD,)) + bomb)


def test_bad_reference_record_is_corrupt() -> None:
    with pytest.raises(Corrupt):
        ch.unpack_refs(b"\x00" * 5)
    assert ch.unpack_refs(ch.pack_refs(3, 10, 7)) == (3, 10, 7)


# -- holes --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 65536])
def test_all_zero_data_is_a_hole(size: int) -> None:
    assert ch.is_zero(bytes(size))
    assert ch.prepare(bytes(size)) is HOLE
    assert ch.prepare(memoryview(bytearray(size))).is_hole


@pytest.mark.parametrize("where", [0, 1, 2047, 4095])
def test_one_nonzero_byte_is_not_a_hole(where: int) -> None:
    data = bytearray(4096)
    data[where] = 1
    assert not ch.is_zero(data)
    prep = ch.prepare(bytes(data))
    assert not prep.is_hole and prep.raw_length == 4096
    assert ch.decode(prep.digest, bytes((prep.codec,)) + prep.payload) == bytes(data)


def test_writing_a_hole_deletes_and_hides(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    data = os.urandom(4096)
    v.put_chunk(b"own", data)
    v.put_chunk(b"inherited", data[::-1])
    store.create_snapshot("v", "s")
    v.put_chunk(b"own2", data + b"2")
    assert store.get_volume("v").used == 3 * 4096 + 1
    v.put_chunk(b"own2", bytes(4097))  # a chunk of the head layer: removed outright
    v.put_chunk(b"inherited", bytes(4096))  # visible from the snapshot: hidden
    v.put_chunk(b"never", bytes(100))  # nothing to delete
    assert v.get(b"own2") is None and v.get(b"inherited") is None and v.get(b"never") is None
    assert [k for k, _ in v.scan()] == [b"own"]
    assert store.get_volume("v").used == 4096
    assert store.snapshot("s").read_chunk(b"inherited") == data[::-1]
    assert store.stats().chunk_count == 2
    assert fsck(store).clean


# -- size limit ---------------------------------------------------------------


def test_max_chunk_size_is_enforced(store: Store) -> None:
    store.create_volume("v", 16 << 20)
    v = store.volume("v")
    with pytest.raises(InvalidArgument):
        ch.prepare(b"x" * (MAX_CHUNK_SIZE + 1))
    with pytest.raises(InvalidArgument):
        store.prepare_chunk(bytes(MAX_CHUNK_SIZE + 1))  # even when all zero
    with pytest.raises(InvalidArgument):
        v.put_chunk(b"big", os.urandom(MAX_CHUNK_SIZE + 1))
    assert v.get(b"big") is None and store.get_volume("v").used == 0
    data = os.urandom(MAX_CHUNK_SIZE)
    v.put_chunk(b"max", data)
    assert v.read_chunk(b"max") == data
    assert store.get_volume("v").used == MAX_CHUNK_SIZE
    assert fsck(store).clean


# -- bounded release ----------------------------------------------------------


def test_gc_step_releases_a_big_layer_in_bounded_steps(store: Store) -> None:
    n, batch = 300, 16
    store.create_volume("big", 1 << 30)
    v = store.volume("big")
    with v.batch() as b:
        for i in range(n):
            b.put_chunk(b"c%05d" % i, store.prepare_chunk(b"%d" % i * 50))
            b.put(b"m%05d" % i, b"meta")
    store.delete_volume("big")
    assert store.gc_pending() == 1
    entries = store.stats().entries
    assert entries == 2 * n
    steps = 0
    while True:
        more = store.gc_step(budget=0, batch=batch)
        steps += 1
        now = store.stats().entries
        # Each step makes progress and removes at most one batch of entries.
        assert entries - batch <= now < entries or (now == entries == 0)
        entries = now
        assert fsck(store).clean
        if not more:
            break
        assert steps < 10 * n, "gc_step makes no progress"
    assert steps >= 2 * n // batch
    assert empty(store)
    assert store.gc_step() is False


def test_gc_step_releases_a_chain_of_layers(store: Store) -> None:
    """Releasing a head frees its parent in turn, down the whole chain."""
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    for i in range(5):
        v.put_chunk(b"k%d" % i, os.urandom(1000))
        store.create_snapshot("v", f"s{i}")
        store.delete_snapshot(f"s{i}")
    assert store.stats().layers == 6
    store.delete_volume("v")
    calls = 0
    while store.gc_step(budget=0, batch=4):
        calls += 1
        assert calls < 100
    assert empty(store)


def test_gc_keeps_what_a_snapshot_still_sees(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    kept = os.urandom(2000)
    v.put_chunk(b"kept", kept)
    store.create_snapshot("v", "s")
    v.put_chunk(b"gone", os.urandom(2000))
    v.put_chunk(b"kept", os.urandom(2000))  # the head's own version, released with it
    store.delete_volume("v")
    store.gc()
    assert store.snapshot("s").read_chunk(b"kept") == kept
    st = store.stats()
    assert (st.chunk_count, st.layers) == (1, 1)
    assert fsck(store).clean
    store.delete_snapshot("s")
    store.gc()
    assert empty(store)


# -- fsck ---------------------------------------------------------------------


@pytest.fixture
def populated(store: Store) -> Store:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    shared = os.urandom(3000)
    v.put_chunk(b"a", shared)
    v.put_chunk(b"b", shared)
    v.put_chunk(b"c", TEXT)
    v.put(b"meta", b"x")
    store.create_snapshot("v", "s")
    v.put_chunk(b"d", os.urandom(500))
    store.clone_snapshot("s", "clone")
    assert fsck(store).clean
    return store


def _digest(store: Store, volume: str, key: bytes) -> bytes:
    ref = store.volume(volume).get(key)
    assert isinstance(ref, ChunkRef)
    return ref.digest


def _repairs_to_clean(store: Store, needle: str) -> None:
    """fsck finds ``needle``, repair fixes it, and the store then empties cleanly."""
    report = fsck(store)
    assert not report.clean
    assert any(needle in p for p in report.problems), report.problems
    assert not report.unfixable
    repaired = fsck(store, repair=True)
    assert repaired.repaired >= 1
    assert fsck(store).clean
    delete_everything(store)
    assert empty(store)
    assert fsck(store).clean


def test_fsck_repairs_a_wrong_refcount(populated: Store) -> None:
    digest = _digest(populated, "v", b"a")
    with populated.env.begin() as txn:
        count, raw, stored = ch.unpack_refs(txn.get(digest, db=populated.dbs.chunkrefs))
    assert count == 2
    write_behind(populated, populated.dbs.chunkrefs, digest, ch.pack_refs(7, raw, stored))
    _repairs_to_clean(populated, "has count 7, referenced 2 times")


def test_fsck_repairs_a_too_low_refcount_before_data_is_lost(populated: Store) -> None:
    digest = _digest(populated, "v", b"a")
    with populated.env.begin() as txn:
        _, raw, stored = ch.unpack_refs(txn.get(digest, db=populated.dbs.chunkrefs))
    write_behind(populated, populated.dbs.chunkrefs, digest, ch.pack_refs(1, raw, stored))
    fsck(populated, repair=True)
    # With the count repaired, dropping one reference must not free the chunk.
    populated.volume("v").delete(b"a")
    assert populated.volume("v").read_chunk(b"b") is not None
    assert fsck(populated).clean


def test_fsck_removes_an_orphaned_chunk(populated: Store) -> None:
    before = populated.stats()
    prep = ch.prepare(b"nobody points here" * 10)
    write_record(populated, prep.digest, bytes((prep.codec,)) + prep.payload)
    write_behind(
        populated,
        populated.dbs.chunkrefs,
        prep.digest,
        ch.pack_refs(1, prep.raw_length, len(prep.payload) + 1),
    )
    report = fsck(populated)
    assert any("orphaned chunk" in p for p in report.problems), report.problems
    fsck(populated, repair=True)
    with populated.env.begin() as txn:
        assert txn.get(prep.digest, db=populated.dbs.chunks) is None
        assert txn.get(prep.digest, db=populated.dbs.chunkrefs) is None
    after = populated.stats()
    assert (after.chunk_count, after.stored_bytes) == (before.chunk_count, before.stored_bytes)
    _empties_cleanly(populated)


def _empties_cleanly(store: Store) -> None:
    assert fsck(store).clean
    delete_everything(store)
    assert empty(store)


def test_fsck_removes_chunk_bytes_without_record_or_reference(populated: Store) -> None:
    prep = ch.prepare(os.urandom(300))
    write_record(populated, prep.digest, bytes((prep.codec,)) + prep.payload)
    _repairs_to_clean(populated, "has no reference record")


def test_fsck_rebuilds_a_lost_reference_record_without_losing_data(populated: Store) -> None:
    """The chunk bytes are there and referenced: repair must keep them readable."""
    digest = _digest(populated, "v", b"a")
    data = populated.volume("v").read_chunk(b"a")
    write_behind(populated, populated.dbs.chunkrefs, digest, None)
    report = fsck(populated)
    assert not report.clean
    fsck(populated, repair=True)
    assert populated.volume("v").read_chunk(b"a") == data
    assert populated.volume("clone").read_chunk(b"b") == data
    assert fsck(populated).clean
    delete_everything(populated)
    assert empty(populated)


def test_fsck_requeues_a_garbage_layer(populated: Store) -> None:
    head = populated.get_volume("clone").head
    populated.delete_volume("clone")
    write_behind(populated, populated.dbs.gcqueue, ly.u64(head), None)
    assert populated.gc_pending() == 0
    _repairs_to_clean(populated, "no holders and is not queued")


def test_fsck_repairs_wrong_holders(populated: Store) -> None:
    layer = populated.get_snapshot("s").layer
    with populated.env.begin() as txn:
        rec = ly.read_layer(txn, populated.dbs, layer)
    assert rec.holders == 3  # the snapshot, the volume's new head, the clone's head
    bad = ly.LayerRecord(rec.layer, rec.parent, rec.family, 9, rec.frozen)
    write_behind(populated, populated.dbs.layers, ly.u64(layer), bad.pack())
    _repairs_to_clean(populated, f"layer {layer} has 9 holders, counted 3")


def test_fsck_repairs_wrong_counters(populated: Store) -> None:
    truth = populated.stats()
    for name in ("chunk_count", "stored_bytes", "referenced_raw_bytes", "unique_raw_bytes"):
        write_behind(populated, populated.dbs.meta, name.encode(), struct.pack(">Q", 12345))
    report = fsck(populated)
    assert sum("counter" in p for p in report.problems) == 4, report.problems
    fsck(populated, repair=True)
    st = populated.stats()
    assert (st.chunk_count, st.stored_bytes, st.referenced_raw_bytes, st.unique_raw_bytes) == (
        truth.chunk_count,
        truth.stored_bytes,
        truth.referenced_raw_bytes,
        truth.unique_raw_bytes,
    )
    _empties_cleanly(populated)


def test_fsck_repairs_wrong_usage(populated: Store) -> None:
    info = populated.get_volume("v")
    write_behind(
        populated, populated.dbs.vstate, b"v", struct.pack(">QQ", info.head, info.used + 77)
    )
    assert populated.get_volume("v").used == info.used + 77
    report = fsck(populated)
    assert any("records" in p for p in report.problems)
    fsck(populated, repair=True)
    assert populated.get_volume("v").used == info.used
    _empties_cleanly(populated)


def test_fsck_restores_a_missing_index_row(populated: Store) -> None:
    head = populated.get_volume("v").head
    write_behind(populated, populated.dbs.layerkeys, ly.u64(head) + ly.enc(b"d"), None)
    # Without the index row, release could not find the entry: repair must restore it.
    _repairs_to_clean(populated, "has no index row")


@pytest.mark.parametrize("lose", ["both", "bytes"])
def test_fsck_reports_but_keeps_a_dangling_reference(populated: Store, lose: str) -> None:
    digest = _digest(populated, "v", b"c")
    write_behind(populated, populated.dbs.chunks, digest, None)
    if lose == "both":
        write_behind(populated, populated.dbs.chunkrefs, digest, None)
    for repair in (False, True, False):
        report = fsck(populated, repair=repair)
        assert any(digest.hex()[:16] in u for u in report.unfixable), report.unfixable
    # The entries still point at the chunk; reading fails instead of returning bytes.
    for view in (populated.volume("v"), populated.snapshot("s"), populated.volume("clone")):
        assert view.get(b"c") == ChunkRef(digest, len(TEXT))
        with pytest.raises((Corrupt, NotFound)):
            view.read_chunk(b"c")
    assert populated.volume("v").read_chunk(b"a") is not None


def test_fsck_of_an_empty_and_a_fresh_store_is_clean(store: Store) -> None:
    report = fsck(store)
    assert report.clean and (report.entries, report.chunks, report.layers) == (0, 0, 0)
    store.create_volume("v", 4096)
    report = fsck(store, repair=True)
    assert report.clean and report.repaired == 0 and report.layers == 1


def test_gc_step_refuses_an_empty_batch(store: Store) -> None:
    store.create_volume("v", 4096)
    store.delete_volume("v")
    with pytest.raises(InvalidArgument):
        store.gc_step(batch=0)
    assert store.gc_step(budget=0, batch=1) is False
    assert empty(store)


# -- damage heals by storing the chunk again ----------------------------------------


@pytest.fixture
def shared_damage(
    store: Store, flip_stored_byte: Callable[[Store, bytes], None]
) -> tuple[Store, bytes, bytes]:
    """One chunk named by a volume, its snapshot and a clone, its stored copy damaged."""
    store.create_volume("v", 4 << 20)
    v = store.volume("v")
    data = os.urandom(65536)
    v.put_chunk(b"a", data)
    v.put_chunk(b"other", os.urandom(65536))
    store.create_snapshot("v", "s")
    store.clone_snapshot("s", "c")
    digest = _digest(store, "v", b"a")
    flip_stored_byte(store, digest)
    return store, data, digest


def _every_view_reads(store: Store, key: bytes, data: bytes) -> None:
    for view in (store.volume("v"), store.snapshot("s"), store.volume("c")):
        assert view.read_chunk(key) == data, view.name


def _put_in_another_process(store: Store, key: bytes, data: bytes) -> None:
    code = (
        "import sys; from blockstore import Store\n"
        "with Store(sys.argv[1]) as s: s.volume('v').put_chunk(bytes.fromhex(sys.argv[2]),"
        " sys.stdin.buffer.read())"
    )
    subprocess.run([sys.executable, "-c", code, str(store.path), key.hex()], input=data, check=True)


def _marked(store: Store, digest: bytes) -> bool:
    with store.env.begin() as txn:
        return txn.get(digest, db=store.dbs.damaged) is not None


@pytest.mark.parametrize("read_first", [True, False], ids=["found-on-read", "not-yet-known"])
def test_storing_a_damaged_chunk_again_heals_every_sharer(
    shared_damage: tuple[Store, bytes, bytes], read_first: bool
) -> None:
    store, data, digest = shared_damage
    if read_first:
        with pytest.raises(Corrupt):
            store.volume("v").read_chunk(b"a")
    before = store.stats()
    store.volume("c").put_chunk(b"copy", data)  # the same bytes, written anew
    _every_view_reads(store, b"a", data)
    assert store.volume("c").read_chunk(b"copy") == data
    after = store.stats()
    # The damaged copy was replaced, not duplicated: still one chunk of this hash.
    assert after.chunk_count == before.chunk_count
    assert after.stored_bytes == before.stored_bytes
    assert not _marked(store, digest)
    assert fsck(store).clean


def test_a_chunk_found_damaged_on_read_is_marked_by_the_next_write(
    shared_damage: tuple[Store, bytes, bytes],
) -> None:
    store, data, digest = shared_damage
    with pytest.raises(Corrupt):
        store.volume("v").read_chunks([b"other", b"a"])
    assert not _marked(store, digest)  # a read does not take the write lock
    store.volume("v").put(b"unrelated", b"x")
    assert _marked(store, digest)
    _put_in_another_process(store, b"again", data)  # heals it: the mark goes
    assert not _marked(store, digest)
    _every_view_reads(store, b"a", data)
    assert fsck(store).clean


def test_a_chunk_healed_elsewhere_is_not_marked(shared_damage: tuple[Store, bytes, bytes]) -> None:
    store, data, digest = shared_damage
    with pytest.raises(Corrupt):
        store.volume("v").read_chunk(b"a")
    _put_in_another_process(store, b"again", data)
    store.volume("v").put(b"unrelated", b"x")
    assert not _marked(store, digest)
    _every_view_reads(store, b"a", data)


def test_one_batch_storing_a_damaged_chunk_twice_rewrites_it_once(
    shared_damage: tuple[Store, bytes, bytes],
) -> None:
    store, data, _ = shared_damage
    before = store.stats().stored_bytes
    with store.volume("v").batch() as b:
        for i in range(3):
            b.put_chunk(b"copy%d" % i, store.prepare_chunk(data))
    store.segments.settle()
    assert store.stats().stored_bytes == before
    _every_view_reads(store, b"a", data)
    report = fsck(store)
    assert report.clean and report.reclaimable_bytes < 2 * 65536, report


def test_storing_a_chunk_whose_record_is_missing_restores_it(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    data = os.urandom(5000)
    v.put_chunk(b"a", data)
    digest = _digest(store, "v", b"a")
    write_behind(store, store.dbs.chunks, digest, None)
    with pytest.raises(Corrupt):
        v.read_chunk(b"a")
    assert fsck(store).unfixable
    v.put_chunk(b"b", data)
    assert v.read_chunk(b"a") == data == v.read_chunk(b"b")
    # What remains is the lost record's uncounted space in its segment.
    assert not fsck(store).unfixable
    fsck(store, repair=True)
    assert fsck(store).clean


def test_a_sound_copy_stored_at_another_level_is_kept(store_dir: Path) -> None:
    with Store(store_dir, compression_level=0) as s:
        s.create_volume("v", 1 << 20)
        s.volume("v").put_chunk(b"a", TEXT)
        location = s.locate_chunk(_digest(s, "v", b"a"))
    with Store(store_dir, compression_level=9) as s:
        s.volume("v").put_chunk(b"b", TEXT)  # a different record, the same chunk
        assert s.locate_chunk(_digest(s, "v", b"b")) == location
        assert fsck(s).clean


def test_fsck_names_every_key_that_sees_a_damaged_chunk_and_repair_marks_it(
    shared_damage: tuple[Store, bytes, bytes], flip_stored_byte: Callable[[Store, bytes], None]
) -> None:
    store, data, digest = shared_damage
    store.volume("v").put_chunk(b"a2", data)  # a second key of the same chunk (healed here)
    flip_stored_byte(store, digest)
    report = fsck(store)
    assert [d.digest for d in report.damaged] == [digest]
    damage = report.damaged[0]
    assert "does not match its hash" in damage.why and damage.raw_length == len(data)
    assert not damage.marked
    assert sorted((r.kind, r.name, r.key) for r in damage.refs) == [
        ("snapshot", "s", b"a"),
        ("volume", "c", b"a"),
        ("volume", "v", b"a"),
        ("volume", "v", b"a2"),
    ]
    repaired = fsck(store, repair=True)
    assert repaired.marked == 1 and repaired.damaged[0].marked and not repaired.clean
    assert _marked(store, digest)
    again = fsck(store)
    assert again.marked == 0 and again.damaged[0].marked
    store.volume("v").put_chunk(b"heal", data)
    assert fsck(store).clean
    _every_view_reads(store, b"a", data)


def test_fsck_names_the_keys_of_a_missing_chunk(populated: Store) -> None:
    digest = _digest(populated, "v", b"c")
    write_behind(populated, populated.dbs.chunks, digest, None)
    damage = {d.digest: d for d in fsck(populated).damaged}[digest]
    assert "missing" in damage.why
    assert sorted((r.kind, r.name) for r in damage.refs) == [
        ("snapshot", "s"),
        ("volume", "clone"),
        ("volume", "v"),
    ]


def test_fsck_drops_a_stale_damage_mark(populated: Store) -> None:
    digest = _digest(populated, "v", b"a")
    write_behind(populated, populated.dbs.damaged, digest, b"was damaged once")
    write_behind(populated, populated.dbs.damaged, b"\x01" * 32, b"a chunk long gone")
    report = fsck(populated)
    assert sum("marked damaged" in p for p in report.problems) == 2, report.problems
    assert not report.damaged
    assert fsck(populated, repair=True).repaired == 2
    assert fsck(populated).clean and not _marked(populated, digest)


_PAYLOADS = [TEXT[:20000], os.urandom(30000), os.urandom(65536), TEXT[1000:9000]]
_KEYS = [b"k0", b"k1", b"k2", b"k3"]
_OPS = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(_KEYS), st.integers(0, len(_PAYLOADS) - 1)),
    st.tuples(st.just("flip"), st.integers(0, len(_PAYLOADS) - 1)),
    st.tuples(st.just("read"), st.integers(0, 3), st.sampled_from(_KEYS)),
    st.tuples(st.just("delete"), st.sampled_from(_KEYS)),
    st.just(("snapshot",)),
)


@settings(
    max_examples=30,
    deadline=None,
    # flip_stored_byte is a plain function: sharing it between examples is harmless.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_OPS, max_size=30))
def test_damage_model(
    ops: list[tuple],
    tmp_path_factory: pytest.TempPathFactory,
    flip_stored_byte: Callable[[Store, bytes], None],
) -> None:
    """Reads fail exactly for damaged chunks, any put of the bytes heals them, fsck agrees.

    The model: which payload each key of the volume and of each snapshot holds, and
    which payloads' stored copies are damaged (an odd number of flips since the
    bytes were last stored; a chunk no view holds any more is gone with its damage).
    """
    digests = [ch.digest_of(p) for p in _PAYLOADS]
    with Store(tmp_path_factory.mktemp("model") / "store") as store:
        store.create_volume("v", 1 << 30)
        views: list[dict[bytes, int]] = [{}]  # the volume, then each snapshot
        damaged: set[int] = set()

        def stored(i: int) -> bool:
            try:
                store.locate_chunk(digests[i])
            except NotFound:
                return False
            return True

        for op in ops:
            if op[0] == "put":
                store.volume("v").put_chunk(op[1], _PAYLOADS[op[2]])
                views[0][op[1]] = op[2]
                damaged.discard(op[2])
            elif op[0] == "flip" and stored(op[1]):
                flip_stored_byte(store, digests[op[1]])
                damaged ^= {op[1]}
            elif op[0] == "read" and op[1] < len(views):
                view = store.volume("v") if op[1] == 0 else store.snapshot(f"s{op[1]}")
                want = views[op[1]].get(op[2])
                if want in damaged:
                    with pytest.raises(Corrupt):
                        view.read_chunk(op[2])
                else:
                    got = view.read_chunk(op[2])
                    assert got == (None if want is None else _PAYLOADS[want])
            elif op[0] == "delete":
                store.volume("v").delete(op[1])
                views[0].pop(op[1], None)
            elif op[0] == "snapshot":
                store.create_snapshot("v", f"s{len(views)}")
                views.append(dict(views[0]))
            damaged = {i for i in damaged if stored(i)}
        report = fsck(store)
        assert {d.digest for d in report.damaged} == {digests[i] for i in damaged}
        for d in report.damaged:  # every key of every view holding the payload is named
            i = digests.index(d.digest)
            want = {
                ("volume" if n == 0 else "snapshot", "v" if n == 0 else f"s{n}", k)
                for n, view in enumerate(views)
                for k, j in view.items()
                if j == i
            }
            assert {(r.kind, r.name, r.key) for r in d.refs} == want
        fsck(store, repair=True)  # drops marks of chunks flipped back, marks the rest
        assert fsck(store).clean == (not damaged)
        for i in sorted(damaged):
            store.volume("v").put_chunk(b"heal", _PAYLOADS[i])
        assert fsck(store).clean
