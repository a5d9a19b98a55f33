"""Fetching and verifying stored chunks ahead of the requests that need them: ``Fetcher``.

Used by ``fuse_adapter``: large reads and sequential read-ahead fetch in worker
threads; a request needing one or two chunks fetches them inline, which is
cheaper than a thread handoff.
"""

from __future__ import annotations

import logging

import trio

from blockstore import StoreError

from .filesystem import Filesystem

log = logging.getLogger(__name__)

# A request that needs at most this many stored chunks fetches them on the trio
# thread; larger ones and read-ahead go to worker threads in batches of
# FETCH_BATCH, at most READ_AHEAD_TASKS batches of read-ahead at once.
INLINE_FETCH_CHUNKS = 2  # at least 2: a request no larger than a chunk spans two
FETCH_BATCH = 4
READ_AHEAD_BATCH = 16
READ_AHEAD_BYTES = 4 * 1024 * 1024  # measured: cold sequential reads 1.5x, 2 MiB 1.25x
READ_AHEAD_TASKS = 4


class Fetcher:
    """Fetches and verifies stored chunks before the requests that need them.

    One fetch and verify (a lookup, a pread, a hash) costs tens of microseconds
    and a round trip through a worker thread costs more (measured: random 4 KiB
    reads ran 2.5x faster inline), so a request needing at most
    ``INLINE_FETCH_CHUNKS`` chunks leaves them to ``Filesystem``, which fetches
    them on the trio thread. Larger requests fetch in batches in worker threads at
    once (hashing releases the GIL, so the batches use every core). A reader
    whose request starts where its previous one ended gets the next
    ``READ_AHEAD_BYTES`` fetched in the background, so that cold sequential reads
    overlap disk reads and hashing with answering requests.

    Fetched chunks go to the chunk cache only if no commit changed file data
    meanwhile (``FileData.fill_cache``); a request finding its chunk in flight
    waits for that fetch instead of starting another, then reads through the
    cache (or fetches inline if the chunk did not make it there). A failed
    background fetch is dropped: the request that needs the chunk fetches it again
    and reports the error.
    """

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.nursery: trio.Nursery | None = None
        self._inflight: dict[tuple[int, int], trio.Event] = {}
        self._next: dict[int, int] = {}  # fh -> where its next sequential read starts
        self._ahead: dict[int, int] = {}  # fh -> end of the range read ahead for it
        self._limiter = trio.CapacityLimiter(READ_AHEAD_TASKS)

    def forget(self, fh: int) -> None:
        self._next.pop(fh, None)
        self._ahead.pop(fh, None)

    async def before(self, fh: int, off: int, size: int, for_write: bool) -> None:
        """Have the stored chunks that ``[off, off+size)`` needs ready (read or partial write)."""
        if not for_write:
            self._read_ahead(fh, off, size)
        if size <= self.fs.chunk_size and not self._inflight:
            return  # at most two chunks and none in flight: the request fetches them inline
        ino, indexes = self.fs.chunks_to_fetch(fh, off, size, for_write=for_write)
        if not indexes:
            return
        waits = []
        missing = []
        for index in indexes:
            ev = self._inflight.get((ino, index))
            if ev is None:
                missing.append(index)
            else:
                waits.append(ev)
        if len(missing) > INLINE_FETCH_CHUNKS:
            async with trio.open_nursery() as nursery:
                for lo in range(0, len(missing), FETCH_BATCH):
                    batch = missing[lo : lo + FETCH_BATCH]
                    nursery.start_soon(self._fetch, ino, batch, self._register(ino, batch), None)
        for ev in waits:
            await ev.wait()

    def _read_ahead(self, fh: int, off: int, size: int) -> None:
        end = off + size
        sequential = self._next.get(fh) == off
        self._next[fh] = end
        if not sequential or self.nursery is None:
            self._ahead.pop(fh, None)
            return
        start = max(end, self._ahead.get(fh, end))
        stop = end + READ_AHEAD_BYTES
        if stop - start < READ_AHEAD_BATCH * self.fs.chunk_size:
            return
        self._ahead[fh] = stop
        ino, indexes = self.fs.chunks_to_fetch(fh, start, stop - start, for_write=False)
        indexes = [i for i in indexes if (ino, i) not in self._inflight]
        for lo in range(0, len(indexes), READ_AHEAD_BATCH):
            batch = indexes[lo : lo + READ_AHEAD_BATCH]
            self.nursery.start_soon(
                self._fetch, ino, batch, self._register(ino, batch), self._limiter
            )

    def _register(self, ino: int, indexes: list[int]) -> trio.Event:
        ev = trio.Event()
        for index in indexes:
            self._inflight[(ino, index)] = ev
        return ev

    async def _fetch(
        self, ino: int, indexes: list[int], ev: trio.Event, limiter: trio.CapacityLimiter | None
    ) -> None:
        data = self.fs.data
        epoch = data.epoch
        try:
            if limiter is None:
                chunks = await trio.to_thread.run_sync(data.fetch, ino, indexes)
            else:
                chunks = await trio.to_thread.run_sync(data.fetch, ino, indexes, limiter=limiter)
            data.fill_cache(ino, chunks, epoch)
        except StoreError as exc:
            log.debug("event=fetch_failed ino=%d error=%s", ino, exc)
        except Exception:
            log.exception("event=fetch_failed ino=%d", ino)
        finally:
            for index in indexes:
                self._inflight.pop((ino, index), None)
            ev.set()
