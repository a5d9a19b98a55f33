"""The PostgreSQL benchmark: pgbench on a fusedrive volume and on a plain directory.

Owns issue 18's PostgreSQL rows. In one run, on the same disk (a work directory under
``--tmp-dir``, removed afterwards), each round builds a fresh cluster on each target,
the targets taking turns (the order alternates between rounds) so that a burst of load
from elsewhere hits both rather than one:

- ``fusedrive``: a volume served by ``python -m fusedrive.fuse_adapter`` (its store, an
  LMDB file, lives in the work directory), mounted once for the whole run;
- ``plain``: a directory of the work directory (the disk itself, through ext4).

Each round on each target times ``initdb``, then ``pgbench -i -s SCALE`` (load, index,
vacuum: the "load time"), then runs ``pgbench -c CLIENTS -j CLIENTS -T SECONDS`` and
reads its TPS; then the server is stopped and the cluster removed. The server runs
with ``fsync=on`` and ``synchronous_commit=on`` as the ``postgres`` user, a direct
child of this process (``Popen(user=...)``), listening only on a unix socket in a
private directory outside the data directory; it is stopped by PID (SIGINT, then
SIGQUIT, then SIGKILL), as tests/fusedrive/programs/test_postgres.py does.

Results: every repetition with the load average after it, the medians, and the ratios
fusedrive / plain (TPS, higher is better) and fusedrive / plain (load seconds, lower
is better), against issue 18's goals (TPS >= 0.6 x plain, load <= 2 x plain). A
missed goal is a measurement, not an error: the exit code is 0 and the misses listed.

The work directory and its parents must be reachable by the ``postgres`` user (the
default, ``.bench-tmp`` in the repository, is; pytest's ``tmp_path`` is not).

Invariants: every server is stopped and every daemon reaped and unmounted, even on
failure; the work directory is removed only when nothing is mounted under it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import command, machine
from .fio_bench import Daemon, create_volume, mounts_under, start_fusedrive

log = logging.getLogger(__name__)

GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "pg.json"
DEFAULT_TMP = REPO / ".bench-tmp"
TARGETS = ("fusedrive", "plain")
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
STEP_TIMEOUT = 1800.0
TPS_GOAL = 0.6  # fusedrive TPS / plain TPS >= this
LOAD_GOAL = 2.0  # fusedrive load seconds / plain load seconds <= this
NOISE_NOTE = (
    "The machine is shared with other engineers' test runs (2 cores), so absolute "
    "numbers may be noisy; the load average is recorded after every step. Prefer the "
    "ratios: both targets run in every round, taking turns."
)


@dataclass(frozen=True)
class Config:
    """Sizes of one run (the defaults are issue 18's)."""

    scale: int = 10
    clients: int = 4
    seconds: int = 30
    rounds: int = 3
    volume_bytes: int = 8 * GiB


QUICK = Config(rounds=2, seconds=15)
# For the smoke test: every code path in seconds, no meaningful numbers.
TINY = Config(scale=1, clients=2, seconds=2, rounds=1, volume_bytes=1 * GiB)


def pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian's layout)."""
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()),
        key=lambda p: int(p.parent.name),
    )
    if not versions:
        raise OSError("pg_bench needs PostgreSQL (Debian package postgresql; make setup)")
    return versions[-1]


def _run(cmd: list[str], timeout: float = STEP_TIMEOUT) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc.stdout


class Server:
    """One cluster's server, a child of this process, stopped by PID."""

    def __init__(self, bindir: Path, pgdata: Path, rundir: Path) -> None:
        self.bin = bindir
        self.pgdata = pgdata
        self.rundir = rundir
        self.log = rundir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def conn(self) -> list[str]:
        return ["-h", str(self.rundir), "-p", "5432", "-U", "postgres"]

    def initdb(self) -> None:
        opts = "-U postgres --auth=trust --no-locale -E UTF8 --no-instructions"
        cmd = ["runuser", "-u", "postgres", "--", str(self.bin / "initdb"), "-D", str(self.pgdata)]
        _run([*cmd, *opts.split()])

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *(str(self.bin / "postgres"), "-D", str(self.pgdata), "-k", str(self.rundir)),
                    *("-p", "5432", "-c", "listen_addresses="),
                    *("-c", "fsync=on", "-c", "synchronous_commit=on"),
                ],
                user="postgres",
                group="postgres",
                extra_groups=[],
                cwd=self.rundir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), *self.conn()], capture_output=True
            )
            if ready.returncode == 0:
                return
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"postgres exited {code}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{self.tail()}")
            time.sleep(0.2)

    def client(self, prog: str, *args: str) -> str:
        return _run([str(self.bin / prog), *self.conn(), *args])

    def stop(self) -> int | None:
        """SIGINT (fast shutdown), then SIGQUIT (immediate), then SIGKILL; by PID."""
        if self.proc is None:
            return None
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                return self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def parse_tps(out: str) -> float:
    m = re.search(r"^tps = ([0-9.]+)", out, re.MULTILINE)
    if not m:
        raise RuntimeError(f"no tps in pgbench's output:\n{out[-2000:]}")
    return float(m.group(1))


