"""Snapshots of a volume while a writer is active hold exactly a prefix of its writes.

A writer thread appends numbered fixed-size records to one file through the mount,
one ``write(2)`` per record, and counts the writes that have returned. Meanwhile
the test asks the mount to flush (``request_flush``) and cuts a snapshot, again
and again. Each snapshot, mounted read-only, must hold records ``0..k-1`` in order
and nothing else: no torn record, nothing missing in the middle, and ``k`` at least
the number of writes that had returned before the flush was asked for (a snapshot
holds every write that returned before it was asked for) and at most one more than
had returned once the snapshot was cut (one write may be in flight).

Records of 12 KiB straddle 64 KiB chunk boundaries; records of 100 KiB span two or
three chunks each, so a torn multi-chunk write would show. Both are whole pages:
the kernel passes each such ``write(2)`` (up to 1 MiB) to the daemon as one request.

Records of 3000 bytes are not: without writeback caching the kernel ends a FUSE
write request at a partly written page that is not in its page cache, so one
unaligned ``write(2)`` reaches the daemon as two or three requests, and a flush can
fall between them. The daemon cannot see ``write(2)`` boundaries, so there a
snapshot may also hold the first part of the one write in flight: exactly the
start of record ``k``, ending at a page boundary of the file. Anything else (a
wrong byte, a record missing, a cut anywhere but a page boundary) fails.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from blockstore import Store, fsck
from fusedrive import request_flush

if TYPE_CHECKING:
    from conftest import FuseMounts

log = logging.getLogger(__name__)

pytestmark = pytest.mark.needs_fuse

MiB = 1024 * 1024
PAGE = 4096
SNAPSHOTS = 8
_HEADER = struct.Struct(">8sQ")


def record(i: int, size: int) -> bytes:
    """Record ``i``: a header naming it, then a filler that differs from record to record."""
    head = _HEADER.pack(b"RECORD::", i)
    fill = struct.pack(">Q", i * 0x9E3779B97F4A7C15 % (1 << 64))
    return head + (fill * (size // 8 + 1))[: size - len(head)]


def records(n: int, size: int) -> bytes:
    return b"".join(record(i, size) for i in range(n))


class Writer(threading.Thread):
    """Appends records until stopped; ``returned`` counts the writes that returned."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(name="record-writer", daemon=True)
        self.path = path
        self.size = size
        self.returned = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                while not self.halt.is_set():
                    rec = record(self.returned, self.size)
                    n = os.write(fd, rec)
                    if n != len(rec):
                        raise OSError(f"short write of record {self.returned}: {n} bytes")
                    self.returned += 1
            finally:
                os.close(fd)
        except BaseException as exc:
            self.error = exc


def check_prefix(data: bytes, size: int, lo: int, hi: int, what: str) -> int:
    """The number of whole records in ``data``, checked to be exactly records 0..k-1.

    ``lo`` and ``hi`` bound the number; a partial last record is accepted only for
    records that are not whole pages, only as the exact start of record ``k`` ending
    at a page boundary of the file, and only if that write may have been in flight.
    """
    k, tail = divmod(len(data), size)
    if data[: k * size] != records(k, size):
        bad = next(i for i in range(k) if data[i * size : (i + 1) * size] != record(i, size))
        head = data[bad * size : bad * size + _HEADER.size]
        raise AssertionError(f"{what}: record {bad} of {k} is wrong (header {head!r})")
    assert lo <= k <= hi, f"{what}: {k} whole records, expected between {lo} and {hi}"
    if tail:
        assert size % PAGE, f"{what}: {len(data)} bytes, record {k} is torn after {tail} bytes"
        assert len(data) % PAGE == 0, f"{what}: record {k} is cut at {len(data)}, not at a page"
        assert data[k * size :] == record(k, size)[:tail], f"{what}: partial record {k} is wrong"
        assert k < hi, f"{what}: record {k} is partly there but its write had not begun"
    return k


@pytest.mark.parametrize("size", [3 * PAGE, 25 * PAGE, 3000])
def test_snapshots_of_a_busy_volume_hold_a_prefix_of_the_writes(
    fuse_mounts: FuseMounts, size: int
) -> None:
    fuse_mounts.volume("v", capacity=1024 * MiB)
    mnt = fuse_mounts.mount("--volume", "v", at="v")
    (mnt / "log").touch()
    request_flush(mnt)
    rng = random.Random(size)
    cuts: list[tuple[str, int, int]] = []  # snapshot, writes returned before, after
    writer = Writer(mnt / "log", size)
    writer.start()
    try:
        while writer.returned < 20 and writer.is_alive():
            time.sleep(0.01)
        for n in range(SNAPSHOTS):
            time.sleep(rng.choice([0, 0.002, 0.01, 0.05]))
            before = writer.returned
            request_flush(mnt)
            with Store(fuse_mounts.store) as s:
                s.create_snapshot("v", f"s{n}")
            cuts.append((f"s{n}", before, writer.returned))
    finally:
        writer.halt.set()
        writer.join(60)
    assert not writer.is_alive(), "the writer did not stop"
    assert writer.error is None, f"the writer failed: {writer.error!r}"
    assert cuts[-1][1] > cuts[0][1], "the writer made no progress while snapshots were cut"

    counts, partial = [], 0
    for name, before, after in cuts:
        snap = fuse_mounts.mount("--snapshot", name, at=name)
        try:
            data = (snap / "log").read_bytes()
        finally:
            fuse_mounts.unmount(snap)
        counts.append(check_prefix(data, size, before, after + 1, f"snapshot {name}"))
        partial += len(data) % size != 0
    assert counts == sorted(counts), f"later snapshots hold fewer records: {counts}"
    log.info("size=%d records per snapshot: %s, %d with a partial record", size, counts, partial)

    final = writer.returned
    check_prefix((mnt / "log").read_bytes(), size, final, final, "the live file")
    fuse_mounts.unmount(mnt)
    with Store(fuse_mounts.store) as s:
        report = fsck(s)
    assert report.clean, report.problems + report.unfixable
