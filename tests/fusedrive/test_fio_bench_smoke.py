"""Smoke test of the fio benchmark: every job on real mounts, tiny sizes, and it reports.

Real parts: fio, a fusedrive daemon and a memfs daemon serving real FUSE mounts. No
timing assertions (performance lives in ``benchmarks/``): only that the JSON has the
expected shape, the numbers are positive and consistent, and that nothing is left
mounted or running afterwards.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from benchmarks import fio_bench, memfs
from benchmarks.fio_bench import JOB_METRIC, TARGETS, TINY

pytestmark = pytest.mark.needs_fuse


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _our_daemon_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"fusedrive.fuse_adapter" in cmdline or b"benchmarks.memfs" in cmdline


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path, Path]:
    base = tmp_path_factory.mktemp("fio-bench")
    out, plot, tmp_root = base / "fio.json", base / "fio.png", base / "tmp"
    console = Console(file=io.StringIO(), width=120)
    fio_bench.run(TINY, out, plot, tmp_root, console, mode="tiny")
    return json.loads(out.read_text()), plot, tmp_root, base


def test_json_has_every_section_and_machine_info(bench: tuple[Any, ...]) -> None:
    results = bench[0]
    for key in ("config", "machine", "noise", "method", "jobs", "small_files", "daemon_memory"):
        assert key in results, key
    for key in ("ratios", "targets", "missed", "fusedrive_store", "daemon_pids"):
        assert key in results, key
    machine = results["machine"]
    for key in ("nproc", "cpu_model", "kernel", "python", "fio", "date"):
        assert machine[key], key
    assert machine["fio"].startswith("fio-")
    assert machine["caches_dropped"] is False  # TINY leaves the page cache alone
    assert len(machine["loadavg_start"]) == len(machine["loadavg_end"]) == 3


def test_every_job_ran_on_every_target(bench: tuple[Any, ...]) -> None:
    jobs = bench[0]["jobs"]
    assert set(jobs) == set(JOB_METRIC)
    for job, metric in JOB_METRIC.items():
        for t in TARGETS:
            entry = jobs[job][t]
            assert _positive(entry[metric]), (job, t)
            assert len(entry["trials"]) == TINY.trials
            # The daemon's CPU time is recorded for the FUSE targets only.
            assert ("daemon_cpu_s" in entry) == (t != "plain"), (job, t)


def test_fio_raw_numbers(bench: tuple[Any, ...]) -> None:
    jobs = bench[0]["jobs"]
    for t in TARGETS:
        write = jobs["seq_write"][t]["trials"][0]
        assert (write["direction"], write["io_bytes"]) == ("write", TINY.seq_bytes)
        read = jobs["seq_read"][t]["trials"][0]
        assert (read["direction"], read["io_bytes"]) == ("read", TINY.seq_bytes)
        for job, direction in (("rand_read", "read"), ("rand_write", "write")):
            r = jobs[job][t]["trials"][0]
            assert r["direction"] == direction
            assert r["io_bytes"] == 4096 * r["total_ios"] > 0
            assert "--direct=1" in r["fio_args"] and "--bs=4k" in r["fio_args"]
            assert _positive(r["clat_us"]["mean"]) and r["clat_us"]["p50"] > 0


def test_small_files_counted(bench: tuple[Any, ...]) -> None:
    jobs = bench[0]["jobs"]
    for op in ("create", "stat", "unlink"):
        for t in TARGETS:
            trial = jobs[op][t]["trials"][0]
            assert trial["ops"] == TINY.small_files
            assert trial["p50_us"] <= trial["p99_us"] <= trial["max_us"]


def test_daemon_memory(bench: tuple[Any, ...]) -> None:
    mem = bench[0]["daemon_memory"]
    assert mem["written_bytes"] == TINY.rss_bytes == mem["fio"]["io_bytes"]
    assert mem["samples"] >= 1 and mem["series"]
    assert _positive(mem["peak_anon_plus_shmem_mib"])
    # VmHWM is the peak of VmRSS, which is RssAnon + RssFile + RssShmem.
    assert mem["vm_hwm_mib"] >= mem["peak_sampled_mib"]["VmRSS"]
    for s in mem["series"]:
        assert s["VmRSS"] == pytest.approx(s["RssAnon"] + s["RssFile"] + s["RssShmem"], abs=1)


def test_targets_and_ratios(bench: tuple[Any, ...]) -> None:
    results = bench[0]
    targets = results["targets"]
    assert len(targets) == len(fio_bench.RATIO_TARGETS) + 1
    assert all(isinstance(t["pass"], bool) and _positive(t["measured"]) for t in targets)
    assert results["missed"] == [t["name"] for t in targets if not t["pass"]]
    for job in JOB_METRIC:
        assert all(_positive(v) for v in results["ratios"][job].values()), job


def test_plot_written_and_everything_cleaned_up(bench: tuple[Any, ...]) -> None:
    results, plot, tmp_root, base = bench
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not tmp_root.exists()
    assert fio_bench.mounts_under(base) == []
    pids = [*results["daemon_pids"]["fusedrive"], *results["daemon_pids"]["memfs"]]
    pids.append(results["daemon_memory"]["pid"])
    assert len(pids) >= 4  # memfs, fusedrive, fusedrive restarted for the cold read, rss
    assert not [p for p in pids if _our_daemon_alive(p)]


def test_small_files_job_on_fusedrive_and_memfs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fio_bench.create_volume(store, "v", 64 << 20)
    daemons: list[fio_bench.Daemon] = []
    try:
        daemons.append(fio_bench.start_fusedrive(store, "v", tmp_path / "fd", tmp_path / "fd.log"))
        daemons.append(fio_bench.start_memfs(tmp_path / "mem", tmp_path / "mem.log"))
        for d in daemons:
            cpu = functools.partial(fio_bench.cpu_seconds, d.pid)
            out = fio_bench.small_files(d.mountpoint, 50, settle=0.0, cpu=cpu)
            assert out["files"] == 50
            for op in ("create", "stat", "unlink"):
                assert out[op]["ops"] == 50 and _positive(out[op]["ops_per_s"]), (d.name, op)
                assert out[op]["daemon_cpu_s"] >= 0
            assert os.listdir(d.mountpoint) == []
    finally:
        codes = [d.stop() for d in daemons]
    assert codes == [0, 0]
    assert fio_bench.mounts_under(tmp_path) == []


def test_bad_out_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        fio_bench.main(["--quick", "--out", str(tmp_path / "results.txt")])
    assert exc.value.code == 2
    assert "--out must name a .json file" in capsys.readouterr().err


def test_memfs_bad_mountpoint_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert memfs.main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "is not a directory" in err and "Traceback" not in err