def parse_processed(out: str) -> int:
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    if not m:
        raise RuntimeError(f"no transaction count in pgbench's output:\n{out[-2000:]}")
    return int(m.group(1))


def one_round(target: str, home: Path, cfg: Config, bindir: Path) -> dict[str, Any]:
    """A fresh cluster under ``home``: initdb, load, pgbench; every number of it."""
    rundir = Path(tempfile.mkdtemp(prefix="pg-bench-run-"))
    shutil.chown(rundir, "postgres", "postgres")
    pgdata = home / "data"
    server = Server(bindir, pgdata, rundir)
    out: dict[str, Any] = {"target": target}
    try:
        t0 = time.perf_counter()
        server.initdb()
        out["initdb_s"] = time.perf_counter() - t0
        server.start()
        t0 = time.perf_counter()
        server.client("pgbench", "-i", "-s", str(cfg.scale), "-q", "postgres")
        out["load_s"] = time.perf_counter() - t0
        out["loadavg_after_load"] = list(os.getloadavg())
        c = str(cfg.clients)
        bench = server.client("pgbench", "-n", "-c", c, "-j", c, "-T", str(cfg.seconds), "postgres")
        out["tps"] = parse_tps(bench)
        out["transactions"] = parse_processed(bench)
        out["loadavg_after_run"] = list(os.getloadavg())
        code = server.stop()
        if code != 0:
            raise RuntimeError(f"postgres exited {code} at shutdown:\n{server.tail()}")
    finally:
        server.stop()
        shutil.rmtree(rundir, ignore_errors=True)
    shutil.rmtree(pgdata)
    return out


def machine_info(work: Path, bindir: Path) -> dict[str, Any]:
    return machine.describe(work, postgres=_run([str(bindir / "postgres"), "--version"]).strip())


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for t in TARGETS:
        mine = [r for r in rounds if r["target"] == t]
        per[t] = {k: statistics.median(r[k] for r in mine) for k in ("tps", "load_s", "initdb_s")}
    f, p = per["fusedrive"], per["plain"]
    ratios = {
        "tps_fusedrive_to_plain": f["tps"] / p["tps"],
        "load_fusedrive_to_plain": f["load_s"] / p["load_s"],
        "initdb_fusedrive_to_plain": f["initdb_s"] / p["initdb_s"],
    }
    targets = [
        {
            "name": "pgbench TPS vs plain dir",
            "measured": ratios["tps_fusedrive_to_plain"],
            "comparison": ">=",
            "limit": TPS_GOAL,
            "pass": ratios["tps_fusedrive_to_plain"] >= TPS_GOAL,
        },
        {
            "name": "pgbench -i load time vs plain dir",
            "measured": ratios["load_fusedrive_to_plain"],
            "comparison": "<=",
            "limit": LOAD_GOAL,
            "pass": ratios["load_fusedrive_to_plain"] <= LOAD_GOAL,
        },
    ]
    return {"medians": per, "ratios": ratios, "targets": targets}


