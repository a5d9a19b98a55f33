"""Buffered changes, the read cache and the flush transaction.

The filesystem changes nothing in the store directly. Every change lands in the
*live* ``Layer``: dirty chunk buffers per file, index ranges of stored chunks that
are hidden (truncated away or punched out), plain key changes (directory entries,
xattrs, symlinks, orphan markers, the superblock) and key prefixes to delete. A
flush freezes the live layer into a ``FlushJob`` (a fresh live layer starts at
once), hashes and compresses its chunks (``prepare``, safe in worker threads: it
only reads the frozen buffers) and writes everything, with the inode records
captured at the same moment, in ONE ``View.batch()`` transaction (``commit``).
LMDB commits are synced, so a committed job survives a crash; a job is all or
nothing. With a thread pool attached (``prepare_pool``), chunks are hashed and
compressed while the layer is still live, from immutable snapshots
(``prepare_ahead``); a chunk changed after its snapshot drops that result, so a
job only ever commits what its buffers hold at the freeze.

Reads see, in order: the live layer, the job being committed (or one whose commit
failed, kept for a retry), then the store through ``ChunkCache``. The cache
mirrors the store: it changes only when a job commits (its keys are dropped) and
entries fetched before a commit that changed file data are not inserted after it
(``epoch``).

Space accounting: each dirty chunk remembers the length of the chunk it replaces
(``base``); a layer's ``growth`` is the sum of (dirty length - base), so the volume's
used bytes plus the growth of the live and the committing layer bound what the
store will hold after both commit. Hidden stored chunks are not subtracted until
they are really deleted, so the bound errs on the safe side; a writer that hits it
flushes and re-checks before reporting ENOSPC.

Commit order inside the transaction: prefix deletes; hidden chunks (skipping
indexes that the job rewrites anyway); chunk puts, shrinking ones first so that a
transaction that fits never trips the capacity check half-way; plain keys; inode
records (with their stored chunk bytes updated); the superblock rides in the
plain keys.
"""

from __future__ import annotations

import bisect
import errno
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import replace

from blockstore import Batch, ChunkRef, PreparedChunk, Store, View

from .errors import FlushNeeded, FsError
from .schema import InodeRecord, chunk_index, chunk_key, chunk_prefix, inode_key

log = logging.getLogger(__name__)

INF = 1 << 62  # an index past any chunk of any file (2**63 bytes / 4 KiB chunks)
_SCAN_BATCH = 1024
_ENTRY_OVERHEAD = 128  # bytes charged per cache entry besides its data
_AHEAD_BATCH = 16  # chunks per task sent to the prepare pool (tasks are cancelled whole)


class _Hidden:
    """The marker returned for a chunk that a layer hides (reads as zeros)."""

    def __repr__(self) -> str:
        return "HIDDEN"


HIDDEN = _Hidden()


class IndexRanges:
    """Sorted, disjoint, half-open ranges of chunk indexes."""

    __slots__ = ("ranges",)

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def add(self, lo: int, hi: int) -> None:
        if lo >= hi:
            return
        keep: list[tuple[int, int]] = []
        for a, b in self.ranges:
            if b < lo or a > hi:
                keep.append((a, b))
            else:
                lo, hi = min(lo, a), max(hi, b)
        keep.append((lo, hi))
        keep.sort()
        self.ranges = keep

    def covers(self, index: int) -> bool:
        i = bisect.bisect_right(self.ranges, (index, INF + 1)) - 1
        return i >= 0 and index < self.ranges[i][1]

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.ranges)


