"""Smoke test of ``make bench-quick``'s parts: csi_bench on tiny sizes, then the report.

Real parts: the plugin process, gRPC, FUSE mounts, loop devices, ext4, fio, and
btrfs where btrfs-progs is installed. No timing assertions (performance lives in
``benchmarks/``): only that the JSON and REPORT.md have the expected structure,
that every repetition is recorded, and that nothing is left mounted, attached or
running afterwards.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from benchmarks import csi_bench, report
from benchmarks.csi_bench import MODES, OPS, TINY
from csi_frontend import loopdev, mounts

pytestmark = [pytest.mark.needs_fuse, pytest.mark.needs_loop]


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    base = tmp_path_factory.mktemp("csi-bench")
    out, tmp_root = base / "csi.json", base / "tmp"
    console = Console(file=io.StringIO(), width=120)
    csi_bench.run(TINY, out, tmp_root, console, mode="tiny")
    return json.loads(out.read_text()), base, tmp_root


def test_json_has_machine_load_versions_and_every_section(bench: tuple[Any, ...]) -> None:
    results = bench[0]
    for key in ("config", "machine", "versions", "noise", "baselines", "total_seconds"):
        assert key in results, key
    for key in csi_bench.SECTIONS:
        assert _positive(results[key]["section_seconds"]), key
    machine = results["machine"]
    assert len(machine["loadavg_start"]) == len(machine["loadavg_end"]) == 3
    for key in ("nproc", "cpu_model", "kernel", "date"):
        assert machine[key], key
    assert results["versions"]["fio"].startswith("fio-")
    assert results["baselines"]["lvm-thin"]  # measured or why not


def test_every_repetition_of_every_system(bench: tuple[Any, ...]) -> None:
    results = bench[0]
    btrfs = results["baselines"]["btrfs"] == "measured"
    sizes = results["compare"]["sizes"]
    assert sorted(int(s) for s in sizes) == list(TINY.sizes)
    for size, entry in sizes.items():
        data = entry["data"]
        assert data["random_bytes"] + data["hole_bytes"] == data["logical_bytes"] == int(size)
        assert data["small_files"] == TINY.small_files
        for mode in MODES:
            systems = {"fusedrive", "hostpath"} | ({"btrfs"} if btrfs else set())
            systems |= {"dd"} if mode == "block" else set()
            got = {k for k, v in entry[mode].items() if isinstance(v, dict)}
            assert got == systems, (size, mode)
            for system in systems:
                ops = entry[mode][system]
                assert set(ops) == ({"clone"} if system == "dd" else set(OPS))
                for op, st in ops.items():
                    assert len(st["seconds"]) == st["samples"] == entry["reps"][system]
                    assert st["min_ms"] <= st["median_ms"] <= st["max_ms"], (system, op)
                    assert all(_positive(s) for s in st["seconds"])
            assert _positive(entry[mode]["fusedrive_stage_ms"])


def test_busy_lineage_scale_and_space(bench: tuple[Any, ...]) -> None:
    results = bench[0]
    busy = results["busy"]
    assert busy["snapshots"] == len(busy["samples"]) >= 1
    assert busy["latency"]["p50_ms"] <= busy["latency"]["p99_ms"]
    assert busy["fio"]["io_bytes"] > 0 and busy["daemon_pid_found"]
    lineage = results["lineage"]
    assert [int(d) for d in lineage["depths"]] == list(TINY.lineage_depths)
    for depth, e in lineage["depths"].items():
        assert e["snapshots"] == int(depth)
        assert len(e["read_mibps"]) == len(e["write_mibps"]) == TINY.lineage_reps
    scale = results["scale"]["per_count"]
    for op in ("CreateVolume", "CreateSnapshot", "DeleteSnapshot", "DeleteVolume"):
        assert set(scale[op]) == {str(n) for n in TINY.scale_counts}, op
    for op in ("ListVolumes", "ListSnapshots"):
        assert set(scale[op]) == {str(n) for n in TINY.scale_counts}, op
    steps = {s["step"]: s for s in results["space"]["steps"]}
    # The second copy of the same data is deduplicated; text-like data compresses.
    assert steps["dedup-b"]["stored_growth_bytes"] < TINY.space_bytes // 10
    assert 0 < steps["text"]["stored_growth_bytes"] < TINY.space_bytes
    floor = results["floor"]
    for part in ("csi_round_trip", "durable_commit", "flush_request"):
        assert floor[part]["samples"] == len(floor[part]["seconds"]) == TINY.floor_samples
        assert all(_positive(s) for s in floor[part]["seconds"]), part
        idle = floor["after_idle"][part]
        assert idle["samples"] == len(idle["seconds"]) == TINY.floor_samples, part
        assert all(_positive(s) for s in idle["seconds"]), part
    assert floor["after_idle"]["idle_seconds"] == TINY.floor_idle_seconds > 0
    # The same Probe from a C client (h2load; scripts/install-system-deps installs it).
    c_client = floor["csi_round_trip_c_client"]
    assert c_client.get("samples") == len(c_client["seconds"]) == TINY.floor_samples, c_client
    assert all(_positive(s) for s in c_client["seconds"])
    assert results["versions"]["h2load"].startswith("h2load nghttp2/")


def test_nothing_left_behind(bench: tuple[Any, ...]) -> None:
    _, base, tmp_root = bench
    assert not tmp_root.exists()
    prefix = str(base)
    assert [m.mountpoint for m in mounts.mount_table() if m.mountpoint.startswith(prefix)] == []
    assert [d.name for d in loopdev.list_devices() if d.backing_file.startswith(prefix)] == []


def test_report_headline_first_then_plots_then_method(bench: tuple[Any, ...]) -> None:
    results, base, _ = bench
    out = base / "report" / "REPORT.md"
    done = report.write_report(base / "no-other-results", base / "csi.json", out)
    text = out.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0].startswith("## Snapshot, restore and clone")
    assert headings.index("## Targets") < headings.index("## Plots") < headings.index("## Method")
    headline = text.split("## Snapshot, restore and clone", 1)[1].split("## Targets", 1)[0]
    rows = [line for line in headline.splitlines() if line.startswith(("| filesystem", "| block"))]
    assert len(rows) == len(MODES) * len(OPS) * len(TINY.sizes)
    assert results["machine"]["date"] in text
    assert "`fio.json` is missing" in text  # the report says what it lacks
    targets = done["targets"]
    assert targets and all(isinstance(t["pass"], bool) for t in targets)
    assert done["missed"] == [t["name"] for t in targets if not t["pass"]]
    assert any(t["name"] == "snapshot of a busy volume, p99" for t in targets)
    # What bounds one operation is shown, and caps every hostpath ratio it can.
    assert "## What bounds one operation" in text
    hostpath = [t for t in targets if "vs hostpath" in t["name"]]
    assert hostpath and all("no " in t["bound"] and " x" in t["bound"] for t in hostpath)
    bounds = text.split("## What bounds one operation", 1)[1].split("\n## ", 1)[0]
    assert "from a C HTTP/2 client" in bounds
    assert "after idle: median" in bounds and "ms of sleep" in bounds
    for plot in done["plots"]:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot.name})" in text


def test_bad_out_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        csi_bench.main(["--quick", "--out", str(tmp_path / "results.txt")])
    assert exc.value.code == 2
    assert "--out must name a .json file" in capsys.readouterr().err


def test_report_without_results_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.main(["--csi", str(tmp_path / "csi.json"), "--out", str(tmp_path / "R.md")]) == 1
    err = capsys.readouterr().err
    assert "run `make bench` first" in err and "Traceback" not in err
