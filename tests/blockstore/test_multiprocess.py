"""Several real processes sharing one store directory.

Writer processes (plain ``python -c`` children) open the same LMDB environment
and commit batches of chunks concurrently: one writes volume ``solo`` alone, two
write volume ``shared`` side by side (with overlapping chunk data, so dedup
crosses processes, and one key both overwrite). Meanwhile the test process cuts
snapshots and clones of the volumes being written, deletes some of them again and
runs release steps. Each writer reports a batch number only after its ``with
batch`` block has committed, so a snapshot taken after a report must contain that
batch, and every snapshot must hold a consistent prefix: batches 0..k, each
complete. Afterwards every batch is present and fsck is clean.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blockstore import ChunkRef, Store, View, fsck

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BATCHES = 120
PER_BATCH = 4
PAUSE_AT = 40  # the solo writer waits for the test here, so one snapshot is surely mid-way
WAIT = 120  # seconds; a guard against a hung child, not a performance bound


def payload(tag: str, i: int, j: int) -> bytes:
    """Chunk ``j`` of batch ``i`` of writer ``tag`` (the children run this same code)."""
    if j == 0:
        # Identical across writers and batches: deduplicated, even across processes.
        return (b"common block %d " % (i % 7)) * 300
    return (b"%s:%d:%d " % (tag.encode(), i, j)) * (100 + 37 * j)


def chunk_key(tag: str, i: int, j: int) -> bytes:
    return b"%s/c/%08d/%d" % (tag.encode(), i, j)


def marker_key(tag: str, i: int) -> bytes:
    return b"%s/m/%08d" % (tag.encode(), i)


WRITER = (
    "\n\n".join(inspect.getsource(f) for f in (payload, chunk_key, marker_key))
    + """
import sys
from blockstore import Store

path, volume, tag, n, per, pause = sys.argv[1:7]
n, per, pause = int(n), int(per), int(pause)
store = Store(path, create=False)
view = store.volume(volume)
for i in range(n):
    preps = [store.prepare_chunk(payload(tag, i, j)) for j in range(per)]
    with view.batch() as b:
        for j, prep in enumerate(preps):
            b.put_chunk(chunk_key(tag, i, j), prep)
        b.put(marker_key(tag, i), b"done")
        b.put(b"last", b"%s:%d" % (tag.encode(), i))
    # Reported only once committed.
    print(i, flush=True)
    if i == pause:
        sys.stdin.readline()