class FileOverlay:
    """One file's buffered data: dirty chunks over hidden ranges over the layer below.

    A dirty chunk is ``bytes`` while it holds one whole-chunk write (immutable: it
    can be read, hashed and prepared ahead without a copy) and becomes a
    ``bytearray`` the first time it is changed in part (``Layer.chunk_for_update``).

    ``ready``: chunks whose hashing and compression started ahead of the flush
    (``FileData.prepare_ahead``), each a future of prepared chunks and a position
    in it. An entry exists only while its buffer is unchanged since the snapshot
    that was prepared: every change to a buffer goes through
    ``Layer.chunk_for_update`` or ``Layer.hide``, which drop the entry.
    """

    __slots__ = ("base", "chunks", "growth", "hidden", "ready")

    def __init__(self) -> None:
        self.chunks: dict[int, bytearray | bytes] = {}
        self.base: dict[int, int] = {}
        self.hidden = IndexRanges()
        self.growth = 0
        self.ready: dict[int, tuple[Future[list[PreparedChunk]], int]] = {}

    def lookup(self, index: int) -> bytearray | bytes | _Hidden | None:
        buf = self.chunks.get(index)
        if buf is not None:
            return buf
        if self.hidden and self.hidden.covers(index):
            return HIDDEN
        return None


class Layer:
    """One generation of buffered changes (see the module docstring)."""

    def __init__(self) -> None:
        self.files: dict[int, FileOverlay] = {}
        self.kv: dict[bytes, bytes | None] = {}
        self.prefix_deletes: list[bytes] = []
        self.dirty_bytes = 0
        self.growth = 0
        self.ahead = False  # a flush became due: the backlog was sent to be prepared ahead

    def __bool__(self) -> bool:
        return bool(self.files or self.kv or self.prefix_deletes)

    def lookup_chunk(self, ino: int, index: int) -> bytearray | bytes | _Hidden | None:
        fo = self.files.get(ino)
        return None if fo is None else fo.lookup(index)

    def lookup_kv(self, key: bytes) -> tuple[bool, bytes | None]:
        if key in self.kv:
            return True, self.kv[key]
        return False, None

    def file_growth(self, ino: int) -> int:
        fo = self.files.get(ino)
        return 0 if fo is None else fo.growth

    def chunk_for_update(
        self, ino: int, index: int, load: Callable[[], tuple[bytes | bytearray, int]]
    ) -> bytearray:
        """The mutable dirty buffer of a chunk, created from ``load() -> (content, base)``."""
        fo = self.files.get(ino)
        if fo is None:
            fo = self.files[ino] = FileOverlay()
        buf = fo.chunks.get(index)
        if buf is None:
            content, base = load()
            new = fo.chunks[index] = bytearray(content)
            fo.base[index] = base
            self._account(fo, len(new) - base, len(new))
            return new
        if fo.ready:
            fo.ready.pop(index, None)  # the caller changes the buffer: that snapshot is stale
        if isinstance(buf, bytes):
            buf = fo.chunks[index] = bytearray(buf)
        return buf

    def put_whole(self, ino: int, index: int, data: bytes, base: int) -> None:
        """Make ``data`` (a whole chunk) the chunk's content; ``base``: the length it replaces."""
        fo = self.files.get(ino)
        if fo is None:
            fo = self.files[ino] = FileOverlay()
        old = fo.chunks.get(index)
        if old is None:
            fo.base[index] = base
            self._account(fo, len(data) - base, len(data))
        else:
            fo.ready.pop(index, None)
            self._account(fo, len(data) - len(old), len(data) - len(old))
        fo.chunks[index] = data

    def resized(self, ino: int, old_length: int, new_length: int) -> None:
        """Account a dirty buffer of ``ino`` that changed length in place."""
        d = new_length - old_length
        if d:
            self._account(self.files[ino], d, d)

    def hide(self, ino: int, lo: int, hi: int) -> None:
        """Hide chunks ``[lo, hi)`` of ``ino``: drop their buffers, delete them at commit."""
        fo = self.files.get(ino)
        if fo is None:
            fo = self.files[ino] = FileOverlay()
        for index in [i for i in fo.chunks if lo <= i < hi]:
            buf = fo.chunks.pop(index)
            base = fo.base.pop(index)
            fo.ready.pop(index, None)
            self._account(fo, base - len(buf), -len(buf))
        fo.hidden.add(lo, hi)

    def _account(self, fo: FileOverlay, growth: int, dirty: int) -> None:
        fo.growth += growth
        self.growth += growth
        self.dirty_bytes += dirty


