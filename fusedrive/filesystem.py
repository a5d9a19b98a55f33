"""The filesystem of one volume: POSIX semantics in plain synchronous Python, no FUSE.

``Filesystem`` mirrors the FUSE low-level operations (inode numbers, lookup counts,
file handles) so that ``fuse_adapter`` stays a thin translation, and tests drive it
directly. It is ``Namespace`` (inodes, directories, links, xattrs) plus open files,
file contents (``FileData``), flushing, mkfs and orphan cleanup. Records and keys
are described in ``schema``; buffering, the read cache and the flush transaction in
``filedata``.

Invariants:
- one writer per volume: while a filesystem is open read-write, its in-memory
  state is the truth and the store lags behind by at most the unflushed layers
  (``flush`` writes them in one transaction; LMDB syncs it);
- no chunk holds bytes at or past its file's size (truncate cuts the last chunk),
  so growing a file never touches data and no operation allocates or loops in
  proportion to a file size or an offset;
- only ``FsError`` leaves a public method (store errors map in ``errors``);
- a snapshot, or a volume opened read-only, is never written: not even atime or
  mkfs (an empty one is served from memory).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from blockstore import MAX_CHUNK_SIZE, MODE_BLOCK, Corrupt, StoreError, View

from . import parameters
from .errors import FlushNeeded, FsError, fs_op, store_errors, translate
from .filedata import FileData, FlushJob, Layer
from .namespace import Attributes, Ctx, Namespace, now_ns
from .schema import (
    DISK_IMAGE_NAME,
    FORMAT,
    NAME_MAX,
    ORPHAN_PREFIX,
    ROOT_INO,
    SUPERBLOCK_KEY,
    DirState,
    Inode,
    Superblock,
    orphan_ino,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = parameters.DEFAULT_CHUNK_SIZE
# A snapshot of a busy volume first commits what is buffered, up to this bound. Measured
# (CreateSnapshot every 0.25 s beside fio's sequential 1 MiB writes): 32 MiB gave p99
# 542 ms and 16 MiB 93 ms (one run each at load 8-11 on 2 cores, where 8 MiB with a
# background flush at half of it looked worse). On the quiet machine (2026-12-06, load
# 1-2, `csi_bench` busy section, trees side by side): 16 MiB p99 61-103 ms over 7 runs,
# 8 MiB 43-62 ms over 3 runs; 8 MiB with the background flush at 3/4 (6 MiB: fewer,
# larger commits) p99 57 ms, and random 4 KiB writes 3,101-4,084 IOPS in 4 runs against
# 2,575-3,462 at 16 MiB (6 runs) and 2,529-3,286 at 8 MiB with 1/2 (6 runs); sequential
# 1 MiB writes within the noise (184-265 MiB/s for all three). 64 MiB doubled RSS for
# no throughput.
DEFAULT_DIRTY_LIMIT = 8 * 1024 * 1024
DEFAULT_CACHE_LIMIT = 32 * 1024 * 1024
MAX_FILE_SIZE = (1 << 63) - 1
COPY_MAX = 64 * 1024 * 1024  # copy_range copies at most this much per call
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
FALLOC_FL_ZERO_RANGE = 0x10
# The fallocate(2) modes served; Linux refuses the other combinations of these three
# flags itself, and COLLAPSE_RANGE, INSERT_RANGE and UNSHARE_RANGE never reach FUSE.
FALLOCATE_MODES = frozenset(
    {
        0,
        FALLOC_FL_KEEP_SIZE,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        FALLOC_FL_ZERO_RANGE,
        FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
    }
)
_INODE_CACHE_MAX = 50_000


@dataclass(frozen=True, slots=True)
class StatFs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    namemax: int


@dataclass(slots=True)
class Handle:
    ino: int
    flags: int


class Filesystem(Namespace):
    """A POSIX filesystem over one volume head (or, read-only, one snapshot)."""

    def __init__(
        self,
        view: View,
        *,
        read_only: bool = False,
        dirty_limit: int = DEFAULT_DIRTY_LIMIT,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
    ) -> None:
        with store_errors():
            self._open(view, read_only, dirty_limit, cache_limit)

    def _open(self, view: View, read_only: bool, dirty_limit: int, cache_limit: int) -> None:
        self.store = view.store
        if view.writable:
            info = self.store.get_volume(view.name)
            self.block_mode, params = info.mode == MODE_BLOCK, info.parameters
        else:
            snap = self.store.get_snapshot(view.name)
            self.block_mode, params = snap.mode == MODE_BLOCK, snap.parameters
        # A record with a bad parameter (the store does not check them) is refused here.
        what = f"{'volume' if view.writable else 'snapshot'} {view.name!r}"
        parameters.check_record(params, what)
        level = parameters.value(params, "compression_level", self.store.compression_level)
        raw = view.get(SUPERBLOCK_KEY)
        if raw is not None and not isinstance(raw, bytes):
            raise Corrupt("the volume's superblock entry is not a plain value")
        sb = Superblock.unpack(raw) if raw is not None else None
        cs = (
            sb.chunk_size
            if sb is not None
            else parameters.value(params, "chunk_size", DEFAULT_CHUNK_SIZE)
        )
        if cs < 4096 or cs > MAX_CHUNK_SIZE or cs % 4096:
            raise Corrupt(f"the superblock's chunk_size {cs} is not a multiple of 4096 up to 4MiB")
        self.chunk_size = cs
        data = FileData(view, cs, level, dirty_limit, cache_limit)
        super().__init__(view, data, read_only or not view.writable)
        self.handles: dict[int, Handle] = {}
        if sb is None:
            self._mkfs(params)
        else:
            self.next_ino, self.inode_count = sb.next_ino, sb.inode_count
            if not self.read_only:
                self._delete_orphans()
                if sb.format < FORMAT:
                    self.sb_dirty = True  # the superblock is rewritten in the current format
                    self.flush()
                    log.info("event=format_upgraded volume=%s from=%d", view.name, sb.format)
        self._grow_disk_image()

    # -- mkfs, orphans, block image ---------------------------------------------------------------
    def _mkfs(self, params: dict[str, str]) -> None:
        """Create an empty filesystem; persisted at once unless read-only (then in memory)."""
        now = now_ns()
        root_mode = stat.S_IFDIR | parameters.value(params, "root_mode", 0o755)
        uid, gid = parameters.value(params, "root_uid", 0), parameters.value(params, "root_gid", 0)
        root = Inode(ROOT_INO, root_mode, uid, gid, 2, 0, 0, now, now, now, parent=ROOT_INO)
        self.inodes[ROOT_INO] = root
        self.dirs[ROOT_INO] = DirState()
        self.xattrs[ROOT_INO] = {}
        self.next_ino, self.inode_count = ROOT_INO + 1, 1
        if self.block_mode:
            img = self._new_inode(stat.S_IFREG | 0o600, Ctx(0, 0))
            img.size = self.data.capacity
            self._add_entry(root, DISK_IMAGE_NAME, img)
        if self.read_only:
            self.data.live = Layer()  # an empty snapshot: the tree lives in memory only
            self.dirty.clear()
            return
        self.sb_dirty = True
        self.dirty.add(ROOT_INO)
        self.flush()
        log.info(
            "event=mkfs volume=%s chunk_size=%d block=%s",
            self.view.name,
            self.chunk_size,
            self.block_mode,
        )

    def _delete_orphans(self) -> None:
        orphans = [orphan_ino(k) for k, _ in self.view.scan(ORPHAN_PREFIX)]
        for ino in orphans:
            self._destroy(ino, orphan=True)
        if orphans:
            self.flush()
            log.info("event=orphans_deleted volume=%s count=%d", self.view.name, len(orphans))

    def _grow_disk_image(self) -> int | None:
        """A block volume's image follows the volume's capacity (never shrinks).

        Returns the image's inode if it grew.
        """
        if not self.block_mode or self.read_only:
            return None
        ent = self._dir(ROOT_INO).entries.get(DISK_IMAGE_NAME)
        if ent is None:
            return None
        img = self._inode(ent[0])
        if img.size >= self.data.capacity:
            return None
        log.info("event=disk_image_grown from=%d to=%d", img.size, self.data.capacity)
        img.size = self.data.capacity
        self._touch(img)
        return img.ino

    # -- open files -------------------------------------------------------------------------------

    def _new_handle(self, node: Inode, flags: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(node.ino, flags)
        node.opens += 1
        return fh

    def _handle(self, fh: int) -> Inode:
        h = self.handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        return self._inode(h.ino)

    @fs_op
    def open(self, ino: int, flags: int) -> int:
        """Open an existing file; O_TRUNC empties a regular file as ftruncate(0) would.

        libfuse turns on the kernel's atomic O_TRUNC mode: the truncation of an
        ``open(O_TRUNC)`` arrives here as a flag, not as a setattr. The kernel has
        already checked write permission (Linux truncates for O_RDONLY|O_TRUNC
        too, as ext4 does), so every O_TRUNC open of a regular file truncates and
        updates mtime and ctime, even when the file was already empty.
        """
        node = self._inode(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            self._writable()
        if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
            self._set_size(node, 0)
            self._touch(node)
        return self._new_handle(node, flags)

    @fs_op
    def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx
    ) -> tuple[int, Attributes]:
        pnode = self._new_name(parent, name)
        node = self._new_inode(stat.S_IFREG | (mode & 0o7777), ctx, 0, pnode)
        self._add_entry(pnode, name, node)
        node.lookups += 1
        return self._new_handle(node, flags), self._attrs(node)

    @fs_op
    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        node = self.inodes.get(h.ino)
        if node is not None:
            node.opens -= 1
            self._maybe_destroy(node)

    @fs_op
    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attributes:
        self._writable()
        node = self._inode(ino)
        now = now_ns()
        if size is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FsError(errno.EINVAL)
            if size < 0 or size > MAX_FILE_SIZE:
                raise FsError(errno.EFBIG if size > 0 else errno.EINVAL)
            self._set_size(node, size)
            node.mtime_ns = now
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        node.ctime_ns = now if ctime_ns is None else ctime_ns
        self.dirty.add(ino)
        return self._attrs(node)

    @fs_op
    def statfs(self) -> StatFs:
        d = self.data
        capacity = d.capacity
        used = min(d.used + max(d.pending_growth(), 0), capacity)
        blocks = capacity // 4096
        free = (capacity - used) // 4096
        files_max = 1 << 32
        ffree = max(files_max - self.inode_count, 0)
        return StatFs(4096, 4096, blocks, free, free, files_max, ffree, ffree, NAME_MAX)

    # -- file data --------------------------------------------------------------------------------

    def _regular(self, node: Inode) -> Inode:
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(node.mode):
            raise FsError(errno.EINVAL)
        return node

    @fs_op
    def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._handle(fh)
        if off < 0 or size < 0:
            raise FsError(errno.EINVAL)
        out = self.data.read(node.ino, node.size, off, size)
        self._relatime(node)
        return out

    @fs_op
    def write(self, fh: int, off: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``off`` (at the end for O_APPEND handles); all or nothing."""
        for _ in range(4):
            try:
                return self._write(fh, off, data)
            except FlushNeeded:
                self.flush()
        raise FsError(errno.ENOSPC)

    def try_write(self, fh: int, off: int, data: bytes | memoryview) -> int:
        """``write`` that raises FlushNeeded instead of flushing (for the async adapter)."""
        try:  # not ``with store_errors()``: a generator context manager per write costs ~1 us
            return self._write(fh, off, data)
        except StoreError as exc:
            raise translate(exc) from exc

    def _write(self, fh: int, off: int, data: bytes | memoryview) -> int:
        self._writable()
        node = self._regular(self._handle(fh))
        if self.handles[fh].flags & os.O_APPEND:
            off = node.size
        if off < 0:
            raise FsError(errno.EINVAL)
        if not len(data):
            return 0
        if off + len(data) > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        try:
            node.size = self.data.write(node.ino, node.size, off, data, self.has_pending())
        except FsError as exc:
            # The volume is full and nothing is buffered: the bytes that stored
            # patches cost beyond file data may make room for this write.
            if exc.errno != errno.ENOSPC or not self._make_room(len(data)):
                raise
            node.size = self.data.write(node.ino, node.size, off, data, self.has_pending())
        if self.handles[fh].flags & os.O_DIRECT:
            self._drop_set_id_bits(node)
        self._touch(node)
        return len(data)

    @staticmethod
    def _drop_set_id_bits(node: Inode) -> None:
        """Clear set-user-ID (and set-group-ID on group-executable files) after a write.

        The kernel does this itself before a write through its page cache, but
        leaves it to the filesystem for handles opened O_DIRECT (the adapter serves
        those with FUSE direct I/O), and pyfuse3 does not pass on whether the
        writer may keep the bits (CAP_FSETID): they are dropped for every writer,
        the safe side.
        """
        kill = stat.S_ISUID | (stat.S_ISGID if node.mode & stat.S_IXGRP else 0)
        if node.mode & kill:
            node.mode &= ~kill

    def _make_room(self, nbytes: int) -> bool:
        """Merge stored patches into their chunks until a write of ``nbytes`` fits (see
        ``FileData.make_room``); False if there was none to merge."""

        def merged(deltas: dict[int, int]) -> None:
            for ino, delta in deltas.items():
                node = self.inodes.get(ino)
                if node is not None:
                    node.alloc = max(node.alloc + delta, 0)
            log.info("event=patches_merged inodes=%d bytes=%d", len(deltas), -sum(deltas.values()))

        # A write can grow a chunk by more than its length (the zeros before it in
        # the chunk are stored), but never by more than one chunk besides.
        return self.data.make_room(nbytes + self.data.chunk_size, merged)

    def _set_size(self, node: Inode, size: int) -> None:
        self.data.truncate(node.ino, node.size, size)
        node.size = size
        self.dirty.add(node.ino)

    def punch_hole(self, ino: int, off: int, length: int) -> None:
        """Zero ``[off, off+length)`` and release whole chunks in it; the size stays."""
        self.fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)

    @fs_op
    def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) in the modes of ``FALLOCATE_MODES``; others fail with EOPNOTSUPP.

        Space is not reserved: the store is content-addressed and copy-on-write, so
        no write can be promised room in advance. Modes 0 and KEEP_SIZE only set the
        size (mode 0, when the range ends past it); PUNCH_HOLE and ZERO_RANGE zero
        the range within the file, releasing the whole chunks in it and rewriting
        the partial ones at its ends, and ZERO_RANGE without KEEP_SIZE then extends
        the file like mode 0. Both read as zeros and both give space back: a hole
        is how the store keeps zeros. Every mode sets mtime and ctime.
        """
        for _ in range(4):
            try:
                return self._fallocate(ino, mode, off, length)
            except FlushNeeded:
                self.flush()
        raise FsError(errno.ENOSPC)

    def try_fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        """``fallocate`` that raises FlushNeeded instead of flushing (for the async adapter)."""
        with store_errors():
            self._fallocate(ino, mode, off, length)

    def _fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        self._writable()
        node = self._inode(ino)
        if off < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        if mode not in FALLOCATE_MODES:
            raise FsError(errno.EOPNOTSUPP)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(node.mode):
            raise FsError(errno.ENODEV)
        if off + length > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            self.data.punch(node.ino, node.size, off, length, self.has_pending())
        if not mode & FALLOC_FL_KEEP_SIZE and off + length > node.size:
            node.size = off + length
        # Every mode changes mtime and ctime, as on ext4 and XFS (the kernel's
        # file_modified before the call; for FUSE it leaves the times to the daemon).
        self._touch(node)

    @fs_op
    def copy_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int) -> int:
        """copy_file_range(2): chunk-aligned whole chunks are shared, not copied.

        Flushes first, then writes the copy with the destination's inode record in
        one transaction. Copies at most ``COPY_MAX`` bytes; returns the count.
        """
        self._writable()
        src = self._regular(self._handle(fh_in))
        dst = self._regular(self._handle(fh_out))
        if off_in < 0 or off_out < 0 or length < 0:
            raise FsError(errno.EINVAL)
        length = min(length, src.size - off_in, COPY_MAX)
        if length <= 0:
            return 0
        if src is dst and off_in < off_out + length and off_out < off_in + length:
            raise FsError(errno.EINVAL, "overlapping ranges in one file")
        if off_out + length > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        self.flush()
        rec = self.data.copy(
            src.ino, src.size, off_in, dst.record(), dst.ino, off_out, length, now_ns()
        )
        dst.size, dst.mtime_ns, dst.ctime_ns, dst.alloc = (
            rec.size,
            rec.mtime_ns,
            rec.ctime_ns,
            rec.alloc,
        )
        return length

    # -- flushing ---------------------------------------------------------------------------------

    def has_pending(self) -> bool:
        """True if anything is buffered (or a failed flush waits for its retry)."""
        d = self.data
        return bool(d.live) or bool(self.dirty) or self.sb_dirty or d.inflight is not None

    def begin_flush(self) -> FlushJob | None:
        """Freeze everything buffered into a job (or hand back a failed job to retry)."""
        if self.read_only:
            return None
        job = self.data.retry()
        if job is not None:
            return job
        if not self.has_pending():
            return None
        if self.sb_dirty:
            sb = Superblock(self.chunk_size, self.next_ino, self.inode_count)
            self.data.live.kv[SUPERBLOCK_KEY] = sb.pack()
        records = {ino: self.inodes[ino].record() for ino in self.dirty if ino in self.inodes}
        self.dirty = set()
        self.sb_dirty = False
        return self.data.freeze(records)

    def finish_flush(self, job: FlushJob, deltas: dict[int, int] | None) -> None:
        """Record a job's outcome: the result of ``job.commit``, or None if it failed."""
        self.data.finished(job, deltas)
        if deltas is None:
            return
        for ino, delta in deltas.items():
            node = self.inodes.get(ino)
            if node is not None and delta:
                node.alloc = max(node.alloc + delta, 0)
                if ino not in job.records:
                    self.dirty.add(ino)
        self._grow_disk_image()
        self._evict()

    def run_flush_job(self, job: FlushJob) -> None:
        """Prepare and commit ``job`` in this thread (the synchronous path)."""
        try:
            job.prepare(self.store, self.data.level)
            deltas = job.commit(self.view)
        except StoreError as exc:
            self.finish_flush(job, None)
            raise translate(exc) from exc
        except BaseException:
            self.finish_flush(job, None)
            raise
        self.finish_flush(job, deltas)

    @fs_op
    def flush(self) -> None:
        """Make every change so far durable: one transaction (two if a retry is due)."""
        for _ in range(2):
            job = self.begin_flush()
            if job is None:
                return
            self.run_flush_job(job)

    @fs_op
    def refresh(self) -> list[int]:
        """Pick up a new capacity and compression level; returns inodes that changed.

        (A block volume's disk image grows with its capacity.)
        """
        if self.read_only:
            return []
        self.data.refresh_usage()
        raw = self.store.get_volume(self.view.name).parameters.get("compression_level", "")
        try:
            self.data.level = parameters.value(
                {"compression_level": raw}, "compression_level", self.store.compression_level
            )
        except parameters.ParameterError as exc:
            # Reported, and a whole number still applies (as before): the flush that
            # then fails is how a bad level handed to a live mount shows (tests use it).
            log.error("event=invalid_parameter volume=%s error=%s", self.view.name, exc)
            if not raw.strip().isdigit():
                raise
            self.data.level = int(raw)
        grown = self._grow_disk_image()
        return [grown] if grown else []

    def _evict(self) -> None:
        if len(self.inodes) <= _INODE_CACHE_MAX:
            return
        for ino, node in list(self.inodes.items()):
            if (
                ino != ROOT_INO
                and node.lookups <= 0
                and node.opens <= 0
                and node.nlink > 0
                and ino not in self.dirty
                and ino not in self.data.live.files
            ):
                del self.inodes[ino]
                self.dirs.pop(ino, None)
                self.xattrs.pop(ino, None)

    # -- prefetching (the async adapter fetches chunks in worker threads) -------------------------

    def chunks_to_fetch(
        self, fh: int, off: int, size: int, *, for_write: bool
    ) -> tuple[int, list[int]]:
        """(ino, indexes of the stored chunks a read or partial write of the range needs)."""
        h = self.handles.get(fh)
        node = self.inodes.get(h.ino) if h is not None else None
        if node is None:
            return 0, []
        if for_write and h is not None and h.flags & os.O_APPEND:
            off = node.size
        return node.ino, self.data.chunks_to_fetch(node.ino, node.size, off, size, for_write)

    # -- closing ----------------------------------------------------------------------------------

    @fs_op
    def close(self) -> None:
        """Flush everything; inodes without links are deleted (nobody can reach them now)."""
        if not self.read_only:
            for node in list(self.inodes.values()):
                if node.nlink == 0:
                    self._destroy(node.ino, orphan=True)
            self.flush()
        self.handles.clear()
        self.dir_handles.clear()
        self.data.cache.clear()
