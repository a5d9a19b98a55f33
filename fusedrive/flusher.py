"""Flushing one mount's buffered changes: ``Flusher``, used by ``fuse_adapter``.

Preparing a flush (hashing and compressing chunks) runs in a small pool, since
hashlib and zstandard release the GIL: writes send it the chunks they complete,
and once a flush is due the chunks they create, so the next batch is prepared
while the previous one commits (see ``FileData.prepare_ahead``); the LMDB commit
runs in a worker thread. At most one flush runs at a time (``Flusher.lock``)
while handlers keep filling a fresh layer on the trio thread.

Flushes happen on fsync and fsyncdir, when the dirty buffers pass half their bound
(in the background) or their bound (the writer waits), every ``FLUSH_INTERVAL``
seconds or ``IDLE_FLUSH`` seconds after changes stop, on a request from
``control.request_flush``, and on unmount or SIGTERM / SIGINT (after the FUSE loop
stops, before the mount goes away; ``fuse_adapter``).

Failures (docs/faults.md): a flush that fails raises ``FsError`` (ENOSPC for a full
store, EIO for anything else, a bug included) and leaves its changes buffered for
the next flush; ``Flusher.failure`` holds the error while they remain.

A flush commits each written file's allocation (st_blocks), which the kernel may
have cached: ``invalidate_attrs`` drops such attributes (``fuse_adapter`` uses it
too, for what ``refresh`` changes).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import logging
from collections.abc import Sequence

import pyfuse3
import trio

from .errors import FsError, failure
from .filedata import FlushJob
from .filesystem import Filesystem

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 3.0
IDLE_FLUSH = 0.5
PREPARE_THREADS = 2


def invalidate_attrs(ino: int) -> None:
    """Make the kernel forget cached attributes the daemon changed on its own."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except OSError as exc:
        # ENOENT: the kernel holds no inode for it (forgotten), nothing to drop.
        if exc.errno != errno.ENOENT:
            log.warning("event=invalidate_failed ino=%d error=%s", ino, exc)


def invalidate_all_attrs(inos: Sequence[int]) -> None:
    for ino in inos:
        invalidate_attrs(ino)


