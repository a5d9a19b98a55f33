"""Issue 18's table from ``datapath_bench``'s repetitions: rows, markdown, plot, summary.

Owns how a row is judged. Every row but the daemon's memory compares fusedrive with
the plain directory of the same run: its number per target is the median of its
trials, and its ratio is fusedrive / plain, a speed ratio (higher is better, goal
``>=``) for throughputs and a time ratio (lower is better, goal ``<=``) for times, as
issue 18 states each goal. The spread of a ratio is the range of the per-trial ratios
(trial i of fusedrive over trial i of plain: the two ran side by side). The memory row
is the daemon's peak resident set (VmHWM) against an absolute limit.
"""

from __future__ import annotations

import functools
import operator
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .fio_bench import human

TARGETS = ("plain", "fusedrive")
RSS_LIMIT_MIB = 200.0

# (id, group, name, unit, better, limit); limit is >= for "higher", <= for "lower".
ROWS: tuple[tuple[str, str, str, str, str, float], ...] = (
    ("pg_tps", "PostgreSQL", "pgbench TPS", "TPS", "higher", 0.6),
    ("pg_load", "PostgreSQL", "pgbench -i load time", "s", "lower", 2.0),
    ("fio_seq_write", "fio", "fio seq write 1 MiB, end fsync", "MiB/s", "higher", 0.6),
    ("fio_seq_read", "fio", "fio cold seq read 1 MiB", "MiB/s", "higher", 0.8),
    ("fio_rand_read", "fio", "fio rand 4 KiB read QD1", "IOPS", "higher", 0.6),
    ("fio_rand_write", "fio", "fio rand 4 KiB write QD1, end fsync", "IOPS", "higher", 0.6),
    ("files_create", "small files", "create", "ops/s", "higher", 0.5),
    ("files_stat", "small files", "stat", "ops/s", "higher", 0.5),
    ("files_unlink", "small files", "unlink", "ops/s", "higher", 0.5),
    ("sqlite_wal", "SQLite", "SQLite inserts, WAL", "s", "lower", 2.0),
    ("sqlite_rollback", "SQLite", "SQLite inserts, rollback journal", "s", "lower", 2.0),
    ("tar_x", "trees", "tar x", "s", "lower", 1.5),
    ("rsync", "trees", "rsync -a", "s", "lower", 1.5),
    (
        "block_seq_write",
        "block volume",
        "block: seq write 1 MiB, end fsync",
        "MiB/s",
        "higher",
        0.5,
    ),
    ("block_seq_read", "block volume", "block: cold seq read 1 MiB", "MiB/s", "higher", 0.5),
    ("block_rand_read", "block volume", "block: rand 4 KiB read QD1", "IOPS", "higher", 0.5),
    ("block_rand_write", "block volume", "block: rand 4 KiB write QD1", "IOPS", "higher", 0.5),
    ("daemon_rss", "daemon memory", "daemon peak RSS (VmHWM)", "MiB", "lower", RSS_LIMIT_MIB),
)
GROUPS = tuple(dict.fromkeys(g for _, g, *_ in ROWS))
# How to read the ratio column of ``table_lines``.
RATIO_NOTE = (
    "Ratio: fusedrive / plain, a speed ratio (goal >=) or, for times, a time ratio with an x "
    "(goal <=); in parentheses the range of the per-trial ratios."
)
FIO_METRIC = {
    "seq_write": "bw_mibps",
    "seq_read": "bw_mibps",
    "rand_read": "iops",
    "rand_write": "iops",
}


def _per_target(
    trials: list[dict[str, Any]], get: Callable[[dict[str, Any]], float]
) -> dict[str, list[float]]:
    """Each target's values, in trial order."""
    out: dict[str, list[float]] = {}
    for t in TARGETS:
        mine = sorted((r for r in trials if r["target"] == t), key=lambda r: r["trial"])
        out[t] = [float(get(r)) for r in mine]
    return out


def _ops_per_s(op: str, r: dict[str, Any]) -> float:
    return float(r[op]["ops_per_s"])


