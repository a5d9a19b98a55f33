"""SIGKILL in the middle of writes, snapshots, clones and release.

Each round starts two children on the same store: a writer that commits numbered
batches (chunks plus a marker, and some churn that frees chunks) and reports each
batch number only after its ``with batch`` block has exited, and an admin that
cuts snapshots and clones, writes to and deletes them and runs release steps.
The test kills both with SIGKILL at a random moment, then reopens the store and
checks: it opens, fsck is clean, every reported batch is present and intact, at
most one unreported batch (committed, killed before the report) is there, and
every snapshot and clone holds a consistent prefix of batches. The next round's
writer continues where the store says the last one stopped.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockstore import ChunkRef, Store, View, fsck

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 8
PER_BATCH = 3
WAIT = 120  # seconds; a guard against a hung child, not a performance bound


def payload(i: int, j: int) -> bytes:
    """Chunk ``j`` of batch ``i`` (the writer child runs this same code)."""
    return (b"batch %d chunk %d " % (i, j)) * (50 + 40 * j)


WRITER = (
    inspect.getsource(payload)
    + """
import sys
from blockstore import Store

store = Store(sys.argv[1], create=False)
view = store.volume("crash")
i = len(view.scan(b"m/"))  # continue after the last batch the store holds
while True:
    preps = [store.prepare_chunk(payload(i, j)) for j in range(3)]
    churn = store.prepare_chunk(b"churn %d " % i * 200)
    with view.batch() as b:
        for j, prep in enumerate(preps):
            b.put_chunk(b"c/%08d/%d" % (i, j), prep)
        b.put(b"m/%08d" % i, b"done")
        # Churn outside the checked keys: overwrites and deletes free chunks.
        b.put_chunk(b"r/%d" % (i % 5), churn)
        b.delete(b"r/%d" % ((i + 2) % 5))
    print(i, flush=True)
    i += 1
"""
)

ADMIN = """
import os
import sys
from blockstore import Store

store = Store(sys.argv[1], create=False)
tag = os.getpid()
n = 0
while True:
    snap, clone = "s%d-%d" % (tag, n), "k%d-%d" % (tag, n)
    store.create_snapshot("crash", snap)
    store.clone_snapshot(snap, clone)
    store.volume(clone).put_chunk(b"clone/own", b"clone data %d" % n * 50)
    store.clone_volume("crash", clone + "v")
    if n % 2:
        store.delete_snapshot(snap)
    store.delete_volume(clone)
    if n % 3:
        store.delete_volume(clone + "v")
    store.gc_step(budget=0.001, batch=16)
    print(n, flush=True)
    n += 1
"""


class Child:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, code: str, store_dir: Path, err: Path) -> None:
        with open(err, "ab") as errf:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(store_dir)],
                stdout=subprocess.PIPE,
                stderr=errf,
                text=True,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.strip())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_lines(self, n: int) -> None:
        deadline = time.monotonic() + WAIT
        with self._cond:
            while len(self.lines) < n and self.proc.poll() is None:
                assert time.monotonic() < deadline, "child made no progress"
                self._cond.wait(timeout=1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT)
        self._thread.join(timeout=WAIT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Callable[[str, Path], Child]]:
    """Start children; any still running at the end is killed by its PID."""
    started: list[Child] = []

    def start(code: str, store_dir: Path) -> Child:
        child = Child(code, store_dir, tmp_path / "children.stderr")
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.kill()


def check_prefix(view: View, at_least: int = 0) -> int:
    """``view`` holds batches 0..k-1, each complete and intact; returns k."""
    markers = [k for k, _ in view.scan(b"m/")]
    k = len(markers)
    assert markers == [b"m/%08d" % i for i in range(k)], f"{view.name}: batches not a prefix"
    assert k >= at_least, (view.name, k, at_least)
    chunks = view.scan(b"c/")
    assert [key for key, _ in chunks] == [
        b"c/%08d/%d" % (i, j) for i in range(k) for j in range(PER_BATCH)
    ], f"{view.name}: a batch is torn"
    for key, ref in chunks:
        assert isinstance(ref, ChunkRef)
        _, i, j = key.split(b"/")
        assert view.store.read_chunk(ref) == payload(int(i), int(j))
    return k


def kill_round(
    start: Callable[[str, Path], Child],
    store_dir: Path,
    rng: random.Random,
    rnd: int,
    committed: int,
) -> int:
    """One round: children run, both are killed, the store is checked; returns batches."""
    # In odd rounds this process keeps the store open throughout, as the CSI plugin
    # does while a mount process dies: its handle must keep working afterwards (a
    # writer killed holding LMDB's write lock must not wedge it). In even rounds the
    # store is opened afresh after the kill.
    live = Store(store_dir, create=False) if rnd % 2 else None
    try:
        writer = start(WRITER, store_dir)
        admin = start(ADMIN, store_dir)
        # Kill at a random moment: sometimes before the first commit (even while the
        # children are still opening the store), mostly after a random number.
        target = rng.choice([0, 1, 2, 5, 10, 20, 30])
        writer.wait_lines(target)
        if target:
            admin.wait_lines(1)
        time.sleep(rng.uniform(0, 0.02))
        first, second = (writer, admin) if rng.random() < 0.5 else (admin, writer)
        first.kill()
        second.kill()
        reported = [int(x) for x in writer.lines]
        assert reported == list(range(committed, committed + len(reported)))

        store = live or Store(store_dir, create=False)
        try:
            parent = store.volume("parent")
            parent.put(b"round-%d" % rnd, b"after the kill")
            assert parent.get(b"round-%d" % rnd) == b"after the kill"
            report = fsck(store)
            assert report.clean, (rnd, report.problems + report.unfixable)
            k = check_prefix(store.volume("crash"), at_least=committed + len(reported))
            # At most the one batch that committed before its report was printed.
            assert k <= committed + len(reported) + 1, (rnd, k, committed, reported)
            for snap in store.list_snapshots():
                assert check_prefix(store.snapshot(snap.name)) <= k
            for vol in store.list_volumes():
                if vol.name not in ("crash", "parent"):
                    assert check_prefix(store.volume(vol.name)) <= k
        finally:
            store.close()
        return k
    finally:
        if live is not None:
            live.close()


def test_sigkill_during_writes_snapshots_and_release(
    children: Callable[[str, Path], Child], store_dir: Path, tmp_path: Path
) -> None:
    rng = random.Random(20240607)
    with Store(store_dir) as store:
        store.create_volume("crash", 1 << 30)
        store.create_volume("parent", 1 << 30)
    committed = 0  # batches the store must hold
    for rnd in range(ROUNDS):
        committed = kill_round(children, store_dir, rng, rnd, committed)
        errors = (tmp_path / "children.stderr").read_text()
        assert "Error" not in errors, errors

    assert committed > 0
    with Store(store_dir, create=False) as store:
        assert [k for k, _ in store.volume("parent").scan()] == sorted(
            b"round-%d" % r for r in range(ROUNDS)
        )
        for snap in store.list_snapshots():
            store.delete_snapshot(snap.name)
        for vol in store.list_volumes():
            store.delete_volume(vol.name)
        store.gc()
        st = store.stats()
        assert (st.chunk_count, st.entries, st.layers, st.stored_bytes) == (0, 0, 0, 0)
        assert fsck(store).clean
