"""PostgreSQL on a fusedrive mount: pgbench, amcheck, checksums, and a crash of the daemon.

The cluster's data directory (``initdb --data-checksums``) lives on the site; the
server listens only on a unix socket in a private directory outside it, and logs
there too, so its log can be read after the mount dies. The server runs as the
``postgres`` user as a direct child of the test (``Popen(user=...)``), so it is
stopped by PID whatever happens: SIGINT (fast shutdown), SIGQUIT (immediate), then
SIGKILL.

The same scenario runs on the plain-directory referee, where the crash is an
immediate stop of the server; on fusedrive the FUSE daemon is SIGKILLed first, by
its PID, in the middle of a pgbench run. Either way, after recovery:
``pg_amcheck`` finds nothing, every page checksum is right (``pg_checksums``),
``pgbench_accounts`` has scale * 100000 rows, the balances of accounts, tellers
and branches each add up to the sum of ``pgbench_history.delta``, and every
transaction pgbench saw committed is in ``pgbench_history``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from referee import Site, run

pytestmark = pytest.mark.needs_fuse

SCALE = 2
CLIENTS = 2
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


def pg_bin() -> Path:
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()),
        key=lambda p: int(p.parent.name),
    )
    assert versions, "PostgreSQL is not installed (scripts/install-system-deps installs it)"
    return versions[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One PostgreSQL cluster; the server is this process's child, found by PID."""

    def __init__(self, pgdata: Path, rundir: Path) -> None:
        self.bin = pg_bin()
        self.pgdata = pgdata
        self.rundir = rundir
        self.port = free_port()
        self.log = rundir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def as_postgres(self, *args: str | Path, timeout: float = 300.0) -> str:
        cmd = ["runuser", "-u", "postgres", "--", *args]
        return run(cmd, cwd=self.rundir, timeout=timeout).stdout

    def client(self, prog: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        conn = ["-h", str(self.rundir), "-p", str(self.port), "-U", "postgres"]
        return run([self.bin / prog, *conn, *args], check=check)

    def initdb(self) -> None:
        opts = "-U postgres --auth=trust --data-checksums --no-locale -E UTF8 --no-instructions"
        self.as_postgres(self.bin / "initdb", "-D", self.pgdata, *opts.split())

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *(self.bin / "postgres", "-D", self.pgdata, "-k", self.rundir),
                    *("-p", str(self.port), "-c", "listen_addresses="),
                    *["-c", "fsync=on", "-c", "synchronous_commit=on"],
                    *["-c", "checkpoint_timeout=30s", "-c", "max_wal_size=64MB"],
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
            ready = run(
                [
                    self.bin / "pg_isready",
                    "-h",
                    self.rundir,
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                ],
                check=False,
            )
            if ready.returncode == 0:
                return
            code = self.proc.poll()
            assert code is None, f"postgres exited {code}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"postgres did not start:\n{self.tail()}"
            time.sleep(0.3)

    def stop(self, mode: str = "fast") -> int | None:
        """Stop the server by PID: "fast" (SIGINT) or "immediate" (SIGQUIT); SIGKILL last."""
        if self.proc is None:
            return None
        sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(STOP_TIMEOUT)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def sql(self, query: str) -> str:
        opts = ["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", "postgres"]
        return self.client("psql", *opts, "-c", query).stdout.strip()

    def amcheck(self) -> None:
        p = self.client("pg_amcheck", "-d", "postgres", "--heapallindexed", check=False)
        assert p.returncode == 0 and not p.stdout.strip(), (
            f"pg_amcheck exited {p.returncode}:\n{p.stdout[-4000:]}{p.stderr[-2000:]}"
        )

    def checksums(self) -> None:
        """Every page of the stopped cluster has the right checksum."""
        out = self.as_postgres(self.bin / "pg_checksums", "--check", "-D", self.pgdata)
        assert "Bad checksums:  0" in out, out


@pytest.fixture
def postgres(site: Site) -> Iterator[Callable[[Path], Cluster]]:
    """Makes clusters; stops every server they started, by PID, whatever happens
    (and before ``site`` goes away: a server's working directory is on it)."""
    clusters: list[Cluster] = []
    rundirs: list[Path] = []

    def make(pgdata: Path) -> Cluster:
        rundir = Path(tempfile.mkdtemp(prefix="fusedrive-pg-"))
        rundirs.append(rundir)
        shutil.chown(rundir, "postgres", "postgres")
        c = Cluster(pgdata, rundir)
        clusters.append(c)
        return c

    try:
        yield make
    finally:
        for c in clusters:
            c.stop("immediate")
        for d in rundirs:
            shutil.rmtree(d, ignore_errors=True)


def processed(pgbench_output: str) -> int:
    m = re.search(r"number of transactions actually processed: (\d+)", pgbench_output)
    assert m, f"no transaction count in pgbench's output:\n{pgbench_output[-3000:]}"
    return int(m.group(1))


def check_bank(c: Cluster, *, committed_at_least: int) -> int:
    """pgbench's tables are whole and consistent; returns the history's row count."""
    counts = c.sql(
        "SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_tellers),"
        " (SELECT count(*) FROM pgbench_branches), (SELECT count(*) FROM pgbench_history)"
    ).split("|")
    accounts, tellers, branches, history = map(int, counts)
    assert (accounts, tellers, branches) == (SCALE * 100000, SCALE * 10, SCALE)
    sums = c.sql(
        "SELECT (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
        " (SELECT sum(abalance) FROM pgbench_accounts),"
        " (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches)"
    ).split("|")
    assert len(set(sums)) == 1, f"history, accounts, tellers, branches balances: {sums}"
    assert history >= committed_at_least, (
        f"pgbench saw {committed_at_least} transactions committed, the history has {history}"
    )
    return history


def wait_for_history(c: Cluster, rows: int, bench: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while int(c.sql("SELECT count(*) FROM pgbench_history")) < rows:
        assert bench.poll() is None, f"pgbench ended early:\n{bench.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "pgbench made no progress"
        time.sleep(0.2)


def test_pgbench_recovers_from_a_crash(site: Site, postgres: Callable[[Path], Cluster]) -> None:
    home = site.root / "pg"
    home.mkdir()
    shutil.chown(home, "postgres", "postgres")
    c = postgres(home / "data")
    c.initdb()
    c.start()
    c.sql("CREATE EXTENSION amcheck")
    c.client("pgbench", "-i", "-s", str(SCALE), "-q", "postgres")
    # -n: no vacuum, and above all no truncation of pgbench_history, before a run
    out = c.client("pgbench", "-n", "-c", str(CLIENTS), "-t", "200", "postgres").stdout
    assert processed(out) == CLIENTS * 200
    history = check_bank(c, committed_at_least=CLIENTS * 200)
    c.amcheck()

    # A crash in the middle of a run: on fusedrive the daemon dies first.
    bench = subprocess.Popen(
        [
            *(c.bin / "pgbench", "-h", c.rundir, "-p", str(c.port), "-U", "postgres"),
            *("-n", "-c", str(CLIENTS), "-T", "300", "postgres"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_history(c, history + 300, bench)
        if site.kill_daemon is not None:
            site.kill_daemon()
        c.stop("immediate")
        out, _ = bench.communicate(timeout=STOP_TIMEOUT)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    committed = processed(out)
    assert committed > 0, out[-3000:]
    if site.mount is not None:
        site.mount()

    c.start()
    assert "automatic recovery in progress" in c.tail(200), c.tail()  # it did crash
    check_bank(c, committed_at_least=history + committed)
    c.amcheck()
    assert c.stop("fast") == 0, c.tail()
    c.checksums()
    site.cycle()
    c.checksums()
    assert os.stat(home / "data").st_mode & 0o777 == 0o700
