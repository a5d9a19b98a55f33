"""Smoke test of the fsync benchmark: every job on a real mount, tiny sizes, and it reports.

Real parts: a fusedrive daemon serving a real FUSE mount, its store's LMDB counter, the
plain directory, SQLite. No timing assertions (performance lives in ``benchmarks/``):
only that the JSON has every job on every target, the numbers are positive, the commit
counts add up, and nothing is left mounted afterwards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import fsync_bench
from benchmarks.fio_bench import mounts_under

pytestmark = pytest.mark.needs_fuse


def test_every_job_runs_on_every_target_and_reports(tmp_path: Path) -> None:
    out, tmp_root = tmp_path / "fsync.json", tmp_path / "tmp"
    fsync_bench.run(fsync_bench.TINY, {"fusedrive": fsync_bench.REPO}, out, tmp_root)
    results = json.loads(out.read_text())
    assert set(results["jobs"]) == set(fsync_bench.JOBS)
    for job, per in results["jobs"].items():
        assert set(per) == {"plain", "fusedrive"}, job
        for target, trials in per.items():
            assert len(trials) == fsync_bench.TINY.rounds, (job, target)
            value = trials[0][fsync_bench.metric(job)]
            assert math.isfinite(value) and value > 0, (job, target)
        summary = results["summary"][job]
        assert summary["to_plain"]["plain"] == 1.0
    fsyncs = results["jobs"]["wal"]["fusedrive"][0]
    assert fsyncs["ops"] > 0 and fsyncs["commits"] >= 1  # each fsync of a change commits
    empty = results["jobs"]["fsync_empty"]["fusedrive"][0]
    assert empty["commits"] <= 2  # fsyncs with nothing buffered commit nothing (setup aside)
    assert not mounts_under(tmp_root)


def test_code_must_name_a_fusedrive_tree(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        fsync_bench.main(["--code", f"x={tmp_path}", "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit):
        fsync_bench.main(["--code", "plain=.", "--out", str(tmp_path / "o.json")])
