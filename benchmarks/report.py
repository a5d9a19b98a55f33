"""``REPORT.md`` and its plots, from the latest results of every benchmark.

Reads ``csi.json`` (``csi_bench``: snapshots, restores and clones against the
baselines, busy volume, lineage, scale, space) and, when present in the results
directory, ``datapath.json`` (``datapath_bench``: issue 18's data-path table, shown with
``datapath_report``'s own rows and formatting), ``fio.json`` (``fio_bench``: shown only
when it is newer than ``datapath.json``, whose fio rows run the same jobs) and
``store.json`` (``store_bench``). Owns the targets of issue 19 and how they are judged;
it measures nothing. Order of the report: the
headline table and the targets first, then the plots, then the other sections and
the method, so that a reader who stops after the first screen knows how we compare.

Invariant: every number in the report is read from a results file; the date, machine
and load averages of the run that produced it are printed with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from . import datapath_report
from .store_report import target

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
OPS = ("snapshot", "restore", "clone")
MODES = ("filesystem", "block")
OP_LABEL = {
    "snapshot": "snapshot (CreateSnapshot)",
    "restore": "restore (CreateVolume from snapshot)",
    "clone": "clone (CreateVolume from volume)",
}
BASELINES = {
    "filesystem": ("hostpath", "btrfs"),
    "block": ("hostpath", "dd", "btrfs"),
}
BASELINE_LABEL = {
    "hostpath": {
        "filesystem": "hostpath (tar -S -czf / tar -xzf / cp -a)",
        "block": "hostpath (cp --sparse=always of the image)",
    },
    "dd": {"block": "dd conv=sparse of the image"},
    "btrfs": {
        "filesystem": "btrfs subvolume snapshot",
        "block": "btrfs subvolume snapshot (image inside)",
    },
}
TARGET_MS = 5.0
FLAT_LIMIT = 1.5
HOSTPATH_FACTOR = 1000.0
HOSTPATH_AT = 1 * GiB
BUSY_P99_MS = 100.0


def human(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.3g} B"


def ms(x: float) -> str:
    if x >= 10_000:
        return f"{x / 1000:.1f} s"
    if x >= 100:
        return f"{x:.0f} ms"
    return f"{x:.2g} ms" if x < 1 else f"{x:.1f} ms"


def num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 10 else f"{x:.2g}x"


def load_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return data


def sizes_of(csi: dict[str, Any]) -> list[int]:
    return sorted(int(s) for s in csi["compare"]["sizes"])


def stat(csi: dict[str, Any], size: int, mode: str, system: str, op: str) -> dict[str, Any] | None:
    entry = csi["compare"]["sizes"][str(size)][mode].get(system)
    if not isinstance(entry, dict):
        return None
    out: dict[str, Any] | None = entry.get(op)
    return out


# -- targets -----------------------------------------------------------------------------


def hostpath_size(csi: dict[str, Any]) -> int:
    """1 GiB if the run measured it, else the measured size nearest to it."""
    return min(sizes_of(csi), key=lambda s: abs(s - HOSTPATH_AT))


FLOOR_PARTS = {
    "csi_round_trip": "a CSI call with no work (`Probe`)",
    "durable_commit": "one durable LMDB commit on this disk",
    "flush_request": "a flush request to an idle staged volume",
}


def floor_ms(floor: dict[str, Any] | None, op: str) -> float | None:
    """The least one ``op`` can take here, from a run's ``floor`` section (or its
    ``after_idle`` part): a CSI round trip and a durable commit, plus the live
    volume's flush for a snapshot or clone."""
    if not floor:
        return None
    parts = ["csi_round_trip", "durable_commit"]
    if op in ("snapshot", "clone"):
        parts.append("flush_request")
    return float(sum(floor[p]["median_ms"] for p in parts))