store.close()
print("exit", flush=True)
"""
)


@dataclass
class Writer:
    tag: str
    proc: subprocess.Popen[str]
    stderr: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    committed: int = -1
    finished: bool = False

    def _take(self, line: str) -> None:
        if line == "exit":
            self.finished = True
        else:
            assert int(line) == self.committed + 1, (self.tag, line)
            self.committed = int(line)

    def poll(self) -> None:
        """Take in what the child has reported so far."""
        while True:
            try:
                self._take(self.lines.get_nowait())
            except queue.Empty:
                return

    def wait_for(self, batch: int) -> None:
        while self.committed < batch and not self.finished:
            self._take(self.lines.get(timeout=WAIT))


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.strip())


Spawn = Callable[..., Writer]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start writer children; every one still running at the end is killed by PID."""
    procs: list[subprocess.Popen[str]] = []

    def start(store_dir: Path, volume: str, tag: str, pause: int = -1) -> Writer:
        with open(tmp_path / f"{tag}.stderr", "w") as err:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-c", WRITER, str(store_dir), volume, tag),
                    *(str(BATCHES), str(PER_BATCH), str(pause)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        procs.append(proc)
        w = Writer(tag, proc, tmp_path / f"{tag}.stderr")
        threading.Thread(target=_pump, args=(proc, w.lines), daemon=True).start()
        return w

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


def batches_in(view: View, tag: str) -> int:
    """Check that ``view`` holds exactly batches 0..k-1 of ``tag``, each complete; return k."""
    markers = [k for k, _ in view.scan(b"%s/m/" % tag.encode())]
    k = len(markers)
    assert markers == [marker_key(tag, i) for i in range(k)], f"{tag}: not a prefix"
    chunks = view.scan(b"%s/c/" % tag.encode())
    assert [key for key, _ in chunks] == [
        chunk_key(tag, i, j) for i in range(k) for j in range(PER_BATCH)
    ], f"{tag}: a batch is incomplete"
    for key, ref in chunks:
        assert isinstance(ref, ChunkRef)
        _, _, i, j = key.split(b"/")
        assert view.store.read_chunk(ref) == payload(tag, int(i), int(j))
    return k


def test_concurrent_writers_snapshots_and_clones(spawn: Spawn, store_dir: Path) -> None:
    store = Store(store_dir)
    try:
        store.create_volume("solo", 1 << 30)
        store.create_volume("shared", 1 << 30)
        writers = [
            spawn(store_dir, "solo", "solo", pause=PAUSE_AT),
            spawn(store_dir, "shared", "x"),
            spawn(store_dir, "shared", "y"),
        ]
        solo = writers[0]
        # (kind, name, source volume, batches each writer had reported before the cut)
        taken: list[tuple[str, str, str, dict[str, int]]] = []
        n = 0
        paused_done = False
        while not all(w.finished for w in writers):
            for w in writers:
                w.poll()
                if w.proc.poll() is not None and not w.finished:
                    w.poll()
                    assert w.finished, (w.tag, w.proc.returncode, w.stderr.read_text())
            if not paused_done and solo.committed >= PAUSE_AT:
                # The solo writer is blocked on its stdin right after batch PAUSE_AT.
                store.create_snapshot("solo", "mid")
                assert batches_in(store.snapshot("mid"), "solo") == PAUSE_AT + 1
                assert solo.proc.stdin is not None
                solo.proc.stdin.write("go\n")
                solo.proc.stdin.flush()
                paused_done = True
            if n >= 300:
                # Enough cuts taken; keep only answering the writers until they finish.
                time.sleep(0.01)
                continue
            before = {w.tag: w.committed for w in writers}
            if n % 3 == 2:
                store.clone_volume("solo", f"clone{n}")
                taken.append(("clone", f"clone{n}", "solo", before))
            else:
                vol = "solo" if n % 3 == 0 else "shared"
                store.create_snapshot(vol, f"snap{n}")
                taken.append(("snap", f"snap{n}", vol, before))
            if n % 5 == 4 and taken[-2][0] == "snap":
                # Release concurrently with the writers.
                store.delete_snapshot(taken[-2][1])
                store.gc_step(budget=0, batch=8)
            n += 1
        for w in writers:
            assert w.proc.wait(timeout=WAIT) == 0
            assert w.committed == BATCHES - 1

        # Every committed batch is there, in every view that should have it.
        assert batches_in(store.volume("solo"), "solo") == BATCHES
        shared = store.volume("shared")
        assert batches_in(shared, "x") == BATCHES
        assert batches_in(shared, "y") == BATCHES
        assert shared.get(b"last") in (b"x:%d" % (BATCHES - 1), b"y:%d" % (BATCHES - 1))
        assert batches_in(store.snapshot("mid"), "solo") == PAUSE_AT + 1

        live_snaps = {s.name for s in store.list_snapshots()}
        checked = 0
        for kind, name, vol, before in taken:
            if kind == "snap" and name not in live_snaps:
                continue
            view = store.volume(name) if kind == "clone" else store.snapshot(name)
            for tag in ["solo"] if vol == "solo" else ["x", "y"]:
                k = batches_in(view, tag)
                # Everything reported committed before the cut is in it.
                assert k >= before[tag] + 1, (name, tag, k, before)
            checked += 1
        assert checked >= 1
        # A clone is independent of the volume it was cut from.
        clone = next(name for kind, name, _, _ in taken if kind == "clone")
        store.volume(clone).put(b"clone-only", b"1")
        assert store.volume("solo").get(b"clone-only") is None

        report = fsck(store)
        assert report.clean, report.problems + report.unfixable
        # Dedup crossed processes: the 7 common blocks are stored once each.
        assert store.stats().chunk_count == 7 + 3 * BATCHES * (PER_BATCH - 1)

        for s in store.list_snapshots():
            store.delete_snapshot(s.name)
        for v in store.list_volumes():
            store.delete_volume(v.name)
        store.gc()
        st = store.stats()
        assert (st.chunk_count, st.entries, st.layers) == (0, 0, 0)
        assert fsck(store).clean
    finally:
        store.close()


def test_a_snapshot_cut_elsewhere_moves_a_writers_head(spawn: Spawn, store_dir: Path) -> None:
    """A view re-reads its head: a snapshot cut by one process redirects another's writes."""
    store = Store(store_dir)
    try:
        store.create_volume("solo", 1 << 30)
        view = store.volume("solo")  # held across the other process's writes
        w = spawn(store_dir, "solo", "solo", pause=0)
        w.wait_for(0)
        store.create_snapshot("solo", "early")
        store.clone_volume("solo", "fork")
        assert batches_in(view, "solo") == 1
        assert w.proc.stdin is not None
        w.proc.stdin.write("go\n")
        w.proc.stdin.flush()
        assert w.proc.wait(timeout=WAIT) == 0
        # The writer's later batches went to the new head, not into the snapshot.
        assert batches_in(store.snapshot("early"), "solo") == 1
        assert batches_in(store.volume("fork"), "solo") == 1
        assert batches_in(view, "solo") == BATCHES
        assert fsck(store).clean
    finally:
        store.close()
