"""The filesystem benchmark: fio through a fusedrive mount, a plain directory and memfs.

Owns the fio targets of issue 18: every target is a ratio against the plain directory
on the same disk, measured in the same run (what a user comparing us with the hostpath
or local-path drivers compares). memfs is a diagnostic of what FUSE itself costs (the
``memfs_to_plain`` and ``fusedrive_to_memfs`` ratios), not a target. In one run, on the
same disk (a work directory under ``--tmp-dir``, removed afterwards), each job runs on
three targets, ``trials`` times with the targets taking turns, so that a burst of load
from elsewhere hits all targets of a job rather than one; a job's number on a target
is the median of its trials (every trial's raw fio numbers are kept, with the FUSE
daemon's CPU seconds from ``/proc/PID/stat``: a busy daemon versus a busy machine):

- ``fusedrive``: a volume served by ``python -m fusedrive.fuse_adapter`` (the store,
  an LMDB file, lives in the work directory);
- ``plain``: a directory of the work directory (the disk itself, through ext4);
- ``memfs``: ``benchmarks.memfs``, a minimal in-memory pyfuse3 filesystem, the
  ceiling any Python FUSE filesystem reaches on this machine.

Jobs (fio from Debian, ``ioengine=psync``, queue depth 1, ``fallocate=none``):

1. sequential write, 1 MiB blocks, ``seq_bytes``, fresh random data for every block
   (``refill_buffers``: no dedup, no compression), ended by fsync (``end_fsync``,
   inside fio's runtime);
2. sequential read of that file, 1 MiB blocks, cold: the page cache is dropped
   (``sync; echo 3 > /proc/sys/vm/drop_caches``) before each target's read, and the
   fusedrive daemon is restarted first (unmount, which flushes, then a fresh daemon),
   so its chunk cache is empty too. memfs keeps its data: memory is what it is;
3. random 4 KiB read, then random 4 KiB write (fresh random data, ended by fsync),
   time-based (``rand_seconds`` per trial) over that file, ``direct=1``: with the
   page cache in the way (fusedrive and memfs open files with ``keep_cache``), reads
   would measure the kernel and not the daemon;
4. create, stat and unlink of ``small_files`` empty files in one directory: a loop of
   ``os`` calls in this process. This fio has the filecreate/filestat/filedelete
   engines, but its own per-file bookkeeping costs tens of microseconds per file on a
   plain directory, about a FUSE round trip, which would flatten the ratios; the
   stat loop starts right after the create loop (``SMALL_SETTLE`` seconds), as a
   program would: what the kernel caches (entries, attributes) counts, on every
   target alike;
5. fusedrive only: the daemon's memory while fio writes ``rss_bytes`` into a fresh
   volume (job 1's parameters), sampled from ``/proc/PID/status`` of the daemon this
   run started. VmHWM (peak resident set) counts the LMDB file the daemon maps:
   those file-backed pages (RssFile) are the page cache of the store, shared and
   reclaimable, not daemon heap. The target is judged on RssAnon + RssShmem.

Invariants: every mount is unmounted (``fusermount3 -u``, then ``-uz``) and every
daemon reaped, even on failure; the work directory is removed only when nothing is
mounted under it; ratios compare numbers of the same run. A missed target is a
measurement, not an error: the exit code is 0 and the misses are listed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fusedrive.filesystem import DEFAULT_CACHE_LIMIT, DEFAULT_DIRTY_LIMIT
from fusedrive.fuse_adapter import CACHED

from . import command, machine

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "fio.json"
DEFAULT_TMP = REPO / ".bench-tmp"
TARGETS = ("fusedrive", "plain", "memfs")
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 300.0  # an unmount flushes everything buffered first
FIO_SLACK = 600.0
RSS_LIMIT_MIB = 200.0
NOISE_NOTE = (
    "The machine is shared with other engineers' test runs (2 cores), so absolute "
    "numbers may be noisy; load averages are recorded after every job. Prefer the "
    "ratios, which compare numbers measured in the same run, job by job."
)


@dataclass(frozen=True)
class Config:
    """Sizes of one benchmark run (the defaults are the full run)."""

    seq_bytes: int = 1 * GiB
    rand_seconds: int = 10
    trials: int = 3
    small_files: int = 20_000
    rss_bytes: int = 4 * GiB
    volume_bytes: int = 8 * GiB
    rss_interval: float = 0.1
    drop_caches: bool = True


QUICK = Config(seq_bytes=256 * MiB, rand_seconds=3, trials=2, small_files=5_000, rss_bytes=1 * GiB)
# For the smoke test: every code path, seconds, no meaningful numbers; it leaves the
# machine's page cache alone (other test suites run beside it).
TINY = Config(
    seq_bytes=8 * MiB,
    rand_seconds=1,
    trials=1,
    small_files=50,
    rss_bytes=16 * MiB,
    volume_bytes=256 * MiB,
    drop_caches=False,
)

# (name, job, metric, reference target, limit): fusedrive / reference >= limit. Every
# reference is the plain directory (issue 18's goals); memfs is a diagnostic only.
RATIO_TARGETS: tuple[tuple[str, str, str, str, float], ...] = (
    ("sequential write (fsync'd) vs plain dir", "seq_write", "bw_mibps", "plain", 0.6),
    ("sequential read (cold) vs plain dir", "seq_read", "bw_mibps", "plain", 0.8),
    ("random 4 KiB read vs plain dir", "rand_read", "iops", "plain", 0.6),
    ("random 4 KiB write (fsync'd) vs plain dir", "rand_write", "iops", "plain", 0.6),
    ("file create vs plain dir", "create", "ops_per_s", "plain", 0.5),
    ("file stat vs plain dir", "stat", "ops_per_s", "plain", 0.5),
    ("file unlink vs plain dir", "unlink", "ops_per_s", "plain", 0.5),
)
# Seconds between the create loop and the stat loop of the small-file job.
SMALL_SETTLE = 0.5


# -- mounts ------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [p for p in (line.split()[4] for line in f) if p.startswith(prefix)]


class Daemon:
    """One FUSE daemon process started by this run, serving one mount point."""

    def __init__(
        self, name: str, argv: list[str], mountpoint: Path, logfile: Path, cwd: Path = REPO
    ) -> None:
        self.name = name
        self.mountpoint = mountpoint
        self.logfile = logfile
        mountpoint.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe()
        try:
            with open(logfile, "ab") as out:
                self.proc = subprocess.Popen(
                    [*argv, "--ready-fd", str(w)],
                    pass_fds=(w,),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    start_new_session=True,  # the harness orders shutdown, not Ctrl-C
                )
        finally:
            os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
            got = os.read(r, 1) if ready else b""
        finally:
            os.close(r)
        if got != b"R" or not is_mounted(mountpoint):
            self.stop()
            raise RuntimeError(f"{name} daemon did not mount {mountpoint}:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """Unmount and reap, escalating as needed; returns the daemon's exit code."""
        try:
            if self.proc.poll() is None and is_mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            try:
                return self.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("event=daemon_kill name=%s pid=%d", self.name, self.pid)
                self.proc.kill()
                return self.proc.wait(EXIT_TIMEOUT)
        finally:
            if is_mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)


