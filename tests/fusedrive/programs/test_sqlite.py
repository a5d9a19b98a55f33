"""SQLite on fusedrive: WAL and rollback journals, checked by SQLite itself.

A deterministic workload of many small transactions (inserts, updates, deletes of
rows up to a few pages long, the odd checkpoint and VACUUM) runs with
``synchronous=FULL`` through Python's sqlite3 module on each site. Then, after a
remount, the ``sqlite3`` program must find the database sound (``PRAGMA
integrity_check``) and its ``.dump`` must equal the referee's.

The crash test runs the writer as its own process and SIGKILLs the FUSE daemon (on
the referee: the writer) once it has reported a hundred commits: after a remount
the database is sound, and holds every transaction the writer saw committed, in
order, and nothing half-done. The writer uses ``synchronous=EXTRA``: with FULL, a
rollback journal's unlink (the commit point) is not followed by a directory fsync,
so SQLite itself allows the last transaction to roll back after a power loss, which
a SIGKILLed daemon is to its mount.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from referee import Site, run

pytestmark = pytest.mark.needs_fuse

JOURNALS = ["wal", "delete", "truncate"]
TRANSACTIONS = 150


def workload(db: Path, journal: str, transactions: int = TRANSACTIONS, seed: int = 7) -> None:
    rng = random.Random(seed)
    con = sqlite3.connect(db, isolation_level=None)
    try:
        assert con.execute(f"PRAGMA journal_mode={journal}").fetchone()[0] == journal
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA page_size=4096")
        con.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB NOT NULL, n INTEGER)")
        con.execute("CREATE INDEX kv_n ON kv (n)")
        keys: list[int] = []
        for t in range(transactions):
            con.execute("BEGIN")
            for _ in range(rng.randrange(1, 8)):
                op = rng.random()
                if op < 0.55 or not keys:
                    k = rng.randrange(1 << 40)
                    blob = rng.randbytes(rng.choice([10, 200, 3000, 9000]))
                    con.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (k, blob, t))
                    keys.append(k)
                elif op < 0.85:
                    k = rng.choice(keys)
                    con.execute(
                        "UPDATE kv SET v = ?, n = n + 1 WHERE k = ?", (rng.randbytes(50), k)
                    )
                else:
                    k = keys.pop(rng.randrange(len(keys)))
                    con.execute("DELETE FROM kv WHERE k = ?", (k,))
            con.execute("COMMIT")
            if journal == "wal" and t % 50 == 49:
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if t == transactions // 2:
                con.execute("VACUUM")
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()


def sqlite_cli(db: Path, *commands: str) -> str:
    return run(["sqlite3", "-bail", db, *commands]).stdout


@pytest.mark.parametrize("journal", JOURNALS)
def test_sqlite_transactions_match_the_referee(journal: str, sites: tuple[Site, Site]) -> None:
    dumps = []
    for site in sites:
        db = site.root / "t.db"
        workload(db, journal)
        site.cycle()
        assert sqlite_cli(db, "PRAGMA integrity_check").strip() == "ok"
        dumps.append(sqlite_cli(db, ".dump"))
    assert dumps[0].count("INSERT INTO") > 100
    assert dumps[0] == dumps[1], "the database's contents differ from the referee's"


WRITER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA journal_mode=" + sys.argv[2])
con.execute("PRAGMA synchronous=EXTRA")
con.execute("CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, body BLOB)")
con.execute("CREATE TABLE IF NOT EXISTS total (id INTEGER PRIMARY KEY, n INTEGER)")
con.execute("INSERT OR IGNORE INTO total VALUES (1, 0)")
for seq in range(1, 1_000_000):
    con.execute("BEGIN")
    con.execute("INSERT INTO log VALUES (?, randomblob(?))", (seq, 100 + seq % 5000))
    con.execute("UPDATE total SET n = n + 1 WHERE id = 1")
    con.execute("COMMIT")
    print(seq, flush=True)
"""


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_sqlite_keeps_committed_transactions_across_a_crash(journal: str, site: Site) -> None:
    db = site.root / "crash.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, db, journal],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    acknowledged = 0
    try:
        assert writer.stdout is not None
        deadline = time.monotonic() + 120
        while acknowledged < 100 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            assert line, "the writer stopped"
            acknowledged = int(line)
        if site.kill_daemon is not None:
            site.kill_daemon()
    finally:
        writer.kill()
        rest, _ = writer.communicate()
    acknowledged = max([acknowledged, *(int(x) for x in rest.split() if x.isdigit())])
    assert acknowledged >= 100
    if site.mount is not None:
        site.mount()
    assert sqlite_cli(db, "PRAGMA integrity_check").strip() == "ok"
    got = sqlite_cli(db, "SELECT count(*), coalesce(max(seq), 0) FROM log", "SELECT n FROM total")
    count, top, total = map(int, got.replace("|", "\n").split())
    assert count == top == total, f"log rows {count}, last seq {top}, total {total}: half-done"
    assert top >= acknowledged, f"the writer saw {acknowledged} commits, the log keeps {top}"
    assert top <= acknowledged + 1
