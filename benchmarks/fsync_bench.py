"""The fsync benchmark: small synced writes and SQLite commits, plain directory vs fusedrive.

Owns the latency side of issue 18's fsync-heavy rows (PostgreSQL's WAL flushes, SQLite's
commits). In one run, on the same disk (a work directory under ``--tmp-dir``, removed
afterwards), every job runs on every target, ``rounds`` times, the targets taking turns
(the order rotates between rounds) so that a burst of load from elsewhere hits all of
them:

- ``plain``: a directory of the work directory (the disk itself, through ext4);
- one fusedrive daemon per ``--code NAME=TREE`` (default: this tree, named ``fusedrive``):
  ``python -m fusedrive.fuse_adapter`` run by TREE's own venv with TREE as its working
  directory, so ``--code main=/work/main --code new=.`` compares two versions of the
  code side by side, each with its own store in the work directory.

Jobs (one process, the loop in Python; each op's latency from ``perf_counter``):

1. ``fsync_empty``: fdatasync of a file with nothing written: what a round trip to the
   daemon costs (plain: nothing at all);
2. ``append``: 8 KiB ``write`` + ``fdatasync`` at the end of a file (its size changes
   every time: ext4 must commit its journal);
3. ``wal``: 8 KiB ``pwrite`` + ``fdatasync`` moving through a preallocated, synced
   16 MiB file, as PostgreSQL writes its WAL (no size change: ext4 flushes data only);
4. ``wal4``: ``wal`` in 4 threads at once, each with its own file: fsyncs that arrive
   together (what group commit shares);
5. ``sqlite_wal`` and ``sqlite_delete``: 50,000 inserts in 500 transactions (Python's
   sqlite3, ``synchronous=FULL``), with the WAL and with the rollback journal.

1-4 run ``seconds`` each; the numbers are ops/s and latency percentiles; every op
counts. The daemon's CPU seconds during each job come from ``/proc/PID/stat``, its
store's commits from LMDB's transaction counter (ops per commit: above 1, fsyncs shared
commits).

Results: every repetition with the load average after it, medians per target, and
ratios target / plain (ops/s: higher is better; SQLite seconds: lower is better).
Invariants: every mount is unmounted and every daemon reaped, even on failure; the
work directory is removed only when nothing is mounted under it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmdb

from . import machine
from .fio_bench import (
    Daemon,
    cpu_seconds,
    create_volume,
    fsync_dir,
    parse_code,
    start_fusedrive,
    work_directory,
)

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "fsync.json"
DEFAULT_TMP = REPO / ".bench-tmp"
WAL_FILE = 16 * MiB
BLOCK = 8 * KiB


@dataclass(frozen=True)
class Config:
    seconds: float = 5.0
    rounds: int = 3
    threads: int = 4
    sqlite_rows: int = 50_000
    sqlite_txns: int = 500
    volume_bytes: int = 8 * GiB


QUICK = Config(seconds=2.0, rounds=2, sqlite_rows=10_000, sqlite_txns=100)
TINY = Config(seconds=0.3, rounds=1, threads=2, sqlite_rows=200, sqlite_txns=10, volume_bytes=GiB)
JOBS = ("fsync_empty", "append", "wal", "wal4", "sqlite_wal", "sqlite_delete")
TIMED = {"sqlite_wal", "sqlite_delete"}  # seconds (lower is better); the rest ops/s


def _pct(sorted_s: list[float], q: float) -> float:
    return sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))] * 1e6


def _loop(fd: int, seconds: float, step: Callable[[int, int], None]) -> list[float]:
    """``step(fd, i)`` then fdatasync, for ``seconds``; each op's seconds."""
    lat: list[float] = []
    end = time.perf_counter() + seconds
    i = 0
    while True:
        t0 = time.perf_counter()
        step(fd, i)
        os.fdatasync(fd)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        i += 1
        if t1 >= end:
            return lat