def _sources(raw: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Every comparative row's values per target, from the raw repetitions."""
    pg = raw["postgresql"]
    src = {
        "pg_tps": _per_target(pg, lambda r: r["tps"]),
        "pg_load": _per_target(pg, lambda r: r["load_s"]),
    }
    for job, metric in FIO_METRIC.items():
        get = operator.itemgetter(metric)
        src[f"fio_{job}"] = _per_target(raw["fio"][job], get)
        src[f"block_{job}"] = _per_target(raw["block"][job], get)
    for op in ("create", "stat", "unlink"):
        src[f"files_{op}"] = _per_target(raw["small_files"], functools.partial(_ops_per_s, op))
    for row, journal in (("sqlite_wal", "wal"), ("sqlite_rollback", "delete")):
        mine = [r for r in raw["sqlite"] if r["journal"] == journal]
        src[row] = _per_target(mine, lambda r: r["seconds"])
    trees = raw["trees"]["trials"]
    src["tar_x"] = _per_target(trees, lambda r: r["tar_x_s"])
    src["rsync"] = _per_target(trees, lambda r: r["rsync_s"])
    return src


def rows(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 18's rows, judged, from ``datapath_bench``'s raw repetitions."""
    src = _sources(raw)
    out = []
    for rid, group, name, unit, better, limit in ROWS:
        row: dict[str, Any] = {"id": rid, "group": group, "name": name, "unit": unit}
        row.update(better=better, comparison=">=" if better == "higher" else "<=", limit=limit)
        if rid == "daemon_rss":
            mem = raw["memory"]
            value = mem["vm_hwm_mib"]
            row.update(fusedrive=value, plain=None, ratio=None, trials={"fusedrive": [value]})
            row["anon_plus_shmem_mib"] = mem["peak_anon_plus_shmem_mib"]
            row["met"] = value <= limit
            out.append(row)
            continue
        vals = src[rid]
        f, p = statistics.median(vals["fusedrive"]), statistics.median(vals["plain"])
        ratio = f / p
        pairs = zip(vals["fusedrive"], vals["plain"], strict=True)
        row.update(fusedrive=f, plain=p, ratio=ratio, trials=vals)
        row["trial_ratios"] = [a / b for a, b in pairs]
        row["met"] = ratio >= limit if better == "higher" else ratio <= limit
        if group == "block volume":
            plain_dir = statistics.median(src[rid.replace("block_", "fio_")]["plain"])
            row["fusedrive_to_plain_dir"] = f / plain_dir
            row["plain_image_to_plain_dir"] = p / plain_dir
        out.append(row)
    return out


# -- text ----------------------------------------------------------------------


def value_text(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "s":
        return f"{x:.2f} s" if x >= 1 else f"{x:.3g} s"
    return f"{x:,.0f} {unit}" if x >= 100 else f"{x:.3g} {unit}"


def ratio_text(row: dict[str, Any]) -> str:
    if row["ratio"] is None:
        return "-"
    r, spread = row["ratio"], row["trial_ratios"]
    fmt = "{:.2f}x" if row["better"] == "lower" else "{:.2f}"
    text = fmt.format(r)
    if len(spread) > 1:
        text += f" ({fmt.format(min(spread))}-{fmt.format(max(spread))})"
    return text


def goal_text(row: dict[str, Any]) -> str:
    if row["id"] == "daemon_rss":
        return f"<= {row['limit']:g} MiB"
    if row["better"] == "lower":
        return f"<= {row['limit']:g}x"
    return f">= {row['limit']:g}"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The table in markdown: one line per row, as in DATAPATH.md (and REPORT.md)."""
    lines = [
        "| row | fusedrive | plain | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        met = "met" if r["met"] else "**missed**"
        lines.append(
            f"| {r['name']} | {value_text(r['fusedrive'], r['unit'])} | "
            f"{value_text(r['plain'], r['unit'])} | {ratio_text(r)} | {goal_text(r)} | {met} |"
        )
    return lines


def _load_range(items: list[dict[str, Any]]) -> str:
    loads = [x for r in items for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"


# Each group's key in the raw results (and in group_seconds).
GROUP_KEYS = {
    "PostgreSQL": "postgresql",
    "fio": "fio",
    "small files": "small_files",
    "SQLite": "sqlite",
    "trees": "trees",
    "block volume": "block",
    "daemon memory": "memory",
}


def _group_items(raw: dict[str, Any], group: str) -> list[dict[str, Any]]:
    """A group's repetitions (each with its load before and after)."""
    got = raw[GROUP_KEYS[group]]
    if group in ("fio", "block volume"):
        return [r for job in FIO_METRIC for r in got[job]]
    if group == "trees":
        return list(got["trials"])
    if group == "daemon memory":
        return [got]
    return list(got)


def markdown(results: dict[str, Any], source: Path) -> str:
    """DATAPATH.md: the table, how it was measured, and the load it was measured under."""
    m, cfg, raw = results["machine"], results["config"], results["raw"]
    v = results["versions"]
    tree = raw["trees"]["tree"]
    lines = [
        "# fusedrive data path vs a plain directory (issue 18's table)",
        "",
        f"Generated by `python -m benchmarks.datapath_bench` ({results['mode']} run) from "
        f"`{source.name}`; do not edit by hand. One run, {m['date']}, "
        f"{results['seconds'] / 60:.1f} minutes; fusedrive `{v['fusedrive_commit']}`.",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), kernel {m['kernel']}, "
        f"{m['memory_bytes'] / (1 << 30):.0f} GiB; load average (1 min) "
        f"{m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end. "
        + results["noise"],
        "",
        "Each number is the median of its trials, the targets taking turns in every trial "
        f"(trials: PostgreSQL {cfg['pg']['rounds']}; fio, small files and block "
        f"{cfg['fio']['trials']}; SQLite and trees {cfg['trials']}; memory 1). " + RATIO_NOTE,
        "",
        *table_lines(results["rows"]),
        "",
        "## Notes",
        "",
    ]
    block = [r for r in results["rows"] if r["group"] == "block volume"]
    lines.append(
        "- Block volume against the plain directory's fio numbers of the same run (no goal): "
        + "; ".join(
            f"{r['name'].removeprefix('block: ')} {r['fusedrive_to_plain_dir']:.2f} "
            f"(plain image: {r['plain_image_to_plain_dir']:.2f})"
            for r in block
        )
        + "."
    )
    lines.append(
        "- Cold reads: `drop_caches` empties this machine's page cache only; on a virtual "
        "machine the host may still hold the disk's blocks, so a cold read of a file just "
        "written can be several times faster than another trial's: compare the trials."
    )
    mem = raw["memory"]
    lines.append(
        f"- Daemon memory writing {human(mem['written_bytes'])} at "
        f"{mem['fio']['bw_mibps']:.0f} MiB/s: VmHWM {mem['vm_hwm_mib']:.0f} MiB, which counts "
        "the LMDB file the daemon maps (RssFile, page cache); peak RssAnon + RssShmem "
        f"{mem['peak_anon_plus_shmem_mib']:.0f} MiB."
    )
    lines.append(
        f"- Tree: {tree['files']:,} files in {tree['directories']} directories, "
        f"{tree['bytes'] / (1 << 20):.0f} MiB (`make_tree`: a quarter of the bytes in "
        "256 B-16 KiB files, 45% in 64 KiB-1 MiB files, 30% in 8 MiB files; each file half "
        "random, half text)."
    )
    lines.append(
        f"- Parameters: pgbench scale {cfg['pg']['scale']}, {cfg['pg']['clients']} clients, "
        f"{cfg['pg']['seconds']} s; fio file {cfg['fio']['seq_bytes'] >> 20} MiB, random jobs "
        f"{cfg['fio']['rand_seconds']} s; {cfg['fio']['small_files']:,} small files; SQLite "
        f"{cfg['sqlite_rows']:,} rows in {cfg['sqlite_txns']} transactions; block image "
        f"{cfg['block_image_bytes'] >> 20} MiB; caches dropped for cold reads: "
        f"{cfg['fio']['drop_caches']}."
    )
    spent = results["group_seconds"]
    lines.append(
        "- Load average (1 min, before and after each trial) and minutes per group: "
        + "; ".join(
            f"{g} {_load_range(_group_items(raw, g))} ({spent[GROUP_KEYS[g]] / 60:.1f} min)"
            for g in GROUPS
        )
        + "."
    )
    lines.append(
        "- Versions: " + "; ".join(f"{k} {val}" for k, val in v.items() if k != "fusedrive_commit")
    )
    missed = results["missed"]
    lines += [
        "",
        f"Missed {len(missed)} of {len(results['rows'])}: " + "; ".join(missed)
        if missed
        else "Every goal met.",
    ]
    return "\n".join(lines) + "\n"


def print_summary(results: dict[str, Any], console: Console) -> None:
    table = Table(title="issue 18: fusedrive vs plain directory (one run, medians)")
    for col in ("row", "fusedrive", "plain", "ratio", "goal", "met"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in results["rows"]:
        table.add_row(
            r["name"],
            value_text(r["fusedrive"], r["unit"]),
            value_text(r["plain"], r["unit"]),
            ratio_text(r),
            goal_text(r),
            "[green]met[/]" if r["met"] else "[red]MISSED[/]",
        )
    console.print(table)
    m = results["machine"]
    console.print(f"load average start {m['loadavg_start']}, end {m['loadavg_end']}")


# -- plot ----------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per row group: fusedrive's speed relative to plain (a time row as plain
    time / fusedrive time, so that up is better everywhere), bars the median, whiskers
    the range of per-trial ratios, red marks the goal; memory in MiB against its limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    for ax, group in zip(axes.flat, GROUPS, strict=False):
        mine = [r for r in results["rows"] if r["group"] == group]
        labels = [r["name"].removeprefix("block: ").removeprefix("fio ") for r in mine]
        xs = list(range(len(mine)))
        if group == "daemon memory":
            r = mine[0]
            vals = [r["fusedrive"], r["anon_plus_shmem_mib"]]
            ax.bar(["VmHWM", "RssAnon+RssShmem"], vals, color=["tab:blue", "tab:cyan"])
            ax.axhline(r["limit"], color="red", linestyle="--", label=f"goal <= {r['limit']:g} MiB")
            ax.set_ylabel("MiB")
            ax.set_title("daemon memory (peak)", fontsize=10)
            ax.legend(fontsize=8)
            continue

        def speed(x: float, r: dict[str, Any]) -> float:
            return x if r["better"] == "higher" else 1 / x

        med = [speed(r["ratio"], r) for r in mine]
        per = [[speed(x, r) for x in r["trial_ratios"]] for r in mine]
        lo = [m - min(p) for m, p in zip(med, per, strict=True)]
        hi = [max(p) - m for m, p in zip(med, per, strict=True)]
        colors = ["tab:green" if r["met"] else "tab:orange" for r in mine]
        ax.bar(xs, med, yerr=[lo, hi], capsize=5, color=colors)
        goals = [speed(r["limit"], r) for r in mine]
        ax.hlines(
            goals,
            [x - 0.4 for x in xs],
            [x + 0.4 for x in xs],
            colors="red",
            linestyles="--",
            label="goal",
        )
        ax.axhline(1.0, color="gray", linewidth=0.8, label="plain directory")
        for x, r, p in zip(xs, mine, per, strict=True):
            top = max(p)  # above the whisker
            ax.annotate(ratio_text(r).split(" ")[0], (x, top), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("fusedrive speed / plain")
        ax.set_title(group, fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(GROUPS) :]:
        ax.axis("off")
    m = results["machine"]
    missed = len(results["missed"])
    fig.suptitle(
        f"fusedrive vs plain directory, issue 18 ({results['mode']} run): "
        f"{len(results['rows']) - missed}/{len(results['rows'])} goals met; "
        "time rows drawn as plain time / fusedrive time (up is better everywhere)"
    )
    fig.text(
        0.5,
        0.005,
        f"{m['date']} · {m['nproc']} cores {m['cpu_model']} · kernel {m['kernel']} · load avg "
        f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end (shared machine)",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
