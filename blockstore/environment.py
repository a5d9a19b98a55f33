"""One open store directory: the LMDB environment, its segment files and transactions.

Several processes open the same store at once (the CSI plugin and one FUSE
process per mounted volume). LMDB serialises writers across processes, so every
change that must be atomic is one write transaction (``_Txn``) and writers batch
many changes per transaction (``View.batch``). Hashing and compression happen
before the transaction starts (``prepare_chunk``), so the write lock is held only
for the puts themselves. A ``_Txn`` (and the ``Batch`` over it) belongs to one
thread.

Space: the store keeps a reserve of free space on its filesystem (``reserve_bytes``:
recorded in ``meta`` as ``reserve_bytes``, else ``default_reserve``). A transaction
that appends chunk bytes checks, at its first append, that they fit beside the
reserve, and creates of volumes, snapshots and clones need ``CREATE_MIN_ROOM``
beyond it; both raise ``NoSpace``. Metadata, deletes and gc may use the reserve:
it is there so that they never meet a full filesystem. Whatever the filesystem or
LMDB still refuses inside a write transaction (``OSError``, ``lmdb.Error``) aborts
it whole and becomes a store error in one place (``errors.store_error_of``):
ENOSPC, EDQUOT and a full map are ``NoSpace``.

``Environment`` is what ``View`` and ``Batch`` build on (transactions, catalog
reads, chunk reads); ``store.Store`` adds volumes, snapshots, clones and gc.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import lmdb

from . import chunks as ch
from . import layers as ly
from .catalog import SnapshotInfo, VolumeInfo, check_name, pack_vstate, unpack_vstate
from .errors import Corrupt, InvalidArgument, NoSpace, NotFound, StoreError, store_error_of
from .layers import ChunkRef
from .segments import (
    SEGMENT_BYTES,
    SegmentFiles,
    aligned,
    pack_location,
    pack_segment,
    unpack_location,
    unpack_segment,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MAP_SIZE = 1 << 40  # 1 TiB of address space; the file grows only as written
DEFAULT_COMPRESSION_LEVEL = 3
COUNTERS = ("chunk_count", "unique_raw_bytes", "stored_bytes", "referenced_raw_bytes")
_U64 = struct.Struct(">Q")


# The reserve of free space kept on the store's filesystem (see ``Store.reserve_bytes``):
# by default RESERVE_SHARE of the filesystem, at least RESERVE_MIN and at most
# RESERVE_MAX, and never more than a quarter of the filesystem.
RESERVE_SHARE = 0.02
RESERVE_MIN = 16 << 20
RESERVE_MAX = 1 << 30
# Volumes, snapshots and clones are refused once less than this is left beyond the
# reserve: a volume made then could not hold a single write of a useful size.
CREATE_MIN_ROOM = 1 << 20


def default_reserve(fs_bytes: int) -> int:
    """The default reserve for a filesystem of ``fs_bytes``."""
    return min(max(int(fs_bytes * RESERVE_SHARE), RESERVE_MIN), RESERVE_MAX, fs_bytes // 4)


def _translate(exc: BaseException) -> StoreError:
    err = store_error_of(exc)
    return err if err is not None else StoreError(f"{type(exc).__name__}: {exc}")


class _Txn:
    """A write transaction plus the chunk counter deltas it accumulates."""

    def __init__(self, store: Environment, txn: lmdb.Transaction) -> None:
        self.store = store
        self.txn = txn
        self.dbs = store.dbs
        self.deltas = dict.fromkeys(COUNTERS, 0)
        # Segments touched by this transaction: id -> [live bytes, end offset].
        self._segs: dict[int, list[int]] = {}
        self._active = 0
        self._written: set[int] = set()
        self._freed: list[tuple[int, int, int]] = []
        self._dead: list[int] = []
        self._room: int | None = None  # what appends may still use (free minus reserve)
        self._healed: set[bytes] = set()  # chunks whose damaged copy this transaction replaced
        self._marked: list[bytes] = []  # damage found by reads, marked by this transaction

    # -- chunk bytes in segment files ---------------------------------------
    def _segment(self, seg: int) -> list[int]:
        rec = self._segs.get(seg)
        if rec is None:
            raw = self.txn.get(_U64.pack(seg), db=self.dbs.segments)
            rec = self._segs[seg] = list(unpack_segment(raw)) if raw else [0, 0]
        return rec

    def append(self, record: bytes) -> bytes:
        """Write ``record`` to the active segment; returns its location."""
        if not self._active:
            self._active = self.store._meta_int(self.txn, b"active_segment")
            if not self._active:
                self._roll()
        size = aligned(len(record))
        if self._room is None:
            self._room = self.store._room(self.txn)
        if size > self._room:
            raise NoSpace(
                f"store is full: {self.store.path} keeps {self.store._reserve(self.txn)} "
                "bytes of its filesystem free (its reserve)"
            )
        self._room -= size
        seg = self._segment(self._active)
        if seg[1] and seg[1] + size > SEGMENT_BYTES:
            self._roll()
            seg = self._segment(self._active)
        offset = seg[1]
        self.store.segments.write(self._active, offset, record)
        self._written.add(self._active)
        seg[0] += size
        seg[1] += size
        return pack_location(self._active, offset, len(record))

    def _roll(self) -> None:
        self._active = self.store._next_counter(self.txn, b"next_segment")
        self.txn.put(b"active_segment", _U64.pack(self._active), db=self.dbs.meta)
        self._segs[self._active] = [0, 0]

    def free(self, location: bytes) -> None:
        seg, offset, length = unpack_location(location)
        size = aligned(length)
        self._segment(seg)[0] -= size
        self._freed.append((seg, offset, size))

    def finish_segments(self) -> None:
        """Record segment sizes and make appended bytes durable before the commit."""
        if not self._segs:
            return
        active = self._active or self.store._meta_int(self.txn, b"active_segment")
        for seg, (live, end) in self._segs.items():
            key = _U64.pack(seg)
            if live <= 0 and seg != active:
                self.txn.delete(key, db=self.dbs.segments)
                self._dead.append(seg)
            else:
                self.txn.put(key, pack_segment(max(live, 0), end), db=self.dbs.segments)
        self.store.segments.sync(self._written)

    def after_commit(self, txnid: int) -> None:
        for digest in (*self._marked, *self._healed):
            self.store.damage_found.pop(digest, None)
        if self._freed or self._dead:
            self.store.segments.release(self._freed, self._dead, txnid)

    # -- chunk references -------------------------------------------------
    def ref_new(self, prep: ch.PreparedChunk) -> None:
        dbs, txn = self.dbs, self.txn
        raw = txn.get(prep.digest, db=dbs.chunkrefs)
        if raw is not None:
            count, raw_len, stored = ch.unpack_refs(raw)
            if prep.digest not in self._healed and not self._copy_is_sound(prep):
                stored = self._replace_copy(prep, stored)
            txn.put(prep.digest, ch.pack_refs(count + 1, raw_len, stored), db=dbs.chunkrefs)
        else:
            record = bytes((prep.codec,)) + prep.payload
            stored = len(record)
            txn.put(prep.digest, self.append(record), db=dbs.chunks)
            txn.put(prep.digest, ch.pack_refs(1, prep.raw_length, stored), db=dbs.chunkrefs)
            self.deltas["chunk_count"] += 1
            self.deltas["unique_raw_bytes"] += prep.raw_length
            self.deltas["stored_bytes"] += stored
        self.deltas["referenced_raw_bytes"] += prep.raw_length

    def _copy_is_sound(self, prep: ch.PreparedChunk) -> bool:
        txn, dbs, store = self.txn, self.dbs, self.store
        marked = (
            prep.digest in store.damage_found or txn.get(prep.digest, db=dbs.damaged) is not None
        )
        location = txn.get(prep.digest, db=dbs.chunks)
        return ch.copy_is_sound(prep, location, store.segments.read, store.chunk_hash, marked)

    def _replace_copy(self, prep: ch.PreparedChunk, stored: int) -> int:
        """Store ``prep`` over a damaged or missing copy of its chunk; the new stored length."""
        txn, dbs = self.txn, self.dbs
        old = txn.get(prep.digest, db=dbs.chunks)
        if old is not None:
            self.free(bytes(old))
        record = ch.record_of(prep)
        txn.put(prep.digest, self.append(record), db=dbs.chunks)
        txn.delete(prep.digest, db=dbs.damaged)
        self._healed.add(prep.digest)
        self.deltas["stored_bytes"] += len(record) - stored
        log.warning("event=chunk_healed digest=%s", prep.digest.hex()[:16])
        return len(record)

    def persist_damage(self) -> None:
        """Mark the chunks this process found damaged (see ``Store.damage_found``)."""
        txn, dbs, store = self.txn, self.dbs, self.store
        for digest, why in list(store.damage_found.items()):
            self._marked.append(digest)  # forgotten after the commit, marked or not
            refs = txn.get(digest, db=dbs.chunkrefs)
            location = txn.get(digest, db=dbs.chunks)
            if digest in self._healed or refs is None or location is None:
                continue
            if txn.get(digest, db=dbs.damaged) is None:
                # Another process may have healed it since: look again before marking.
                if ch.record_is_sound(
                    digest, ch.unpack_refs(refs)[1], location, store.segments.read, store.chunk_hash
                ):
                    continue
                txn.put(digest, why.encode(), db=dbs.damaged)

    def ref_existing(self, ref: ChunkRef) -> None:
        raw = self.txn.get(ref.digest, db=self.dbs.chunkrefs)
        if raw is None:
            raise NotFound(f"chunk {ref.digest.hex()[:16]}")
        count, raw_len, stored = ch.unpack_refs(raw)
        self.txn.put(ref.digest, ch.pack_refs(count + 1, raw_len, stored), db=self.dbs.chunkrefs)
        self.deltas["referenced_raw_bytes"] += raw_len

    def unref(self, digest: bytes) -> None:
        dbs, txn = self.dbs, self.txn
        raw = txn.get(digest, db=dbs.chunkrefs)
        if raw is None:
            log.warning("event=unref_missing_chunk digest=%s", digest.hex()[:16])
            return
        count, raw_len, stored = ch.unpack_refs(raw)
        self.deltas["referenced_raw_bytes"] -= raw_len
        if count <= 1:
            txn.delete(digest, db=dbs.chunkrefs)
            location = txn.get(digest, db=dbs.chunks)
            if location is not None:
                self.free(location)
                txn.delete(digest, db=dbs.chunks)
            txn.delete(digest, db=dbs.damaged)
            self.deltas["chunk_count"] -= 1
            self.deltas["unique_raw_bytes"] -= raw_len
            self.deltas["stored_bytes"] -= stored
        else:
            txn.put(digest, ch.pack_refs(count - 1, raw_len, stored), db=dbs.chunkrefs)

    def release_version(self, raw: bytes | None) -> None:
        """Drop the chunk reference held by a removed entry version, if any."""
        if raw is not None and raw[:1] == b"C":
            self.unref(bytes(raw[1:33]))

    # -- layers -----------------------------------------------------------
    def new_layer(self, parent: int, family: int = 0) -> int:
        layer = self.store._next_counter(self.txn, b"next_layer")
        ly.write_layer(self.txn, self.dbs, ly.LayerRecord(layer, parent, family or layer, 1, False))
        return layer

    def add_holders(self, layer: int, delta: int) -> None:
        rec = ly.read_layer(self.txn, self.dbs, layer)
        holders = rec.holders + delta
        rec = replace(rec, holders=holders)
        ly.write_layer(self.txn, self.dbs, rec)
        if holders <= 0:
            self.txn.put(ly.u64(layer), b"", db=self.dbs.gcqueue)
        elif holders == 1 and delta < 0 and rec.frozen:
            self.txn.put(ly.u64(layer), b"", db=self.dbs.mergequeue)

    def commit_counters(self) -> None:
        for name, delta in self.deltas.items():
            if delta:
                key = name.encode()
                cur = self.txn.get(key, db=self.dbs.meta)
                val = (_U64.unpack(cur)[0] if cur else 0) + delta
                self.txn.put(key, _U64.pack(max(val, 0)), db=self.dbs.meta)


class Environment:
    """One open store directory: LMDB, segment files, transactions, the reserve, chunk reads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        compression_level: int | None = None,
        chunk_hash: str = ch.DEFAULT_HASH,
        map_size: int = DEFAULT_MAP_SIZE,
        reserve: int | None = None,
    ) -> None:
        """Open the store at ``path``, creating it if ``create``. ``chunk_hash`` applies
        to a new store only: an existing store keeps the hash it was created with.
        ``reserve``: record this reserve of free space (bytes; 0: the default), as
        ``set_reserve`` does."""
        ch.digest_of(b"", chunk_hash)  # InvalidArgument for an unknown hash
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise NotFound(f"no store at {self.path}")
            self.path.mkdir(mode=0o700, parents=True)
        elif not self.path.is_dir():
            raise InvalidArgument(f"store path {self.path} is not a directory")
        os.chmod(self.path, 0o700)
        try:
            self.env = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=16,
                max_readers=1024,
                readahead=False,
                subdir=True,
            )
        except lmdb.Error as exc:
            raise _translate(exc) from exc
        self.dbs = ly.Databases(self.env)
        self.lineages = ly.LineageCache()
        self.segments = SegmentFiles(self.path, self._oldest_reader)
        # Chunks this process found damaged on read (digest -> why): the next put of
        # one rewrites it, and the next write transaction marks it (``damaged``).
        self.damage_found: dict[bytes, str] = {}
        try:
            self._settings(compression_level, chunk_hash)
            if reserve is not None:
                self.set_reserve(reserve)
        except BaseException:
            self.close()  # a store that cannot be used is not left open
            raise

    def _settings(self, compression_level: int | None, chunk_hash: str) -> None:
        """Record a new store's settings, check an existing one's, and read them."""
        with self._write() as t:
            fmt = t.txn.get(b"format", db=self.dbs.meta)
            if fmt is None:
                t.txn.put(b"format", _U64.pack(FORMAT_VERSION), db=self.dbs.meta)
                level = (
                    DEFAULT_COMPRESSION_LEVEL if compression_level is None else compression_level
                )
                t.txn.put(b"compression_level", _U64.pack(level), db=self.dbs.meta)
                t.txn.put(b"chunk_hash", chunk_hash.encode(), db=self.dbs.meta)
            elif _U64.unpack(fmt)[0] != FORMAT_VERSION:
                raise InvalidArgument(f"store format {_U64.unpack(fmt)[0]} is not supported")
            if compression_level is not None:
                t.txn.put(b"compression_level", _U64.pack(compression_level), db=self.dbs.meta)
        with self._read() as txn:
            self.compression_level = self._meta_int(txn, b"compression_level")
            # Stores created before the hash was recorded hash with sha256.
            self.chunk_hash = bytes(txn.get(b"chunk_hash", b"sha256", db=self.dbs.meta)).decode()
        if self.chunk_hash not in ch.HASHES:
            raise Corrupt(f"store {self.path} names an unknown chunk hash {self.chunk_hash!r}")

    # -- plumbing ---------------------------------------------------------
    def close(self) -> None:
        self.segments.close()  # first: giving space back consults the reader table
        self.env.close()

    def _begin(self, write: bool) -> lmdb.Transaction:
        try:
            return self.env.begin(write=write)
        except lmdb.MapResizedError:
            # Another process grew the map: adopt its size and retry once.
            self.env.set_mapsize(0)
            return self.env.begin(write=write)

    def _oldest_reader(self) -> int | None:
        """The transaction id of the oldest open read transaction in any process."""
        self.env.reader_check()  # slots left by dead processes are not readers
        ids = []
        for line in self.env.readers().splitlines()[1:]:  # "pid thread txnid", "-": idle
            fields = line.split()
            if len(fields) == 3 and fields[2].isdigit():
                ids.append(int(fields[2]))
        return min(ids, default=None)

    @contextlib.contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        txn = self._begin(False)
        try:
            yield txn
        finally:
            txn.abort()

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Txn]:
        txn = self._begin(True)
        t = _Txn(self, txn)
        try:
            yield t
            if self.damage_found:
                t.persist_damage()
            t.commit_counters()
            t.finish_segments()
            txnid = txn.id()  # readers older than this may still see what it freed
            txn.commit()
        except (lmdb.Error, OSError) as exc:
            # A full filesystem (a segment append, LMDB growing its file) is NoSpace;
            # the transaction is gone and the store is as it was before it.
            txn.abort()
            raise _translate(exc) from exc
        except BaseException:
            txn.abort()
            raise
        t.after_commit(txnid)

    def _meta_int(self, txn: lmdb.Transaction, key: bytes) -> int:
        raw = txn.get(key, db=self.dbs.meta)
        return int(_U64.unpack(raw)[0]) if raw else 0

    # -- the reserve of free space ----------------------------------------------------
    def _reserve(self, txn: lmdb.Transaction, vfs: os.statvfs_result | None = None) -> int:
        configured = self._meta_int(txn, b"reserve_bytes")
        if configured:
            return configured
        vfs = vfs or os.statvfs(self.path)
        return default_reserve(vfs.f_blocks * vfs.f_frsize)

    def _room(self, txn: lmdb.Transaction) -> int:
        vfs = os.statvfs(self.path)
        return max(vfs.f_bavail * vfs.f_frsize - self._reserve(txn, vfs), 0)

    def reserve_bytes(self) -> int:
        """Free space the store keeps on its filesystem.

        New chunk data, new volumes, snapshots and clones are refused (``NoSpace``)
        rather than eat into it: it is there so that LMDB's metadata, deletes and
        ``gc`` never meet a full filesystem. Recorded in the store (``set_reserve``),
        else ``default_reserve`` of the filesystem's size.
        """
        with self._read() as txn:
            return self._reserve(txn)

    def room(self) -> int:
        """Bytes of new data the store can still take: free space minus the reserve."""
        with self._read() as txn:
            return self._room(txn)

    def set_reserve(self, nbytes: int) -> None:
        """Record the reserve in bytes (0: back to the default); every process sees it."""
        if not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidArgument(f"reserve must be a number of bytes >= 0, not {nbytes!r}")
        with self._write() as t:
            t.txn.put(b"reserve_bytes", _U64.pack(nbytes), db=self.dbs.meta)
        log.info("event=reserve_set bytes=%d", nbytes)

    def _check_room(self, txn: lmdb.Transaction, what: str) -> None:
        """Refuse to create ``what`` once the store is down to its reserve."""
        if self._room(txn) < CREATE_MIN_ROOM:
            raise NoSpace(
                f"cannot create {what}: the store's filesystem is down to its reserve of "
                f"{self._reserve(txn)} free bytes (delete volumes or snapshots and run gc)"
            )

    def _next_counter(self, txn: lmdb.Transaction, key: bytes) -> int:
        n = self._meta_int(txn, key) + 1
        txn.put(key, _U64.pack(n), db=self.dbs.meta)
        return n

    def _volume(self, txn: lmdb.Transaction, name: str) -> VolumeInfo:
        key = check_name(name, "volume name")
        raw = txn.get(key, db=self.dbs.volumes)
        state = txn.get(key, db=self.dbs.vstate)
        if raw is None or state is None:
            raise NotFound(f"volume {name!r} not found")
        head, used = unpack_vstate(state)
        return VolumeInfo.from_json(raw, head, used)

    def _snapshot(self, txn: lmdb.Transaction, name: str) -> SnapshotInfo:
        raw = txn.get(check_name(name, "snapshot name"), db=self.dbs.snapshots)
        if raw is None:
            raise NotFound(f"snapshot {name!r} not found")
        return SnapshotInfo.from_json(raw)

    def _put_volume(self, txn: lmdb.Transaction, info: VolumeInfo) -> None:
        key = info.name.encode()
        txn.put(key, info.to_json(), db=self.dbs.volumes)
        txn.put(key, pack_vstate(info.head, info.used), db=self.dbs.vstate)

    # -- catalog reads ----------------------------------------------------
    def get_volume(self, name: str) -> VolumeInfo:
        with self._read() as txn:
            return self._volume(txn, name)

    def get_snapshot(self, name: str) -> SnapshotInfo:
        with self._read() as txn:
            return self._snapshot(txn, name)

    # -- chunks -----------------------------------------------------------
    def prepare_chunk(self, data: bytes | memoryview, level: int | None = None) -> ch.PreparedChunk:
        """Hash and compress ``data`` (no lock held; safe to call from worker threads)."""
        return ch.prepare(data, self.compression_level if level is None else level, self.chunk_hash)

    def read_chunk(self, ref: ChunkRef) -> bytes:
        """The raw bytes of a chunk, verified against its hash (``Corrupt`` if not)."""
        with self._read() as txn:
            location = txn.get(ref.digest, db=self.dbs.chunks)
        if location is None:
            # An entry names a chunk that is gone: the store is damaged (fsck says so).
            raise Corrupt(f"chunk {ref.digest.hex()[:16]} is missing")
        return self._decode(ref, self.segments.read(location))

    def _decode(self, ref: ChunkRef, record: bytes | memoryview) -> bytes:
        try:
            return ch.decode(ref.digest, record, ref.raw_length, self.chunk_hash)
        except Corrupt as exc:
            self.damage_found[ref.digest] = str(exc)
            log.warning("event=chunk_damaged digest=%s error=%s", ref.digest.hex()[:16], exc)
            raise

    def _read_chunks(self, txn: lmdb.Transaction, refs: list[ChunkRef]) -> list[bytes]:
        """``read_chunk`` of several chunks in ``txn``; neighbours on disk are read together."""
        locations = []
        for ref in refs:
            location = txn.get(ref.digest, db=self.dbs.chunks)
            if location is None:
                raise Corrupt(f"chunk {ref.digest.hex()[:16]} is missing")
            locations.append(location)
        return self.segments.read_many(
            locations,
            lambda i, rec: self._decode(refs[i], rec),
        )

    def locate_chunk(self, digest: bytes) -> tuple[Path, int, int]:
        """(segment file, offset, length) of a chunk's stored record: for fsck and tests."""
        with self._read() as txn:
            location = txn.get(digest, db=self.dbs.chunks)
        if location is None:
            raise NotFound(f"chunk {digest.hex()[:16]}")
        seg, offset, length = unpack_location(location)
        return self.segments.path(seg), offset, length
