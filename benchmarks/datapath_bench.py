"""Issue 18's whole table in one run: fusedrive against a plain directory on the same disk.

Owns the one command that re-measures every row of issue 18's table
(``make bench-datapath``). In one run, in a work directory under ``--tmp-dir`` (on
the disk under test; removed afterwards), every row is measured on both targets, the
targets taking turns trial by trial (the order alternates: plain, fusedrive, then
fusedrive, plain, ...), so that a burst of load from elsewhere hits both rather than
one:

- ``fusedrive``: a volume served by ``python -m fusedrive.fuse_adapter`` with its
  default options (how ``fusedrive mount`` serves it; the store, an LMDB file, lives
  in the work directory), the way ``pg_bench`` and ``fio_bench`` mount it;
- ``plain``: a directory of the work directory (the disk itself).

Row groups, each reusing the benchmark that owns it:

1. PostgreSQL (``pg_bench.one_round``): a fresh cluster per round, ``pgbench -i -s
   10`` load time and ``pgbench`` TPS (4 clients, 30 s, fsync on).
2. fio (``fio_bench.fio_trial``, its job definitions and cold-read rules): sequential
   write 1 MiB blocks ended by fsync, cold sequential read, random 4 KiB read and
   write at queue depth 1 (``direct=1``, the write ended by fsync).
3. Small files (``fio_bench.small_files``): create, stat, unlink of 20,000 files.
4. SQLite (Python's ``sqlite3``): 50,000 inserts in 500 transactions, WAL and
   rollback (``DELETE``) journal, SQLite's default ``synchronous=FULL``; time.
5. Trees: ``tar x`` of a deterministic ~243 MiB tree (``make_tree``), then ``rsync -a``
   of the same tree from the disk; time. The source tree and tarball live on the
   plain disk, read warm by both targets alike.
6. Block volume: ext4 on a loop device over a fusedrive block volume's disk image (how
   the CSI node serves a block volume: ``csi_frontend.loopdev.attach`` on the image
   in the volume's mount) against ext4 on a loop device over a plain image file of the
   same size on the same disk; fio's four jobs on each. A cold read takes down and
   rebuilds both stacks (unmount ext4, detach, restart the fusedrive daemon, attach,
   mount) and drops the page cache. Also reported against the plain directory's fio
   numbers of group 2 (same run), without a goal.
7. Daemon memory (``fio_bench.measure_rss``): peak resident set (VmHWM) of a fresh
   daemon while fio writes 4 GiB into a fresh volume; one trial.

Results: ``benchmarks/results/datapath.json`` (the machine, tool versions, the
parameters, every repetition with the load average before and after it, the rows with
medians, ratios and goals), ``DATAPATH.md`` (the table) and ``datapath.png`` (the
plot) beside it; see ``datapath_report``. A missed goal is a measurement, not an
error: the exit code is 0 and the misses are listed.

Invariants: everything this run creates is undone by what it created, even on failure
or SIGTERM: postgres servers stopped by PID, ext4 unmounted by path, loop devices
detached by the name and attachment (diskseq) this run got, FUSE daemons unmounted and
reaped by PID, the work directory removed only when nothing is mounted under it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
from rich.console import Console

from csi_frontend import loopdev

from . import command, datapath_report, fio_bench, machine, pg_bench
from .fio_bench import (
    FIO_JOBS,
    SMALL_SETTLE,
    Daemon,
    Targets,
    cpu_seconds,
    drop_caches,
    fio_job_args,
    fio_timeout,
    fio_trial,
    fsync_dir,
    fusedrive_cli,
    human,
    is_mounted,
    mounts_under,
    run_fio,
    small_files,
    start_fusedrive,
)
from .trees import TREE_SEED, make_tree, tree_size

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "datapath.json"
QUICK_OUT = REPO / "benchmarks" / "results" / "quick" / "datapath.json"
DEFAULT_TMP = REPO / ".bench-tmp"
TARGETS = ("plain", "fusedrive")
SQLITE_JOURNALS = ("wal", "delete")
STEP_TIMEOUT = 1800.0
DETACH_TIMEOUT = 30.0
NOISE_NOTE = (
    "The machine is shared with other engineers' test runs (2 cores), so absolute "
    "numbers are noisy; the load average is recorded before and after every trial. "
    "Prefer the ratios: both targets run in every trial, taking turns."
)


@dataclass(frozen=True)
class Config:
    """Sizes of one run; the defaults are issue 18's (about 15-20 minutes on 2 cores)."""

    pg: pg_bench.Config = field(default_factory=lambda: pg_bench.Config(rounds=2))
    fio: fio_bench.Config = field(default_factory=fio_bench.Config)
    trials: int = 3  # SQLite and trees (fio, small files and block use fio.trials)
    sqlite_rows: int = 50_000
    sqlite_txns: int = 500
    tree_bytes: int = 243 * MiB
    block_image_bytes: int = 3 * GiB


