"""Views and batches: reading and writing one volume head or snapshot.

A ``View`` names a volume (writable head) or a snapshot (read-only, frozen
layer). Every operation resolves the view's lineage inside its own transaction,
so a snapshot or clone cut by another process is seen by the next operation.
A ``Batch`` is one write transaction on a volume head; reads inside it see its
own writes; it must stay in the thread that opened it.

Usage accounting: a volume's logical usage is the sum of the raw lengths of the
chunks its head sees. Every change computes its delta from the version it hides,
and a change that would grow usage past the capacity raises ``NoSpace`` before
touching anything, so the transaction stays usable and nothing written is lost.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import lmdb

from . import chunks as ch
from . import layers as ly
from .catalog import SnapshotInfo, pack_vstate, unpack_vstate
from .environment import Environment, _Txn
from .errors import InvalidArgument, NoSpace, NotFound, ReadOnly
from .layers import ChunkRef, Lineage, Value


class View:
    """A volume head (writable) or a snapshot (read-only) key space."""

    def __init__(self, store: Environment, name: str, snapshot_layer: int | None) -> None:
        self.store = store
        self.name = name
        self._snapshot_layer = snapshot_layer
        self._key = name.encode()

    @property
    def writable(self) -> bool:
        return self._snapshot_layer is None

    def lineage(self, txn: lmdb.Transaction) -> tuple[Lineage, int]:
        """The view's lineage and logical bytes used, as of ``txn``."""
        dbs = self.store.dbs
        if self._snapshot_layer is not None:
            raw = txn.get(self._key, db=dbs.snapshots)
            snap = None if raw is None else SnapshotInfo.from_json(raw)
            # A snapshot deleted and re-cut under the same name is another snapshot:
            # this view's layer may already be released, so it must not be read.
            if snap is None or snap.layer != self._snapshot_layer:
                raise NotFound(f"snapshot {self.name!r} not found")
            layer, used = snap.layer, snap.size
        else:
            state = txn.get(self._key, db=dbs.vstate)
            if state is None:
                raise NotFound(f"volume {self.name!r} not found")
            layer, used = unpack_vstate(state)
        return self.store.lineages.get(txn, dbs, layer), used

    def get(self, key: bytes) -> Value | None:
        with self.store._read() as txn:
            lin, _ = self.lineage(txn)
            return ly.lookup(txn, self.store.dbs, lin, key)

    def get_many(self, keys: list[bytes]) -> list[Value | None]:
        with self.store._read() as txn:
            lin, _ = self.lineage(txn)
            return [ly.lookup(txn, self.store.dbs, lin, k) for k in keys]

    def scan(
        self, prefix: bytes = b"", start: bytes | None = None, limit: int | None = None
    ) -> list[tuple[bytes, Value]]:
        """Visible entries under ``prefix`` in key order, from ``start`` (inclusive)."""
        out: list[tuple[bytes, Value]] = []
        with self.store._read() as txn:
            lin, _ = self.lineage(txn)
            for item in ly.scan(txn, self.store.dbs, lin, prefix, start):
                out.append(item)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def read_chunk(self, key: bytes) -> bytes | None:
        """The bytes of the chunk stored under ``key``; None for a hole."""
        return self.read_chunks([key])[0]

    def read_chunks(self, keys: list[bytes]) -> list[bytes | None]:
        """The bytes of the chunks stored under ``keys`` (None for holes), in one transaction.

        Chunks written one after another are read with one pread (see
        ``SegmentFiles.read_many``); every chunk is verified against its hash.
        """
        store = self.store
        with store._read() as txn:
            lin, _ = self.lineage(txn)
            refs: list[ChunkRef] = []
            where: list[int] = []
            for i, key in enumerate(keys):
                value = ly.lookup(txn, store.dbs, lin, key)
                if value is None:
                    continue
                if not isinstance(value, ChunkRef):
                    raise InvalidArgument(f"entry {key!r} is not a chunk")
                refs.append(value)
                where.append(i)
            datas = store._read_chunks(txn, refs) if refs else []
        out: list[bytes | None] = [None] * len(keys)
        for i, data in zip(where, datas, strict=True):
            out[i] = data
        return out

    def read_chunk_ranges(
        self, ranges: list[tuple[bytes, bytes]]
    ) -> list[list[tuple[bytes, bytes]]]:
        """(key, bytes) of every chunk entry with ``start <= key < stop``, per range.

        One transaction for all ranges; each range is one cursor walk in key order,
        and the chunks are read as ``read_chunks`` reads them (verified, neighbours
        on disk together). A plain value inside a range is an error.
        """
        store = self.store
        with store._read() as txn:
            lin, _ = self.lineage(txn)
            refs: list[ChunkRef] = []
            where: list[tuple[int, bytes]] = []
            for i, (start, stop) in enumerate(ranges):
                # A range holding only its first key (the common case) costs a plain
                # lookup and one cursor seek; anything after it is walked.
                found: list[tuple[bytes, Value | None]] = [
                    (start, ly.lookup(txn, store.dbs, lin, start))
                ]
                after = start + b"\0"  # the first key after start
                if ly.any_version(txn, store.dbs, lin, after, stop):
                    found += ly.scan(txn, store.dbs, lin, b"", after, stop)
                for key, value in found:
                    if value is None:
                        continue
                    if not isinstance(value, ChunkRef):
                        raise InvalidArgument(f"entry {key!r} is not a chunk")
                    refs.append(value)
                    where.append((i, key))
            datas = store._read_chunks(txn, refs) if refs else []
        out: list[list[tuple[bytes, bytes]]] = [[] for _ in ranges]
        for (i, key), data in zip(where, datas, strict=True):
            out[i].append((key, data))
        return out

    def usage(self) -> tuple[int, int]:
        """(logical bytes used, capacity)."""
        if self._snapshot_layer is not None:
            snap = self.store.get_snapshot(self.name)
            if snap.layer != self._snapshot_layer:
                raise NotFound(f"snapshot {self.name!r} not found")
            return snap.size, snap.capacity
        info = self.store.get_volume(self.name)
        return info.used, info.capacity

    def put(self, key: bytes, value: bytes) -> None:
        with self.batch() as b:
            b.put(key, value)

    def put_chunk(self, key: bytes, data: bytes | ch.PreparedChunk) -> None:
        prep = data if isinstance(data, ch.PreparedChunk) else self.store.prepare_chunk(data)
        with self.batch() as b:
            b.put_chunk(key, prep)

    def delete(self, key: bytes) -> bool:
        with self.batch() as b:
            return b.delete(key)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Batch]:
        """One write transaction on this view; committed when the block exits cleanly."""
        if not self.writable:
            raise ReadOnly(f"snapshot {self.name!r} is read-only")
        with self.store._write() as t:
            lin, used = self.lineage(t.txn)
            b = Batch(self, t, lin, used)
            yield b
            if b.used != used:
                t.txn.put(self._key, pack_vstate(lin.layer, b.used), db=self.store.dbs.vstate)


