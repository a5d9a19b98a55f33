"""Kernel cache timeouts, before and after: create, stat, unlink of many small files.

Owns the measurement behind docs/datapath.md's "Kernel caches" section. In one run,
on the same disk (a work directory under ``--tmp-dir``, removed afterwards), three
targets take turns, trial after trial, running ``fio_bench.small_files`` (a loop of
``os`` calls: create, stat right after, unlink):

- ``plain``: a directory of the work directory;
- ``fusedrive_1s``: a fusedrive volume served with ``--cache-timeout 1`` (entries and
  attributes kept 1 s, no negative entries kept: what the daemon did before);
- ``fusedrive``: a second volume of the same store, served with the daemon's default
  (``CACHED``: entries and attributes).

Results: every trial (with the load average after it and the daemon's CPU seconds),
medians, and each fusedrive target's ratio to plain, in ``benchmarks/results/cache.json``.
Invariants: as ``fio_bench`` (every mount unmounted and daemon reaped, even on failure).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fusedrive.fuse_adapter import CACHED

from . import command
from .fio_bench import (
    SMALL_SETTLE,
    Daemon,
    check_machine,
    cpu_seconds,
    create_volume,
    small_files,
    work_directory,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cache.json"
DEFAULT_TMP = REPO / ".bench-tmp"
TARGETS = ("plain", "fusedrive_1s", "fusedrive")
OPS = ("create", "stat", "unlink")


def start(store: Path, volume: str, work: Path, timeout: float | None) -> Daemon:
    argv = [sys.executable, "-m", "fusedrive.fuse_adapter", str(store), str(work / volume)]
    argv += ["--volume", volume]
    if timeout is not None:
        argv += ["--cache-timeout", str(timeout)]
    return Daemon(volume, argv, work / volume, work / f"{volume}.log")


def run(
    files: int, trials: int, out: Path, tmp_root: Path, console: Console, mode: str
) -> dict[str, Any]:
    check_machine()
    with work_directory(tmp_root) as work, contextlib.ExitStack() as stack:
        store = work / "store"
        roots: dict[str, Path] = {"plain": work / "plain"}
        roots["plain"].mkdir()
        daemons: dict[str, Daemon] = {}
        for name, timeout in (("fusedrive_1s", 1.0), ("fusedrive", None)):
            create_volume(store, name, 1 << 30)
            d = start(store, name, work, timeout)
            stack.callback(d.stop)
            daemons[name] = d
            roots[name] = d.mountpoint
        results: dict[str, Any] = {
            "benchmark": "fusedrive cache_bench",
            "mode": mode,
            "files": files,
            "trials": trials,
            "settle_seconds": SMALL_SETTLE,
            "cache_timeout_s": {"fusedrive_1s": 1.0, "fusedrive": CACHED._asdict()},
            "machine": {
                "nproc": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "loadavg_start": list(os.getloadavg()),
            },
            "method": (
                "fio_bench.small_files: os.open(O_CREAT|O_EXCL)+close, os.stat, os.unlink of "
                "empty files in one new directory; targets take turns in every trial"
            ),
        }
        raw: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS}
        for trial in range(trials):
            order = TARGETS if trial % 2 == 0 else TARGETS[::-1]
            for t in order:
                console.print(f"  {t}, trial {trial + 1}/{trials}")
                served = daemons.get(t)
                cpu = functools.partial(cpu_seconds, served.pid) if served else None
                raw[t].append(small_files(roots[t], files, SMALL_SETTLE, cpu))
        for name, d in daemons.items():
            code = d.stop()
            if code != 0:
                raise RuntimeError(f"{name} daemon exited {code}:\n{d.log_tail()}")
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    med = {
        t: {op: statistics.median(r[op]["ops_per_s"] for r in raw[t]) for op in OPS}
        for t in TARGETS
    }
    results["trials_raw"] = raw
    results["median_ops_per_s"] = med
    results["ratio_to_plain"] = {
        t: {op: med[t][op] / med["plain"][op] for op in OPS} for t in TARGETS if t != "plain"
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title=f"{files} small files: ops/s (median of {trials}) and ratio to plain")
    table.add_column("target")
    for op in OPS:
        table.add_column(op, justify="right")
    for t in TARGETS:
        cells = [f"{med[t][op]:,.0f}" for op in OPS]
        if t != "plain":
            cells = [
                f"{c} ({results['ratio_to_plain'][t][op]:.3f})"
                for c, op in zip(cells, OPS, strict=True)
            ]
        table.add_row(t, *cells)
    console.print(table)
    m = results["machine"]
    console.print(f"load average start {m['loadavg_start']}, end {m['loadavg_end']}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = command.parse(
        argv,
        prog="python -m benchmarks.cache_bench",
        doc=__doc__ or "",
        default_out=DEFAULT_OUT,
        default_tmp=DEFAULT_TMP,
        quick_help="5,000 files, 2 trials (default: 20,000 files, 3 trials)",
        tmp_help="where the store, the plain directory and the mount points live",
    )
    files, trials = (5_000, 2) if args.quick else (20_000, 3)
    console = Console()
    t0 = time.perf_counter()
    try:
        run(files, trials, args.out, args.tmp_dir, console, args.mode)
    except (OSError, RuntimeError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    console.print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