def code_python(code: Path) -> str:
    """The interpreter that runs the fusedrive of the tree ``code`` (its own venv)."""
    if code == REPO:
        return sys.executable
    python = code / ".venv" / "bin" / "python"
    if not python.exists():
        raise OSError(f"no {python}: run `make setup` in {code} first")
    return str(python)


def parse_code(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or name == "plain":
        raise argparse.ArgumentTypeError(f"--code wants NAME=TREE (NAME not 'plain'): {text!r}")
    tree = Path(path).resolve()
    if not (tree / "fusedrive" / "fuse_adapter.py").exists():
        raise argparse.ArgumentTypeError(f"{tree} holds no fusedrive tree")
    return name, tree


def start_fusedrive(
    store: Path,
    volume: str,
    mountpoint: Path,
    logfile: Path,
    code: Path = REPO,
    extra: Sequence[str] = (),
) -> Daemon:
    """A daemon of the fusedrive in the tree ``code`` (this one by default; ``python -m``
    imports from the working directory first, so the daemon runs in ``code``), with
    ``extra`` daemon options."""
    argv = [code_python(code), "-m", "fusedrive.fuse_adapter", str(store), str(mountpoint)]
    return Daemon("fusedrive", [*argv, "--volume", volume, *extra], mountpoint, logfile, cwd=code)


def start_memfs(mountpoint: Path, logfile: Path) -> Daemon:
    argv = [sys.executable, "-m", "benchmarks.memfs", str(mountpoint)]
    # fusedrive's timeouts, so that the kernel asks both daemons equally often.
    return Daemon("memfs", [*argv, "--attr-timeout", str(CACHED.attr)], mountpoint, logfile)


def fusedrive_cli(store: Path, *args: str, code: Path = REPO) -> str:
    """Run the ``fusedrive`` command line (of the tree ``code``) on ``store``; its stdout."""
    cmd = [code_python(code), "-m", "fusedrive", "--store", str(store), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=code)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def create_volume(store: Path, name: str, size: int, code: Path = REPO) -> None:
    fusedrive_cli(store, "volume", "create", name, "--size", f"{-(-size // MiB)}MiB", code=code)


def store_stats(store: Path) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(fusedrive_cli(store, "stats", "--json"))
    return stats


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Targets:
    """The places each job runs (``names``, a subset of ``TARGETS``), and the fusedrive
    restart for cold reads."""

    def __init__(
        self,
        work: Path,
        cfg: Config,
        stack: contextlib.ExitStack,
        names: Sequence[str] = TARGETS,
    ) -> None:
        self.work = work
        self.cfg = cfg
        self.names = tuple(names)
        self.store = work / "store"
        self.plain = work / "plain"
        self.plain.mkdir()
        self._stack = stack
        self.daemons: dict[str, Daemon] = {}
        self.pids: dict[str, list[int]] = {t: [] for t in self.names if t != "plain"}
        if "memfs" in self.names:
            self._start("memfs")
        if "fusedrive" in self.names:
            create_volume(self.store, "bench", cfg.volume_bytes)
            self._start("fusedrive")

    def _start(self, name: str) -> None:
        mp = self.work / f"mnt-{name}"
        logfile = self.work / f"{name}.log"
        if name == "fusedrive":
            d = start_fusedrive(self.store, "bench", mp, logfile)
        else:
            d = start_memfs(mp, logfile)
        self._stack.callback(d.stop)
        self.daemons[name] = d
        self.pids[name].append(d.pid)

    def path(self, name: str) -> Path:
        return self.plain if name == "plain" else self.daemons[name].mountpoint

    def restart_fusedrive(self) -> None:
        d = self.daemons["fusedrive"]
        code = d.stop()
        if code != 0:
            raise RuntimeError(f"fusedrive daemon exited {code} at unmount:\n{d.log_tail()}")
        self._start("fusedrive")


# -- fio ---------------------------------------------------------------------


def fio_version() -> str:
    out = subprocess.run(["fio", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _lat_us(lat: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {k: lat[k] / 1e3 for k in ("min", "max", "mean", "stddev") if k in lat}
    pct = lat.get("percentile") or {}
    for p in ("50.000000", "90.000000", "99.000000", "99.900000"):
        if p in pct:
            out[f"p{float(p):g}"] = pct[p] / 1e3
    return out


def run_fio(name: str, filename: Path, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """One fio job on ``filename``; returns its raw numbers (bw, iops, latencies)."""
    cmd = [
        "fio",
        f"--name={name}",
        f"--filename={filename}",
        "--ioengine=psync",
        "--iodepth=1",
        "--fallocate=none",  # posix_fallocate emulation would write the file twice on FUSE
        "--output-format=json",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job {name} reported error {job['error']}")
    side = "write" if job["write"]["io_bytes"] else "read"
    s = job[side]
    return {
        "fio_args": list(args),
        "direction": side,
        "io_bytes": s["io_bytes"],
        "runtime_ms": s["runtime"],
        "total_ios": s["total_ios"],
        "bw_kibps": s["bw"],
        "bw_mibps": s["bw_bytes"] / MiB,
        "iops": s["iops"],
        "lat_us": _lat_us(s["lat_ns"]),
        "clat_us": _lat_us(s["clat_ns"]),
        "usr_cpu": job["usr_cpu"],
        "sys_cpu": job["sys_cpu"],
        "loadavg_after": list(os.getloadavg()),
    }


def seq_write_args(nbytes: int) -> list[str]:
    return ["--rw=write", "--bs=1M", f"--size={nbytes}", "--refill_buffers=1", "--end_fsync=1"]


def seq_read_args(nbytes: int) -> list[str]:
    return ["--rw=read", "--bs=1M", f"--size={nbytes}"]


def rand_args(rw: str, nbytes: int, seconds: int) -> list[str]:
    args = [f"--rw={rw}", "--bs=4k", f"--size={nbytes}", "--direct=1"]
    args += ["--time_based=1", f"--runtime={seconds}", "--norandommap=1", "--randrepeat=0"]
    if rw == "randwrite":
        args += ["--refill_buffers=1", "--end_fsync=1"]
    return args


# The fio jobs, in the order they run: each reads or writes the file job 1 wrote.
FIO_JOBS = ("seq_write", "seq_read", "rand_read", "rand_write")


def fio_job_args(job: str, cfg: Config) -> list[str]:
    """fio's arguments for one of ``FIO_JOBS`` (the file comes from the caller)."""
    if job == "seq_write":
        return seq_write_args(cfg.seq_bytes)
    if job == "seq_read":
        return seq_read_args(cfg.seq_bytes)
    if job in ("rand_read", "rand_write"):
        return rand_args(job.replace("_", ""), cfg.seq_bytes, cfg.rand_seconds)
    raise ValueError(f"unknown fio job {job!r}")


def fio_timeout(cfg: Config, nbytes: int) -> float:
    # Generous: 5 MiB/s would be a broken filesystem, not a slow one.
    return FIO_SLACK + cfg.rand_seconds + nbytes / (5 * MiB)


# -- small files -------------------------------------------------------------


def _op_stats(each_ns: list[int], total_s: float) -> dict[str, float]:
    xs = sorted(each_ns)
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else xs * 99
    return {
        "ops": len(xs),
        "seconds": total_s,
        "ops_per_s": len(xs) / total_s,
        "mean_us": statistics.fmean(xs) / 1e3,
        "p50_us": q[49] / 1e3,
        "p99_us": q[98] / 1e3,
        "max_us": xs[-1] / 1e3,
    }


def small_files(
    root: Path, n: int, settle: float, cpu: Callable[[], float] | None = None
) -> dict[str, Any]:
    """Create, stat and unlink ``n`` empty files in a new directory of ``root``.

    ``settle`` seconds pass between the creates and the stats.
    ``cpu``, if given, reads the daemon's CPU seconds: each loop records its share.
    """
    d = root / "small"
    d.mkdir()
    paths = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    sizes = 0

    def create(p: str) -> None:
        os.close(os.open(p, flags, 0o644))

    def stat(p: str) -> None:
        nonlocal sizes
        sizes += os.stat(p).st_size

    out: dict[str, Any] = {"files": n, "settle_seconds": settle}
    clock = time.perf_counter_ns
    for op, fn in (("create", create), ("stat", stat), ("unlink", os.unlink)):
        if op == "stat":
            time.sleep(settle)
        c0 = cpu() if cpu else 0.0
        each: list[int] = []
        t0 = clock()
        for p in paths:
            t = clock()
            fn(p)
            each.append(clock() - t)
        out[op] = _op_stats(each, (clock() - t0) / 1e9)
        if cpu:
            out[op]["daemon_cpu_s"] = cpu() - c0
    if sizes:
        raise RuntimeError(f"small files under {root} should be empty, found {sizes} bytes")
    left = os.listdir(d)
    if left:
        raise RuntimeError(f"{len(left)} small files left in {d} after unlinking them all")
    d.rmdir()
    out["loadavg_after"] = list(os.getloadavg())
    return out


# -- daemon memory -----------------------------------------------------------

_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def read_status(pid: int) -> dict[str, float]:
    """The memory fields of ``/proc/PID/status``, in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in _STATUS_FIELDS:
            out[key] = int(rest.split()[0]) * KiB / MiB
    return out


class RssSampler:
    """Samples a process's memory in a thread until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s = read_status(self.pid)
            except (OSError, ValueError):
                return
            s["t"] = time.monotonic() - self._t0
            self.samples.append(s)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_rss(work: Path, cfg: Config, stack: contextlib.ExitStack) -> dict[str, Any]:
    """fio writes ``rss_bytes`` into a fresh fusedrive volume; the daemon's memory."""
    store = work / "store"
    create_volume(store, "rss", max(cfg.volume_bytes, cfg.rss_bytes + cfg.rss_bytes // 4))
    d = start_fusedrive(store, "rss", work / "mnt-rss", work / "rss.log")
    stack.callback(d.stop)
    before = read_status(d.pid)
    c0 = cpu_seconds(d.pid)
    with RssSampler(d.pid, cfg.rss_interval) as sampler:
        fio = run_fio(
            "rss_write",
            d.mountpoint / "big",
            seq_write_args(cfg.rss_bytes),
            fio_timeout(cfg, cfg.rss_bytes),
        )
    after = read_status(d.pid)
    fio["daemon_cpu_s"] = cpu_seconds(d.pid) - c0
    samples = sampler.samples
    if not samples:
        raise RuntimeError(f"no memory samples of fusedrive daemon {d.pid}")
    heap = [s["RssAnon"] + s["RssShmem"] for s in samples]
    code = d.stop()
    if code != 0:
        raise RuntimeError(f"fusedrive daemon exited {code} at unmount:\n{d.log_tail()}")
    step = max(1, len(samples) // 400)
    return {
        "pid": d.pid,
        "written_bytes": cfg.rss_bytes,
        "interval_s": cfg.rss_interval,
        "samples": len(samples),
        "before_mib": before,
        "vm_hwm_mib": after["VmHWM"],
        "peak_sampled_mib": {k: max(s[k] for s in samples) for k in _STATUS_FIELDS},
        "peak_anon_plus_shmem_mib": max(heap),
        "note": (
            "VmHWM is the exact peak of the resident set, LMDB's mapped file pages "
            "included (RssFile: the store's page cache, not daemon heap); the target "
            "is judged on the peak of RssAnon + RssShmem, sampled every interval_s"
        ),
        "fio": fio,
        "series": samples[::step],
    }


# -- running -----------------------------------------------------------------


def machine_info(work: Path, cfg: Config) -> dict[str, Any]:
    return machine.describe(
        work,
        fio=fio_version(),
        caches_dropped=cfg.drop_caches,
        fusedrive={
            "entry_timeout_s": CACHED.entry,
            "attr_timeout_s": CACHED.attr,
            "dirty_limit_bytes": DEFAULT_DIRTY_LIMIT,
            "cache_limit_bytes": DEFAULT_CACHE_LIMIT,
        },
    )


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    jobs = results["jobs"]
    out = []
    for name, job, metric, ref, limit in RATIO_TARGETS:
        measured = jobs[job]["fusedrive"][metric] / jobs[job][ref][metric]
        out.append({"name": name, "measured": measured, "limit": limit, "comparison": ">="})
        out[-1].update({"unit": "x", "pass": measured >= limit})
    rss = results["daemon_memory"]
    measured = rss["peak_anon_plus_shmem_mib"]
    out.append(
        {
            "name": f"daemon RssAnon+RssShmem writing {human(rss['written_bytes'])}",
            "measured": measured,
            "limit": RSS_LIMIT_MIB,
            "comparison": "<=",
            "unit": "MiB",
            "pass": measured <= RSS_LIMIT_MIB,
        }
    )
    return out


def human(nbytes: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= size:
            return f"{nbytes / size:g} {unit}"
    return f"{nbytes} B"


def ratios(jobs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """fusedrive / plain and fusedrive / memfs (and memfs / plain) for every job."""
    out = {}
    for job, per in jobs.items():
        metric = JOB_METRIC[job]
        f, p, m = (per[t][metric] for t in ("fusedrive", "plain", "memfs"))
        out[job] = {
            "fusedrive_to_plain": f / p,
            "fusedrive_to_memfs": f / m,
            "memfs_to_plain": m / p,
        }
    return out


JOB_METRIC = {
    "seq_write": "bw_mibps",
    "seq_read": "bw_mibps",
    "rand_read": "iops",
    "rand_write": "iops",
    "create": "ops_per_s",
    "stat": "ops_per_s",
    "unlink": "ops_per_s",
}

# The reference of each job's target (the plot's labels).
JOB_REFERENCE = {job: ref for _, job, _, ref, _ in RATIO_TARGETS}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def summarize_trials(trials: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """The median of each metric over the trials, and the trials themselves."""
    out: dict[str, Any] = {m: statistics.median(t[m] for t in trials) for m in metrics}
    if all("daemon_cpu_s" in t for t in trials):
        out["daemon_cpu_s"] = statistics.median(t["daemon_cpu_s"] for t in trials)
    out["trials"] = trials
    return out


def fio_trial(targets: Targets, t: str, job: str, cfg: Config) -> dict[str, Any]:
    """One trial of one of ``FIO_JOBS`` on target ``t``, by the rules of this module: a
    sequential write writes a new file; a cold read restarts the fusedrive daemon (when
    ``t`` is fusedrive) and drops the page cache first (when ``cfg.drop_caches``); the
    daemon's CPU seconds during the job are recorded for a FUSE target."""
    f = targets.path(t) / "seq"
    if job == "seq_write" and f.exists():  # every trial writes a new file
        f.unlink()
        fsync_dir(f.parent)
    if job == "seq_read":
        if t == "fusedrive":
            targets.restart_fusedrive()
        if cfg.drop_caches:
            drop_caches()
    # The daemon's CPU time tells a busy daemon from a machine busy elsewhere.
    pid = targets.daemons[t].pid if t in targets.daemons else None
    c0 = cpu_seconds(pid) if pid else 0.0
    raw = run_fio(job, f, fio_job_args(job, cfg), fio_timeout(cfg, cfg.seq_bytes))
    if pid:
        raw["daemon_cpu_s"] = cpu_seconds(pid) - c0
    return raw


def measure_jobs(
    targets: Targets, cfg: Config, console: Console
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every fio job and the small-file job on every target; returns (jobs, extras).

    Each job runs ``cfg.trials`` times, the targets taking turns within each trial;
    a job's number on a target is the median of its trials.
    """
    size = cfg.seq_bytes
    trials: dict[str, dict[str, list[dict[str, Any]]]] = {
        job: {t: [] for t in TARGETS} for job in JOB_METRIC
    }
    headings = {
        "seq_write": f"[bold]1/5 sequential write, {human(size)}[/]",
        "seq_read": f"[bold]2/5 sequential read, {human(size)}, cold[/]",
        "rand_read": f"[bold]3/5 random 4 KiB read and write, {cfg.rand_seconds} s per trial[/]",
    }
    for job in FIO_JOBS:
        if job in headings:
            console.print(headings[job])
        for trial in range(cfg.trials):
            for t in TARGETS:
                console.print(f"  {job} on {t}, trial {trial + 1}/{cfg.trials}")
                trials[job][t].append(fio_trial(targets, t, job, cfg))
    settle = SMALL_SETTLE
    console.print(f"[bold]4/5 create, stat, unlink of {cfg.small_files} files[/]")
    loads: dict[str, list[list[float]]] = {t: [] for t in TARGETS}
    for trial in range(cfg.trials):
        for t in TARGETS:
            console.print(f"  small files on {t}, trial {trial + 1}/{cfg.trials}")
            d = targets.daemons.get(t)
            cpu = functools.partial(cpu_seconds, d.pid) if d else None
            small = small_files(targets.path(t), cfg.small_files, settle, cpu)
            for op in ("create", "stat", "unlink"):
                trials[op][t].append(small[op])
            loads[t].append(small["loadavg_after"])
    jobs: dict[str, Any] = {}
    for job, metric in JOB_METRIC.items():
        metrics = ("bw_mibps", "iops") if metric != "ops_per_s" else ("ops_per_s",)
        jobs[job] = {t: summarize_trials(trials[job][t], metrics) for t in TARGETS}
    extras = {
        "small_files": {
            "files": cfg.small_files,
            "settle_seconds": settle,
            "note": (
                "empty files in one directory, stat right after the creates (kernel "
                "caches count on every target); load averages after each trial"
            ),
            "loadavg_after": loads,
        },
        "daemon_pids": targets.pids,
        "fusedrive_store": store_stats(targets.store),
    }
    return jobs, extras


@contextlib.contextmanager
def work_directory(root: Path) -> Iterator[Path]:
    """A fresh directory under ``root``, removed afterwards unless something is mounted."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fio-bench-", dir=root))
    try:
        yield work
    finally:
        left = mounts_under(work)
        if left:
            log.error("event=mounts_left paths=%s; not removing %s", left, work)
        else:
            shutil.rmtree(work, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):  # another run may be using it
                    root.rmdir()


def check_machine() -> None:
    """Clear errors for what the benchmark needs and lacks."""
    if os.geteuid() != 0:
        raise OSError("fio_bench needs root (FUSE mounts with allow_other, drop_caches)")
    for tool in ("fio", "fusermount3"):
        if shutil.which(tool) is None:
            raise OSError(f"fio_bench needs {tool} on PATH (Debian packages fio, fuse3)")
    if not os.path.exists("/dev/fuse"):
        raise OSError("fio_bench needs /dev/fuse")


def run(
    cfg: Config,
    out: Path,
    plot: Path | None,
    tmp_root: Path = DEFAULT_TMP,
    console: Console | None = None,
    mode: str = "full",
) -> dict[str, Any]:
    """Run every measurement, write the JSON (and the plot); returns the results."""
    console = console or Console()
    check_machine()
    with work_directory(tmp_root) as work, contextlib.ExitStack() as stack:
        results: dict[str, Any] = {
            "benchmark": "fusedrive fio_bench",
            "mode": mode,
            "config": asdict(cfg),
            "machine": machine_info(work, cfg),
            "noise": NOISE_NOTE,
            "method": {
                "seq_read": (
                    "cold: page cache dropped before each target's read"
                    if cfg.drop_caches
                    else "page cache NOT dropped (this configuration leaves it alone)"
                )
                + "; fusedrive daemon restarted before its read (empty chunk cache)",
                "random": "direct=1, psync, queue depth 1, time-based, over the sequential file",
                "trials": f"{cfg.trials} per job, targets taking turns; medians reported",
                "small_files": "os.open(O_CREAT|O_EXCL)+close, os.stat, os.unlink loops",
            },
        }
        t0 = time.perf_counter()
        targets = Targets(work, cfg, stack)
        jobs, extras = measure_jobs(targets, cfg, console)
        results["jobs"] = jobs
        results.update(extras)
        stack.close()  # unmount before the memory job: one daemon writing at a time
        console.print(f"[bold]5/5 fusedrive daemon memory, writing {human(cfg.rss_bytes)}[/]")
        results["daemon_memory"] = measure_rss(work, cfg, stack)
        results["seconds"] = time.perf_counter() - t0
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["ratios"] = ratios(results["jobs"])
    results["targets"] = evaluate_targets(results)
    results["missed"] = [t["name"] for t in results["targets"] if not t["pass"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if plot is not None:
        write_plot(results, plot)
    print_summary(results, console)
    console.print(f"results: {out}" + (f", plot: {plot}" if plot else ""))
    return results


# -- report ------------------------------------------------------------------


def print_summary(results: dict[str, Any], console: Console) -> None:
    table = Table(title="fio benchmark: targets (fusedrive / reference, same run)")
    for col in ("target", "measured", "limit", "result"):
        table.add_column(col, justify="right" if col in ("measured", "limit") else "left")
    for t in results["targets"]:
        table.add_row(
            t["name"],
            f"{t['measured']:.3g} {t['unit']}",
            f"{t['comparison']} {t['limit']:g} {t['unit']}",
            "[green]pass[/]" if t["pass"] else "[red]MISS[/]",
        )
    console.print(table)
    nums = Table(title="fio benchmark: numbers")
    nums.add_column("job")
    for t in TARGETS:
        nums.add_column(t, justify="right")
    nums.add_column("fd/plain", justify="right")
    nums.add_column("fd/memfs", justify="right")
    nums.add_column("memfs/plain (FUSE cost)", justify="right")
    units = {"bw_mibps": "MiB/s", "iops": "IOPS", "ops_per_s": "ops/s"}
    for job, metric in JOB_METRIC.items():
        per = results["jobs"][job]
        r = results["ratios"][job]
        nums.add_row(
            job,
            *(f"{per[t][metric]:,.0f} {units[metric]}" for t in TARGETS),
            f"{r['fusedrive_to_plain']:.2f}",
            f"{r['fusedrive_to_memfs']:.2f}",
            f"{r['memfs_to_plain']:.2f}",
        )
    console.print(nums)
    mem = results["daemon_memory"]
    peak = mem["peak_sampled_mib"]
    console.print(
        f"fusedrive daemon (pid {mem['pid']}) writing {human(mem['written_bytes'])} at "
        f"{mem['fio']['bw_mibps']:.0f} MiB/s: VmHWM {mem['vm_hwm_mib']:.0f} MiB; sampled "
        f"peaks RssAnon {peak['RssAnon']:.0f}, RssShmem {peak['RssShmem']:.0f}, RssFile "
        f"{peak['RssFile']:.0f} MiB (RssFile: the mapped LMDB file, page cache)"
    )
    m = results["machine"]
    console.print(f"load average start {m['loadavg_start']}, end {m['loadavg_end']}")
    missed = results["missed"]
    if missed:
        console.print(f"[red]missed {len(missed)} target(s):[/] " + "; ".join(missed))
    else:
        console.print("[green]all targets met[/]")


JOB_TITLE = {
    "seq_write": ("sequential write, 1 MiB, fsync'd", "MiB/s"),
    "seq_read": ("sequential read, 1 MiB, cold", "MiB/s"),
    "rand_read": ("random read, 4 KiB, QD1, direct", "IOPS"),
    "rand_write": ("random write, 4 KiB, QD1, direct", "IOPS"),
    "create": ("file create", "ops/s"),
    "stat": ("file stat", "ops/s"),
    "unlink": ("file unlink", "ops/s"),
}


def write_plot(results: dict[str, Any], path: Path) -> None:
    """One job per panel: the three targets' medians with min-max over the trials, the
    job's reference bar outlined and its target drawn; then the daemon's memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = results["jobs"]
    limits = {job: (ref, limit) for _, job, _, ref, limit in RATIO_TARGETS}
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    colors = {"fusedrive": "tab:blue", "plain": "tab:gray", "memfs": "tab:green"}
    for ax, (job, metric) in zip(axes.flat, JOB_METRIC.items(), strict=False):
        title, unit = JOB_TITLE[job]
        ref, limit = limits[job]
        med = [jobs[job][t][metric] for t in TARGETS]
        trials = [[tr[metric] for tr in jobs[job][t]["trials"]] for t in TARGETS]
        lo = [m - min(ts) for m, ts in zip(med, trials, strict=True)]
        hi = [max(ts) - m for m, ts in zip(med, trials, strict=True)]
        bars = ax.bar(TARGETS, med, yerr=[lo, hi], capsize=5, color=[colors[t] for t in TARGETS])
        bars[TARGETS.index(ref)].set_edgecolor("black")
        bars[TARGETS.index(ref)].set_linewidth(2)
        need = limit * jobs[job][ref][metric]
        ax.axhline(need, color="red", linestyle="--", label=f"target: >= {limit:g} x {ref}")
        ratio = results["ratios"][job][f"fusedrive_to_{ref}"]
        ax.set_title(f"{title}\nfusedrive = {ratio:.2f} x {ref}", fontsize=10)
        if unit == "ops/s":
            ax.set_yscale("log")  # the plain directory is two orders of magnitude ahead
        ax.set_ylabel(f"{unit} (median of {len(trials[0])}, bars min-max)")
        ax.legend(fontsize=8, loc="upper right")
    ax = axes.flat[len(JOB_METRIC)]
    mem = results["daemon_memory"]
    series = mem["series"]
    ts = [s["t"] for s in series]
    ax.plot(ts, [s["RssAnon"] + s["RssShmem"] for s in series], label="RssAnon + RssShmem")
    ax.plot(ts, [s["RssFile"] for s in series], label="RssFile (mapped LMDB)")
    ax.plot(ts, [s["VmRSS"] for s in series], label="VmRSS", linestyle=":")
    ax.axhline(RSS_LIMIT_MIB, color="red", linestyle="--", label="target (anon + shmem)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(f"daemon memory writing {human(mem['written_bytes'])}", fontsize=10)
    ax.legend(fontsize=8)
    missed = len(results["missed"])
    m = results["machine"]
    load = m.get("loadavg_start", [0.0])[0], m.get("loadavg_end", [0.0])[0]
    fig.suptitle(
        f"fusedrive fio benchmark ({results['mode']}): {len(results['targets']) - missed}/"
        f"{len(results['targets'])} targets met; outlined bar = the job's reference"
    )
    fig.text(
        0.5,
        0.005,
        f"{m['date']} · {m['nproc']} cores {m['cpu_model']} · kernel {m['kernel']} · "
        f"{m['fio']} · load avg {load[0]:.1f} at start, {load[1]:.1f} at end (shared machine)",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = command.parse(
        argv,
        prog="python -m benchmarks.fio_bench",
        doc=__doc__ or "",
        default_out=DEFAULT_OUT,
        default_tmp=DEFAULT_TMP,
        quick_help="smaller sizes (a few minutes)",
        tmp_help=(
            "where the store, the plain directory and the mount points live; "
            "must be on the disk under test"
        ),
    )
    cfg = QUICK if args.quick else Config()
    console = Console()
    try:
        run(cfg, args.out, args.plot, args.tmp_dir, console, mode=args.mode)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