class Batch:
    """Changes to one volume head inside one write transaction (reads see them)."""

    def __init__(self, view: View, t: _Txn, lin: Lineage, used: int) -> None:
        self.view = view
        self._t = t
        self._lin = lin
        self.used = used
        self._capacity: int | None = None
        self._dbs = view.store.dbs

    @property
    def capacity(self) -> int:
        if self._capacity is None:
            self._capacity = self.view.store._volume(self._t.txn, self.view.name).capacity
        return self._capacity

    def get(self, key: bytes) -> Value | None:
        return ly.lookup(self._t.txn, self._dbs, self._lin, key)

    def scan(
        self, prefix: bytes = b"", start: bytes | None = None
    ) -> Iterator[tuple[bytes, Value]]:
        return ly.scan(self._t.txn, self._dbs, self._lin, prefix, start)

    def read_chunks(self, refs: list[ChunkRef]) -> list[bytes]:
        """The bytes of stored chunks, read inside this transaction (verified)."""
        return self.view.store._read_chunks(self._t.txn, refs) if refs else []

    def _visible_chunk_length(self, key: bytes) -> int:
        raw = ly.lookup_raw(self._t.txn, self._dbs, self._lin, key)
        return struct.unpack(">I", raw[33:37])[0] if raw is not None and raw[:1] == b"C" else 0

    def _charge(self, key: bytes, new_length: int) -> None:
        """Account a visible chunk of ``new_length`` replacing whatever ``key`` had."""
        old = self._visible_chunk_length(key)
        used = self.used - old + new_length
        if new_length > old and used > self.capacity:
            raise NoSpace(
                f"volume {self.view.name!r}: {used} bytes would exceed its capacity "
                f"of {self.capacity}"
            )
        self.used = used

    def put(self, key: bytes, value: bytes) -> None:
        self._charge(key, 0)
        old = ly.set_version(self._t.txn, self._dbs, self._lin, key, ly.encode_value(value))
        self._t.release_version(old)

    def put_chunk(self, key: bytes, prep: ch.PreparedChunk) -> None:
        """Store a prepared chunk under ``key``; a hole deletes the key."""
        if prep.is_hole:
            self.delete(key)
            return
        self._charge(key, prep.raw_length)
        self._t.ref_new(prep)
        raw = ly.encode_value(ChunkRef(prep.digest, prep.raw_length))
        self._t.release_version(ly.set_version(self._t.txn, self._dbs, self._lin, key, raw))

    def put_ref(self, key: bytes, ref: ChunkRef) -> None:
        """Point ``key`` at an already stored chunk (a cheap copy of file data)."""
        if self._t.txn.get(ref.digest, db=self._dbs.chunkrefs) is None:
            raise NotFound(f"chunk {ref.digest.hex()[:16]}")  # before anything changes
        self._charge(key, ref.raw_length)
        self._t.ref_existing(ref)
        raw = ly.encode_value(ref)
        self._t.release_version(ly.set_version(self._t.txn, self._dbs, self._lin, key, raw))

    def delete(self, key: bytes) -> bool:
        """Hide ``key`` in this view; True if it was visible."""
        txn, dbs, lin = self._t.txn, self._dbs, self._lin
        if ly.lookup_raw(txn, dbs, lin, key) is None:
            return False
        self._charge(key, 0)
        below = ly.parent_lookup_raw(txn, dbs, lin, key)
        old = ly.set_version(txn, dbs, lin, key, ly.TOMBSTONE if below is not None else None)
        self._t.release_version(old)
        return True

    def delete_prefix(self, prefix: bytes, start: bytes | None = None) -> int:
        """Delete every visible key under ``prefix`` (from ``start``); returns the count."""
        keys = [k for k, _ in self.scan(prefix, start)]
        for k in keys:
            self.delete(k)
        return len(keys)