@contextlib.contextmanager
def work_directory(root: Path, prefix: str = "pg-bench-") -> Iterator[Path]:
    """A fresh directory under ``root`` the postgres user can reach, removed afterwards
    unless something is still mounted under it."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    os.chmod(work, 0o755)
    try:
        yield work
    finally:
        left = mounts_under(work)
        if left:
            log.error("event=mounts_left paths=%s; not removing %s", left, work)
        else:
            shutil.rmtree(work, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    root.rmdir()


def check_machine() -> Path:
    if os.geteuid() != 0:
        raise OSError("pg_bench needs root (FUSE mounts with allow_other, runuser)")
    for tool in ("fusermount3", "runuser"):
        if shutil.which(tool) is None:
            raise OSError(f"pg_bench needs {tool} on PATH")
    if not os.path.exists("/dev/fuse"):
        raise OSError("pg_bench needs /dev/fuse")
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise OSError("pg_bench needs the postgres user (Debian package postgresql)") from exc
    return pg_bin()


def run(
    cfg: Config,
    out: Path,
    tmp_root: Path = DEFAULT_TMP,
    console: Console | None = None,
    mode: str = "full",
) -> dict[str, Any]:
    """Every round on both targets; writes the JSON and returns the results."""
    console = console or Console()
    bindir = check_machine()
    with work_directory(tmp_root) as work, contextlib.ExitStack() as stack:
        results: dict[str, Any] = {
            "benchmark": "fusedrive pg_bench",
            "mode": mode,
            "config": asdict(cfg),
            "machine": machine_info(work, bindir),
            "noise": NOISE_NOTE,
            "method": (
                "each round: a fresh cluster per target (initdb, pgbench -i -s scale -q, "
                "pgbench -n -c clients -j clients -T seconds), fsync=on, "
                "synchronous_commit=on; targets alternate their order between rounds; "
                "medians over rounds"
            ),
        }
        store = work / "store"
        create_volume(store, "pg", cfg.volume_bytes)
        daemon: Daemon = start_fusedrive(store, "pg", work / "mnt-fusedrive", work / "fd.log")
        stack.callback(daemon.stop)
        homes = {"fusedrive": daemon.mountpoint / "pg", "plain": work / "plain"}
        for home in homes.values():
            home.mkdir()
            shutil.chown(home, "postgres", "postgres")
        rounds: list[dict[str, Any]] = []
        t_start = time.perf_counter()
        for i in range(cfg.rounds):
            order = TARGETS if i % 2 == 0 else TARGETS[::-1]
            for t in order:
                console.print(f"  round {i + 1}/{cfg.rounds} on {t}")
                r = one_round(t, homes[t], cfg, bindir)
                r["round"] = i
                rounds.append(r)
                console.print(
                    f"    load {r['load_s']:.2f} s, {r['tps']:.0f} TPS, "
                    f"load avg {r['loadavg_after_run'][0]:.1f}"
                )
        results["rounds"] = rounds
        results["seconds"] = time.perf_counter() - t_start
        results["daemon_pid"] = daemon.pid
        code = daemon.stop()
        if code != 0:
            raise RuntimeError(f"fusedrive daemon exited {code} at unmount:\n{daemon.log_tail()}")
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    results.update(summarize(results["rounds"]))
    results["missed"] = [t["name"] for t in results["targets"] if not t["pass"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results, console)
    console.print(f"results: {out}")
    return results


def print_summary(results: dict[str, Any], console: Console) -> None:
    table = Table(title="pgbench: fusedrive vs plain directory (same run, medians)")
    for col in ("", "fusedrive", "plain", "fusedrive / plain", "goal"):
        table.add_column(col, justify="right")
    med, r = results["medians"], results["ratios"]
    goals = {"tps": f">= {TPS_GOAL:g}", "load_s": f"<= {LOAD_GOAL:g}", "initdb_s": ""}
    keys = {"tps": "tps", "load_s": "load", "initdb_s": "initdb"}
    for k, label in (("tps", "TPS"), ("load_s", "load seconds"), ("initdb_s", "initdb seconds")):
        table.add_row(
            label,
            f"{med['fusedrive'][k]:,.2f}",
            f"{med['plain'][k]:,.2f}",
            f"{r[f'{keys[k]}_fusedrive_to_plain']:.2f}",
            goals[k],
        )
    console.print(table)
    m = results["machine"]
    console.print(f"load average start {m['loadavg_start']}, end {m['loadavg_end']}")
    if results["missed"]:
        console.print("[red]missed:[/] " + "; ".join(results["missed"]))


def main(argv: list[str] | None = None) -> int:
    args = command.parse(
        argv,
        prog="python -m benchmarks.pg_bench",
        doc=__doc__ or "",
        default_out=DEFAULT_OUT,
        default_tmp=DEFAULT_TMP,
        quick_help="two rounds of 15 s",
        tmp_help=(
            "where the store, the plain directory and the mount point live; "
            "must be on the disk under test"
        ),
    )
    cfg = QUICK if args.quick else Config()
    console = Console()
    try:
        run(cfg, args.out, args.tmp_dir, console, mode=args.mode)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
