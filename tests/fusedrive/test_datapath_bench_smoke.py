"""Smoke test of issue 18's one-run benchmark: every row on real parts, tiny sizes.

Real parts: Debian's PostgreSQL, fio, SQLite, tar and rsync on a real fusedrive FUSE
mount and a plain directory, and ext4 on real loop devices over a fusedrive block
volume's image and a plain image. No timing assertions (performance lives in
``benchmarks/``): only that the JSON has every row with sane fields, the table and the
plot are written, and nothing is left mounted, attached or on disk afterwards.
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
from typing import Any

import pytest
from rich.console import Console

from benchmarks import datapath_bench, datapath_report, fio_bench
from benchmarks.datapath_bench import TINY
from csi_frontend import loopdev

pytestmark = [pytest.mark.needs_fuse, pytest.mark.needs_loop]


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench() -> Iterator[tuple[dict[str, Any], Path]]:
    # The postgres user must reach the work directory (pytest's tmp_path is 0700).
    base = Path(tempfile.mkdtemp(prefix="datapath-smoke-"))
    os.chmod(base, 0o755)
    try:
        out = base / "datapath.json"
        console = Console(file=io.StringIO(), width=120)
        datapath_bench.run(
            TINY, out, base / "datapath.png", base / "DATAPATH.md", base / "tmp", console, "tiny"
        )
        yield json.loads(out.read_text()), base
    finally:
        if not fio_bench.mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


def test_every_row_with_sane_fields(bench: tuple[Any, ...]) -> None:
    results = bench[0]
    rows = {r["id"]: r for r in results["rows"]}
    assert list(rows) == [r[0] for r in datapath_report.ROWS]
    for rid, r in rows.items():
        assert isinstance(r["met"], bool), rid
        assert _positive(r["fusedrive"]), rid
        if rid == "daemon_rss":
            assert r["plain"] is None and r["ratio"] is None
            assert r["anon_plus_shmem_mib"] <= r["fusedrive"]  # VmHWM counts both and more
            continue
        assert _positive(r["plain"]) and r["ratio"] == pytest.approx(r["fusedrive"] / r["plain"])
        for t in ("fusedrive", "plain"):
            assert len(r["trials"][t]) == len(r["trial_ratios"]) >= 1, rid
        want = r["ratio"] >= r["limit"] if r["better"] == "higher" else r["ratio"] <= r["limit"]
        assert r["met"] == want, rid
        if r["group"] == "block volume":
            assert _positive(r["fusedrive_to_plain_dir"]), rid
    assert results["missed"] == [r["name"] for r in results["rows"] if not r["met"]]


def test_machine_versions_and_every_repetition(bench: tuple[Any, ...]) -> None:
    results = bench[0]
    m = results["machine"]
    assert m["nproc"] and m["kernel"] and len(m["loadavg_start"]) == len(m["loadavg_end"]) == 3
    v = results["versions"]
    assert v["fio"].startswith("fio-") and "PostgreSQL" in v["postgres"] and v["sqlite"]
    raw = results["raw"]
    reps = [*raw["postgresql"], *raw["small_files"], *raw["sqlite"], *raw["trees"]["trials"]]
    reps += [r for job in fio_bench.FIO_JOBS for r in (*raw["fio"][job], *raw["block"][job])]
    reps.append(raw["memory"])
    for r in reps:
        assert len(r["loadavg_before"]) == len(r["loadavg_after"]) == 3
    # Both targets in every trial of every group, taking turns.
    assert [r["target"] for r in raw["sqlite"]] == ["plain", "fusedrive"] * 2
    for job in fio_bench.FIO_JOBS:
        assert {r["target"] for r in raw["block"][job]} == {"fusedrive", "plain"}
        seq = [r for r in raw["block"][job] if job.startswith("seq")]
        assert all(r["io_bytes"] == TINY.fio.seq_bytes for r in seq)
    tree = raw["trees"]["tree"]
    assert TINY.tree_bytes - 8 <= tree["bytes"] <= TINY.tree_bytes
    assert tree["files"] > 0 and raw["memory"]["written_bytes"] == TINY.fio.rss_bytes


def test_table_plot_and_cleanup(bench: tuple[Any, ...]) -> None:
    results, base = bench
    text = (base / "DATAPATH.md").read_text()
    for r in results["rows"]:
        assert f"| {r['name']} |" in text
    assert (base / "datapath.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (base / "tmp").exists()
    assert fio_bench.mounts_under(base) == []
    # No loop device left attached to an image of this run (matched by path: other
    # engineers attach their own meanwhile).
    assert [d.name for d in loopdev.list_devices() if d.backing_file.startswith(str(base))] == []
    pids = [*results["daemon_pids"], *results["raw"]["block"]["daemon_pids"]]
    pids.append(results["raw"]["memory"]["pid"])
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert b"fusedrive.fuse_adapter" not in cmd, pid


def test_make_tree_is_deterministic(tmp_path: Path) -> None:
    a = datapath_bench.make_tree(tmp_path / "a", 1 << 20)
    b = datapath_bench.make_tree(tmp_path / "b", 1 << 20)
    assert a == b and a["bytes"] == datapath_bench.tree_size(tmp_path / "a")[1]
    for dirpath, _, files in os.walk(tmp_path / "a"):
        for name in files:
            p = Path(dirpath) / name
            other = tmp_path / "b" / p.relative_to(tmp_path / "a")
            assert p.read_bytes() == other.read_bytes()


def test_bad_out_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        datapath_bench.main(["--quick", "--out", str(tmp_path / "datapath.txt")])
    assert exc.value.code == 2
    assert "--out must name a .json file" in capsys.readouterr().err
