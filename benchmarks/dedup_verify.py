"""What verifying the stored copy on a dedup hit costs (``chunks.copy_is_sound``).

A put of a chunk that is already stored checks the stored copy before taking a
reference to it (damage heals by storing the data again). This measures, in one
store on the repository's disk, the time per chunk of a batch that stores chunks
that are all already stored: with the check, and with the check replaced by
"sound" (what the store did before). Also, for scale, a batch of new chunks.

    .venv/bin/python -m benchmarks.dedup_verify [--chunks N] [--rounds R] [--cold]

``--cold`` drops the store's segment files from the page cache before each timed
batch (``posix_fadvise(DONTNEED)`` on those files only, nothing else on the
machine), so the check reads the records from disk.

Invariants: the store lives in a temporary directory removed afterwards; data is
generated outside the timed region; both variants run in the same process on the
same chunks, alternating, and the median of the rounds is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from blockstore import Store
from blockstore import chunks as ch

CHUNK = 65536
TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(2000))


def _datas(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        if i % 2:
            out.append(os.urandom(CHUNK))
        else:
            out.append((b"%08d" % i + TEXT)[:CHUNK])
    return out


def _drop_cache(store: Store) -> None:
    for seg in store.segments.existing():
        fd = store.segments.fd(seg)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _timed_batch(
    store: Store, preps: list[ch.PreparedChunk], prefix: bytes, cold: bool = False
) -> float:
    v = store.volume("v")
    if cold:
        _drop_cache(store)
    t0 = time.perf_counter()
    with v.batch() as b:
        for i, prep in enumerate(preps):
            b.put_chunk(prefix + b"%06d" % i, prep)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cold", action="store_true", help="records read from disk, not the cache")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    with (
        tempfile.TemporaryDirectory(dir=root, prefix=".dedup-bench-") as tmp,
        Store(Path(tmp) / "store") as store,
    ):
        store.create_volume("v", 1 << 40)
        preps = [store.prepare_chunk(d) for d in _datas(args.chunks)]
        _timed_batch(store, preps, b"orig")
        real: Callable[..., bool] = ch.copy_is_sound
        times: dict[str, list[float]] = {"verify": [], "no verify": [], "new chunks": []}
        for r in range(args.rounds):
            times["verify"].append(_timed_batch(store, preps, b"dup%d-" % r, args.cold))
            ch.copy_is_sound = lambda *a, **k: True
            try:
                times["no verify"].append(_timed_batch(store, preps, b"dup%d-" % r, args.cold))
            finally:
                ch.copy_is_sound = real
            fresh = [store.prepare_chunk(d) for d in _datas(args.chunks)]
            times["new chunks"].append(_timed_batch(store, fresh, b"new%d-" % r, args.cold))
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{name:>10}: {med / args.chunks * 1e6:7.1f} us/chunk (median of {len(ts)})")


if __name__ == "__main__":
    main()