QUICK = Config(
    pg=pg_bench.Config(scale=2, clients=4, seconds=5, rounds=1),
    fio=fio_bench.Config(
        seq_bytes=128 * MiB,
        rand_seconds=2,
        trials=1,
        small_files=2_000,
        rss_bytes=256 * MiB,
        volume_bytes=2 * GiB,
    ),
    trials=1,
    sqlite_rows=5_000,
    sqlite_txns=50,
    tree_bytes=24 * MiB,
    block_image_bytes=512 * MiB,
)
# For the smoke test: every code path in seconds, no meaningful numbers; it leaves
# the machine's page cache alone (other test suites run beside it).
TINY = Config(
    pg=pg_bench.TINY,
    fio=fio_bench.TINY,
    trials=1,
    sqlite_rows=200,
    sqlite_txns=4,
    tree_bytes=2 * MiB,
    block_image_bytes=64 * MiB,
)


def order(trial: int) -> tuple[str, ...]:
    """The targets' turn in ``trial``: plain first in even trials, fusedrive in odd."""
    return TARGETS if trial % 2 == 0 else TARGETS[::-1]


def loadavg() -> list[float]:
    return list(os.getloadavg())


def measured(tags: dict[str, Any], fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """One repetition, ``fn(*args)``: its numbers with ``tags`` and the load before and
    after it."""
    before = loadavg()
    raw = fn(*args)
    return {**tags, **raw, "loadavg_before": before, "loadavg_after": loadavg()}


def _run(cmd: Sequence[str | Path], timeout: float = STEP_TIMEOUT) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, errors="replace"
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc.stdout + proc.stderr


def _timed(cmd: Sequence[str | Path]) -> float:
    t0 = time.perf_counter()
    _run(cmd)
    return time.perf_counter() - t0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# -- PostgreSQL ---------------------------------------------------------------


def measure_pg(
    homes: dict[str, Path], cfg: pg_bench.Config, bindir: Path, console: Console
) -> list[dict[str, Any]]:
    for home in homes.values():
        home.mkdir()
        shutil.chown(home, "postgres", "postgres")
    rounds = []
    for i in range(cfg.rounds):
        for t in order(i):
            console.print(f"  pgbench round {i + 1}/{cfg.rounds} on {t}")
            r = measured({"trial": i}, pg_bench.one_round, t, homes[t], cfg, bindir)
            rounds.append(r)
            console.print(f"    load {r['load_s']:.2f} s, {r['tps']:.0f} TPS")
    return rounds


# -- fio and small files on the volume ------------------------------------------


def measure_fio(
    targets: Targets, cfg: fio_bench.Config, console: Console
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {job: [] for job in FIO_JOBS}
    for job in FIO_JOBS:
        for i in range(cfg.trials):
            for t in order(i):
                console.print(f"  fio {job} on {t}, trial {i + 1}/{cfg.trials}")
                out[job].append(
                    measured({"trial": i, "target": t}, fio_trial, targets, t, job, cfg)
                )
    for t in TARGETS:
        (targets.path(t) / "seq").unlink()
    return out


def measure_small_files(
    targets: Targets, cfg: fio_bench.Config, console: Console
) -> list[dict[str, Any]]:
    out = []
    for i in range(cfg.trials):
        for t in order(i):
            console.print(f"  {cfg.small_files} files on {t}, trial {i + 1}/{cfg.trials}")
            d = targets.daemons.get(t)
            cpu = functools.partial(cpu_seconds, d.pid) if d else None
            tags = {"trial": i, "target": t}
            root = targets.path(t)
            out.append(measured(tags, small_files, root, cfg.small_files, SMALL_SETTLE, cpu))
    return out


# -- SQLite ------------------------------------------------------------------


def sqlite_rows(rows: int) -> list[tuple[int, str]]:
    """The rows every trial inserts: a key and a ~100-byte text, the same every run."""
    rng = random.Random(TREE_SEED)
    return [
        (rng.randrange(1 << 31), f"row {i:08d} " + rng.randbytes(44).hex()) for i in range(rows)
    ]


def sqlite_trial(
    directory: Path, journal: str, rows: list[tuple[int, str]], txns: int
) -> dict[str, Any]:
    """A fresh database in ``directory``: ``len(rows)`` inserts in ``txns`` transactions
    (a table with an index), SQLite's default synchronous level; the inserts' time."""
    directory.mkdir(exist_ok=True)
    db = directory / f"bench-{journal}.db"
    for suffix in ("", "-wal", "-shm", "-journal"):
        _remove(Path(f"{db}{suffix}"))
    con = sqlite3.connect(db, isolation_level=None)
    try:
        got = con.execute(f"PRAGMA journal_mode={journal}").fetchone()[0]
        if got != journal:
            raise RuntimeError(f"sqlite on {directory} gave journal_mode {got}, not {journal}")
        sync = con.execute("PRAGMA synchronous").fetchone()[0]
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v TEXT NOT NULL)")
        con.execute("CREATE INDEX t_k ON t (k)")
        per = -(-len(rows) // txns)
        t0 = time.perf_counter()
        for start in range(0, len(rows), per):
            con.execute("BEGIN")
            con.executemany("INSERT INTO t (k, v) VALUES (?, ?)", rows[start : start + per])
            con.execute("COMMIT")
        seconds = time.perf_counter() - t0
        count = con.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        con.close()
    if count != len(rows):
        raise RuntimeError(f"sqlite on {directory} holds {count} rows, not {len(rows)}")
    for suffix in ("", "-wal", "-shm", "-journal"):
        _remove(Path(f"{db}{suffix}"))
    return {"journal": journal, "synchronous": sync, "rows": count, "seconds": seconds}


def measure_sqlite(roots: dict[str, Path], cfg: Config, console: Console) -> list[dict[str, Any]]:
    rows = sqlite_rows(cfg.sqlite_rows)
    out = []
    for i in range(cfg.trials):
        for journal in SQLITE_JOURNALS:
            for t in order(i):
                console.print(f"  sqlite {journal} on {t}, trial {i + 1}/{cfg.trials}")
                os.sync()  # the previous trial's writeback is not this one's
                tags = {"trial": i, "target": t}
                where = roots[t] / "sqlite"
                out.append(measured(tags, sqlite_trial, where, journal, rows, cfg.sqlite_txns))
    for root in roots.values():
        _remove(root / "sqlite")
    return out


# -- trees: tar x and rsync -a -----------------------------------------------------


def tree_trial(src: Path, tarball: Path, root: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """``tar x`` of ``tarball`` into ``root``, then ``rsync -a`` of ``src`` into it; times."""
    out: dict[str, Any] = {}
    steps: tuple[tuple[str, Path, list[str | Path]], ...] = (
        ("tar_x", root / "tar-x", ["tar", "-xf", tarball, "-C", root / "tar-x"]),
        ("rsync", root / "rsync", ["rsync", "-a", f"{src}/", f"{root / 'rsync'}/"]),
    )
    for step, dest, cmd in steps:
        dest.mkdir()
        out[f"{step}_s"] = _timed(cmd)
        got = tree_size(dest if step == "rsync" else dest / src.name)
        if got != (expect["files"], expect["bytes"]):
            raise RuntimeError(f"{step} into {dest} gave {got} (files, bytes), not {expect}")
    for step in ("tar-x", "rsync"):
        shutil.rmtree(root / step)
    return out


def measure_trees(
    roots: dict[str, Path], work: Path, cfg: Config, console: Console
) -> dict[str, Any]:
    src = work / "tree"
    src.mkdir()
    made = make_tree(src, cfg.tree_bytes)
    tarball = work / "tree.tar"
    _run(["tar", "-cf", tarball, "-C", work, "tree"])
    made["tarball_bytes"] = tarball.stat().st_size
    trials = []
    for i in range(cfg.trials):
        for t in order(i):
            console.print(f"  tar x and rsync -a of {human(made['bytes'])} on {t}, trial {i + 1}")
            os.sync()  # the previous trial's writeback is not this one's
            tags = {"trial": i, "target": t}
            trials.append(measured(tags, tree_trial, src, tarball, roots[t], made))
    shutil.rmtree(src)
    tarball.unlink()
    return {"tree": made, "trials": trials}


# -- block volume: ext4 on a loop device ------------------------------------------

BLOCK_VOLUME = "blk"
MKFS_EXT4 = ("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0")


class BlockStack:
    """ext4 on a loop device over a disk image: in a fusedrive block volume's mount
    (``fusedrive``) or a plain file of the work directory (``plain``)."""

    def __init__(self, name: str, work: Path, cfg: Config, stack: contextlib.ExitStack) -> None:
        self.name = name
        self.work = work
        self.size = cfg.block_image_bytes
        self.ext4 = work / f"ext4-{name}"
        self.ext4.mkdir()
        self.daemon: Daemon | None = None
        self.device = ""
        self.diskseq: int | None = None
        self.pids: list[int] = []
        self.store = work / "store"
        stack.callback(self.close)
        if name == "fusedrive":
            size = f"{-(-self.size // MiB)}MiB"
            fusedrive_cli(
                self.store, "volume", "create", BLOCK_VOLUME, "--size", size, "--mode", "block"
            )
        else:
            (work / "block-plain").mkdir()
            with open(work / "block-plain" / "disk.img", "wb") as f:
                f.truncate(self.size)
        self.up(format_=True)

    @property
    def image(self) -> Path:
        if self.daemon is not None:
            return self.daemon.mountpoint / "disk.img"
        return self.work / "block-plain" / "disk.img"

    def up(self, format_: bool = False) -> None:
        if self.name == "fusedrive":
            mnt, logfile = self.work / "mnt-blk", self.work / "blk.log"
            self.daemon = start_fusedrive(self.store, BLOCK_VOLUME, mnt, logfile)
            self.pids.append(self.daemon.pid)
        dev = loopdev.attach(self.image)
        self.device, self.diskseq = dev.name, loopdev.diskseq(dev.name)
        if format_:
            _run([*MKFS_EXT4, self.device])
        _run(["mount", "-t", "ext4", self.device, self.ext4])

    def down(self) -> None:
        """Unmount ext4, detach the loop device, stop the daemon; errors raised."""
        if is_mounted(self.ext4):
            _run(["umount", self.ext4])
        if self.device:
            self._detach()
        if self.daemon is not None:
            code = self.daemon.stop()
            d, self.daemon = self.daemon, None
            if code != 0:
                raise RuntimeError(f"fusedrive block daemon exited {code}:\n{d.log_tail()}")

    def _detach(self) -> None:
        dev, seq = self.device, self.diskseq
        self.device, self.diskseq = "", None
        if seq is None or loopdev.diskseq(dev) != seq:
            log.warning("event=loop_not_ours device=%s: not detaching", dev)
            return
        loopdev.detach(dev)
        deadline = time.monotonic() + DETACH_TIMEOUT
        while loopdev.diskseq(dev) == seq:  # the image stays busy until it is gone
            if time.monotonic() > deadline:
                raise RuntimeError(f"loop device {dev} still attached {DETACH_TIMEOUT:g} s on")
            time.sleep(0.1)

    def cold(self) -> None:
        """Rebuild the stack: nothing of it (ext4, loop, daemon) keeps cached data."""
        self.down()
        self.up()

    def close(self) -> None:
        """``down`` for cleanup: every step tried, failures logged, the last resorts
        lazy (ext4) and the daemon's own escalation."""
        if (
            is_mounted(self.ext4)
            and subprocess.run(["umount", str(self.ext4)], capture_output=True).returncode
        ):
            subprocess.run(["umount", "-l", str(self.ext4)], capture_output=True)
        if self.device:
            try:
                self._detach()
            except (OSError, RuntimeError, loopdev.LoopError) as exc:
                log.error("event=loop_detach_failed error=%s", exc)
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


def block_trial(
    stacks: dict[str, BlockStack], t: str, job: str, cfg: fio_bench.Config
) -> dict[str, Any]:
    """One of fio's jobs on the ext4 of ``stacks[t]``, by fio_bench's rules (a new file
    per sequential write; a cold read rebuilds the stack and drops the page cache)."""
    s = stacks[t]
    f = s.ext4 / "seq"
    if job == "seq_write" and f.exists():
        f.unlink()
        fsync_dir(f.parent)
    if job == "seq_read":
        s.cold()
        if cfg.drop_caches:
            drop_caches()
    pid = s.daemon.pid if s.daemon else None
    c0 = cpu_seconds(pid) if pid else 0.0
    raw = run_fio(job, f, fio_job_args(job, cfg), fio_timeout(cfg, cfg.seq_bytes))
    if pid:
        raw["daemon_cpu_s"] = cpu_seconds(pid) - c0
    return raw


def measure_block(work: Path, cfg: Config, console: Console) -> dict[str, Any]:
    fio_cfg = cfg.fio
    with contextlib.ExitStack() as stack:
        stacks = {t: BlockStack(t, work, cfg, stack) for t in TARGETS}
        out: dict[str, Any] = {job: [] for job in FIO_JOBS}
        for job in FIO_JOBS:
            for i in range(fio_cfg.trials):
                for t in order(i):
                    console.print(f"  block {job} on {t}, trial {i + 1}/{fio_cfg.trials}")
                    tags = {"trial": i, "target": t}
                    out[job].append(measured(tags, block_trial, stacks, t, job, fio_cfg))
        out["daemon_pids"] = stacks["fusedrive"].pids
        for s in stacks.values():
            s.down()
    return out


# -- running -----------------------------------------------------------------


def _first_line(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return (
        (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.stdout or proc.stderr else ""
    )


def versions(bindir: Path) -> dict[str, str]:
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return {
        "fusedrive_commit": git.stdout.strip(),
        "pyfuse3": pyfuse3.__version__,
        "fusermount3": _first_line("fusermount3", "--version"),
        "fio": fio_bench.fio_version(),
        "postgres": _first_line(str(bindir / "postgres"), "--version"),
        "sqlite": sqlite3.sqlite_version,
        "tar": _first_line("tar", "--version"),
        "rsync": _first_line("rsync", "--version"),
        "mke2fs": _first_line("mke2fs", "-V"),
    }


def check_machine() -> Path:
    """Clear errors for what the run needs and lacks; PostgreSQL's bin directory."""
    bindir = pg_bench.check_machine()
    fio_bench.check_machine()
    for tool, package in (
        ("tar", "tar"),
        ("rsync", "rsync"),
        ("mkfs.ext4", "e2fsprogs"),
        ("losetup", "mount"),
        ("mount", "mount"),
    ):
        if shutil.which(tool) is None:
            raise OSError(f"datapath_bench needs {tool} on PATH (Debian package {package})")
    return bindir


def method(cfg: Config) -> dict[str, str]:
    drop = "page cache dropped" if cfg.fio.drop_caches else "page cache NOT dropped (TINY)"
    return {
        "order": "targets take turns in every trial: plain first in even trials, fusedrive "
        "first in odd ones; a row's number per target is the median of its trials",
        "postgresql": f"pg_bench.one_round: fresh cluster per round, pgbench -i -s "
        f"{cfg.pg.scale} -q (load time), pgbench -n -c {cfg.pg.clients} -j {cfg.pg.clients} "
        f"-T {cfg.pg.seconds} (TPS), fsync=on, synchronous_commit=on; {cfg.pg.rounds} rounds",
        "fio": f"fio_bench.fio_trial: psync, QD1, {human(cfg.fio.seq_bytes)} file; seq write "
        f"1 MiB + end_fsync; cold seq read 1 MiB (fusedrive daemon restarted, {drop}); "
        f"random 4 KiB read / write direct=1, {cfg.fio.rand_seconds} s each, write end_fsync",
        "small_files": f"fio_bench.small_files: create (O_CREAT|O_EXCL + close), stat, unlink "
        f"of {cfg.fio.small_files} empty files in one directory",
        "sqlite": f"python sqlite3 {sqlite3.sqlite_version}: {cfg.sqlite_rows} inserts in "
        f"{cfg.sqlite_txns} explicit transactions into a table with one index, fresh database "
        "per trial, journal_mode WAL and DELETE (rollback), synchronous left at its default",
        "trees": "tar -xf of a tarball of make_tree's tree (on the plain disk, warm) into "
        "the target; then rsync -a of the source tree into the target; wall time of each "
        "command (no sync after it: what the user waits for); os.sync() before each trial",
        "block": f"fusedrive block volume of {human(cfg.block_image_bytes)} (disk.img in its "
        "mount) vs a sparse plain image file of that size in the work directory; each "
        f"attached with losetup (csi_frontend.loopdev.attach, buffered), {' '.join(MKFS_EXT4)}, "
        "mounted with default options; fio's four jobs on a file of the ext4; a cold read "
        f"unmounts, detaches and restarts the whole stack first ({drop})",
        "memory": f"fio_bench.measure_rss: a fresh daemon on a fresh volume, fio writes "
        f"{human(cfg.fio.rss_bytes)} (1 MiB blocks, end fsync); VmHWM of /proc/PID/status "
        "after the write; RssAnon/RssFile/RssShmem sampled every "
        f"{cfg.fio.rss_interval:g} s; one trial",
    }


def run(
    cfg: Config,
    out: Path,
    plot: Path | None,
    markdown: Path | None,
    tmp_root: Path = DEFAULT_TMP,
    console: Console | None = None,
    mode: str = "full",
) -> dict[str, Any]:
    """Measure every row, write the JSON (and the table and plot); returns the results."""
    console = console or Console()
    bindir = check_machine()
    t_start = time.perf_counter()
    raw: dict[str, Any] = {}
    spent: dict[str, float] = {}

    @contextlib.contextmanager
    def group(name: str, title: str) -> Iterator[None]:
        console.print(f"[bold]{title}[/]")
        t0 = time.perf_counter()
        yield
        spent[name] = time.perf_counter() - t0

    with pg_bench.work_directory(tmp_root, "datapath-") as work, contextlib.ExitStack() as stack:
        results: dict[str, Any] = {
            "benchmark": "fusedrive datapath_bench (issue 18's table)",
            "mode": mode,
            "config": asdict(cfg),
            "machine": machine.describe(work),
            "versions": versions(bindir),
            "noise": NOISE_NOTE,
            "method": method(cfg),
        }
        targets = Targets(work, cfg.fio, stack, names=("fusedrive", "plain"))
        roots = {t: targets.path(t) for t in TARGETS}
        with group("postgresql", "1/7 PostgreSQL pgbench"):
            homes = {t: roots[t] / "pg" for t in TARGETS}
            raw["postgresql"] = measure_pg(homes, cfg.pg, bindir, console)
        with group("fio", f"2/7 fio, {human(cfg.fio.seq_bytes)}"):
            raw["fio"] = measure_fio(targets, cfg.fio, console)
        with group("small_files", f"3/7 create, stat, unlink of {cfg.fio.small_files} files"):
            raw["small_files"] = measure_small_files(targets, cfg.fio, console)
        with group("sqlite", f"4/7 SQLite, {cfg.sqlite_rows} inserts in {cfg.sqlite_txns} txns"):
            raw["sqlite"] = measure_sqlite(roots, cfg, console)
        with group("trees", f"5/7 tar x and rsync -a of a {human(cfg.tree_bytes)} tree"):
            raw["trees"] = measure_trees(roots, work, cfg, console)
        results["daemon_pids"] = targets.pids["fusedrive"]
        d = targets.daemons["fusedrive"]
        code = d.stop()
        if code != 0:
            raise RuntimeError(f"fusedrive daemon exited {code} at unmount:\n{d.log_tail()}")
        with group("block", "6/7 block volume: fio on ext4 over a loop device"):
            raw["block"] = measure_block(work, cfg, console)
        with group("memory", f"7/7 daemon memory writing {human(cfg.fio.rss_bytes)}"):
            before = loadavg()
            mem = fio_bench.measure_rss(work, cfg.fio, stack)
            raw["memory"] = {**mem, "loadavg_before": before, "loadavg_after": loadavg()}
        results["machine"]["loadavg_end"] = loadavg()
        left = mounts_under(work)
        if left:
            raise RuntimeError(f"still mounted under {work}: {left}")
    results["raw"] = raw
    results["seconds"] = time.perf_counter() - t_start
    results["group_seconds"] = spent
    results["rows"] = datapath_report.rows(raw)
    results["missed"] = [r["name"] for r in results["rows"] if r["met"] is False]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if markdown is not None:
        markdown.write_text(datapath_report.markdown(results, out))
    if plot is not None:
        datapath_report.plot(results, plot)
    datapath_report.print_summary(results, console)
    console.print(f"results: {out}" + "".join(f", {p}" for p in (markdown, plot) if p))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = command.parse(
        argv,
        prog="python -m benchmarks.datapath_bench",
        doc=__doc__ or "",
        default_out=QUICK_OUT if "--quick" in argv else DEFAULT_OUT,
        default_tmp=DEFAULT_TMP,
        quick_help="small sizes, one trial (under 2 minutes; results in benchmarks/results/quick/)",
        tmp_help="where stores, plain directories, images and mounts live: the disk under test",
    )
    cfg = QUICK if args.quick else Config()
    console = Console()

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every cleanup

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run(
            cfg,
            args.out,
            args.plot,
            args.out.with_name("DATAPATH.md"),
            args.tmp_dir,
            console,
            args.mode,
        )
    except (OSError, RuntimeError, subprocess.SubprocessError, loopdev.LoopError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: everything this run created was cleaned up")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
