"""An fsx-style data-integrity exerciser through a live mount.

One file, a long seeded sequence of random operations: writes, truncates (up and
down, across chunk boundaries and far past the end), reads at random offsets and
sizes (many just around the chunk size and 1 MiB, the kernel's largest request),
reads through mmap, writes and reads through a second descriptor opened O_DIRECT
(served with FUSE direct I/O, beside the cached one), fsync, close and reopen, and
one clean unmount and remount in the middle. A bytearray is the model: every read,
every size and the whole file after the remount and at the end must match it. The
run is bounded by time and by a number of operations, whichever comes first; the
sequence depends only on the seed, so a failure is replayed with
``FUSEDRIVE_FSX_SEED`` (and ``FUSEDRIVE_FSX_OPS`` to stop at the failing
operation). On a mismatch the test reports the seed and the tail of the operation
log and writes the whole log next to the store.

Two passes: the default 64 KiB chunks, and 4 KiB chunks (``chunk_size`` volume
parameter) where every page boundary is a chunk boundary.
"""

from __future__ import annotations

import logging
import mmap
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from blockstore import Store, fsck

if TYPE_CHECKING:
    from conftest import FuseMounts

log = logging.getLogger(__name__)

pytestmark = pytest.mark.needs_fuse

KiB, MiB = 1024, 1024 * 1024
SECONDS = float(os.environ.get("FUSEDRIVE_FSX_SECONDS", "15"))
MAX_OPS = int(os.environ.get("FUSEDRIVE_FSX_OPS", "20000"))
FILE_SPAN = 4 * MiB  # writes land below this; truncates reach up to FAR
FAR = 24 * MiB
WEIGHTS = {
    "write": 30,
    "read": 30,
    "direct_write": 8,
    "direct_read": 4,
    "truncate": 10,
    "mapread": 6,
    "fsync": 3,
    "reopen": 4,
}


class Mismatch(AssertionError):
    pass


