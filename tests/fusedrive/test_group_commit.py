"""Group commit: fsyncs that wait together share one commit (``Flusher.flush``).

Drives the daemon's ``Flusher`` under trio over a real store (no FUSE). Each job's
commit waits for the test's go-ahead before it runs (``GatedFlusher``), so the order
of events is forced, not hoped for; the commits themselves are real, and their number
is read from LMDB's own transaction counter.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blockstore import Store
from fusedrive import Ctx, Filesystem
from fusedrive.errors import FsError
from fusedrive.filedata import FlushJob
from fusedrive.flusher import Flusher
from fusedrive.schema import ROOT_INO

MiB = 1 << 20


class GatedFlusher(Flusher):
    """The daemon's flusher, whose N-th job waits for ``gates[N]`` before its (real)
    commit: the test decides when each commit may proceed."""

    def __init__(self, fs: Filesystem) -> None:
        super().__init__(fs)
        self.gates = {n: threading.Event() for n in (1, 2, 3)}

    def _commit(self, job: FlushJob) -> dict[int, int]:
        assert self.gates[job.seq].wait(60)
        return super()._commit(job)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Filesystem]:
    store = Store(tmp_path / "store")
    store.create_volume("v", 64 * MiB)
    fs = Filesystem(store.volume("v"))
    try:
        yield fs
    finally:
        fs.close()
        store.close()


def last_txnid(store: Store) -> int:
    return int(store.env.info()["last_txnid"])


async def until(cond: object) -> None:
    with trio.fail_after(30):  # a safety net, not a measurement
        while not cond():  # type: ignore[operator]
            await trio.sleep(0.005)


def test_fsyncs_waiting_together_share_one_commit(fs: Filesystem) -> None:
    """F1 commits A; F2 and F3, called while it commits, share ONE commit of B and C;
    D, written after F3 was called and after that commit froze, is not F3's to wait
    for: F3 returns without a third commit, and D stays buffered until it is asked for."""
    store = fs.store
    ctx = Ctx(0, 0)
    fhs = {n: fs.create(ROOT_INO, n, 0o644, os.O_RDWR, ctx)[0] for n in (b"a", b"b", b"c", b"d")}
    fs.flush()
    flusher = GatedFlusher(fs)
    done: list[str] = []

    async def fsync(name: str) -> None:
        await flusher.flush()
        done.append(name)

    async def main() -> None:
        start = last_txnid(store)
        fs.write(fhs[b"a"], 0, b"A" * 5000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fsync, "F1")
            await until(lambda: fs.data.inflight is not None)  # job 1 frozen, commit blocked
            job1 = fs.data.inflight
            fs.write(fhs[b"b"], 0, b"B" * 5000)
            nursery.start_soon(fsync, "F2")
            fs.write(fhs[b"c"], 0, b"C" * 5000)
            nursery.start_soon(fsync, "F3")
            await trio.sleep(0.05)
            assert done == []  # everybody waits for the held commit

            def job2_frozen() -> bool:
                return fs.data.inflight is not None and fs.data.inflight is not job1

            flusher.gates[1].set()  # job 1 commits; job 2 (B and C) is frozen and held
            await until(job2_frozen)
            assert done == ["F1"]
            fs.write(fhs[b"d"], 0, b"D" * 5000)  # after F3's call: not owed to F3
            flusher.gates[2].set()
        assert sorted(done) == ["F1", "F2", "F3"]
        assert last_txnid(store) - start == 2  # job 1, then one job for F2 and F3
        assert fs.data.live  # D is still buffered: nobody asked for it yet
        flusher.gates[3].set()
        await flusher.flush()
        assert last_txnid(store) - start == 3
        assert not fs.has_pending()

    try:
        trio.run(main)
    finally:
        flusher.close()
    for name, fill in ((b"a", b"A"), (b"b", b"B"), (b"c", b"C"), (b"d", b"D")):
        assert fs.read(fhs[name], 0, 5000) == fill * 5000


def test_a_flush_with_nothing_new_waits_for_the_commit_in_flight_only(fs: Filesystem) -> None:
    """An fsync whose changes are all in the job being committed returns once that job
    is committed, without a commit of its own; with nothing buffered at all, it returns
    at once."""
    store = fs.store
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, Ctx(0, 0))[0]
    fs.flush()
    flusher = GatedFlusher(fs)

    async def main() -> None:
        start = last_txnid(store)
        await flusher.flush()  # nothing buffered
        assert last_txnid(store) == start
        fs.write(fh, 0, b"x" * 5000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher.flush)
            await until(lambda: fs.data.inflight is not None)
            nursery.start_soon(flusher.flush)  # its change is in the job in flight
            await trio.sleep(0.05)
            flusher.gates[1].set()
        assert last_txnid(store) - start == 1

    try:
        trio.run(main)
    finally:
        flusher.close()
    assert not fs.has_pending()


def test_a_job_that_failed_outside_the_flusher_is_retried_by_the_next_flush(
    fs: Filesystem,
) -> None:
    """A synchronous flush (``Filesystem.flush``) that fails leaves its job for a retry
    and nothing new buffered: the flusher's next flush must still store it (its own
    job numbers say nothing is owed), never return with changes unstored."""
    store = fs.store
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, Ctx(0, 0))[0]
    fs.flush()
    flusher = Flusher(fs)
    fs.write(fh, 0, b"y" * 5000)
    store.set_reserve(os.statvfs(store.path).f_blocks * os.statvfs(store.path).f_frsize)
    with pytest.raises(FsError) as failed:
        fs.flush()  # the store is "full": the job fails and stays buffered
    assert failed.value.errno == errno.ENOSPC
    assert fs.data.inflight is not None and not fs.data.live
    store.set_reserve(0)
    start = last_txnid(store)
    try:
        trio.run(flusher.flush)
    finally:
        flusher.close()
    assert last_txnid(store) - start == 1
    assert not fs.has_pending()
    assert fs.read(fh, 0, 5000) == b"y" * 5000
