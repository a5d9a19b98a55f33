"""Smoke test of meta_bench and handler_cost: real mounts, tiny sizes, and they report.

Real parts: a fusedrive daemon, a memfs daemon and a second fusedrive daemon run with
``--baseline`` pointing at this very checkout, serving real FUSE mounts; tar and rsync.
No timing assertions: only the JSON's shape, that every number is positive where it
must be, that the tree arrived whole on every target (the benchmark checks that and
raises), and that nothing is left mounted.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from benchmarks import meta_bench

pytestmark = pytest.mark.needs_fuse
REPO = Path(__file__).resolve().parents[2]


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    base = tmp_path_factory.mktemp("meta-bench")
    out, tmp_root = base / "meta.json", base / "tmp"
    console = Console(file=io.StringIO(), width=120)
    meta_bench.run(40, 1 << 20, 1, REPO, out, tmp_root, console, "tiny")
    return json.loads(out.read_text()), tmp_root


def test_every_target_reports_every_operation(bench: tuple[dict[str, Any], Path]) -> None:
    results, _ = bench
    med = results["summary"]["median"]
    assert set(med) == {"plain", "memfs", "fusedrive", "baseline"}
    for target, row in med.items():
        for op in (*meta_bench.OPS, *meta_bench.DIR_OPS):
            assert _positive(row[f"{op}_ops_per_s"]), (target, op)
            if target != "plain":  # a daemon's CPU is counted; it may round to 0 ticks
                assert row[f"{op}_daemon_cpu_us"] >= 0, (target, op)
        for step in meta_bench.TREE_STEPS:
            assert _positive(row[f"{step}_s"]), (target, step)
    ratios = results["summary"]["ratio_to_plain"]
    assert set(ratios) == {"memfs", "fusedrive", "baseline"}
    assert results["tree"]["files"] > 0 and results["tree"]["bytes"] > 0
    assert results["code"]["baseline"]["tree"] == str(REPO)
    assert len(results["machine"]["loadavg_end"]) == 3


def test_nothing_is_left_mounted(bench: tuple[dict[str, Any], Path]) -> None:
    _, tmp_root = bench
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    assert not [m for m in mounts if m.startswith(str(tmp_root))]


def test_make_tree_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert meta_bench.make_tree(a, 300_000) == meta_bench.make_tree(b, 300_000)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_handler_cost_reports_every_operation() -> None:
    script = REPO / "benchmarks" / "handler_cost.py"
    done = subprocess.run(
        [sys.executable, "-P", str(script), "--files", "30", "--repeat", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(done.stdout)
    assert result["fusedrive"] == str(REPO / "fusedrive")
    assert all(_positive(v) for v in result["best_us"]["requests_us"].values())
    for row in result["best_us"]["filesystem_us"].values():
        assert _positive(row["op_us"]) and row["commit_us"] >= 0
