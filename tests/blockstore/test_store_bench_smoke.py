"""Smoke test of the store benchmark: every section runs on a tiny size and reports.

No timing assertions (performance lives in ``benchmarks/``): only that the JSON has
the expected shape, the numbers are positive and the temporary stores are removed.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from benchmarks import store_bench
from benchmarks.store_report import LATENCY_OPS


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path, Path]:
    base = tmp_path_factory.mktemp("bench")
    out, plot, tmp_root = base / "store.json", base / "store.png", base / "tmp"
    console = Console(file=io.StringIO(), width=120)
    store_bench.run(store_bench.TINY, out, plot, tmp_root, console, mode="tiny")
    return json.loads(out.read_text()), out, plot, tmp_root


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_json_has_every_section_and_machine_info(bench: tuple[Any, ...]) -> None:
    results = bench[0]
    for key in (
        "config",
        "machine",
        "noise",
        "snapshot_clone_latency",
        "get_latency",
        "write_throughput",
        "churn",
        "targets",
        "missed",
    ):
        assert key in results, key
    machine = results["machine"]
    for key in ("nproc", "cpu_model", "kernel", "python", "date"):
        assert machine[key], key
    assert machine["work_dir_on_repo_disk"] in (True, False)


def test_latencies_are_positive(bench: tuple[Any, ...]) -> None:
    lat = bench[0]["snapshot_clone_latency"]
    for size in ("small", "large", "small_in_large_store"):
        for op in LATENCY_OPS:
            s = lat[size][op]
            assert s["samples"] == store_bench.TINY.latency_reps
            assert _positive(s["median_ms"]) and _positive(s["p90_ms"])
            assert s["min_ms"] <= s["median_ms"] <= s["max_ms"]
    assert all(_positive(lat["ratio_large_to_small_median"][op]) for op in LATENCY_OPS)


def test_get_latency_and_entries(bench: tuple[Any, ...]) -> None:
    get = bench[0]["get_latency"]
    deep = get[f"snapshots_{store_bench.TINY.get_rounds}"]
    for g in (get["snapshots_0"], deep):
        assert _positive(g["median_us"]) and _positive(g["loop_mean_us"])
        assert g["samples"] == store_bench.TINY.get_samples
    # Every round rewrote keys in a new layer, so the store holds more versions.
    assert deep["entries"] > get["snapshots_0"]["entries"] == store_bench.TINY.get_keys
    assert _positive(get["ratio_median"])


def test_throughput_beside_primitives(bench: tuple[Any, ...]) -> None:
    tp = bench[0]["write_throughput"]
    for kind in ("random", "text"):
        k = tp[kind]
        for name in ("hash", "zstd", "lmdb_put", "store", "store_pipelined"):
            assert _positive(k["mibps"][name]), (kind, name)
        assert k["slowest_primitive"] in ("hash", "zstd", "lmdb_put")
        assert _positive(k["store_to_slowest_primitive"])
    assert tp["random"]["compression_ratio"] < 1.05
    assert tp["text"]["compression_ratio"] > 2


def test_churn_and_targets(bench: tuple[Any, ...]) -> None:
    results = bench[0]
    churn = results["churn"]
    assert _positive(churn["before_mibps"]) and _positive(churn["after_mibps"])
    assert _positive(churn["ratio_after_before"]) and _positive(churn["ratio_after_late_before"])
    for probes in (churn["before_probes"], churn["after_probes"]):
        assert len(probes) == store_bench.TINY.churn_probes
        assert all(_positive(p["mibps"]) and _positive(p["file_pages"]) for p in probes)
    # The churn rounds wrote and freed data: the file holds pages not in use.
    assert churn["states"]["churned"]["free_pages"] > 0
    assert len(churn["rewrite_mibps_per_round"]) == store_bench.TINY.churn_rounds
    targets = results["targets"]
    assert len(targets) == 12
    assert all(isinstance(t["pass"], bool) and _positive(t["measured"]) for t in targets)
    assert results["missed"] == [t["name"] for t in targets if not t["pass"]]


def test_plot_written_and_temporary_stores_removed(bench: tuple[Any, ...]) -> None:
    _, _, plot, tmp_root = bench
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not tmp_root.exists()


def test_bad_out_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        store_bench.main(["--quick", "--out", str(tmp_path / "results.txt")])
    assert exc.value.code == 2
    assert "--out must name a .json file" in capsys.readouterr().err
