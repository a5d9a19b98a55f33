"""Device flushes per fsync: strace the fusedrive daemon and PostgreSQL during pgbench.

Owns the count in docs/datapath.md ("Device flushes per fsync"). One fusedrive volume
(served by ``python -m fusedrive.fuse_adapter`` from a store in a work directory under
``--tmp-dir``), a PostgreSQL cluster on it (``pg_bench.Server``: fsync on), ``pgbench -i``
and a ``CHECKPOINT``; then, while ``pgbench -n -c 4 -j 4 -T SECONDS`` runs, ``strace -f -y``
counts every fsync, fdatasync, msync, sync_file_range and syncfs of the daemon and of
every server process, by the file each names. Results (counts per file, transactions,
the load average) go to ``benchmarks/results/pg_flushes.json``.

Not counted by strace: LMDB writes its meta page through a descriptor opened O_DSYNC
(a device flush without a sync call); the JSON records the daemon's descriptors of
``data.mdb`` and whether each is O_DSYNC. Every process started here is stopped by
PID and the work directory removed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .fio_bench import create_volume, start_fusedrive
from .pg_bench import DEFAULT_TMP, REPO, Server, parse_processed, parse_tps, pg_bin
from .pg_bench import work_directory as pg_work_directory

DEFAULT_OUT = REPO / "benchmarks" / "results" / "pg_flushes.json"
SYNC_CALLS = "fsync,fdatasync,msync,sync_file_range,syncfs"
_CALL = re.compile(r"\b(fsync|fdatasync|msync|sync_file_range|syncfs)\((\d+)<([^>]*)>")


def count_calls(trace: str, root: Path) -> dict[str, int]:
    """``call path`` -> count, from ``strace -y`` output (paths relative to ``root``,
    numbers in file names replaced by N so that segments and WAL files add up)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in trace.splitlines():
        m = _CALL.search(line)
        if m and "resumed>" not in line:
            path = m.group(3).replace(str(root) + "/", "")
            counts[f"{m.group(1)} {re.sub(r'[0-9A-F]{4,}', 'N', path)}"] += 1
    return dict(counts)


def mdb_descriptors(pid: int) -> list[dict[str, Any]]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.endswith("data.mdb"):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                flags = int(info.split("flags:")[1].split()[0], 8)
                out.append(
                    {"fd": int(fd), "flags": oct(flags), "o_dsync": bool(flags & os.O_DSYNC)}
                )
    return out


def strace(out: Path, pids: list[int]) -> subprocess.Popen[bytes]:
    args = [a for p in pids for a in ("-p", str(p))]
    cmd = ["strace", "-f", "-y", "-qq", "-e", f"trace={SYNC_CALLS}", "-o", str(out), *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(seconds: int, scale: int, out: Path, tmp_root: Path) -> dict[str, Any]:
    if shutil.which("strace") is None:
        raise OSError("pg_flushes needs strace (Debian package strace)")
    bindir = pg_bin()
    with pg_work_directory(tmp_root) as work:
        store = work / "store"
        create_volume(store, "pg", 4 << 30)
        daemon = start_fusedrive(store, "pg", work / "mnt", work / "fd.log")
        rundir = Path(tempfile.mkdtemp(prefix="pg-flushes-run-"))
        tracers: list[subprocess.Popen[bytes]] = []
        server: Server | None = None
        try:
            shutil.chown(rundir, "postgres", "postgres")
            home = daemon.mountpoint / "pg"
            home.mkdir()
            shutil.chown(home, "postgres", "postgres")
            server = Server(bindir, home / "data", rundir)
            server.initdb()
            server.start()
            assert server.proc is not None
            server.client("pgbench", "-i", "-s", str(scale), "-q", "postgres")
            server.client("psql", "-X", "-c", "CHECKPOINT", "-d", "postgres")
            pid = server.proc.pid
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            tracers.append(strace(work / "daemon.strace", [daemon.pid]))
            tracers.append(strace(work / "pg.strace", [pid, *map(int, kids)]))
            time.sleep(2)  # strace attached
            c = "4"
            bench = server.client("pgbench", "-n", "-c", c, "-j", c, "-T", str(seconds), "postgres")
            for t in tracers:
                t.send_signal(signal.SIGINT)
                t.wait(60)
            results: dict[str, Any] = {
                "benchmark": "fusedrive pg_flushes",
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "loadavg_end": list(os.getloadavg()),
                "command": f"pgbench -n -c 4 -j 4 -T {seconds} (scale {scale}), under strace",
                "transactions": parse_processed(bench),
                "tps_under_strace": parse_tps(bench),
                "daemon": count_calls((work / "daemon.strace").read_text(), work),
                "postgres": count_calls((work / "pg.strace").read_text(), work),
                "daemon_data_mdb_descriptors": mdb_descriptors(daemon.pid),
            }
        finally:
            for t in tracers:
                if t.poll() is None:
                    t.kill()
                    t.wait()
            if server is not None:
                server.stop()
            shutil.rmtree(rundir, ignore_errors=True)
            daemon.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pg_flushes", description=__doc__)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--tmp-dir", type=Path, default=DEFAULT_TMP)
    args = p.parse_args(argv)
    try:
        r = run(args.seconds, args.scale, args.out, args.tmp_dir)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: r[k] for k in ("transactions", "daemon", "postgres")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