def evaluate_targets(csi: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    sizes = sizes_of(csi)
    hp = hostpath_size(csi)
    for mode in MODES:
        for op in OPS:
            meds = {s: stat(csi, s, mode, "fusedrive", op)["median_ms"] for s in sizes}  # type: ignore[index]
            for s in sizes:
                targets.append(
                    target(f"{mode} {op} median at {human(s)}", meds[s], TARGET_MS, "<=", "ms")
                )
            targets.append(
                target(
                    f"{mode} {op} flat: median {human(sizes[-1])} / {human(sizes[0])}",
                    meds[sizes[-1]] / meds[sizes[0]],
                    FLAT_LIMIT,
                    "<=",
                    "x",
                )
            )
            for s in sizes:
                bt = stat(csi, s, mode, "btrfs", op)
                if bt is not None:
                    targets.append(
                        target(
                            f"{mode} {op} faster than btrfs at {human(s)} (btrfs / ours)",
                            bt["median_ms"] / meds[s],
                            1.0,
                            ">=",
                            "x",
                        )
                    )
            hps = stat(csi, hp, mode, "hostpath", op)
            if hps is not None:
                t = target(
                    f"{mode} {op} vs hostpath at {human(hp)} (hostpath / ours)",
                    hps["median_ms"] / meds[hp],
                    HOSTPATH_FACTOR,
                    ">=",
                    "x",
                )
                floor = floor_ms(csi.get("floor"), op)
                if floor:
                    t["bound"] = (
                        f"the baseline took {ms(hps['median_ms'])}; no {op} can take less "
                        f"than {ms(floor)} here (see What bounds one operation), so at most "
                        f"{hps['median_ms'] / floor:,.0f} x"
                    )
                targets.append(t)
    if "busy" in csi:
        targets.append(
            target(
                "snapshot of a busy volume, p99",
                csi["busy"]["latency"]["p99_ms"],
                BUSY_P99_MS,
                "<=",
                "ms",
            )
        )
    return targets


# -- plots -------------------------------------------------------------------------------------


def caption(csi: dict[str, Any]) -> str:
    m = csi["machine"]
    la0, la1 = m["loadavg_start"], m.get("loadavg_end", m["loadavg_start"])
    return (
        f"{m['date']} · {m['nproc']} cores {m['cpu_model']} · kernel {m['kernel']} · "
        f"{m.get('work_dir_fstype') or 'disk'} · load avg (1/5/15 min) {la0[0]:.1f}/{la0[1]:.1f}/"
        f"{la0[2]:.1f} at start, {la1[0]:.1f}/{la1[1]:.1f}/{la1[2]:.1f} at end · "
        "shared machine: absolute times are noisy · fusedrive "
        f"{csi['versions']['fusedrive_commit']}"
    )


HOSTPATH_FS_OP = {
    "snapshot": "tar -S -czf of the directory",
    "restore": "tar -xzf into a new directory",
    "clone": "cp -a of the directory",
}


def baseline_label(base: str, mode: str, op: str) -> str:
    if base == "hostpath" and mode == "filesystem":
        return f"hostpath ({HOSTPATH_FS_OP[op]})"
    return BASELINE_LABEL[base][mode]


def minor_label(y: float, _: object) -> str:
    """Labels 2 and 5 times a power of ten on a log axis (narrow ranges need them)."""
    lead = f"{y:.0e}"[0]
    return f"{y:g}" if lead in "25" else ""


def log_axis_labels(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    axis.set_minor_formatter(FuncFormatter(minor_label))


def _series(csi: dict[str, Any], mode: str, system: str, op: str) -> tuple[list[float], ...]:
    xs, med, lo, hi = [], [], [], []
    for s in sizes_of(csi):
        st = stat(csi, s, mode, system, op)
        if st is None:
            continue
        xs.append(s / GiB)
        med.append(st["median_ms"])
        lo.append(st["median_ms"] - st["min_ms"])
        hi.append(st["max_ms"] - st["median_ms"])
    return xs, med, lo, hi


def plot_compare(csi: dict[str, Any], mode: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    baselines = [b for b in BASELINES[mode] if any(_series(csi, mode, b, op)[0] for op in OPS)]
    ncols = max(1, len(baselines))
    fig, axes = plt.subplots(len(OPS), ncols, figsize=(4.6 * ncols, 3.4 * len(OPS)), squeeze=False)
    hp = hostpath_size(csi)
    sizes = sizes_of(csi)
    for r, op in enumerate(OPS):
        for c in range(ncols):
            ax = axes[r][c]
            base = baselines[c] if c < len(baselines) else ""
            bx, bmed, blo, bhi = _series(csi, mode, base, op) if base else ([], [], [], [])
            if not bx:
                ax.axis("off")
                if base:
                    ax.text(
                        0.5,
                        0.5,
                        f"{base}: measured for clone only",
                        ha="center",
                        transform=ax.transAxes,
                        color="gray",
                    )
                continue
            xs, med, lo, hi = _series(csi, mode, "fusedrive", op)
            ax.errorbar(
                xs, med, yerr=[lo, hi], marker="o", capsize=3, color="tab:blue", label="fusedrive"
            )
            ax.errorbar(
                bx,
                bmed,
                yerr=[blo, bhi],
                marker="s",
                capsize=3,
                color="tab:orange",
                label=baseline_label(base, mode, op),
            )
            ax.axhline(TARGET_MS, color="red", linestyle="--", linewidth=1, label="target <= 5 ms")
            if base == "hostpath":
                st = stat(csi, hp, mode, "hostpath", op)
                if st is not None:
                    ax.plot(
                        [hp / GiB],
                        [st["median_ms"] / HOSTPATH_FACTOR],
                        marker="v",
                        color="red",
                        linestyle="none",
                        markersize=9,
                        label=f"target: hostpath/1000 at {human(hp)}",
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator([s / GiB for s in sizes]))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human(x * GiB)))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(minor_label))
            ax.set_title(f"{op}: fusedrive vs {base}", fontsize=10)
            ax.set_xlabel("volume size (logical)")
            ax.set_ylabel("ms: median, bars min-max")
            ax.legend(fontsize=7, loc="best")
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{mode} volumes: snapshot, restore and clone against one baseline per panel")
    fig.text(0.5, 0.005, caption(csi), ha="center", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_other(csi: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    busy = csi.get("busy")
    if busy:
        lat = [s["seconds"] * 1e3 for s in busy["samples"]]
        ax.plot(range(1, len(lat) + 1), lat, marker=".", linestyle="none", label="CreateSnapshot")
        ax.axhline(busy["latency"]["p50_ms"], color="tab:green", label="p50")
        ax.axhline(busy["latency"]["p99_ms"], color="tab:purple", label="p99")
        ax.axhline(BUSY_P99_MS, color="red", linestyle="--", label="target p99 ≤ 100 ms")
        ax.set_yscale("log")
        log_axis_labels(ax.yaxis)
        ax.set_xlabel("snapshot # (fio writing at full speed)")
        ax.set_ylabel("ms")
        ax.set_title(f"snapshot of a busy volume ({busy['fio']['bw_mibps']:.0f} MiB/s of writes)")
        ax.legend(fontsize=7)
    ax = axes[1]
    lin = csi.get("lineage")
    if lin:
        depths = list(lin["depths"])
        x = range(len(depths))
        ax.bar(
            [i - 0.2 for i in x],
            [lin["depths"][d]["read_mibps_median"] for d in depths],
            0.4,
            label="sequential read (cold daemon)",
        )
        ax.bar(
            [i + 0.2 for i in x],
            [lin["depths"][d]["write_mibps_median"] for d in depths],
            0.4,
            label="sequential write (fsync'd)",
        )
        ax.set_xticks(list(x), [f"{d} snapshots" for d in depths])
        ax.set_ylabel("MiB/s (median)")
        ax.set_title(f"throughput against lineage depth ({human(lin['bytes'])})")
        ax.legend(fontsize=7)
    ax = axes[2]
    scale = csi.get("scale")
    if scale:
        for op, by_n in scale["per_count"].items():
            ns = sorted(by_n, key=int)
            ax.plot([int(n) for n in ns], [by_n[n]["median_ms"] for n in ns], marker="o", label=op)
        ax.set_xscale("log")
        ax.set_yscale("log")
        log_axis_labels(ax.xaxis)
        log_axis_labels(ax.yaxis)
        ax.set_xlabel("objects in the store")
        ax.set_ylabel("ms per call (median)")
        ax.set_title("scale: per-call time through CSI")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.text(0.5, 0.005, caption(csi), ha="center", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- markdown --------------------------------------------------------------------------------------


def _cell(st: dict[str, Any] | None) -> str:
    if st is None:
        return "-"
    return f"{ms(st['median_ms'])} ({ms(st['min_ms'])}-{ms(st['max_ms'])}, n={st['samples']})"


def headline(csi: dict[str, Any]) -> list[str]:
    lines = [
        "| volume | operation | size | fusedrive (CSI) | hostpath | x | btrfs | x | dd | x |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for op in OPS:
            for s in sizes_of(csi):
                ours = stat(csi, s, mode, "fusedrive", op)
                assert ours is not None
                row = [mode, op, human(s), _cell(ours)]
                for base in ("hostpath", "btrfs", "dd"):
                    b = stat(csi, s, mode, base, op)
                    row.append(_cell(b))
                    row.append(f"**{ratio(b['median_ms'] / ours['median_ms'])}**" if b else "-")
                lines.append("| " + " | ".join(row) + " |")
    return lines


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | measured | limit | result |", "|---|---:|---:|---|"]
    for t in targets:
        unit = t["unit"]
        lines.append(
            f"| {t['name']} | {num(t['measured'])} {unit} | {t['comparison']} {t['limit']:g} "
            f"{unit} | {'pass' if t['pass'] else '**MISS**'} |"
        )
    return lines


def floor_lines(csi: dict[str, Any]) -> list[str]:
    """What bounds one operation on this machine (the run's ``floor`` section)."""
    floor = csi.get("floor")
    if not floor:
        return []
    idle = floor.get("after_idle")
    lines = [
        "## What bounds one operation",
        "",
        "Measured in the same run (median of "
        f"{floor['csi_round_trip']['samples']} each; `csi_bench.measure_floor`):",
        "",
        "| part | back to back: median | min-max |"
        + (" after idle: median | min-max |" if idle else ""),
        "|---|---:|---:|" + ("---:|---:|" if idle else ""),
    ]
    for key, label in FLOOR_PARTS.items():
        row = f"| {label} | {span(floor[key])} |"
        lines.append(row + (f" {span(idle[key])} |" if idle else ""))
    snap, restore = floor_ms(floor, "snapshot"), floor_ms(floor, "restore")
    lines += [
        "",
        f"A snapshot or clone of a live volume pays all three ({ms(snap or 0)}), a restore the "
        f"first two ({ms(restore or 0)}). So against a baseline that takes B, no driver "
        "behind this gRPC server and this disk is more than B / that times faster; the "
        "misses above say where that caps a ratio below its target.",
        "",
        *idle_lines(idle),
        *c_client_lines(floor),
    ]
    return lines


def span(st: dict[str, Any]) -> str:
    return f"{ms(st['median_ms'])} | {ms(st['min_ms'])}-{ms(st['max_ms'])}"


def idle_lines(idle: dict[str, Any] | None) -> list[str]:
    """The floor of a call that arrives after a quiet moment (``after_idle``)."""
    if not idle:
        return []
    snap = floor_ms(idle, "snapshot")
    return [
        f"The second pair of columns: each sample taken after {idle['idle_seconds'] * 1000:.0f} "
        "ms of sleep (the samples take turns with the back-to-back ones). On a virtual "
        "machine a step that follows another runs on a busy CPU, one after a pause wakes a "
        f"halted one: the three parts then add up to {ms(snap or 0)}, which is closer to what "
        "a CSI call arriving at a quiet node pays. The bound above uses the back-to-back "
        "times, the least each part takes here.",
        "",
    ]


def c_client_lines(floor: dict[str, Any]) -> list[str]:
    """How much of the round trip is the benchmark's own (Python) client."""
    c = floor.get("csi_round_trip_c_client")
    if not c:
        return []
    if "not_measured" in c:
        return [f"The same `Probe` from a C client: not measured ({c['not_measured']}).", ""]
    py = floor["csi_round_trip"]
    less = py["median_ms"] - c["median_ms"]
    return [
        "Every time in this report is taken through the benchmark's client, grpcio in "
        "Python; in a cluster the callers (kubelet, the snapshotter and provisioner "
        "sidecars) are compiled Go. The same `Probe` from a C HTTP/2 client on one "
        f"connection (nghttp2's `h2load`, {c['samples']} calls) took {ms(c['median_ms'])} "
        f"(median; {ms(c['min_ms'])}-{ms(c['max_ms'])}) against {ms(py['median_ms'])}: "
        f"about {ms(max(less, 0))} of every operation above is our client's, and the "
        "bounds above would be that much lower for such a caller.",
        "",
    ]


def data_lines(csi: dict[str, Any]) -> list[str]:
    lines = [
        "| size (logical) | random bytes | hole (sparse) | small files | block image |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in sizes_of(csi):
        d = csi["compare"]["sizes"][str(s)]["data"]
        lines.append(
            f"| {human(s)} | {human(d['random_bytes'])} | {human(d['hole_bytes'])} | "
            f"{d['small_files']} ({human(d['small_file_bytes'])}) | "
            f"{human(d['block_image_bytes'])} ext4 |"
        )
    return lines


def busy_lines(busy: dict[str, Any]) -> list[str]:
    lat = busy["latency"]
    return [
        f"{busy['snapshots']} CreateSnapshot calls, one every {busy['interval_s']} s, while fio "
        f"wrote sequentially at {busy['fio']['bw_mibps']:.0f} MiB/s (1 MiB blocks, fresh random "
        "data, no fsync) into the volume:",
        "",
        f"- p50 **{ms(lat['p50_ms'])}**, p99 **{ms(lat['p99_ms'])}**, max {ms(lat['max_ms'])} "
        f"(target p99 ≤ {BUSY_P99_MS:g} ms);",
        f"- bytes the volume's daemon wrote to disk during one call (its `/proc/PID/io` "
        f"write_bytes; this includes background flushes running at the same time, so it bounds "
        f"what the snapshot's flush committed): median {human(busy['daemon_write_bytes_median'])}, "
        f"max {human(busy['daemon_write_bytes_max'])}; the daemon buffers at most "
        f"{human(busy['dirty_limit_bytes'])} of dirty data.",
    ] + (
        [
            f"- what the snapshots cost the writer (new writes wait while a snapshot's flush "
            f"runs): the same fio job alone wrote {busy['fio_alone']['bw_mibps']:.0f} MiB/s, "
            f"with the snapshots {busy['fio']['bw_mibps']:.0f} MiB/s."
        ]
        if "fio_alone" in busy
        else []
    )


def lineage_lines(lin: dict[str, Any]) -> list[str]:
    lines = [
        "| snapshots in the lineage | sequential read MiB/s (cold daemon) | "
        "sequential write MiB/s |",
        "|---:|---:|---:|",
    ]
    for d, e in lin["depths"].items():
        r = ", ".join(f"{x:.0f}" for x in e["read_mibps"])
        w = ", ".join(f"{x:.0f}" for x in e["write_mibps"])
        lines.append(
            f"| {d} | **{e['read_mibps_median']:.0f}** ({r}) | "
            f"**{e['write_mibps_median']:.0f}** ({w}) |"
        )
    return lines


def scale_lines(scale: dict[str, Any]) -> list[str]:
    counts = [str(n) for n in scale["counts"]]
    lines = [
        "| call | "
        + " | ".join(f"ms at {n}" for n in counts)
        + f" | growth {counts[0]}→{counts[-1]} |",
        "|---|" + "---:|" * (len(counts) + 1),
    ]
    for op, by_n in scale["per_count"].items():
        meds = [by_n[n]["median_ms"] if n in by_n else None for n in counts]
        cells = [ms(m) if m is not None else "-" for m in meds]
        growth = f"{meds[-1] / meds[0]:.2g}x" if meds[0] and meds[-1] else "-"
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {growth} |")
    return lines


def space_lines(space: dict[str, Any]) -> list[str]:
    n = space["bytes"]
    lines = [
        "| written (logical) | store file growth | chunk bytes stored | physical / logical |",
        "|---|---:|---:|---:|",
    ]
    label = {
        "dedup-a": f"{human(n)} random data into volume A",
        "dedup-b": f"the same {human(n)} into volume B",
        "text": f"{human(n)} text-like data into volume C",
    }
    for st in space["steps"][1:]:
        lines.append(
            f"| {label.get(st['step'], st['step'])} | {human(st['file_growth_bytes'])} | "
            f"{human(max(st['stored_growth_bytes'], 0))} | **{st['physical_over_logical']:.2f}** |"
        )
    lines.append(
        f"| the same three files in a plain directory (ext4) | "
        f"{human(space['plain_directory_allocated_bytes'])} | - | "
        f"{space['plain_directory_allocated_bytes'] / (3 * n):.2f} |"
    )
    return lines


def fio_lines(fio: dict[str, Any]) -> list[str]:
    unit = {"bw_mibps": "MiB/s", "iops": "IOPS", "ops_per_s": "ops/s"}
    metric = {
        "seq_write": "bw_mibps",
        "seq_read": "bw_mibps",
        "rand_read": "iops",
        "rand_write": "iops",
        "create": "ops_per_s",
        "stat": "ops_per_s",
        "unlink": "ops_per_s",
    }
    m = fio["machine"]
    lines = [
        f"From `fio.json` ({fio['mode']} run of {m['date']}, load avg "
        f"{m['loadavg_start'][0]:.1f} → {m.get('loadavg_end', [0])[0]:.1f}; `make bench-fio`):",
        "",
        "| job | fusedrive | plain directory | memfs (Python FUSE ceiling) | fusedrive / plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for job, key in metric.items():
        j = fio["jobs"].get(job)
        if not j:
            continue
        vals = [j[t][key] for t in ("fusedrive", "plain", "memfs")]
        lines.append(
            f"| {job} | {vals[0]:,.0f} {unit[key]} | {vals[1]:,.0f} | {vals[2]:,.0f} | "
            f"{vals[0] / vals[1]:.2f} |"
        )
    missed = fio.get("missed", [])
    lines += ["", f"fio targets: {len(fio['targets']) - len(missed)} of {len(fio['targets'])} met"]
    if missed:
        lines[-1] += "; missed: " + "; ".join(missed)
    return lines


def run_date(results: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(results["machine"]["date"])


def goals_met(datapath: dict[str, Any]) -> tuple[int, int]:
    """(goals met, rows) of a ``datapath.json``."""
    return len(datapath["rows"]) - len(datapath["missed"]), len(datapath["rows"])


def datapath_lines(datapath: dict[str, Any], notes: Path | None) -> list[str]:
    """Issue 18's table as DATAPATH.md has it; ``notes`` is DATAPATH.md's path relative
    to the report, if it exists."""
    m = datapath["machine"]
    met, total = goals_met(datapath)
    return [
        f"From `datapath.json` ({datapath['mode']} run of {m['date']}, load avg "
        f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end, fusedrive "
        f"`{datapath['versions']['fusedrive_commit']}`; `make bench-datapath`): fusedrive "
        "against a plain directory on the same disk in one run (block rows: ext4 on a loop "
        "device over a fusedrive block volume's image against one over a plain image file); "
        f"**{met} of {total} goals met**."
        + (
            f" How each row is measured, its trials and the load per group: [DATAPATH.md]({notes})."
            if notes
            else ""
        ),
        "",
        datapath_report.RATIO_NOTE,
        "",
        *datapath_report.table_lines(datapath["rows"]),
    ]


def file_io_lines(
    datapath: dict[str, Any] | None, fio: dict[str, Any] | None, notes: Path | None
) -> list[str]:
    """The data-path table; ``fio.json``'s table only if that run is the newer one."""
    if datapath is None:
        return fio_lines(fio) if fio else ["`fio.json` is missing: run `make bench-fio`."]
    lines = datapath_lines(datapath, notes)
    if fio is None:
        return lines
    if run_date(fio) > run_date(datapath):
        return [*lines, "", "### A newer fio_bench run", "", *fio_lines(fio)]
    return [
        *lines,
        "",
        f"`fio.json` ({fio['mode']} fio_bench run of {fio['machine']['date']}) is older and not "
        "shown: the fio and small-files rows above measure its jobs again (fio_bench's job "
        "definitions); its memfs column (the Python FUSE ceiling) is only in that file.",
    ]


def store_lines(store: dict[str, Any]) -> list[str]:
    m = store["machine"]
    missed = store.get("missed", [])
    return [
        f"From `store.json` ({store['mode']} run of {m['date']}): the store's own operations "
        f"without CSI, FUSE or process start-up; {len(store['targets']) - len(missed)} of "
        f"{len(store['targets'])} targets met"
        + ("; missed: " + "; ".join(missed) if missed else "")
        + ". See `store.png`.",
    ]


def method_lines(csi: dict[str, Any]) -> list[str]:
    cfg = csi["config"]
    reps = {s: csi["compare"]["sizes"][str(s)]["reps"] for s in sizes_of(csi)}
    rep_text = "; ".join(
        f"{human(s)}: " + ", ".join(f"{k} {v}" for k, v in r.items()) for s, r in reps.items()
    )
    return [
        "- **One run, one disk, same data.** `python -m benchmarks.csi_bench` starts the real "
        "plugin (`python -m csi_frontend.cli serve`) on a unix socket and a fresh store in a work "
        f"directory on the disk under test ({csi['machine'].get('work_dir_fstype') or '?'}), and "
        "calls it with `csi_frontend.client` (gRPC) the way the sidecars do. Every baseline runs "
        "in the same run on the same disk, on copies of the same data.",
        "- **Data per size**: one directory with one big file of random data and "
        f"{cfg['small_files']:,} small random files (0.5-8 KiB). At most {human(cfg['real_cap'])} "
        "per size is random data; the rest of a size is a hole (sparse), as the data table "
        "says. A block volume holds an ext4 image of the same directory (made with `mkfs.ext4` "
        "and `cp -a`), written onto our volume's loop device with `dd conv=sparse`.",
        "- **Ours**: the volume is staged and published (its FUSE daemon live) when it is "
        "snapshotted or cloned, so each call includes the daemon's flush. snapshot = "
        "CreateSnapshot; restore = CreateVolume from a snapshot; clone = CreateVolume from the "
        "live volume. Each result is undone (DeleteSnapshot/DeleteVolume) untimed. The time is "
        "the client's wall time of the RPC. A restored volume is usable once staged: "
        "NodeStageVolume starts its daemon; that took "
        + ", ".join(
            f"{ms(csi['compare']['sizes'][str(s)][m]['fusedrive_stage_ms'])} ({m}, {human(s)})"
            for s in sizes_of(csi)[-1:]
            for m in MODES
        )
        + " in this run (not in the table).",
        "- **hostpath** (what csi-driver-host-path does): filesystem snapshot = `tar -S -czf` of "
        "the directory (`-S` keeps holes; hostpath's own tar lacks it, so it is slower at the "
        "logical sizes than shown), restore = `tar -xzf` into a new directory, clone = `cp -a`; "
        "block = `cp --sparse=always` of the image for all three; nothing is fsync'd, which "
        "favours the baseline. **dd**: `dd bs=1M conv=sparse` of the image (clone). "
        "**btrfs**: `btrfs subvolume snapshot` (`-r` for snapshots) on a btrfs made by the run "
        "on a loop device backed by a sparse file on the same disk; a block volume is a "
        "subvolume holding the image. Baselines run as commands, so their times include "
        "starting the process, as a driver would.",
        f"- **LVM thin** (TopoLVM): {csi['baselines']['lvm-thin']}.",
        f"- **Repetitions** (rounds take turns: ours, then each baseline): {rep_text}. "
        "Median, with min-max as the spread; every repetition is in `csi.json`. Each timed "
        "operation starts after an untimed `sync`, so none pays for the writeback of the "
        "gigabytes another system wrote just before it.",
        "- **Busy volume**: fio sequential write (psync, 1 MiB, `refill_buffers`) into a staged "
        "filesystem volume; CreateSnapshot in a loop beside it.",
        "- **Lineage**: a volume with data, then snapshots each after a 64 KiB overwrite; at "
        "each depth the volume is unstaged and staged again (empty daemon cache), then fio "
        "reads it (`direct=1`, 1 MiB) and writes a fresh file (fsync'd).",
        "- **Scale**: volumes (64 MiB, unstaged) and one snapshot per volume, created and deleted "
        'one by one through CSI; a time "at N" is the median of the 10 calls that brought the '
        "count to N (or, for deletes, started from N); a list lists every object.",
        "- **Space**: files copied into fresh volumes, each unstaged (flushed) before the store "
        "is measured by a second process (`Store.stats()`); physical = growth of the store's "
        "files on disk.",
        f"- **Load**: {csi['noise']}",
        "- **Versions**: "
        + "; ".join(f"{k} `{v}`" for k, v in csi["versions"].items())
        + f". Mode `{csi['mode']}`, total {csi['total_seconds'] / 60:.1f} min.",
    ]


def write_report(results_dir: Path, csi_path: Path, out: Path) -> dict[str, Any]:
    csi = load_json(csi_path)
    if csi is None:
        raise FileNotFoundError(f"{csi_path} is missing: run `make bench` first")
    fio = load_json(results_dir / "fio.json")
    datapath = load_json(results_dir / "datapath.json")
    notes_md = results_dir / "DATAPATH.md"
    store = load_json(results_dir / "store.json")
    targets = evaluate_targets(csi)
    missed = [t for t in targets if not t["pass"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = {mode: out.parent / f"compare-{mode}.png" for mode in MODES}
    for mode, p in plots.items():
        plot_compare(csi, mode, p)
    other = out.parent / "busy-lineage-scale.png"
    plot_other(csi, other)

    sizes = sizes_of(csi)
    hp = hostpath_size(csi)
    speedups = []
    for mode in MODES:
        for op in OPS:
            ours = stat(csi, hp, mode, "fusedrive", op)
            h = stat(csi, hp, mode, "hostpath", op)
            if ours and h:
                speedups.append(h["median_ms"] / ours["median_ms"])
    all_ours = [
        stat(csi, s, m, "fusedrive", op)["median_ms"]  # type: ignore[index]
        for s in sizes
        for m in MODES
        for op in OPS
    ]
    all_min = [
        stat(csi, s, m, "fusedrive", op)["min_ms"]  # type: ignore[index]
        for s in sizes
        for m in MODES
        for op in OPS
    ]
    stage = [csi["compare"]["sizes"][str(s)][m]["fusedrive_stage_ms"] for s in sizes for m in MODES]
    stage_text = f"{ms(min(stage))}-{ms(max(stage))}"
    m = csi["machine"]
    lines = [
        "# fusedrive benchmark report",
        "",
        f"_Generated by `{'make bench-quick' if csi['mode'] == 'quick' else 'make bench'}` "
        f"from `{csi_path.name}` ({csi['mode']} run, {m['date']}, "
        f"{m['nproc']} cores, load avg {m['loadavg_start'][0]:.1f} at start and "
        f"{m.get('loadavg_end', [0])[0]:.1f} at end on a machine shared with other test runs: "
        "absolute times are noisy, ratios are from the same run)._",
        "",
        f"**In short**: through CSI, snapshot, restore and clone took "
        f"{ms(min(all_ours))}-{ms(max(all_ours))} (medians) at every size from "
        f"{human(sizes[0])} to {human(sizes[-1])}, filesystem and block (the fastest "
        f"repetition of each: {ms(min(all_min))}-{ms(max(all_min))});"
        + (
            f" at {human(hp)} that is {min(speedups):,.0f}-{max(speedups):,.0f}x faster than "
            "what a hostpath-style driver does (tar / cp)."
            if speedups
            else ""
        )
        + (
            " A restored or cloned volume is then staged (NodeStageVolume starts its FUSE "
            f"daemon) before a pod uses it: {stage_text}, not counted above."
        )
        + f" **{len(targets) - len(missed)} of {len(targets)} targets met**"
        + (":" if missed else "."),
        "",
        *[
            f"- missed: {t['name']}: {num(t['measured'])} {t['unit']} "
            f"(target {t['comparison']} {t['limit']:g} {t['unit']})"
            + (f"; bound: {t['bound']}" if "bound" in t else "")
            for t in missed
        ],
        "",
    ]
    if datapath:
        met, total = goals_met(datapath)
        groups = ", ".join(dict.fromkeys(r["group"] for r in datapath["rows"]))
        lines += [
            "Beside these targets, the data path against a plain directory ("
            f"{groups}; `datapath.json`, run of {datapath['machine']['date']}) met "
            f"**{met} of {total} goals**: see [File I/O](#file-io).",
            "",
        ]
    lines += [
        "## Snapshot, restore and clone (median, min-max, repetitions; x = baseline / fusedrive)",
        "",
        *headline(csi),
        "",
        "## Targets",
        "",
        *targets_table(targets),
        "",
        *floor_lines(csi),
        "## Plots",
        "",
        f"![filesystem volumes]({plots['filesystem'].name})",
        "",
        f"![block volumes]({plots['block'].name})",
        "",
        f"![busy volume, lineage, scale]({other.name})",
        "",
        f"_{caption(csi)}_",
        "",
        "## Data per size",
        "",
        *data_lines(csi),
        "",
    ]
    if "busy" in csi:
        lines += ["## Snapshot of a busy volume", "", *busy_lines(csi["busy"]), ""]
    if "lineage" in csi:
        lines += ["## Throughput against lineage depth", "", *lineage_lines(csi["lineage"]), ""]
    if "scale" in csi:
        lines += ["## Scale: 10 to 1,000 objects in one store", "", *scale_lines(csi["scale"]), ""]
    if "space" in csi:
        lines += ["## Dedup and compression", "", *space_lines(csi["space"]), ""]
    notes = Path(os.path.relpath(notes_md, out.parent)) if notes_md.exists() else None
    lines += ["## File I/O", "", *file_io_lines(datapath, fio, notes)]
    lines += ["", "## The store alone", ""]
    lines += store_lines(store) if store else ["`store.json` is missing."]
    lines += ["", "## Method", "", *method_lines(csi), ""]
    out.write_text("\n".join(lines))
    return {
        "targets": targets,
        "missed": [t["name"] for t in missed],
        "plots": [*plots.values(), other],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--csi", type=Path, default=RESULTS / "csi.json", help="csi_bench results")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="directory with datapath.json, fio.json and store.json",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "REPORT.md", help="report file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        done = write_report(args.results, args.csi, args.out)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {args.out}; {len(done['missed'])} target(s) missed")
    for name in done["missed"]:
        print(f"  MISS {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
