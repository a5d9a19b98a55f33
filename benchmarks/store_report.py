"""Targets, summary table and plot of the store benchmark (``store_bench``).

Owns the targets of issue "blockstore", section 4, and how a results dictionary is
judged and shown. It reads the results only: nothing here measures anything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
LATENCY_LIMIT_MS = 15.0
SIZE_RATIO_LIMIT = 1.5
GET_RATIO_LIMIT = 1.5
THROUGHPUT_FRACTION = 0.5
LATENCY_OPS = ("snapshot", "clone_from_snapshot", "clone_from_volume")


def human(nbytes: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= size:
            return f"{nbytes / size:g} {unit}"
    return f"{nbytes} B"


def target(name: str, measured: float, limit: float, comparison: str, unit: str) -> dict[str, Any]:
    """One pass/miss row of a report: ``measured`` against ``limit`` by ``comparison``."""
    ok = measured <= limit if comparison == "<=" else measured >= limit
    return {
        "name": name,
        "measured": measured,
        "limit": limit,
        "comparison": comparison,
        "unit": unit,
        "pass": ok,
    }


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    lat = results["snapshot_clone_latency"]
    for size in ("small", "large"):
        for op in LATENCY_OPS:
            targets.append(
                target(
                    f"{op} median, {human(lat[size]['written_bytes'])} written",
                    lat[size][op]["median_ms"],
                    LATENCY_LIMIT_MS,
                    "<=",
                    "ms",
                )
            )
    for op in LATENCY_OPS:
        targets.append(
            target(
                f"{op} median ratio large/small",
                lat["ratio_large_to_small_median"][op],
                SIZE_RATIO_LIMIT,
                "<=",
                "x",
            )
        )
    get = results["get_latency"]
    targets.append(
        target(
            f"get median ratio {get['snapshot_count']}/0 snapshots",
            get["ratio_median"],
            GET_RATIO_LIMIT,
            "<=",
            "x",
        )
    )
    for kind in ("random", "text"):
        tp = results["write_throughput"][kind]
        targets.append(
            target(
                f"store write throughput / slowest primitive ({tp['slowest_primitive']}), {kind}",
                tp["store_to_slowest_primitive"],
                THROUGHPUT_FRACTION,
                ">=",
                "x",
            )
        )
    return targets


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    names = ["hash", "zstd", "lmdb_put", "store", "store_pipelined"]
    width = 0.4
    for j, kind in enumerate(("random", "text")):
        vals = [results["write_throughput"][kind]["mibps"][n] for n in names]
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        ax.bar(xs, vals, width, label=kind)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("MiB/s (raw data)")
    ax.set_title("write throughput vs primitives")
    ax.legend()

    ax = axes[0][1]
    lat = results["snapshot_clone_latency"]
    sizes = [(size, human(lat[size]["written_bytes"])) for size in ("small", "large")]
    width = 0.35
    for j, (size, label) in enumerate(sizes):
        med = [lat[size][op]["median_ms"] for op in LATENCY_OPS]
        p90 = [lat[size][op]["p90_ms"] - m for op, m in zip(LATENCY_OPS, med, strict=True)]
        xs = [i + (j - 0.5) * width for i in range(len(LATENCY_OPS))]
        ax.bar(xs, med, width, yerr=[[0] * len(med), p90], capsize=4, label=label)
    ax.axhline(LATENCY_LIMIT_MS, color="red", linestyle="--", label="target")
    ax.set_xticks(range(len(LATENCY_OPS)), LATENCY_OPS)
    # Log scale: the bars are some 40 times below the target line, which would
    # otherwise flatten them to slivers.
    ax.set_yscale("log")
    lowest = min(lat[size][op]["median_ms"] for size in ("small", "large") for op in LATENCY_OPS)
    ax.set_ylim(bottom=lowest / 10)
    ax.set_ylabel("ms (median, bar to p90; log scale)")
    ax.set_title("snapshot and clone latency")
    ax.legend()

    ax = axes[1][0]
    get = results["get_latency"]
    deep = f"snapshots_{get['snapshot_count']}"
    labels = ["0 snapshots", f"{get['snapshot_count']} snapshots"]
    med = [get["snapshots_0"]["median_us"], get[deep]["median_us"]]
    p90 = [get["snapshots_0"]["p90_us"] - med[0], get[deep]["p90_us"] - med[1]]
    ax.bar(labels, med, yerr=[[0, 0], p90], capsize=4)
    ax.set_ylabel("µs per get (median, bar to p90)")
    ax.set_title(f"View.get, {get['keys']} keys")

    ax = axes[1][1]
    churn = results["churn"]
    before, after = churn["before_probes"], churn["after_probes"]
    probe = human(churn["probe_bytes"])
    ax.bar(range(len(before)), [p["mibps"] for p in before], label="before churn")
    ax.bar(
        range(len(before), len(before) + len(after)),
        [p["mibps"] for p in after],
        label="after churn",
    )
    ax.set_xlabel(f"probe ({probe} of random data into a new volume each), in order")
    ax.set_ylabel("MiB/s")
    ax.set_title(
        f"write throughput, ratio after/before {churn['ratio_after_before']:.2f} "
        f"(later probes {churn['ratio_after_late_before']:.2f})"
    )
    ax.legend()

    fig.suptitle(f"blockstore benchmark, {results['machine']['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(results: dict[str, Any], console: Console) -> None:
    table = Table(title="blockstore benchmark: targets")
    for col in ("target", "measured", "limit", "result"):
        table.add_column(col, justify="right" if col in ("measured", "limit") else "left")
    for t in results["targets"]:
        result = "[green]pass[/]" if t["pass"] else "[red]MISS[/]"
        table.add_row(
            t["name"],
            f"{t['measured']:.3g} {t['unit']}",
            f"{t['comparison']} {t['limit']:g} {t['unit']}",
            result,
        )
    console.print(table)

    nums = Table(title="blockstore benchmark: numbers")
    nums.add_column("measurement")
    nums.add_column("value", justify="right")
    lat = results["snapshot_clone_latency"]
    for size in ("small", "large", "small_in_large_store"):
        for op in LATENCY_OPS:
            s = lat[size][op]
            nums.add_row(
                f"{op}, {size} ({human(lat[size]['written_bytes'])})",
                f"median {s['median_ms']:.2f} ms, p90 {s['p90_ms']:.2f} ms",
            )
    get = results["get_latency"]
    for key in ("snapshots_0", f"snapshots_{get['snapshot_count']}"):
        g = get[key]
        nums.add_row(
            f"get, {key.replace('_', ' ')}",
            f"median {g['median_us']:.1f} µs, p90 {g['p90_us']:.1f} µs, "
            f"loop {g['loop_mean_us']:.1f} µs",
        )
    for kind in ("random", "text"):
        tp = results["write_throughput"][kind]
        nums.add_row(
            f"throughput, {kind} (compresses {tp['compression_ratio']:.2f}x)",
            ", ".join(f"{k} {v:.0f}" for k, v in tp["mibps"].items()) + " MiB/s",
        )
    churn = results["churn"]
    nums.add_row(
        "write throughput before/after churn",
        f"{churn['before_mibps']:.0f} / {churn['after_mibps']:.0f} MiB/s "
        f"(ratio {churn['ratio_after_before']:.2f}; later probes "
        f"{churn['after_late_mibps']:.0f} MiB/s, ratio {churn['ratio_after_late_before']:.2f})",
    )
    console.print(nums)
    missed = results["missed"]
    if missed:
        console.print(f"[red]missed {len(missed)} target(s):[/] " + "; ".join(missed))
    else:
        console.print("[green]all targets met[/]")
