"""Flushing one mount's buffered changes: ``Flusher``, used by ``fuse_adapter``.

Preparing a flush (hashing and compressing chunks) runs in a small pool, since
hashlib and zstandard release the GIL: writes send it the chunks they complete,
and once a flush is due the chunks they create, so the next batch is prepared
while the previous one commits (see ``FileData.prepare_ahead``); the LMDB commit
runs in a worker thread. At most one flush runs at a
time (``Flusher.lock``) while handlers keep filling a fresh layer on the trio
thread, and flushes called while one commits share the next commit (group commit,
see ``Flusher``).

Flushes happen on fsync and fsyncdir, when the dirty buffers pass 3/4 of their bound
(in the background) or their bound (the writer waits), every ``FLUSH_INTERVAL``
seconds or ``IDLE_FLUSH`` seconds after changes stop, on a request from
``control.request_flush`` (new writes wait while it runs, so a snapshot of a busy
volume commits only what was written before it: ``Flusher.flush_requested``), and on
unmount or SIGTERM / SIGINT (after the FUSE loop stops, before the mount goes away;
``fuse_adapter``).

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
import logging
import queue
import threading
import time
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


class _Invalidator:
    """One thread that drops the kernel's cached attributes of inodes handed to it.

    An invalidation must never run on the trio thread (the kernel may wait for a
    request the daemon is still serving); one long-lived thread costs a queue put per
    flush, where a thread handoff per flush cost a trio task and a wakeup each.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Sequence[int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, inos: Sequence[int]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="fusedrive-invalidate", daemon=True
            )
            self._thread.start()
        self._queue.put(inos)

    def _run(self) -> None:
        while (inos := self._queue.get()) is not None:
            invalidate_all_attrs(inos)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class Flusher:
    """Runs flushes one at a time, with hashing, compression and commit in threads.

    Group commit: every change buffered before a flush *freezes* its job is in that
    job, so a flush called while another commits needs only the next job, and callers
    that waited together share it (``_frozen`` counts frozen jobs, ``_committed`` is
    the number of the last one committed; jobs commit in freeze order, a failed one
    is retried before anything new is frozen). Concurrent fsyncs thus cost one commit
    between them, not one each.

    The pool that prepares chunks is also ``FileData.prepare_pool``: chunks sent
    ahead by writes are usually ready when the flush freezes them. (Preparing and
    committing in one worker thread, one handoff fewer, used less CPU per fsync but
    measured slower for one writer doing 8 KiB write + fdatasync: 68 against 101-112
    fsyncs/s over 5 interleaved rounds; docs/datapath.md.)
    """

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.lock = trio.Lock()
        self.nursery: trio.Nursery | None = None
        self._background = False
        # A flush holds the lock. Not ``lock.locked()``: the tasks in ``wait_idle`` hold
        # it in turn too, and writers that took that for a flush running would wait for
        # each other forever with full buffers and no flush (seen with the writeback
        # cache, whose write back sends several writes at once).
        self.flushing = False
        # Set while a flush asked for from outside (``flush_requested``) runs: writes wait
        # for it to end, then go on (an Event each; a later request replaces it).
        self.hold: trio.Event | None = None
        self._frozen = 0  # jobs frozen so far (each holds every change before its freeze)
        self._committed = 0  # the number of the last job committed
        # The error of the last flush, while buffered changes it could not store remain
        # (None once a flush succeeds): close(2) of a file opened for writing reports it.
        self.failure: FsError | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            PREPARE_THREADS, thread_name_prefix="fusedrive-prepare"
        )
        self._invalidator = _Invalidator()
        if not fs.read_only:
            fs.data.prepare_pool = self._pool

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._invalidator.close()

    def _prepare(self, job: FlushJob) -> None:
        fs = self.fs
        parts = [
            self._pool.submit(job.prepare, fs.store, fs.data.level, part, PREPARE_THREADS)
            for part in range(PREPARE_THREADS)
        ]
        for f in parts:
            f.result()

    def _commit(self, job: FlushJob) -> dict[int, int]:
        return job.commit(self.fs.view)

    async def flush(self) -> None:
        """Commit everything buffered before the call (sharing a commit with others).

        Raises ``FsError`` and nothing else (ENOSPC when the store is full, EIO for
        any other failure, a bug included); the changes stay buffered, to be
        committed by the next flush.
        """
        fs = self.fs
        # The job that holds every change made so far: the next one to be frozen if
        # anything changed since the last freeze, else the last one frozen.
        need = self._frozen + (1 if fs.data.live or fs.dirty or fs.sb_dirty else 0)
        async with self.lock:
            self.flushing = True
            try:
                await self._flush_locked(need)
            finally:
                self.flushing = False

    async def _flush_locked(self, need: int) -> None:
        """``flush`` with the lock held: commit jobs until job ``need`` is committed."""
        # A failed job waiting for its retry (whoever froze it) goes first, whatever
        # ``need`` says: a flush never returns while changes it could owe are unstored.
        while self._committed < need or self.fs.data.inflight is not None:
            retry = self.fs.data.inflight is not None
            tb = time.perf_counter()
            try:
                job = self.fs.begin_flush()
            except Exception as exc:
                raise failure(exc) from exc
            if job is None:
                self.failure = None  # nothing is left unstored
                return
            if not retry:
                self._frozen += 1
                job.seq = self._frozen
            try:
                t0 = time.perf_counter()
                if job.chunks:
                    await trio.to_thread.run_sync(self._prepare, job)
                t1 = time.perf_counter()
                deltas = await trio.to_thread.run_sync(self._commit, job)
                if log.isEnabledFor(logging.DEBUG):
                    self._log_flushed(job, t0 - tb, t1 - t0, time.perf_counter() - t1)
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
            self._committed = max(self._committed, job.seq)
            try:
                self.fs.finish_flush(job, deltas)
            except Exception as exc:  # committed; only the bookkeeping after it failed
                raise failure(exc) from exc
            self._stored(list(job.layer.files))

    def _log_flushed(self, job: FlushJob, begin: float, prepare: float, commit: float) -> None:
        c = self.fs.store.last_commit
        log.debug(
            "event=flushed seq=%d bytes=%d chunks=%d begin_ms=%.2f prepare_ms=%.2f "
            "commit_ms=%.2f txn_body_ms=%.2f segment_sync_ms=%.2f lmdb_commit_ms=%.2f",
            job.seq,
            job.dirty_bytes,
            len(job.chunks),
            begin * 1000,
            prepare * 1000,
            commit * 1000,
            c.body * 1000 if c else -1,
            c.segment_sync * 1000 if c else -1,
            c.lmdb_commit * 1000 if c else -1,
        )

    async def flush_requested(self) -> None:
        """``flush`` for ``control.request_flush`` (a snapshot or clone about to be cut).

        Writes that arrive meanwhile wait until it ends (``writes_may_go``), as a
        freeze does: the flush then commits only what was written before the request
        (at most the dirty-buffer bound), without new writes competing with it for the
        CPU, and a busy volume's snapshot does not wait for data written after it.
        """
        hold = trio.Event()
        self.hold = hold
        try:
            await self.flush()
        finally:
            if self.hold is hold:
                self.hold = None
            hold.set()

    async def writes_may_go(self) -> None:
        """Return once no requested flush holds writes back."""
        while self.hold is not None:
            await self.hold.wait()

    def _stored(self, inos: list[int]) -> None:
        """The flushed files' st_blocks changed (estimate -> stored): the kernel may
        hold their attributes for ``ATTR_TIMEOUT``, so drop them, in the background
        (a thread, as every invalidation here: never on the request path)."""
        if inos and self.nursery is not None:
            self._invalidator.put(inos)

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
        """Start a background flush once the dirty buffers pass 3/4 of their bound."""
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