class Exerciser:
    """Drives the file and the model with one seeded random sequence."""

    def __init__(self, fuse_mounts: FuseMounts, volume: str, chunk_size: int, seed: int) -> None:
        self.env = fuse_mounts
        self.volume = volume
        self.cs = chunk_size
        self.seed = seed
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.log: list[str] = []
        self.ops = 0
        self.mnt = fuse_mounts.mount("--volume", volume, at=volume)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.dfd = os.open(self.path, os.O_RDWR | os.O_DIRECT)

    @property
    def path(self) -> Path:
        return self.mnt / "fsx.data"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR)
        self.dfd = os.open(self.path, os.O_RDWR | os.O_DIRECT)

    # -- choosing offsets, sizes and data ---------------------------------------------------------
    def boundary(self, limit: int) -> int:
        """An offset at or next to a chunk, 64 KiB or 1 MiB boundary below ``limit``."""
        unit = self.rng.choice([self.cs, 64 * KiB, MiB])
        k = self.rng.randrange(max(limit // unit, 1) + 1)
        return max(k * unit + self.rng.choice([-1, 0, 0, 1]), 0)

    def offset(self, limit: int) -> int:
        r = self.rng.random()
        if r < 0.35:
            return self.boundary(limit)
        if r < 0.5:
            return max(len(self.model) + self.rng.randint(-300, 300), 0)
        return self.rng.randrange(limit)

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randint(1, 600)
        if r < 0.5:
            return self.cs + self.rng.randint(-2, 2)
        if r < 0.6:
            return 64 * KiB + self.rng.randint(-2, 2)
        if r < 0.7:
            return MiB + self.rng.randint(-2, 2)
        if r < 0.8:
            return self.rng.randint(2, 5) * self.cs + self.rng.randint(-1, 1)
        return self.rng.randint(1, 300 * KiB)

    def data(self, n: int) -> bytes:
        r = self.rng.random()
        if r < 0.15:
            return bytes(n)  # whole zero chunks are holes in the store
        if r < 0.3:
            return bytes([self.ops & 0xFF, 0x5A]) * (n // 2) + bytes([0xA5] * (n % 2))
        return self.rng.randbytes(n)

    # -- operations -------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.log.append(f"{self.ops}: {text}")

    def fail(self, what: str) -> None:
        raise Mismatch(
            f"fsx mismatch at op {self.ops} (seed {self.seed}, chunk size {self.cs}): {what}\n"
            f"replay: FUSEDRIVE_FSX_SEED={self.seed} FUSEDRIVE_FSX_OPS={self.ops + 1}\n"
            "last operations:\n  " + "\n  ".join(self.log[-40:])
        )

    def compare(self, got: bytes, off: int, n: int, how: str) -> None:
        want = bytes(self.model[off : off + n])
        if got == want:
            return
        first = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
            min(len(got), len(want)),
        )
        self.fail(
            f"{how} of {n} bytes at {off} returned {len(got)} bytes, expected {len(want)}; "
            f"first difference at file offset {off + first}"
        )

    def check_size(self) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            self.fail(f"file size {size}, expected {len(self.model)}")

    def write(self, direct: bool = False) -> None:
        off = self.offset(FILE_SPAN)
        body = self.data(self.size())
        self.note(f"{'direct ' if direct else ''}write {off} +{len(body)}")
        n = os.pwrite(self.dfd if direct else self.fd, body, off)
        if n != len(body):
            self.fail(f"short write: {n} of {len(body)} bytes")
        if len(self.model) < off:
            self.model.extend(bytes(off - len(self.model)))
        self.model[off : off + len(body)] = body

    def read(self, direct: bool = False) -> None:
        off = self.offset(len(self.model) + 2 * self.cs)
        n = self.size()
        self.note(f"{'direct ' if direct else ''}read {off} +{n}")
        got = os.pread(self.dfd if direct else self.fd, n, off)
        self.compare(got, off, n, "direct read" if direct else "read")

    def direct_write(self) -> None:
        self.write(direct=True)

    def direct_read(self) -> None:
        self.read(direct=True)

    def mapread(self) -> None:
        if not self.model:
            return
        off = self.offset(len(self.model)) % len(self.model)
        n = min(self.size(), len(self.model) - off)
        self.note(f"mapread {off} +{n}")
        with mmap.mmap(self.fd, len(self.model), prot=mmap.PROT_READ) as m:
            self.compare(m[off : off + n], off, n, "mmap read")

    def truncate(self) -> None:
        r = self.rng.random()
        if r < 0.2:
            size = self.rng.randint(FILE_SPAN, FAR)  # far past the end: holes only
        elif r < 0.6:
            size = self.boundary(max(len(self.model), FILE_SPAN))
        else:
            size = self.rng.randrange(max(len(self.model), 1) + self.cs)
        self.note(f"truncate {len(self.model)} -> {size}")
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def fsync(self) -> None:
        self.note("fsync")
        os.fsync(self.fd)

    def reopen(self) -> None:
        self.note("close, reopen")
        self.close()
        self.open()

    def verify_whole(self, how: str) -> None:
        got = self.path.read_bytes()
        self.compare(got, 0, len(self.model) + 1, f"whole-file read {how}")

    def remount(self) -> None:
        self.note("unmount, mount")
        self.close()
        self.env.unmount(self.mnt)
        self.mnt = self.env.mount("--volume", self.volume, at=self.volume)
        self.verify_whole("after the remount")
        self.open()

    def run(self, seconds: float, max_ops: int) -> int:
        names = list(WEIGHTS)
        weights = list(WEIGHTS.values())
        remount_at = self.rng.randint(100, 400)
        deadline = time.monotonic() + seconds
        while self.ops < max_ops and (time.monotonic() < deadline or self.ops <= remount_at):
            if self.ops == remount_at:
                self.remount()
            getattr(self, self.rng.choices(names, weights)[0])()
            self.check_size()
            self.ops += 1
        return self.ops


@pytest.mark.parametrize("chunk_size", [64 * KiB, 4 * KiB], ids=["64KiB", "4KiB"])
def test_random_operations_match_a_bytearray(fuse_mounts: FuseMounts, chunk_size: int) -> None:
    seed = int(os.environ.get("FUSEDRIVE_FSX_SEED") or random.randrange(1 << 32))
    params = {} if chunk_size == 64 * KiB else {"chunk_size": str(chunk_size)}
    fuse_mounts.volume("fsx", capacity=256 * MiB, **params)
    fsx = Exerciser(fuse_mounts, "fsx", chunk_size, seed)
    try:
        ops = fsx.run(SECONDS, MAX_OPS)
        fsx.close()
        fsx.verify_whole("at the end")
    except BaseException:
        logfile = fuse_mounts.tmp / f"fsx-{seed}.log"
        logfile.write_text("\n".join(fsx.log) + "\n")
        print(f"fsx seed {seed}, chunk size {chunk_size}: operation log in {logfile}")
        raise
    finally:
        fsx.close()
    log.info("fsx seed=%d chunk_size=%d ops=%d size=%d", seed, chunk_size, ops, len(fsx.model))
    fuse_mounts.unmount(fsx.mnt)
    with Store(fuse_mounts.store) as s:
        report = fsck(s)
    assert report.clean, report.problems + report.unfixable
    ro = fuse_mounts.mount("--volume", "fsx", "--read-only", at="ro")
    assert (ro / "fsx.data").read_bytes() == bytes(fsx.model)
