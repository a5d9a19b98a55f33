"""The kernel writeback cache, A/B: fusedrive with it off, with it on, and a plain directory.

One run, on the same disk (a work directory under ``--tmp-dir``), the three targets
taking turns in every trial, so that load from elsewhere hits them alike; a job's
number on a target is the median of its trials, every trial is kept, with the load
average after it and the daemon's CPU seconds. The two fusedrive targets are two
volumes of one store, each served by its own ``python -m fusedrive.fuse_adapter``
with ``--no-writeback-cache`` / ``--writeback-cache``.

Jobs (fio, ``ioengine=psync``, queue depth 1, ``fallocate=none``), over a file of
``file_bytes`` laid out first (sequential 1 MiB writes, fsync'd):

- ``rand_write``: random 4 KiB writes through the page cache (no O_DIRECT: a direct
  write bypasses the writeback cache), fresh random data, time-based, ended by
  fsync inside fio's runtime: the row the writeback cache is meant to move;
- ``rand_write_direct``: the same with ``direct=1``, as ``fio_bench`` measures it
  (expected unchanged: direct writes go to the daemon either way);
- ``seq_write``: a new file, 1 MiB blocks, ``file_bytes``, ended by fsync;
- ``rand_read``: random 4 KiB reads, ``direct=1`` (as ``fio_bench``).

Invariants: every mount is unmounted and every daemon reaped, even on failure
(``fio_bench.Daemon``); ratios compare numbers of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import fio_bench, machine
from .fio_bench import MiB, cpu_seconds, create_volume, fsync_dir, run_fio, start_fusedrive

TARGETS = ("fusedrive_off", "fusedrive_on", "plain")
DEFAULT_OUT = fio_bench.REPO / "benchmarks" / "results" / "writeback_ab.json"


@dataclass(frozen=True)
class Config:
    file_bytes: int = 256 * MiB
    rand_seconds: int = 10
    trials: int = 3


QUICK = Config(file_bytes=64 * MiB, rand_seconds=3, trials=2)


def _jobs(cfg: Config) -> dict[str, list[str]]:
    rand = [
        "--bs=4k",
        f"--size={cfg.file_bytes}",
        "--time_based=1",
        f"--runtime={cfg.rand_seconds}",
        "--norandommap=1",
        "--randrepeat=0",
    ]
    write = ["--rw=randwrite", "--refill_buffers=1", "--end_fsync=1"]
    return {
        "rand_write": [*rand, *write],
        "rand_write_direct": [*rand, *write, "--direct=1"],
        "seq_write": [
            "--rw=write",
            "--bs=1M",
            f"--size={cfg.file_bytes}",
            "--refill_buffers=1",
            "--end_fsync=1",
        ],
        "rand_read": [*rand, "--rw=randread", "--direct=1"],
    }


METRIC = {"rand_write": "iops", "rand_write_direct": "iops", "seq_write": "bw_mibps"}
METRIC["rand_read"] = "iops"


def run(cfg: Config, out: Path, tmp_root: Path) -> dict[str, Any]:
    fio_bench.check_machine()
    jobs = _jobs(cfg)
    timeout = fio_bench.FIO_SLACK + cfg.rand_seconds + cfg.file_bytes / (5 * MiB)
    trials: dict[str, dict[str, list[dict[str, Any]]]] = {j: {t: [] for t in TARGETS} for j in jobs}
    with fio_bench.work_directory(tmp_root) as work, contextlib.ExitStack() as stack:
        results: dict[str, Any] = {
            "benchmark": "fusedrive writeback cache A/B",
            "config": asdict(cfg),
            "machine": machine.describe(work, fio=fio_bench.fio_version()),
            "noise": fio_bench.NOISE_NOTE,
        }
        store = work / "store"
        paths: dict[str, Path] = {"plain": work / "plain"}
        paths["plain"].mkdir()
        pids: dict[str, int] = {}
        for t, flag in (
            ("fusedrive_off", "--no-writeback-cache"),
            ("fusedrive_on", "--writeback-cache"),
        ):
            create_volume(store, t, 4 * cfg.file_bytes)
            d = start_fusedrive(store, t, work / f"mnt-{t}", work / f"{t}.log", extra=[flag])
            stack.callback(d.stop)
            paths[t], pids[t] = d.mountpoint, d.pid
        t0 = time.perf_counter()
        for t in TARGETS:  # the file the random jobs work on
            run_fio("layout", paths[t] / "data", jobs["seq_write"], timeout)

        def timed(t: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            pid = pids.get(t)
            c0 = cpu_seconds(pid) if pid else 0.0
            raw = fn()
            if pid:
                raw["daemon_cpu_s"] = cpu_seconds(pid) - c0
            return raw

        for job, args in jobs.items():
            for trial in range(cfg.trials):
                for t in TARGETS:
                    print(f"{job} on {t}, trial {trial + 1}/{cfg.trials}", flush=True)
                    if job == "seq_write":
                        f = paths[t] / "seq"
                        if f.exists():
                            f.unlink()
                            fsync_dir(f.parent)
                    else:
                        f = paths[t] / "data"
                    trials[job][t].append(
                        timed(t, lambda f=f, a=args, j=job: run_fio(j, f, a, timeout))
                    )
        stack.close()
        results["seconds"] = time.perf_counter() - t0
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    summary: dict[str, Any] = {}
    for job, per in trials.items():
        m = METRIC[job]
        med = {t: statistics.median(x[m] for x in per[t]) for t in TARGETS}
        summary[job] = {
            "metric": m,
            "median": med,
            "on_to_off": med["fusedrive_on"] / med["fusedrive_off"],
            "off_to_plain": med["fusedrive_off"] / med["plain"],
            "on_to_plain": med["fusedrive_on"] / med["plain"],
        }
    results["summary"] = summary
    results["trials"] = trials
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for job, s in summary.items():
        med = "  ".join(f"{t}={v:,.1f}" for t, v in s["median"].items())
        print(
            f"{job:18} {s['metric']:8} {med}  on/off={s['on_to_off']:.2f} "
            f"off/plain={s['off_to_plain']:.2f} on/plain={s['on_to_plain']:.2f}"
        )
    print(f"results: {out}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.writeback_ab", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--tmp-dir", type=Path, default=fio_bench.DEFAULT_TMP)
    args = p.parse_args(argv)
    try:
        run(QUICK if args.quick else Config(), args.out, args.tmp_dir)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
