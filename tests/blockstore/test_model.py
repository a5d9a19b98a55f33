"""Stateful property test of the store against a plain in-memory model.

The model keeps, per volume and per snapshot, a dict key -> ("v", bytes) for a
plain value or ("c", bytes) for chunk data. Random sequences of writes, batches,
snapshots, clones, deletions, expansions, garbage collection and reopening are
applied to both; after every step every live view (volume heads and snapshots,
through long-lived ``View`` objects as a FUSE process would hold them) must read
exactly what the model holds, usage must equal the chunk bytes each view sees,
and ``fsck`` must find nothing. Deleting everything and collecting garbage must
leave an empty store.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from blockstore import (
    AlreadyExists,
    ChunkRef,
    InvalidArgument,
    NoSpace,
    NotFound,
    OutOfRange,
    ReadOnly,
    Store,
    View,
    fsck,
)
from blockstore import chunks as ch

log = logging.getLogger(__name__)

Entry = tuple[str, bytes]  # ("v", value) or ("c", chunk data)
Data = dict[bytes, Entry]

VOLUMES = ["v0", "v1", "v2", "v3"]
SNAPSHOTS = ["s0", "s1", "s2"]
# Keys chosen to stress the self-delimiting key encoding: NUL bytes, prefixes of
# each other, 0xFF, and the empty key.
KEYS = [b"", b"\x00", b"a", b"a\x00", b"a\x00\x01", b"a\xff", b"ab", b"b"]
PREFIXES = [b"", b"a", b"a\x00", b"b", b"c"]
CAPACITIES = [3000, 8000, 1 << 20]

# A few fixed blobs so that the same chunk is written under many keys (dedup).
SHARED = [
    b"x" * 1200,
    bytes(range(256)) * 4,
    b"lorem ipsum dolor sit amet " * 40,
    hashlib.sha256(b"seed").digest() * 30,
]

values = st.binary(max_size=16)
chunk_data = st.one_of(
    st.sampled_from(SHARED),
    st.binary(min_size=1, max_size=64),
    st.integers(min_value=1, max_value=2500).map(bytes),  # all zero: a hole
)
keys = st.sampled_from(KEYS)
volumes = st.sampled_from(VOLUMES)
snapshots = st.sampled_from(SNAPSHOTS)
picks = st.integers(min_value=0, max_value=7)  # an index into the existing volumes


class Aborted(Exception):
    """Raised inside a batch on purpose: the whole batch must vanish."""


def chunk_bytes(data: Data) -> int:
    return sum(len(v) for kind, v in data.values() if kind == "c")


def is_zero(b: bytes) -> bool:
    return not any(b)


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="blockstore-model-")
        self.store = Store(self.dir)
        # name -> {"data", "capacity", "source"}
        self.vols: dict[str, dict[str, Any]] = {}
        # name -> {"data", "volume", "size", "capacity"}
        self.snaps: dict[str, dict[str, Any]] = {}
        self.vol_views: dict[str, View] = {}
        self.snap_views: dict[str, View] = {}
        # Views of deleted snapshots: they must fail, even once the name is reused.
        self.dead_views: list[View] = []

    # -- helpers ------------------------------------------------------------
    def expect(self, exc: type[BaseException], fn: Callable[[], Any]) -> None:
        with pytest.raises(exc):
            fn()

    def apply_chunk(self, vol: dict[str, Any], key: bytes, data: bytes) -> bool:
        """Apply a chunk write to the model; False if it must fail with NoSpace."""
        d: Data = vol["data"]
        if is_zero(data):
            d.pop(key, None)
            return True
        old = d.get(key)
        old_len = len(old[1]) if old and old[0] == "c" else 0
        new_used = chunk_bytes(d) - old_len + len(data)
        if len(data) > old_len and new_used > vol["capacity"]:
            return False
        d[key] = ("c", data)
        return True

    def existing(self, pick: int) -> str:
        names = sorted(self.vols)
        return names[pick % len(names)]

    def remember_view(self, name: str) -> None:
        self.vol_views.setdefault(name, self.store.volume(name))

    @initialize(items=st.lists(st.tuples(keys, chunk_data), max_size=8))
    def two_volumes(self, items: list[tuple[bytes, bytes]]) -> None:
        """Start with volumes to write to; later rules delete and re-create them."""
        for name, capacity in (("v0", 1 << 20), ("v1", 8000)):
            self.store.create_volume(name, capacity)
            self.vols[name] = {"data": {}, "capacity": capacity, "source": ""}
            self.remember_view(name)
        self.put_chunk(0, items)

    # -- volumes ------------------------------------------------------------
    @rule(name=volumes, capacity=st.sampled_from(CAPACITIES))
    def create_volume(self, name: str, capacity: int) -> None:
        vol = self.vols.get(name)
        if vol is None:
            info = self.store.create_volume(name, capacity)
            assert (info.capacity, info.used, info.source) == (capacity, 0, "")
            self.vols[name] = {"data": {}, "capacity": capacity, "source": ""}
        elif vol["source"] == "" and vol["capacity"] == capacity:
            info = self.store.create_volume(name, capacity)
            assert info.used == chunk_bytes(vol["data"])
        else:
            self.expect(AlreadyExists, lambda: self.store.create_volume(name, capacity))
        self.remember_view(name)

    @rule(name=volumes)
    def delete_volume(self, name: str) -> None:
        if name not in self.vols:
            self.expect(NotFound, lambda: self.store.delete_volume(name))
            return
        self.store.delete_volume(name)
        del self.vols[name]

    @rule(name=volumes, grow=st.sampled_from([0, 1, 5000, -1]))
    def expand(self, name: str, grow: int) -> None:
        vol = self.vols.get(name)
        if vol is None:
            self.expect(NotFound, lambda: self.store.expand_volume(name, 1 << 20))
            return
        capacity = vol["capacity"] + grow
        if grow < 0:
            self.expect(OutOfRange, lambda: self.store.expand_volume(name, capacity))
            return
        info = self.store.expand_volume(name, capacity)
        assert info.capacity == capacity
        vol["capacity"] = capacity

    # -- single writes ------------------------------------------------------
    @precondition(lambda self: self.vols)
    @rule(pick=picks, items=st.lists(st.tuples(keys, values), min_size=1, max_size=3))
    def put(self, pick: int, items: list[tuple[bytes, bytes]]) -> None:
        name = self.existing(pick)
        for key, value in items:
            self.store.volume(name).put(key, value)
            self.vols[name]["data"][key] = ("v", value)

    @precondition(lambda self: self.vols)
    @rule(pick=picks, items=st.lists(st.tuples(keys, chunk_data), min_size=1, max_size=6))
    def put_chunk(self, pick: int, items: list[tuple[bytes, bytes]]) -> None:
        """One transaction per chunk; a NoSpace one must leave the volume unchanged."""
        name = self.existing(pick)
        view = self.store.volume(name)
        for key, data in items:
            if self.apply_chunk(self.vols[name], key, data):
                view.put_chunk(key, data)
            else:
                self.expect(NoSpace, lambda k=key, d=data: view.put_chunk(k, d))

    @precondition(lambda self: self.vols)
    @rule(pick=picks, key=keys, extra=st.sampled_from([-1, 0, 1]), fill=st.integers(1, 255))
    def fill_to_capacity(self, pick: int, key: bytes, extra: int, fill: int) -> None:
        """A chunk exactly one byte short of, at, or one byte past the capacity."""
        name = self.existing(pick)
        vol = self.vols[name]
        old = vol["data"].get(key)
        old_len = len(old[1]) if old and old[0] == "c" else 0
        size = vol["capacity"] - chunk_bytes(vol["data"]) + old_len + extra
        if not 0 < size <= 64 * 1024:
            return
        data = bytes([fill]) * size
        view = self.store.volume(name)
        if self.apply_chunk(vol, key, data):
            view.put_chunk(key, data)
            assert extra <= 0 or size <= old_len
        else:
            assert extra > 0
            self.expect(NoSpace, lambda: view.put_chunk(key, data))

    @precondition(lambda self: self.vols)
    @rule(pick=picks, key=keys)
    def delete(self, pick: int, key: bytes) -> None:
        name = self.existing(pick)
        vol = self.vols[name]
        assert self.store.volume(name).delete(key) is (key in vol["data"])
        vol["data"].pop(key, None)

    @precondition(lambda self: self.vols)
    @rule(source=st.one_of(volumes, snapshots), src_key=keys, pick=picks, key=keys)
    def put_ref(self, source: str, src_key: bytes, pick: int, key: bytes) -> None:
        """Point a key at a chunk another view already stores (a cheap copy)."""
        src = self.vols.get(source) if source.startswith("v") else self.snaps.get(source)
        name = self.existing(pick)
        vol = self.vols[name]
        if src is None:
            return
        entry = src["data"].get(src_key)
        if entry is None or entry[0] != "c":
            return
        view = self.store.volume(source) if source.startswith("v") else self.snap_views[source]
        ref = view.get(src_key)
        assert isinstance(ref, ChunkRef)
        d: Data = vol["data"]
        old = d.get(key)
        old_len = len(old[1]) if old and old[0] == "c" else 0
        fits = (
            ref.raw_length <= old_len
            or chunk_bytes(d) - old_len + ref.raw_length <= vol["capacity"]
        )
        with self.store.volume(name).batch() as b:
            if fits:
                b.put_ref(key, ref)
                d[key] = entry
            else:
                with pytest.raises(NoSpace):
                    b.put_ref(key, ref)

    # -- batches ------------------------------------------------------------
    @precondition(lambda self: self.vols)
    @rule(
        pick=picks,
        ops=st.lists(
            st.one_of(
                st.tuples(st.just("put"), keys, values),
                st.tuples(st.just("chunk"), keys, chunk_data),
                st.tuples(st.just("delete"), keys, st.just(b"")),
                st.tuples(st.just("delete_prefix"), st.sampled_from(PREFIXES), st.just(b"")),
            ),
            min_size=1,
            max_size=8,
        ),
        abort=st.booleans(),
    )
    def batch(self, pick: int, ops: list[tuple[str, bytes, bytes]], abort: bool) -> None:
        """Several changes in one transaction; NoSpace inside leaves the batch usable."""
        name = self.existing(pick)
        vol = self.vols[name]
        work = {"data": dict(vol["data"]), "capacity": vol["capacity"]}
        d: Data = work["data"]
        try:
            with self.store.volume(name).batch() as b:
                for op, key, payload in ops:
                    if op == "put":
                        b.put(key, payload)
                        d[key] = ("v", payload)
                    elif op == "chunk":
                        prep = self.store.prepare_chunk(payload)
                        if self.apply_chunk(work, key, payload):
                            b.put_chunk(key, prep)
                        else:
                            with pytest.raises(NoSpace):
                                b.put_chunk(key, prep)
                    elif op == "delete":
                        assert b.delete(key) is (key in d)
                        d.pop(key, None)
                    else:
                        gone = [k for k in d if k.startswith(key)]
                        assert b.delete_prefix(key) == len(gone)
                        for k in gone:
                            del d[k]
                    # Reads inside the batch see its own writes.
                    self.check_get(b.get, key, d.get(key), read=False)
                    assert b.used == chunk_bytes(d)
                if abort:
                    raise Aborted
        except Aborted:
            return
        vol["data"] = d

    # -- snapshots and clones -----------------------------------------------
    @rule(volume=volumes, name=snapshots)
    def create_snapshot(self, volume: str, name: str) -> None:
        snap = self.snaps.get(name)
        if snap is not None:
            if snap["volume"] == volume:
                info = self.store.create_snapshot(volume, name)
                assert info.size == snap["size"]
            else:
                self.expect(AlreadyExists, lambda: self.store.create_snapshot(volume, name))
            return
        vol = self.vols.get(volume)
        if vol is None:
            self.expect(NotFound, lambda: self.store.create_snapshot(volume, name))
            return
        info = self.store.create_snapshot(volume, name)
        size = chunk_bytes(vol["data"])
        assert (info.volume, info.size, info.capacity) == (volume, size, vol["capacity"])
        self.snaps[name] = {
            "data": dict(vol["data"]),
            "volume": volume,
            "size": size,
            "capacity": vol["capacity"],
        }
        self.snap_views[name] = self.store.snapshot(name)

    @precondition(lambda self: self.vols)
    @rule(pick=picks, name=snapshots)
    def replace_snapshot(self, pick: int, name: str) -> None:
        """Delete a snapshot and cut a new one under the same name (names get reused)."""
        if name in self.snaps:
            self.delete_snapshot(name)
        self.create_snapshot(self.existing(pick), name)

    @rule(name=snapshots)
    def delete_snapshot(self, name: str) -> None:
        if name not in self.snaps:
            self.expect(NotFound, lambda: self.store.delete_snapshot(name))
            return
        self.store.delete_snapshot(name)
        del self.snaps[name]
        # A mount of the snapshot would keep its view: it must fail from now on.
        self.dead_views.append(self.snap_views.pop(name))

    def clone(
        self, source: str, src: dict[str, Any] | None, name: str, capacity: int | None, call: Any
    ) -> None:
        if src is None:
            self.expect(NotFound, call)
            return
        existing = self.vols.get(name)
        if existing is not None:
            same = existing["source"] == source and capacity in (None, existing["capacity"])
            if same:
                info = call()
                assert info.capacity == existing["capacity"]
            else:
                self.expect(AlreadyExists, call)
            return
        cap = src["capacity"] if capacity is None else capacity
        if cap < src["capacity"]:
            self.expect(OutOfRange, call)
            return
        info = call()
        assert (info.capacity, info.used, info.source) == (cap, chunk_bytes(src["data"]), source)
        self.vols[name] = {"data": dict(src["data"]), "capacity": cap, "source": source}
        self.remember_view(name)

    @rule(snap=snapshots, name=volumes, capacity=st.sampled_from([None, *CAPACITIES]))
    def clone_snapshot(self, snap: str, name: str, capacity: int | None) -> None:
        self.clone(
            f"snapshot:{snap}",
            self.snaps.get(snap),
            name,
            capacity,
            lambda: self.store.clone_snapshot(snap, name, capacity=capacity),
        )

    @rule(src=volumes, name=volumes, capacity=st.sampled_from([None, *CAPACITIES]))
    def clone_volume(self, src: str, name: str, capacity: int | None) -> None:
        self.clone(
            f"volume:{src}",
            self.vols.get(src),
            name,
            capacity,
            lambda: self.store.clone_volume(src, name, capacity=capacity),
        )

    # -- release, reopen ----------------------------------------------------
    @rule(batch=st.one_of(st.none(), st.integers(min_value=1, max_value=4)))
    def gc(self, batch: int | None) -> None:
        """Either all garbage, or one smallest step of it."""
        if batch is None:
            self.store.gc()
            assert self.store.gc_pending() == 0
            return
        pending = self.store.gc_pending()
        more = self.store.gc_step(budget=0, batch=batch)
        assert more is (self.store.gc_pending() > 0)
        if pending == 0:
            assert more is False

    @rule(level=st.sampled_from([None, 0, 1, 19]))
    def reopen(self, level: int | None) -> None:
        """Reopen, possibly with another compression level: old chunks stay readable."""
        self.store.close()
        self.store = Store(self.dir, create=False, compression_level=level)
        self.vol_views = {n: self.store.volume(n) for n in self.vol_views}
        self.snap_views = {n: self.store.snapshot(n) for n in self.snaps}
        self.dead_views = []

    # -- checks -------------------------------------------------------------
    def check_get(
        self, get: Callable[[bytes], Any], key: bytes, want: Entry | None, read: bool = True
    ) -> None:
        """``read=False`` inside a batch: its new chunks are not yet visible to other txns."""
        got = get(key)
        if want is None:
            assert got is None, (key, got)
        elif want[0] == "v":
            assert got == want[1], (key, got, want)
        else:
            assert isinstance(got, ChunkRef), (key, got)
            assert got.raw_length == len(want[1])
            assert got.digest == ch.digest_of(want[1], self.store.chunk_hash)
            if read:
                assert self.store.read_chunk(got) == want[1]

    def check_view(self, view: View, data: Data, used: int, capacity: int) -> None:
        for key in KEYS:
            self.check_get(view.get, key, data.get(key))
        assert view.get_many(KEYS) == [view.get(k) for k in KEYS]
        scanned = view.scan()
        assert [k for k, _ in scanned] == sorted(data)
        for key, value in scanned:
            self.check_get(lambda _k, v=value: v, key, data[key])
        for prefix in PREFIXES:
            want = sorted(k for k in data if k.startswith(prefix))
            assert [k for k, _ in view.scan(prefix)] == want
            for start in (b"a\x00", b"ab"):
                from_start = [k for k in want if k >= start]
                assert [k for k, _ in view.scan(prefix, start)] == from_start
                assert [k for k, _ in view.scan(prefix, start, limit=1)] == from_start[:1]
        assert used == chunk_bytes(data)
        assert view.usage() == (used, capacity)
        for key, (kind, payload) in data.items():
            if kind == "c":
                assert view.read_chunk(key) == payload

    def check_missing(self, view: View) -> None:
        with pytest.raises(NotFound):
            self.store.get_volume(view.name)
        with pytest.raises(NotFound):
            view.get(b"a")
        with pytest.raises(NotFound):
            view.scan()
        with pytest.raises(NotFound):
            view.put(b"a", b"x")
        with pytest.raises(NotFound):
            view.put_chunk(b"a", b"x")
        with pytest.raises(NotFound):
            view.delete(b"a")

    @invariant()
    def views_match_model(self) -> None:
        for name in VOLUMES:
            view = self.vol_views.get(name) or self.store.volume(name)
            vol = self.vols.get(name)
            if vol is None:
                self.check_missing(view)
                continue
            info = self.store.get_volume(name)
            assert info.capacity == vol["capacity"]
            self.check_view(view, vol["data"], info.used, vol["capacity"])
        for name in SNAPSHOTS:
            snap = self.snaps.get(name)
            if snap is None:
                with pytest.raises(NotFound):
                    self.store.snapshot(name)
                continue
            view = self.snap_views[name]
            info = self.store.get_snapshot(name)
            assert (info.volume, info.size) == (snap["volume"], snap["size"])
            for v in (view, self.store.snapshot(name)):
                self.check_view(v, snap["data"], info.size, snap["capacity"])
            with pytest.raises(ReadOnly):
                view.put(b"a", b"no")
        for view in self.dead_views:
            with pytest.raises(NotFound):
                view.get(b"a")
            with pytest.raises(NotFound):
                view.scan()
            with pytest.raises(NotFound):
                view.usage()
        st_ = self.store.stats()
        assert (st_.volumes, st_.snapshots) == (len(self.vols), len(self.snaps))
        assert st_.logical_used_bytes == sum(chunk_bytes(v["data"]) for v in self.vols.values())
        assert sorted(v.name for v in self.store.list_volumes()) == sorted(self.vols)
        assert sorted(s.name for s in self.store.list_snapshots()) == sorted(self.snaps)
        report = fsck(self.store)
        assert report.clean, report.problems + report.unfixable

    def delete_everything(self) -> None:
        for name in list(self.snaps):
            self.store.delete_snapshot(name)
        for name in list(self.vols):
            self.store.delete_volume(name)
        self.snaps.clear()
        self.vols.clear()
        self.store.gc()
        st_ = self.store.stats()
        assert (st_.chunk_count, st_.entries, st_.layers, st_.gc_pending_layers) == (0, 0, 0, 0)
        assert (st_.unique_raw_bytes, st_.stored_bytes, st_.referenced_raw_bytes) == (0, 0, 0)
        assert fsck(self.store).clean

    def teardown(self) -> None:
        try:
            self.delete_everything()
        finally:
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)


StoreModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestStoreModel = StoreModel.TestCase


def test_bad_names_are_clear_errors(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as store:
        with pytest.raises(InvalidArgument):
            store.volume("../x")
        with pytest.raises(InvalidArgument):
            store.snapshot("a/b")
        with pytest.raises(InvalidArgument):
            store.create_volume("v", 0)


def test_a_view_of_a_deleted_snapshot_never_reads_its_successor(tmp_path: Path) -> None:
    """Found by the model: a held snapshot view kept reading its old (released) layer."""
    with Store(tmp_path / "s") as store:
        store.create_volume("v", 1 << 20)
        v = store.volume("v")
        v.put(b"k", b"old")
        v.put_chunk(b"c", b"old chunk" * 100)
        store.create_snapshot("v", "s")
        held = store.snapshot("s")
        assert held.get(b"k") == b"old"
        store.delete_snapshot("s")
        store.delete_volume("v")
        store.gc()  # the old layer is gone now
        store.create_volume("v", 1 << 20)
        store.volume("v").put(b"k", b"new")
        store.create_snapshot("v", "s")
        for call in (lambda: held.get(b"k"), held.scan, held.usage, lambda: held.read_chunk(b"c")):
            with pytest.raises(NotFound):
                call()
        assert store.snapshot("s").get(b"k") == b"new"
