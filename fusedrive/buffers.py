"""Buffered changes: ``Layer``, one generation of them, as ``FileData`` keeps them.

Every change lands in the *live* layer: dirty chunk buffers per file
(``FileOverlay``), index ranges of stored chunks that are hidden (truncated away or
punched out), patches (``patches``), plain key changes (directory entries, xattrs,
symlinks, orphan markers, the superblock) and key prefixes to delete. A layer also
counts what its commit will add: ``dirty_bytes``, ``growth`` (the sum of dirty
length - ``base``, the length of the chunk each dirty chunk replaces) and
``stored`` (see ``filedata``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from blockstore import PreparedChunk

INF = 1 << 62  # an index past any chunk of any file (2**63 bytes / 4 KiB chunks)


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

    ``patches``: per chunk without a dirty buffer, offset -> bytes; they never
    overlap.
    """

    __slots__ = ("base", "chunks", "growth", "hidden", "patches", "ready")

    def __init__(self) -> None:
        self.chunks: dict[int, bytearray | bytes] = {}
        self.base: dict[int, int] = {}
        self.hidden = IndexRanges()
        self.growth = 0
        self.ready: dict[int, tuple[Future[list[PreparedChunk]], int]] = {}
        self.patches: dict[int, dict[int, bytes]] = {}

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
        self.stored = 0  # a bound of what committing this layer appends to the store
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
            content, base = load()  # with this layer's patches applied: drop them
            self._drop_patches(fo, index)
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
            self._drop_patches(fo, index)
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
        for index in [i for i in fo.patches if lo <= i < hi]:
            self._drop_patches(fo, index)
        fo.hidden.add(lo, hi)

    def patches_of(self, ino: int, index: int) -> dict[int, bytes] | None:
        fo = self.files.get(ino)
        return None if fo is None else fo.patches.get(index)

    def add_patch(self, ino: int, index: int, off: int, data: bytes, replaced: list[int]) -> None:
        """Lay ``data`` over chunk ``index`` at ``off`` in place of this layer's
        patches at ``replaced`` (which ``data`` already includes)."""
        fo = self.files.get(ino)
        if fo is None:
            fo = self.files[ino] = FileOverlay()
        mine = fo.patches.get(index)
        if mine is None:
            mine = fo.patches[index] = {}
        freed = sum(len(mine.pop(o)) for o in replaced)
        mine[off] = data
        self._account(fo, len(data) - freed, len(data) - freed)

    def _drop_patches(self, fo: FileOverlay, index: int) -> None:
        """Forget this layer's patches of a chunk (now rewritten whole, or hidden)."""
        mine = fo.patches.pop(index, None)
        if mine:
            n = sum(len(d) for d in mine.values())
            self._account(fo, -n, -n)

    def _account(self, fo: FileOverlay, growth: int, dirty: int) -> None:
        fo.growth += growth
        self.growth += growth
        self.dirty_bytes += dirty
