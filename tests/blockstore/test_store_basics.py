from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from blockstore import (
    AlreadyExists,
    ChunkRef,
    InvalidArgument,
    NoSpace,
    NotFound,
    OutOfRange,
    ReadOnly,
    Store,
    fsck,
)


@pytest.fixture
def store(store_dir: Path):
    s = Store(store_dir)
    yield s
    s.close()


def test_store_directory_is_private(store: Store, store_dir: Path) -> None:
    assert (store_dir.stat().st_mode & 0o777) == 0o700


def test_snapshot_freezes_and_head_moves_on(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    v.put(b"k", b"old")
    store.create_snapshot("v", "s")
    v.put(b"k", b"new")
    v.put(b"only-head", b"x")
    snap = store.snapshot("s")
    assert snap.get(b"k") == b"old"
    assert snap.get(b"only-head") is None
    assert v.get(b"k") == b"new"
    with pytest.raises(ReadOnly):
        snap.put(b"k", b"nope")


def test_tombstone_hides_older_version(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    v.put(b"k", b"1")
    store.create_snapshot("v", "s")
    assert v.delete(b"k") is True
    assert v.get(b"k") is None
    assert [k for k, _ in v.scan()] == []
    assert store.snapshot("s").get(b"k") == b"1"
    assert v.delete(b"k") is False


def test_idempotent_create_and_conflicts(store: Store) -> None:
    a = store.create_volume("v", 1 << 20, parameters={"x": "1"})
    assert store.create_volume("v", 1 << 20, parameters={"x": "1"}).head == a.head
    with pytest.raises(AlreadyExists):
        store.create_volume("v", 2 << 20)
    store.create_volume("w", 1 << 20)
    store.create_snapshot("v", "s")
    assert store.create_snapshot("v", "s").layer == store.get_snapshot("s").layer
    with pytest.raises(AlreadyExists):
        store.create_snapshot("w", "s")


@pytest.mark.parametrize("name", ["", ".hidden", "../escape", "a/b", "x" * 129, "sp ace"])
def test_bad_names_are_rejected(store: Store, name: str) -> None:
    with pytest.raises(InvalidArgument):
        store.create_volume(name, 1 << 20)


def test_clone_from_snapshot_and_volume_are_independent(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    v.put_chunk(b"c", os.urandom(4096))
    store.create_snapshot("v", "s")
    store.clone_snapshot("s", "from-snap")
    store.clone_volume("v", "from-vol")
    v.put(b"after", b"1")
    store.volume("from-snap").put(b"mine", b"1")
    assert store.volume("from-vol").get(b"after") is None
    assert v.get(b"mine") is None
    assert store.volume("from-snap").read_chunk(b"c") == v.read_chunk(b"c")
    with pytest.raises(OutOfRange):
        store.clone_snapshot("s", "tiny", capacity=1000)


def test_capacity_is_enforced_and_nothing_is_lost(store: Store) -> None:
    store.create_volume("v", 3 * 4096)
    v = store.volume("v")
    blocks = [os.urandom(4096) for _ in range(4)]
    for i in range(3):
        v.put_chunk(b"c%d" % i, blocks[i])
    with pytest.raises(NoSpace):
        v.put_chunk(b"c3", blocks[3])
    assert [v.read_chunk(b"c%d" % i) for i in range(3)] == blocks[:3]
    assert v.get(b"c3") is None
    # Overwriting in place does not grow usage.
    v.put_chunk(b"c0", blocks[3])
    assert store.get_volume("v").used == 3 * 4096
    store.expand_volume("v", 4 * 4096)
    v.put_chunk(b"c3", blocks[0])
    assert fsck(store).clean


def test_zero_chunks_are_holes(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    v.put_chunk(b"z", bytes(65536))
    assert v.get(b"z") is None
    assert store.stats().chunk_count == 0


def test_dedup_and_corruption_detection(
    store: Store, flip_stored_byte: Callable[[Store, bytes], None]
) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    data = os.urandom(65536)
    v.put_chunk(b"a", data)
    v.put_chunk(b"b", data)
    st = store.stats()
    assert st.chunk_count == 1 and st.dedup_ratio == 2.0
    ref = v.get(b"a")
    assert isinstance(ref, ChunkRef)
    flip_stored_byte(store, ref.digest)
    from blockstore import Corrupt

    with pytest.raises(Corrupt):
        v.read_chunk(b"a")
    assert not fsck(store).clean


def test_reading_chunks_by_key_range(
    store: Store, flip_stored_byte: Callable[[Store, bytes], None]
) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    blobs = {k: os.urandom(1000 + i) for i, k in enumerate([b"a1", b"a1\x00", b"a1x", b"a2", b"b"])}
    for k, data in blobs.items():
        v.put_chunk(k, data)
    v.put(b"c", b"plain")
    store.create_snapshot("v", "s")
    v.delete(b"a1x")  # a tombstone in the head hides the snapshot's version
    got = v.read_chunk_ranges([(b"a1", b"a2"), (b"a2", b"b"), (b"x", b"y")])
    assert got == [
        [(b"a1", blobs[b"a1"]), (b"a1\x00", blobs[b"a1\x00"])],
        [(b"a2", blobs[b"a2"])],
        [],
    ]
    snap = store.snapshot("s").read_chunk_ranges([(b"a1", b"a2")])
    assert [k for k, _ in snap[0]] == [b"a1", b"a1\x00", b"a1x"]
    with pytest.raises(InvalidArgument):
        v.read_chunk_ranges([(b"b", b"d")])  # a plain value inside the range
    with v.batch() as b:
        ref = b.get(b"a2")
        assert isinstance(ref, ChunkRef)
        assert b.read_chunks([ref]) == [blobs[b"a2"]]
    flip_stored_byte(store, ref.digest)
    from blockstore import Corrupt

    with pytest.raises(Corrupt):
        v.read_chunk_ranges([(b"a2", b"a3")])


def test_delete_everything_returns_to_empty(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    for i in range(10):
        v.put_chunk(b"c%d" % i, os.urandom(1000))
        v.put(b"m%d" % i, b"meta")
    store.create_snapshot("v", "s")
    store.clone_snapshot("s", "c")
    store.delete_volume("v")
    assert store.snapshot("s").get(b"m3") == b"meta"
    store.delete_snapshot("s")
    store.delete_volume("c")
    store.gc()
    st = store.stats()
    assert (st.chunk_count, st.entries, st.layers, st.stored_bytes) == (0, 0, 0, 0)
    assert fsck(store).clean
    with pytest.raises(NotFound):
        store.get_volume("v")


def test_deleting_a_snapshot_releases_what_the_volume_overwrote(store: Store) -> None:
    store.create_volume("v", 1 << 30)
    v = store.volume("v")
    old = [os.urandom(4096) for _ in range(8)]
    for i, data in enumerate(old):
        v.put_chunk(b"c%d" % i, data)
    v.put(b"meta", b"1")
    store.create_snapshot("v", "s")
    new = [os.urandom(4096) for _ in range(4)]
    for i, data in enumerate(new):
        v.put_chunk(b"c%d" % i, data)
    v.delete(b"meta")
    assert store.stats().chunk_count == 12
    store.delete_snapshot("s")
    store.gc()
    st = store.stats()
    # The four overwritten chunks are gone; the volume's lineage is one layer again.
    assert (st.chunk_count, st.layers, st.entries) == (8, 1, 8)
    assert [v.read_chunk(b"c%d" % i) for i in range(8)] == new + old[4:]
    assert v.get(b"meta") is None
    assert fsck(store).clean


def test_merge_keeps_a_later_snapshot_and_clone_intact(store: Store) -> None:
    store.create_volume("v", 1 << 30)
    v = store.volume("v")
    v.put(b"a", b"1")
    v.put(b"b", b"1")
    store.create_snapshot("v", "s1")
    v.put(b"a", b"2")
    v.delete(b"b")
    store.create_snapshot("v", "s2")
    store.clone_snapshot("s2", "c")
    v.put(b"a", b"3")
    store.delete_snapshot("s1")
    while store.gc_step(budget=0, batch=1):
        # Every intermediate state of the merge reads the same.
        assert store.snapshot("s2").scan() == [(b"a", b"2")]
        assert store.volume("c").scan() == [(b"a", b"2")]
        assert v.scan() == [(b"a", b"3")]
    assert fsck(store).clean
    assert store.stats().layers == 3  # s2's layer, v's head, c's head


def test_an_aborted_write_leaves_only_reclaimable_space(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    v = store.volume("v")
    with pytest.raises(RuntimeError), v.batch() as b:
        b.put_chunk(b"c", store.prepare_chunk(os.urandom(8192)))
        raise RuntimeError("abort the transaction after its bytes were appended")
    report = fsck(store)
    assert report.clean and report.reclaimable_bytes > 0
    fsck(store, repair=True)
    assert fsck(store).reclaimable_bytes == 0
    # The next write reuses the segment and everything still adds up.
    v.put_chunk(b"c", os.urandom(8192))
    assert fsck(store).clean and len(v.read_chunk(b"c") or b"") == 8192


def test_volumes_and_snapshots_share_one_namespace(store: Store) -> None:
    store.create_volume("v", 1 << 20)
    store.create_snapshot("v", "s")
    with pytest.raises(AlreadyExists, match="cannot create volume 's': a snapshot has that name"):
        store.create_volume("s", 1 << 20)
    with pytest.raises(AlreadyExists, match="cannot create snapshot 'v': a volume has that name"):
        store.create_snapshot("v", "v")
    with pytest.raises(AlreadyExists, match="a snapshot has that name"):
        store.clone_volume("v", "s")
    with pytest.raises(AlreadyExists, match="a snapshot has that name"):
        store.clone_snapshot("s", "s")
    assert [v.name for v in store.list_volumes()] == ["v"]
    assert [s.name for s in store.list_snapshots()] == ["s"]
    # The same calls again stay idempotent, and a freed name can be taken by the other kind.
    assert store.create_snapshot("v", "s").name == "s"
    store.delete_snapshot("s")
    assert store.create_volume("s", 1 << 20).name == "s"
