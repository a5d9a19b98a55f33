"""Buffered changes, the read cache and the flush transaction.

The filesystem changes nothing in the store directly. Every change lands in the
*live* ``Layer`` (``buffers``): dirty chunk buffers per file, index ranges of stored
chunks that are hidden (truncated away or punched out), patches, plain key changes
(directory entries, xattrs, symlinks, orphan markers, the superblock) and key
prefixes to delete. A flush freezes the live layer into a ``FlushJob`` (a fresh
live layer starts at once), hashes and compresses its chunks (``prepare``, safe in
worker threads: it only reads the frozen buffers) and writes everything, with the
inode records captured at the same moment, in ONE ``View.batch()`` transaction
(``commit``).
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

The store's filesystem is checked too: ``room`` is what the store can still take
(free space minus its reserve, ``Store.room``, read after every commit) and each
layer's ``stored`` bounds what its commit may append to the store (every dirty
chunk and patch as a worst-case record: incompressible, rounded up to the store's
4 KiB alignment). A write whose bound does not fit makes the writer flush and look
again, then fail with ENOSPC: data the store cannot take is refused at write(2)
rather than accepted and lost. Other processes may take the room meanwhile; the
store's own check then fails the commit with ``NoSpace`` and the job stays
buffered (fsync, close and unmount report ENOSPC).

Patches (``patches``): a write of part of one chunk that has no dirty buffer
becomes a patch of the live layer, stored as its own record; reads apply them over
their chunk, and a commit may rewrite the chunk whole instead.

Commit order inside the transaction: prefix deletes; hidden chunks and their
patches (skipping indexes that the job rewrites anyway); patches covered by newer
ones; chunk and patch puts, shrinking ones first so that a transaction that fits
never trips the capacity check half-way (a rewritten chunk deletes its patches
first); plain keys; inode records (with their stored chunk bytes updated); the
superblock rides in the plain keys.
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import replace

from blockstore import Batch, ChunkRef, Environment, PreparedChunk, View

from .buffers import HIDDEN, INF, Layer
from .errors import FlushNeeded, FsError
from .patches import (
    FIRST_CHUNK_KEY,
    NewPatch,
    Unit,
    delete_patches,
    extent,
    lay,
    patch_unit,
    patched_chunks,
    plan_patch,
    refs,
    rewrite_whole,
)
from .schema import (
    InodeRecord,
    chunk_index,
    chunk_ino,
    chunk_key,
    chunk_prefix,
    inode_key,
    patch_offset,
)

log = logging.getLogger(__name__)

_SCAN_BATCH = 1024
_ENTRY_OVERHEAD = 128  # bytes charged per cache entry besides its data
_AHEAD_BATCH = 16  # chunks per task sent to the prepare pool (tasks are cancelled whole)
MERGE_SLACK = 8 << 20  # bytes merged beyond what a writer lacks, so the next writes fit
MERGE_BATCH = 64  # chunks rewritten whole per transaction when merging patches
_RECORD_ALIGN = 4096  # the store's record alignment (blockstore.segments.ALIGN)


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

    def __init__(self, layer: Layer, records: dict[int, InodeRecord], chunk_size: int) -> None:
        self.layer = layer
        self.chunk_size = chunk_size
        self.records = records
        # (ino, index, patch offset or None for the whole chunk, bytes)
        self.chunks: list[tuple[int, int, int | None, bytearray | bytes]] = []
        self.ready: list[tuple[Future[list[PreparedChunk]], int] | None] = []
        for ino, fo in layer.files.items():
            for index, buf in fo.chunks.items():
                self.chunks.append((ino, index, None, buf))
                self.ready.append(fo.ready.get(index))
            for index, mine in fo.patches.items():
                for off, data in mine.items():
                    self.chunks.append((ino, index, off, data))
                    self.ready.append(None)
        self.prepared: list[PreparedChunk | None] = [None] * len(self.chunks)
        self.level: int | None = None
        self.state = self.NEW
        self.seq = 0  # the flusher's number for this job (its freeze order), 0 if none

    @property
    def dirty_bytes(self) -> int:
        return self.layer.dirty_bytes

    def prepare(self, store: Environment, level: int, part: int = 0, parts: int = 1) -> None:
        self.level = level  # for chunks the commit rewrites whole
        for i in range(part, len(self.chunks), parts):
            if self.prepared[i] is None:
                prep = self._ready(i)
                if prep is None:
                    buf = self.chunks[i][3]
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
            units: list[Unit] = []
            patched: dict[tuple[int, int], list[NewPatch]] = defaultdict(list)
            for (ino, index, off, data), prep in zip(self.chunks, self.prepared, strict=True):
                assert prep is not None, "commit before prepare"
                if off is not None:
                    patched[(ino, index)].append((off, data, prep))
                    continue
                key = chunk_key(ino, index)
                stored = refs(b, key)  # the whole chunk replaces its patches too
                old = sum(ref.raw_length for ref in stored.values())
                patches = [k for k in stored if k != key]
                units.append((prep.raw_length - old, ino, patches, [(key, prep)]))
            for (ino, index), new in patched.items():
                units.append(patch_unit(b, ino, index, new, self.chunk_size, self.level))
            units.sort(key=lambda u: u[0])  # shrinking first (see the module docstring)
            for delta, ino, deletes, puts in units:
                for key in deletes:
                    b.delete(key)
                for key, prep in puts:
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


def _record_bound(n: int) -> int:
    """The most the store's segments take for a chunk of ``n`` bytes (zstd's worst-case
    expansion, the codec byte, the 4 KiB alignment)."""
    return -(-(n + (n >> 7) + 64) // _RECORD_ALIGN) * _RECORD_ALIGN


def _prepare_all(store: Environment, level: int, snaps: list[bytes]) -> list[PreparedChunk]:
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
    """Delete stored chunks ``[lo, hi)`` of ``ino`` and their patches, except chunks
    being rewritten (their commit deletes their patches)."""
    prefix = chunk_prefix(ino)
    start = chunk_key(ino, lo)
    while True:
        found: list[tuple[bytes, int, bytes | ChunkRef]] = []
        # Collect first, delete after: the scan's cursor must not see its own deletes.
        for key, value in b.scan(prefix, start=start):
            index = chunk_index(key)
            if index >= hi or len(found) >= _SCAN_BATCH:
                break
            found.append((key, index, value))
        for key, index, value in found:
            if index not in keep and b.delete(key) and isinstance(value, ChunkRef):
                deltas[ino] -= value.raw_length
        if len(found) < _SCAN_BATCH:
            return
        start = found[-1][0] + b"\0"  # the next key after the last one seen


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
        self._merge_from = FIRST_CHUNK_KEY  # where the next merge of patches starts
        self.used, self.capacity = view.usage()
        self.room = self.store.room()  # what the store's filesystem can still take
        # Where writes send chunks to be hashed and compressed before the flush needs
        # them (``prepare_ahead``; the async adapter sets its pool; None: at the flush).
        self.prepare_pool: Executor | None = None

    def layers(self) -> list[Layer]:
        return [self.live] if self.inflight is None else [self.live, self.inflight.layer]

    def refresh_usage(self) -> None:
        self.used, self.capacity = self.view.usage()
        self.room = self.store.room()

    def pending_stored(self) -> int:
        return sum(layer.stored for layer in self.layers())

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
        patches: list[dict[int, bytes]] | None = None  # the layers' patches, newest first
        base: bytes | bytearray | None = None
        for layer in self.layers():
            fo = layer.files.get(ino)
            if fo is None:
                continue
            found = fo.lookup(index)
            if found is HIDDEN:
                base = b""
                break
            if found is not None:
                base = found  # type: ignore[assignment]
                break
            mine = fo.patches.get(index) if fo.patches else None
            if mine:
                patches = [mine] if patches is None else [*patches, mine]
        if base is None:
            base = self.cache.get((ino, index))
        if base is None:
            if not need_data:
                length = self._stored_length(ino, index)
                for mine in patches or ():
                    length = max([length, *(o + len(d) for o, d in mine.items())])
                return None, length
            base = self._read_stored(ino, [index])[0]
            self.cache.put((ino, index), base)
        if patches is None:
            return base, len(base)
        merged = bytearray(base)
        for mine in reversed(patches):
            for off, data in mine.items():
                lay(merged, off, data)
        return merged, len(merged)

    def _read_stored(self, ino: int, indexes: list[int]) -> list[bytes]:
        """Stored chunks with their stored patches applied, one read transaction.

        Runs of consecutive indexes are read with one cursor walk each.
        """
        runs: list[list[int]] = []
        for index in indexes:
            if runs and runs[-1][1] == index - 1:
                runs[-1][1] = index
            else:
                runs.append([index, index])
        groups = self.view.read_chunk_ranges(
            [(chunk_key(ino, lo), chunk_key(ino, hi + 1)) for lo, hi in runs]
        )
        found: dict[int, bytes | bytearray] = {}
        for entries in groups:
            for key, data in entries:
                index = chunk_index(key)
                off = patch_offset(key)
                if off is None:
                    found[index] = data
                    continue
                cur = found.get(index, b"")
                if not isinstance(cur, bytearray):
                    cur = found[index] = bytearray(cur)
                lay(cur, off, data)
        out = []
        for index in indexes:
            got = found.get(index, b"")
            out.append(got if isinstance(got, bytes) else bytes(got))
        return out

    def _stored_length(self, ino: int, index: int) -> int:
        """The length of a stored chunk with its stored patches applied."""
        entries = self.view.scan(chunk_key(ino, index))
        return extent({k: v for k, v in entries if isinstance(v, ChunkRef)})

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

    def check_space(self, growth: int, nbytes: int, pending: bool, stored: int = 0) -> None:
        """Raise FlushNeeded if buffers are full, or space is short while changes are pending.

        ``pending``: anything at all is buffered (data, metadata or a failed job).
        ``stored``: a bound of the bytes the change adds to the store (see the module
        docstring); counted in the live layer once the change passes.
        """
        if pending and nbytes and self.pending_bytes() + nbytes > self.dirty_limit:
            raise FlushNeeded("dirty buffers are full")
        if stored and self.pending_stored() + stored > self.room:
            if pending:
                raise FlushNeeded("the store may be full while changes are pending", space=True)
            self.room = self.store.room()  # a fresh look: gc may have given space back
            if stored > self.room:
                raise FsError(
                    errno.ENOSPC,
                    f"the store is full: {self.room} bytes left beyond its reserve",
                )
        if growth > 0 and self.used + self.pending_growth() + growth > self.capacity:
            if pending:
                raise FlushNeeded("space is short while changes are pending", space=True)
            self.refresh_usage()
            if self.used + growth > self.capacity:
                raise FsError(
                    errno.ENOSPC,
                    f"volume {self.view.name!r} is full "
                    f"({self.used} of {self.capacity} bytes used)",
                )
        self.live.stored += stored

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
        mv = memoryview(data)
        live = self.live
        if off // cs == (end - 1) // cs and n < cs:
            index = off // cs
            patch = plan_patch(self.layers(), cs, ino, size, index, off - index * cs, mv)
            # A patch needs new space; short of it, rewriting the chunk needs none.
            if patch is not None and (
                self.used + self.pending_growth() + len(patch[1]) <= self.capacity
            ):
                start, piece, absorbed = patch
                self.check_space(len(piece), n, pending, _record_bound(len(piece)))
                live.add_patch(ino, index, start, piece, absorbed)
                return max(size, end)
        plan = []
        growth = stored = 0
        dirty = live.files.get(ino)
        for index in range(off // cs, (end - 1) // cs + 1):
            base = index * cs
            s, e = max(off, base) - base, min(end, base + cs) - base
            # A partial write will need the chunk's bytes: fetching them now (they
            # land in the cache) saves a second lookup when the buffer is made.
            length = self.visible(ino, size, index, s > 0 or e < cs)[1]
            growth += max(0, e - length)
            if dirty is None or index not in dirty.chunks:
                stored += _record_bound(cs)  # a new dirty chunk: one more record at commit
            plan.append((index, s, e, length))
        self.check_space(growth, n, pending, stored)
        pos = 0
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
        """Buffered bytes past which the live layer should be flushed in the background:
        three quarters of the bound (half made more, smaller commits: slower random
        writes, filesystem.DEFAULT_DIRTY_LIMIT)."""
        return self.dirty_limit * 3 // 4

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

    def punch(self, ino: int, size: int, off: int, length: int, pending: bool) -> None:
        """Zero ``[off, off+length)`` within the file; whole chunks become holes.

        A chunk the range covers in part gets a dirty buffer (cut short when the
        range reaches its end), checked like a write's (``check_space``: may raise
        FlushNeeded before anything changed); whole chunks are hidden, which costs
        no buffer and gives their stored bytes back at the commit.
        """
        end = min(off + length, size)
        if off >= end:
            return
        cs = self.chunk_size
        first_full, last_full = -(-off // cs), end // cs
        edges = []
        for index in sorted({off // cs, (end - 1) // cs}):
            if first_full <= index < last_full:
                continue
            base = index * cs
            s, e = max(off, base) - base, min(end, base + cs) - base
            if self.visible(ino, size, index, False)[1] > s:
                edges.append((index, s, e))
        dirty = self.live.files.get(ino)
        fresh = sum(1 for index, _, _ in edges if dirty is None or index not in dirty.chunks)
        self.check_space(0, fresh * cs, pending, fresh * _record_bound(cs))
        for index, s, e in edges:
            buf = self.update_chunk(ino, size, index)
            before = len(buf)
            if e >= before:
                del buf[s:]  # zeros at a chunk's end are not kept
            else:
                buf[s:e] = bytes(e - s)
            self.live.resized(ino, before, len(buf))
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
                old = refs(b, dkey)  # the chunk (key dkey) and its patches
                old_len = sum(ref.raw_length for ref in old.values())
                skey = chunk_key(src, src_index)
                src_refs = refs(b, skey)
                src_ref = src_refs.get(skey)
                src_len = src_ref.raw_length if src_ref is not None else 0
                if (
                    all(k == skey for k in src_refs)  # a chunk with patches is not shared
                    and s == 0
                    and src_s == 0
                    and (n == cs or (src_len <= n and extent(old) <= n))
                ):
                    delete_patches(b, dkey, old)
                    if src_ref is not None:
                        b.put_ref(dkey, src_ref)
                    else:
                        b.delete(dkey)
                    delta += src_len - old_len
                else:
                    cur = bytearray()
                    for k, ref in old.items():
                        lay(cur, patch_offset(k) or 0, self.store.read_chunk(ref))
                    lay(cur, s, self.read(src, src_size, off_in + pos, n).ljust(n, b"\0"))
                    prep = self.store.prepare_chunk(memoryview(cur), self.level)
                    delete_patches(b, dkey, old)
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

    def make_room(self, nbytes: int, merged: Callable[[dict[int, int]], None]) -> bool:
        """Merge stored patches into their chunks until ``nbytes`` more fit, or none is left.

        Patches cost bytes beyond the file data they change; a writer that found the
        volume full merges some to get those bytes back: enough for ``nbytes`` plus
        ``MERGE_SLACK``, ``MERGE_BATCH`` chunks per transaction, resuming where the
        last call stopped (and going round once), so the pause is bounded by what
        the writer needs, not by the volume: here merging every patch of a 1 GiB
        file after 49k random 4 KiB writes took 3.3 s, making room for one write
        0.39 s. Call only with nothing buffered. After each transaction,
        ``merged`` gets the stored bytes gained per inode (negative), whose inode
        records changed in it. Returns whether any patch was merged.
        """
        assert not self.live and self.inflight is None, "merging needs an empty buffer"
        self.refresh_usage()
        want = self.used + nbytes - self.capacity + MERGE_SLACK
        any_merged = False
        origin = start = self._merge_from
        wrapped = False
        freed = 0
        while freed < want:
            with self.view.batch() as b:
                keys, resume = patched_chunks(b, start, MERGE_BATCH)
                mine: dict[int, int] = defaultdict(int)
                for key in keys:
                    gained, deletes, puts = rewrite_whole(b, key, refs(b, key), [], self.level)
                    for k in deletes:
                        b.delete(k)
                    for k, prep in puts:
                        b.put_chunk(k, prep)
                    mine[chunk_ino(key)] += gained
                    freed -= gained
                for ino, delta in mine.items():
                    raw = b.get(inode_key(ino))
                    if isinstance(raw, bytes):
                        rec = InodeRecord.unpack(raw)
                        b.put(inode_key(ino), _with_alloc(rec, rec.alloc + delta).pack())
            if keys:
                any_merged = True
                self.cache.clear()
                self.epoch += 1
                self.refresh_usage()
                merged(dict(mine))
            if resume is not None:
                start = resume
                if wrapped and start >= origin:
                    break  # went round: every patched chunk was seen
                continue
            start = FIRST_CHUNK_KEY  # the end: go round once, from the first chunk
            if wrapped or origin == FIRST_CHUNK_KEY:
                break
            wrapped = True
        self._merge_from = start
        return any_merged

    # -- flushing ---------------------------------------------------------------------------------
    def freeze(self, records: dict[int, InodeRecord]) -> FlushJob:
        """Turn the live layer into a job (see ``begin`` in ``Filesystem.begin_flush``)."""
        if self.inflight is not None:
            raise RuntimeError("a flush job is already in flight")
        job = self.inflight = FlushJob(self.live, records, self.chunk_size)
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
        for ino, index, _, _ in job.chunks:
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
            if for_write and n < cs and off // cs == (end - 1) // cs:
                break  # a write inside one chunk is usually a patch: nothing to fetch
            if any(layer.lookup_chunk(ino, index) is not None for layer in self.layers()):
                continue
            if self.cache.get((ino, index)) is None:
                out.append(index)
        return out

    def fetch(self, ino: int, indexes: list[int]) -> list[tuple[int, bytes]]:
        """Read chunks from the store (thread-safe: touches only the store)."""
        return list(zip(indexes, self._read_stored(ino, indexes), strict=True))

    def fill_cache(self, ino: int, chunks: list[tuple[int, bytes]], epoch: int) -> None:
        """Insert fetched chunks unless a commit happened since ``epoch`` was read."""
        if epoch == self.epoch:
            for index, data in chunks:
                self.cache.put((ino, index), data)