class ChunkCache:
    """A bounded LRU of decoded stored chunks, keyed by (ino, index); b"" is a hole."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._d: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: tuple[int, int]) -> bytes | None:
        data = self._d.get(key)
        if data is not None:
            self._d.move_to_end(key)
        return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        if self.limit <= 0:
            return
        self.discard(key)
        self._d[key] = data
        self.size += len(data) + _ENTRY_OVERHEAD
        while self.size > self.limit and self._d:
            _, old = self._d.popitem(last=False)
            self.size -= len(old) + _ENTRY_OVERHEAD

    def discard(self, key: tuple[int, int]) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.size -= len(old) + _ENTRY_OVERHEAD

    def discard_range(self, ino: int, lo: int, hi: int) -> None:
        for key in [k for k in self._d if k[0] == ino and lo <= k[1] < hi]:
            self.discard(key)

    def clear(self) -> None:
        self._d.clear()
        self.size = 0


class FlushJob:
    """A frozen layer plus the inode records captured with it, on its way to the store.

    ``prepare`` may run in several worker threads at once (each takes every
    ``parts``-th chunk); ``commit`` runs in one thread. Neither touches the
    filesystem's live state.
    """

    NEW, COMMITTING, FAILED = "new", "committing", "failed"

    def __init__(self, layer: Layer, records: dict[int, InodeRecord]) -> None:
        self.layer = layer
        self.records = records
        self.chunks: list[tuple[int, int, bytearray | bytes]] = []
        self.ready: list[tuple[Future[list[PreparedChunk]], int] | None] = []
        for ino, fo in layer.files.items():
            for index, buf in fo.chunks.items():
                self.chunks.append((ino, index, buf))
                self.ready.append(fo.ready.get(index))
        self.prepared: list[PreparedChunk | None] = [None] * len(self.chunks)
        self.state = self.NEW

    @property
    def dirty_bytes(self) -> int:
        return self.layer.dirty_bytes

    def prepare(self, store: Store, level: int, part: int = 0, parts: int = 1) -> None:
        for i in range(part, len(self.chunks), parts):
            if self.prepared[i] is None:
                prep = self._ready(i)
                if prep is None:
                    buf = self.chunks[i][2]
                    prep = store.prepare_chunk(
                        buf if isinstance(buf, bytes) else memoryview(buf), level
                    )
                self.prepared[i] = prep

    def _ready(self, i: int) -> PreparedChunk | None:
        """The chunk prepared ahead of the flush, if any (None: prepare it now).

        A prepare-ahead still queued is cancelled rather than waited for: it may sit
        behind this very call in the same pool.
        """
        ready = self.ready[i]
        if ready is None:
            return None
        self.ready[i] = None
        fut, pos = ready
        if fut.cancel():
            return None
        try:
            return fut.result()[pos]
        except CancelledError:
            return None
        except Exception:
            log.exception("event=prepare_ahead_failed")
            return None

    def commit(self, view: View) -> dict[int, int]:
        """Write the job in one transaction; returns stored chunk bytes gained per inode."""
        deltas: dict[int, int] = defaultdict(int)
        layer = self.layer
        with view.batch() as b:
            for prefix in layer.prefix_deletes:
                b.delete_prefix(prefix)
            for ino, fo in layer.files.items():
                for lo, hi in fo.hidden:
                    _delete_chunks(b, ino, lo, hi, fo.chunks, deltas)
            puts = []
            for (ino, index, _), prep in zip(self.chunks, self.prepared, strict=True):
                assert prep is not None, "commit before prepare"
                key = chunk_key(ino, index)
                old = b.get(key)
                old_len = old.raw_length if isinstance(old, ChunkRef) else 0
                puts.append((prep.raw_length - old_len, key, prep, ino))
            puts.sort(key=lambda p: p[0])
            for delta, key, prep, ino in puts:
                b.put_chunk(key, prep)
                deltas[ino] += delta
            for key, value in layer.kv.items():
                if value is None:
                    b.delete(key)
                else:
                    b.put(key, value)
            for ino, rec in self.records.items():
                rec = rec if not deltas.get(ino) else _with_alloc(rec, rec.alloc + deltas[ino])
                b.put(inode_key(ino), rec.pack())
        return dict(deltas)


def _prepare_all(store: Store, level: int, snaps: list[bytes]) -> list[PreparedChunk]:
    return [store.prepare_chunk(snap, level) for snap in snaps]


def _with_alloc(rec: InodeRecord, alloc: int) -> InodeRecord:
    return replace(rec, alloc=max(alloc, 0))


def _delete_chunks(
    b: Batch,
    ino: int,
    lo: int,
    hi: int,
    keep: dict[int, bytearray | bytes],
    deltas: dict[int, int],
) -> None:
    """Delete stored chunks ``[lo, hi)`` of ``ino`` except those being rewritten."""
    prefix = chunk_prefix(ino)
    start = lo
    while start < hi:
        found: list[tuple[bytes, int, bytes | ChunkRef]] = []
        # Collect first, delete after: the scan's cursor must not see its own deletes.
        for key, value in b.scan(prefix, start=chunk_key(ino, start)):
            index = chunk_index(key)
            if index >= hi or len(found) >= _SCAN_BATCH:
                break
            found.append((key, index, value))
        for key, index, value in found:
            if index not in keep and b.delete(key) and isinstance(value, ChunkRef):
                deltas[ino] -= value.raw_length
        if len(found) < _SCAN_BATCH:
            return
        start = found[-1][1] + 1


class FileData:
    """The contents of every file of one volume: buffered, cached and flushed.

    Knows files only by inode number and size; the namespace lives in
    ``Filesystem``. Sizes are the caller's: a chunk at or past ``size`` reads as
    nothing without a store lookup (the no-data-past-EOF invariant).
    """

    def __init__(
        self, view: View, chunk_size: int, level: int, dirty_limit: int, cache_limit: int
    ) -> None:
        self.view = view
        self.store = view.store
        self.chunk_size = chunk_size
        self.level = level
        self.dirty_limit = dirty_limit
        self.cache = ChunkCache(cache_limit)
        self.live = Layer()
        self.inflight: FlushJob | None = None
        self.epoch = 0  # bumped whenever the store's copy of file data may have changed
        self.used, self.capacity = view.usage()
        # Where writes send chunks to be hashed and compressed before the flush needs
        # them (``prepare_ahead``; the async adapter sets its pool; None: at the flush).
        self.prepare_pool: Executor | None = None

    def layers(self) -> list[Layer]:
        return [self.live] if self.inflight is None else [self.live, self.inflight.layer]

    def refresh_usage(self) -> None:
        self.used, self.capacity = self.view.usage()

    def file_growth(self, ino: int) -> int:
        growth = self.live.file_growth(ino)  # on every getattr: no generator, no list
        if self.inflight is not None:
            growth += self.inflight.layer.file_growth(ino)
        return growth

    def pending_growth(self) -> int:
        return sum(layer.growth for layer in self.layers())

    def pending_bytes(self) -> int:
        return sum(layer.dirty_bytes for layer in self.layers())

    # -- looking at chunks ------------------------------------------------------------------------
    def visible(
        self, ino: int, size: int, index: int, need_data: bool
    ) -> tuple[bytes | bytearray | None, int]:
        """(content, length) of a chunk as reads see it; content None if not needed.

        A dirty buffer is returned as is (not copied): callers must not keep it.
        """
        if index * self.chunk_size >= size:
            return b"", 0
        for layer in self.layers():
            found = layer.lookup_chunk(ino, index)
            if found is HIDDEN:
                return b"", 0
            if isinstance(found, (bytes, bytearray)):
                return found, len(found)
        cached = self.cache.get((ino, index))
        if cached is not None:
            return cached, len(cached)
        if not need_data:
            ref = self.view.get(chunk_key(ino, index))
            return None, ref.raw_length if isinstance(ref, ChunkRef) else 0
        data = self.view.read_chunk(chunk_key(ino, index)) or b""
        self.cache.put((ino, index), data)
        return data, len(data)

    def update_chunk(
        self, ino: int, size: int, index: int, length_if_replaced: int | None = None
    ) -> bytearray:
        """The live dirty buffer of a chunk, created on first use.

        ``length_if_replaced``: the caller overwrites all current content, so only
        the current length (for accounting) is needed, not the bytes.
        """

        def load() -> tuple[bytes | bytearray, int]:
            if length_if_replaced is not None:
                return b"", length_if_replaced
            data, length = self.visible(ino, size, index, True)
            return data or b"", length  # copied once, into the new buffer

        return self.live.chunk_for_update(ino, index, load)

    def check_space(self, growth: int, nbytes: int, pending: bool) -> None:
        """Raise FlushNeeded if buffers are full, or space is short while changes are pending.

        ``pending``: anything at all is buffered (data, metadata or a failed job).
        """
        if pending and nbytes and self.pending_bytes() + nbytes > self.dirty_limit:
            raise FlushNeeded("dirty buffers are full")
        if growth <= 0 or self.used + self.pending_growth() + growth <= self.capacity:
            return
        if pending:
            raise FlushNeeded("space is short while changes are pending", space=True)
        self.refresh_usage()
        if self.used + growth > self.capacity:
            raise FsError(
                errno.ENOSPC,
                f"volume {self.view.name!r} is full ({self.used} of {self.capacity} bytes used)",
            )

    # -- reading and changing file contents -------------------------------------------------------
    def read(self, ino: int, size: int, off: int, n: int) -> bytes:
        end = min(off + n, size)
        if off >= end:
            return b""
        cs = self.chunk_size
        first, last = off // cs, (end - 1) // cs
        pieces: list[bytes | memoryview] = []
        for index in range(first, last + 1):
            base = index * cs
            s, e = max(off, base) - base, min(end, base + cs) - base
            data = self.visible(ino, size, index, True)[0] or b""
            if first == last and s == 0 and e == len(data) and isinstance(data, bytes):
                return data
            # Stored chunks and whole-chunk writes are immutable bytes: view them, copy
            # once in the join. A bytearray is copied at once: nothing may keep a view
            # of a buffer that changes.
            piece = memoryview(data)[s:e] if isinstance(data, bytes) else bytes(data[s:e])
            if first == last and len(piece) == e - s:
                return bytes(piece)
            pieces.append(piece)
            if len(piece) < e - s:
                pieces.append(bytes(e - s - len(piece)))
        return b"".join(pieces)

    def write(self, ino: int, size: int, off: int, data: bytes | memoryview, pending: bool) -> int:
        """Buffer ``data`` at ``off``; returns the file's new size. May raise FlushNeeded."""
        n = len(data)
        end = off + n
        cs = self.chunk_size
        plan = []
        growth = 0
        for index in range(off // cs, (end - 1) // cs + 1):
            base = index * cs
            s, e = max(off, base) - base, min(end, base + cs) - base
            # A partial write will need the chunk's bytes: fetching them now (they
            # land in the cache) saves a second lookup when the buffer is made.
            length = self.visible(ino, size, index, s > 0 or e < cs)[1]
            growth += max(0, e - length)
            plan.append((index, s, e, length))
        self.check_space(growth, n, pending)
        mv = memoryview(data)
        pos = 0
        live = self.live
        due = self.prepare_pool is not None and live.dirty_bytes >= self.flush_threshold
        ahead = []
        for index, s, e, length in plan:
            # Chunks worth preparing ahead: those this write completes (a sequential
            # writer does not come back to them) and, once a flush is due, those it
            # creates (a random writer rarely comes back before the flush).
            if e == cs or (
                due and not isinstance(live.lookup_chunk(ino, index), (bytes, bytearray))
            ):
                ahead.append(index)
            if s == 0 and e == cs:  # a whole chunk: one copy, into an immutable chunk
                live.put_whole(ino, index, bytes(mv[pos : pos + cs]), length)
                pos += cs
                continue
            replaced = length if s == 0 and e >= length else None
            buf = self.update_chunk(ino, size, index, replaced)
            old = len(buf)
            if old < s:
                buf.extend(bytes(s - old))
            buf[s:e] = mv[pos : pos + e - s]
            pos += e - s
            live.resized(ino, old, len(buf))
        if self.prepare_pool is not None:
            if not live.ahead and live.dirty_bytes >= self.flush_threshold:
                self._prepare_backlog()
            elif ahead:
                self.prepare_ahead(ino, ahead)
        return max(size, end)

    @property
    def flush_threshold(self) -> int:
        """Buffered bytes past which the live layer should be flushed in the background."""
        return self.dirty_limit // 2

    def prepare_ahead(self, ino: int, indexes: list[int]) -> None:
        """Start hashing and compressing chunks of the live layer in ``prepare_pool``.

        The flush then finds them prepared and only commits: the next batch is
        prepared while the previous one commits. The pool gets immutable
        snapshots (whole-chunk writes are immutable already), never the buffers
        the trio thread changes.
        """
        assert self.prepare_pool is not None
        fo = self.live.files[ino]
        for lo in range(0, len(indexes), _AHEAD_BATCH):
            batch = indexes[lo : lo + _AHEAD_BATCH]
            snaps = [bytes(fo.chunks[index]) for index in batch]
            fut = self.prepare_pool.submit(_prepare_all, self.store, self.level, snaps)
            for pos, index in enumerate(batch):
                fo.ready[index] = (fut, pos)

    def _prepare_backlog(self) -> None:
        """A flush of the live layer is due: prepare ahead every chunk not yet sent."""
        self.live.ahead = True
        for ino, fo in self.live.files.items():
            indexes = [index for index in fo.chunks if index not in fo.ready]
            if indexes:
                self.prepare_ahead(ino, indexes)

    def truncate(self, ino: int, old_size: int, new_size: int) -> None:
        """Shrink: cut the last chunk and hide the rest. Growing needs nothing (holes)."""
        if new_size >= old_size:
            return
        cs = self.chunk_size
        k, r = divmod(new_size, cs)
        if r:
            if self.visible(ino, old_size, k, False)[1] > r:
                buf = self.update_chunk(ino, old_size, k)
                before = len(buf)
                del buf[r:]
                self.live.resized(ino, before, len(buf))
            k += 1
        if k * cs < old_size:
            self.live.hide(ino, k, INF)

    def punch(self, ino: int, size: int, off: int, length: int) -> None:
        """Zero ``[off, off+length)`` within the file; whole chunks become holes."""
        end = min(off + length, size)
        if off >= end:
            return
        cs = self.chunk_size
        first_full, last_full = -(-off // cs), end // cs
        for index in sorted({off // cs, (end - 1) // cs}):
            if first_full <= index < last_full:
                continue
            base = index * cs
            s, e = max(off, base) - base, min(end, base + cs) - base
            if self.visible(ino, size, index, False)[1] > s:
                buf = self.update_chunk(ino, size, index)
                stop = min(e, len(buf))
                buf[s:stop] = bytes(stop - s)
        if first_full < last_full:
            self.live.hide(ino, first_full, last_full)

    def copy(
        self, src: int, src_size: int, off_in: int, dst: InodeRecord, dst_ino: int, off_out: int,
        n_total: int, now: int,
    ) -> InodeRecord:  # fmt: skip
        """Copy bytes straight into the store with ``dst``'s new record, in one transaction.

        Call only with nothing buffered (after a flush), so the store holds exactly
        what reads see. Chunk-aligned whole chunks are shared (``put_ref``).
        """
        assert not self.live and self.inflight is None, "copy needs an empty buffer"
        cs = self.chunk_size
        delta = 0
        touched = []
        with self.view.batch() as b:
            pos = 0
            while pos < n_total:
                index, s = divmod(off_out + pos, cs)
                n = min(cs - s, n_total - pos)
                src_index, src_s = divmod(off_in + pos, cs)
                dkey = chunk_key(dst_ino, index)
                old = b.get(dkey)
                old_len = old.raw_length if isinstance(old, ChunkRef) else 0
                src_ref = b.get(chunk_key(src, src_index))
                src_len = src_ref.raw_length if isinstance(src_ref, ChunkRef) else 0
                if s == 0 and src_s == 0 and (n == cs or (src_len <= n and old_len <= n)):
                    if isinstance(src_ref, ChunkRef):
                        b.put_ref(dkey, src_ref)
                    else:
                        b.delete(dkey)
                    delta += src_len - old_len
                else:
                    stored = self.store.read_chunk(old) if isinstance(old, ChunkRef) else b""
                    cur = bytearray(stored)
                    if len(cur) < s:
                        cur.extend(bytes(s - len(cur)))
                    cur[s : s + n] = self.read(src, src_size, off_in + pos, n).ljust(n, b"\0")
                    prep = self.store.prepare_chunk(memoryview(cur), self.level)
                    b.put_chunk(dkey, prep)
                    delta += prep.raw_length - old_len
                touched.append(index)
                pos += n
            rec = replace(
                dst,
                size=max(dst.size, off_out + n_total),
                mtime_ns=now,
                ctime_ns=now,
                alloc=max(dst.alloc + delta, 0),
            )
            b.put(inode_key(dst_ino), rec.pack())
        for index in touched:
            self.cache.discard((dst_ino, index))
        self.epoch += 1
        self.refresh_usage()
        return rec

    # -- flushing ---------------------------------------------------------------------------------
    def freeze(self, records: dict[int, InodeRecord]) -> FlushJob:
        """Turn the live layer into a job (see ``begin`` in ``Filesystem.begin_flush``)."""
        if self.inflight is not None:
            raise RuntimeError("a flush job is already in flight")
        job = self.inflight = FlushJob(self.live, records)
        job.state = FlushJob.COMMITTING
        self.live = Layer()
        return job

    def retry(self) -> FlushJob | None:
        """The job whose commit failed, to be committed again (None if there is none)."""
        job = self.inflight
        if job is None:
            return None
        if job.state == FlushJob.COMMITTING:
            raise RuntimeError("a flush is already committing")
        job.state = FlushJob.COMMITTING
        return job

    def finished(self, job: FlushJob, deltas: dict[int, int] | None) -> None:
        """Record a job's outcome: its ``commit`` result, or None if the commit failed."""
        if deltas is None:
            job.state = FlushJob.FAILED
            return
        self.inflight = None
        if job.layer.files or job.layer.prefix_deletes:
            self.epoch += 1
        for ino, index, _ in job.chunks:
            self.cache.discard((ino, index))
        for ino, fo in job.layer.files.items():
            for lo, hi in fo.hidden:
                self.cache.discard_range(ino, lo, hi)
        self.refresh_usage()

    # -- prefetching (the async adapter fetches in worker threads) --------------------------------
    def chunks_to_fetch(self, ino: int, size: int, off: int, n: int, for_write: bool) -> list[int]:
        """Indexes of stored chunks that reading (or partly overwriting) a range would fetch."""
        cs = self.chunk_size
        end = off + n if for_write else min(off + n, size)
        out: list[int] = []
        if n <= 0 or off < 0 or off >= end:
            return out
        for index in range(off // cs, (end - 1) // cs + 1):
            base = index * cs
            if base >= size:
                break
            if for_write and off <= base and end >= base + cs:
                continue  # the write replaces the whole chunk
            if any(layer.lookup_chunk(ino, index) is not None for layer in self.layers()):
                continue
            if self.cache.get((ino, index)) is None:
                out.append(index)
        return out

    def fetch(self, ino: int, indexes: list[int]) -> list[tuple[int, bytes]]:
        """Read chunks from the store (thread-safe: touches only the store)."""
        datas = self.view.read_chunks([chunk_key(ino, i) for i in indexes])
        return [(i, data or b"") for i, data in zip(indexes, datas, strict=True)]

    def fill_cache(self, ino: int, chunks: list[tuple[int, bytes]], epoch: int) -> None:
        """Insert fetched chunks unless a commit happened since ``epoch`` was read."""
        if epoch == self.epoch:
            for index, data in chunks:
                self.cache.put((ino, index), data)
