"""Smoke test of the PostgreSQL benchmark: one tiny round on each target, and it reports.

Real parts: Debian's PostgreSQL (initdb, postgres, pgbench) on a real fusedrive FUSE
mount and on a plain directory. No timing assertions (performance lives in
``benchmarks/``): only that the JSON has the expected shape, every number is positive,
and nothing is left mounted, running or on disk afterwards.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from benchmarks import fio_bench, pg_bench
from benchmarks.pg_bench import TARGETS, TINY

pytestmark = pytest.mark.needs_fuse


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A directory the postgres user can reach (pytest's tmp_path is root's, 0700)."""
    root = Path(tempfile.mkdtemp(prefix="pg-bench-smoke-"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        if not fio_bench.mounts_under(root):
            shutil.rmtree(root, ignore_errors=True)


def test_tiny_run_reports_every_round_and_cleans_up(reachable_tmp: Path) -> None:
    tmp_path = reachable_tmp
    out, tmp_root = tmp_path / "pg.json", tmp_path / "tmp"
    pg_bench.run(TINY, out, tmp_root, Console(file=io.StringIO(), width=120), mode="tiny")
    results = json.loads(out.read_text())
    assert results["config"]["scale"] == TINY.scale
    machine = results["machine"]
    assert machine["postgres"].startswith("postgres (PostgreSQL)")
    assert len(machine["loadavg_start"]) == len(machine["loadavg_end"]) == 3
    rounds = results["rounds"]
    assert sorted(r["target"] for r in rounds) == sorted(TARGETS * TINY.rounds)
    for r in rounds:
        for key in ("initdb_s", "load_s", "tps"):
            assert _positive(r[key]), (r["target"], key)
        assert r["transactions"] > 0
        assert len(r["loadavg_after_run"]) == 3
    assert set(results["ratios"]) == {
        "tps_fusedrive_to_plain",
        "load_fusedrive_to_plain",
        "initdb_fusedrive_to_plain",
    }
    assert all(_positive(v) for v in results["ratios"].values())
    assert results["missed"] == [t["name"] for t in results["targets"] if not t["pass"]]
    # Nothing left: the work directory (and the daemon's mount under it) is gone.
    assert not tmp_root.exists()
    assert fio_bench.mounts_under(tmp_path) == []


def test_parse_tps_rejects_output_without_it() -> None:
    assert pg_bench.parse_tps("tps = 123.5 (without initial connection time)\n") == 123.5
    with pytest.raises(RuntimeError, match="no tps"):
        pg_bench.parse_tps("pgbench: error: connection failed\n")


def test_bad_out_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        pg_bench.main(["--out", str(tmp_path / "pg.txt")])
    assert exc.value.code == 2
    assert "--out must name a .json file" in capsys.readouterr().err