def _wal_file(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"\0" * MiB
    for off in range(0, WAL_FILE, MiB):
        os.pwrite(fd, block, off)
    os.fsync(fd)
    fsync_dir(path.parent)
    return fd


def _fresh(buf: bytearray, i: int) -> bytearray:
    """``buf`` made unlike every earlier block (a store that dedups must store it)."""
    buf[:8] = i.to_bytes(8, "little")
    buf[-8:] = time.perf_counter_ns().to_bytes(8, "little")
    return buf


def _wal_step() -> Callable[[int, int], None]:
    slots = WAL_FILE // BLOCK
    buf = bytearray(os.urandom(BLOCK))

    def step(fd: int, i: int) -> None:
        os.pwrite(fd, _fresh(buf, i), (i % slots) * BLOCK)

    return step


def _summary(lat: list[float], seconds: float) -> dict[str, Any]:
    s = sorted(lat)
    return {
        "ops": len(s),
        "ops_per_s": len(s) / seconds,
        "p50_us": _pct(s, 0.5),
        "p90_us": _pct(s, 0.9),
        "p99_us": _pct(s, 0.99),
    }


def job_fsync_empty(d: Path, cfg: Config) -> dict[str, Any]:
    fd = os.open(d / "empty", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fsync(fd)
        t0 = time.perf_counter()
        lat = _loop(fd, cfg.seconds, lambda fd, i: None)
        return _summary(lat, time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(d / "empty")


def job_append(d: Path, cfg: Config) -> dict[str, Any]:
    buf = bytearray(os.urandom(BLOCK))
    fd = os.open(d / "append", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    try:
        os.fsync(fd)
        t0 = time.perf_counter()

        def step(fd: int, i: int) -> None:
            os.write(fd, _fresh(buf, i))

        lat = _loop(fd, cfg.seconds, step)
        return _summary(lat, time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(d / "append")


def job_wal(d: Path, cfg: Config) -> dict[str, Any]:
    fd = _wal_file(d / "wal")
    try:
        t0 = time.perf_counter()
        lat = _loop(fd, cfg.seconds, _wal_step())
        return _summary(lat, time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(d / "wal")


def job_wal4(d: Path, cfg: Config) -> dict[str, Any]:
    paths = [d / f"wal{i}" for i in range(cfg.threads)]
    fds = [_wal_file(p) for p in paths]
    results: list[list[float]] = [[] for _ in fds]
    start = threading.Barrier(len(fds) + 1)

    def worker(k: int) -> None:
        start.wait()
        results[k] = _loop(fds[k], cfg.seconds, _wal_step())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(fds))]
    try:
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    finally:
        for fd, p in zip(fds, paths, strict=True):
            os.close(fd)
            p.unlink()
    return _summary([x for r in results for x in r], elapsed)


def _sqlite(d: Path, cfg: Config, journal: str) -> dict[str, Any]:
    db = d / f"bench-{journal}.db"
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute(f"PRAGMA journal_mode={journal}")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        per = cfg.sqlite_rows // cfg.sqlite_txns
        row = "x" * 100
        t0 = time.perf_counter()
        for k in range(cfg.sqlite_txns):
            con.execute("BEGIN")
            con.executemany(
                "INSERT INTO t (id, v) VALUES (?, ?)", ((k * per + j, row) for j in range(per))
            )
            con.execute("COMMIT")
        seconds = time.perf_counter() - t0
    finally:
        con.close()
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db}{suffix}")
    return {"seconds": seconds, "txns": cfg.sqlite_txns, "rows": cfg.sqlite_rows}


RUNNERS: dict[str, Callable[[Path, Config], dict[str, Any]]] = {
    "fsync_empty": job_fsync_empty,
    "append": job_append,
    "wal": job_wal,
    "wal4": job_wal4,
    "sqlite_wal": lambda d, cfg: _sqlite(d, cfg, "wal"),
    "sqlite_delete": lambda d, cfg: _sqlite(d, cfg, "delete"),
}


def last_txnid(store: Path) -> int:
    """The number of LMDB write transactions the store has committed (read-only look)."""
    env = lmdb.open(str(store), readonly=True, max_dbs=16, subdir=True)
    try:
        return int(env.info()["last_txnid"])
    finally:
        env.close()


def metric(job: str) -> str:
    return "seconds" if job in TIMED else "ops_per_s"


def run(
    cfg: Config, codes: dict[str, Path], out: Path, tmp_root: Path, jobs: tuple[str, ...] = JOBS
) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise OSError("fsync_bench needs root (FUSE mounts with allow_other)")
    with work_directory(tmp_root) as work, contextlib.ExitStack() as stack:
        results: dict[str, Any] = {
            "benchmark": "fusedrive fsync_bench",
            "config": asdict(cfg),
            "codes": {name: str(path) for name, path in codes.items()},
            "machine": machine.describe(work),
        }
        dirs: dict[str, Path] = {"plain": work / "plain"}
        dirs["plain"].mkdir()
        daemons: dict[str, Daemon] = {}
        stores: dict[str, Path] = {}
        for name, code in codes.items():
            store = stores[name] = work / f"store-{name}"
            create_volume(store, "bench", cfg.volume_bytes, code=code)
            d = start_fusedrive(store, "bench", work / f"mnt-{name}", work / f"{name}.log", code)
            stack.callback(d.stop)
            daemons[name] = d
            dirs[name] = d.mountpoint
        targets = list(dirs)
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {
            j: {t: [] for t in targets} for j in jobs
        }
        for r in range(cfg.rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for job in jobs:
                for t in order:
                    pid = daemons[t].pid if t in daemons else None
                    c0 = cpu_seconds(pid) if pid else 0.0
                    n0 = last_txnid(stores[t]) if t in stores else 0
                    res = RUNNERS[job](dirs[t], cfg)
                    if pid:
                        res["daemon_cpu_s"] = cpu_seconds(pid) - c0
                        # Store commits during the job (its setup's few included).
                        res["commits"] = last_txnid(stores[t]) - n0
                    res["round"] = r
                    res["loadavg_after"] = list(os.getloadavg())
                    raw[job][t].append(res)
                    print(f"round {r + 1} {job:14} {t:10} {_line(job, res)}", flush=True)
        for name, d in daemons.items():
            exit_code = d.stop()
            if exit_code != 0:
                raise RuntimeError(f"{name} daemon exited {exit_code}:\n{d.log_tail()}")
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    summary: dict[str, Any] = {}
    for job in jobs:
        m = metric(job)
        med = {t: statistics.median(x[m] for x in raw[job][t]) for t in targets}
        summary[job] = {
            "metric": m,
            "median": med,
            "to_plain": {t: med[t] / med["plain"] for t in targets if med["plain"]},
        }
        if m == "ops_per_s":
            summary[job]["p50_us"] = {
                t: statistics.median(x["p50_us"] for x in raw[job][t]) for t in targets
            }
            summary[job]["ops_per_commit"] = {
                t: statistics.median(x["ops"] / max(x["commits"], 1) for x in raw[job][t])
                for t in daemons
            }
            # The daemon's CPU per op: steadier than its latency on a busy machine.
            summary[job]["daemon_cpu_us_per_op"] = {
                t: statistics.median(1e6 * x["daemon_cpu_s"] / x["ops"] for x in raw[job][t])
                for t in daemons
            }
    results["jobs"] = raw
    results["summary"] = summary
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(summary, targets)
    print(f"results: {out}")
    return results


def _line(job: str, res: dict[str, Any]) -> str:
    if job in TIMED:
        return f"{res['seconds']:.2f} s"
    return f"{res['ops_per_s']:.0f} ops/s, p50 {res['p50_us']:.0f} us, p90 {res['p90_us']:.0f} us"


def print_summary(summary: dict[str, Any], targets: list[str]) -> None:
    print(f"{'job':14} " + " ".join(f"{t:>22}" for t in targets))
    for job, s in summary.items():
        cells = []
        for t in targets:
            v = s["median"][t]
            ratio = s["to_plain"].get(t, 0.0)
            num = f"{v:.2f} s" if s["metric"] == "seconds" else f"{v:.0f}/s"
            cells.append(f"{num} ({ratio:.2f}x)")
        print(f"{job:14} " + " ".join(f"{c:>22}" for c in cells))
        cpu = s.get("daemon_cpu_us_per_op")
        if cpu:
            print(f"{'  cpu/op':14} " + " ".join(f"{cpu[t]:>20.0f}us" for t in cpu))
            per = s["ops_per_commit"]
            print(f"{'  ops/commit':14} " + " ".join(f"{per[t]:>22.2f}" for t in per))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fsync_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="shorter jobs, 2 rounds")
    p.add_argument("--tiny", action="store_true", help="every code path in seconds (tests)")
    p.add_argument(
        "--code",
        type=parse_code,
        action="append",
        metavar="NAME=TREE",
        help="a fusedrive tree to measure (repeatable; default: this tree)",
    )
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {JOBS}")
    p.add_argument("--rounds", type=int, help="override the rounds of the chosen size")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--tmp-dir", type=Path, default=DEFAULT_TMP)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = TINY if args.tiny else QUICK if args.quick else Config()
    if args.rounds:
        cfg = Config(**{**asdict(cfg), "rounds": args.rounds})
    jobs = tuple(j for j in args.jobs.split(",") if j)
    unknown = [j for j in jobs if j not in RUNNERS]
    if unknown:
        p.error(f"unknown jobs {unknown}; known: {JOBS}")
    codes = dict(args.code or [("fusedrive", REPO)])
    try:
        run(cfg, codes, args.out, args.tmp_dir, jobs)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