class Flusher:
    """Runs flushes one at a time, with hashing, compression and commit in threads.

    The pool that prepares chunks is also ``FileData.prepare_pool``: chunks sent
    ahead by writes are usually ready when the flush freezes them.
    """

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.lock = trio.Lock()
        # A flush holds the lock. Not ``lock.locked()``: the tasks in ``wait_idle`` hold
        # it in turn too, and writers that took that for a flush running would wait for
        # each other forever with full buffers and no flush (seen with the writeback
        # cache, whose write back sends several writes at once).
        self.flushing = False
        self.nursery: trio.Nursery | None = None
        self._background = False
        # The error of the last flush, while buffered changes it could not store remain
        # (None once a flush succeeds): close(2) of a file opened for writing reports it.
        self.failure: FsError | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            PREPARE_THREADS, thread_name_prefix="fusedrive-prepare"
        )
        if not fs.read_only:
            fs.data.prepare_pool = self._pool

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _prepare(self, job: FlushJob) -> None:
        fs = self.fs
        parts = [
            self._pool.submit(job.prepare, fs.store, fs.data.level, part, PREPARE_THREADS)
            for part in range(PREPARE_THREADS)
        ]
        for f in parts:
            f.result()

    async def flush(self) -> None:
        """Commit everything buffered before the call.

        Raises ``FsError`` and nothing else (ENOSPC when the store is full, EIO for
        any other failure, a bug included); the changes stay buffered, to be
        committed by the next flush.
        """
        async with self.lock:
            self.flushing = True
            try:
                await self._flush_locked()
            finally:
                self.flushing = False

    async def _flush_locked(self) -> None:
        """``flush`` with the lock held."""
        while True:  # a failed job first, if any, then the live layer
            retry = self.fs.data.inflight is not None
            try:
                job = self.fs.begin_flush()
            except Exception as exc:
                raise failure(exc) from exc
            if job is None:
                self.failure = None  # nothing is left unstored
                return
            try:
                t0 = trio.current_time()
                if job.chunks:
                    await trio.to_thread.run_sync(self._prepare, job)
                t1 = trio.current_time()
                deltas = await trio.to_thread.run_sync(job.commit, self.fs.view)
                log.debug(
                    "event=flushed bytes=%d chunks=%d prepare_ms=%.1f commit_ms=%.1f",
                    job.dirty_bytes,
                    len(job.chunks),
                    (t1 - t0) * 1000,
                    (trio.current_time() - t1) * 1000,
                )
            except BaseException as exc:
                self.fs.finish_flush(job, None)
                if not isinstance(exc, Exception):
                    raise  # cancelled: the job stays buffered for the next flush
                self.failure = failure(exc)
                log.error(
                    "event=flush_failed errno=%s buffered_bytes=%d error=%s",
                    errno.errorcode.get(self.failure.errno, self.failure.errno),
                    self.fs.data.pending_bytes(),
                    self.failure,
                )
                raise self.failure from exc
            self.failure = None
            try:
                self.fs.finish_flush(job, deltas)
            except Exception as exc:  # committed; only the bookkeeping after it failed
                raise failure(exc) from exc
            self._stored(list(job.layer.files))
            if not retry:
                return  # what was buffered before the call is committed

    def _stored(self, inos: list[int]) -> None:
        """The flushed files' st_blocks changed (estimate -> stored): the kernel may
        hold their attributes for ``ATTR_TIMEOUT``, so drop them, in the background
        (a thread, as every invalidation here: never on the request path)."""
        if inos and self.nursery is not None:
            with contextlib.suppress(RuntimeError):  # the nursery has closed: unmounting
                self.nursery.start_soon(
                    functools.partial(trio.to_thread.run_sync, invalidate_all_attrs, inos)
                )

    async def wait_idle(self) -> None:
        """Wait for the flush in flight, if any, to finish."""
        async with self.lock:
            pass

    async def make_room(self, space: bool) -> None:
        """Free dirty buffers for a writer: a full flush only if space is in doubt.

        While a flush is committing, the writer only waits for it: the next one
        starts in the background, so commits and new writes overlap.
        """
        if not space and self.flushing:
            await self.wait_idle()
        else:
            await self.flush()

    async def flush_logged(self) -> None:
        # Logged by flush; the changes stay buffered and the next flush retries them.
        with contextlib.suppress(FsError):
            await self.flush()

    def after_write(self) -> None:
        """Start a background flush once the dirty buffers pass half their bound."""
        data = self.fs.data
        if (
            self.nursery is not None
            and not self._background
            and not self.flushing
            and data.live.dirty_bytes >= data.flush_threshold
        ):
            self._background = True
            self.nursery.start_soon(self._background_flush)

    async def _background_flush(self) -> None:
        try:
            await self.flush_logged()
        finally:
            self._background = False

    async def run_timer(self) -> None:
        """Flush what is pending every ``FLUSH_INTERVAL`` seconds, or once changes stop.

        A mount that has gone quiet is flushed after ``IDLE_FLUSH`` seconds rather
        than at the next tick: the commit (GIL-bound, and long after a burst of
        metadata changes) then runs while nobody waits for the daemon, not in the
        middle of whatever comes next, and the changes are durable sooner.
        """
        mark: tuple[int, ...] | None = None
        due = trio.current_time() + FLUSH_INTERVAL
        while True:
            try:
                mark, due = await self._tick(mark, due)
            except Exception:  # never let the timer take the mount down
                log.exception("event=flush_timer_failed")
                mark, due = None, trio.current_time() + FLUSH_INTERVAL

    async def _tick(
        self, mark: tuple[int, ...] | None, due: float
    ) -> tuple[tuple[int, ...] | None, float]:
        """One turn of ``run_timer``: returns the next (mark, due)."""
        await trio.sleep(IDLE_FLUSH)
        if not self.fs.has_pending() or self.flushing:
            return None, trio.current_time() + FLUSH_INTERVAL
        now = self._change_mark()
        # A failed commit is retried at the interval only: it may keep failing.
        quiet = now == mark and self.fs.data.inflight is None
        if quiet or trio.current_time() >= due:
            await self.flush_logged()
            return None, trio.current_time() + FLUSH_INTERVAL
        return now, due

    def _change_mark(self) -> tuple[int, ...]:
        """Numbers that change with almost every change (an unchanged mark means quiet)."""
        fs, live = self.fs, self.fs.data.live
        return (live.dirty_bytes, live.growth, len(live.kv), len(fs.dirty), fs.next_ino)
