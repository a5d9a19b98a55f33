"""Metadata-heavy work, side by side: per-request daemon CPU, `tar x` and `rsync -a`.

Owns the measurement behind docs/datapath.md's "Metadata requests" section. In one
run, on the same disk (a work directory under ``--tmp-dir``, removed afterwards),
these targets take turns, trial after trial (the order reverses every trial):

- ``plain``: a directory of the work directory (ext4 or whatever the disk has);
- ``memfs``: ``benchmarks.memfs``, the in-memory pyfuse3 filesystem: what the
  kernel, libfuse, pyfuse3 and trio cost per request, the floor for any daemon
  built like ours (a diagnostic, not a target);
- ``fusedrive``: a volume served by this tree's ``python -m fusedrive.fuse_adapter``;
- ``baseline`` (with ``--baseline DIR``): the same, served by the tree at DIR with
  its own virtualenv (``DIR/.venv/bin/python -P``, so DIR's code and nothing of
  this tree's), e.g. ``--baseline /work/main`` to measure a change before and after
  in one run. Each fusedrive target has its own store.

Work, per target and trial:

1. ``ops``: ``files`` (20,000; ``--quick`` 5,000) files in a new directory, one
   loop of ``os`` calls per operation, in this order: create (open O_CREAT|O_EXCL,
   close), stat, chmod, chown, utime, write100 (open O_TRUNC, write 100 bytes,
   close), rename, unlink; then mkdir and rmdir of as many directories. Each loop's
   ops/s, and the FUSE daemon's CPU seconds (``/proc/PID/stat``, all threads) from the
   loop's start to ``SETTLE`` seconds after its end, so the commit the loop caused
   (the daemon's idle flush) is counted: ``daemon_cpu_us_per_op``.
2. ``tree``: ``tar -xf`` of a tarball of a deterministic tree (``make_tree``,
   ``tree_bytes``: 243 MiB; ``--quick`` 48 MiB) into the target, then ``rsync -a``
   of the source tree into the target, then ``sync`` (so a target's buffered
   writes are not left for the next one's time to pay); wall time of each, and
   the daemon's CPU seconds. The tree and tarball live on the plain disk, warm in
   the page cache for every target alike.

Results: every trial (with the load average after each), medians, each target's
ratio to plain, in ``benchmarks/results/meta.json``. Invariants: every mount is
unmounted and every daemon reaped, even on failure (``fio_bench.Daemon``); ratios
compare numbers of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import command, machine
from .fio_bench import (
    Daemon,
    check_machine,
    cpu_seconds,
    create_volume,
    work_directory,
)
from .trees import make_tree, tree_size

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "meta.json"
DEFAULT_TMP = REPO / ".bench-tmp"
SETTLE = 1.2  # the daemon flushes IDLE_FLUSH (0.5 s) after changes stop, at a 0.5 s tick
OPS = ("create", "stat", "chmod", "chown", "utime", "write100", "rename", "unlink")
DIR_OPS = ("mkdir", "rmdir")
TREE_STEPS = ("tar_x", "rsync")
MiB = 1 << 20


# -- targets -------------------------------------------------------------------------------------
def _fusedrive(name: str, python: Path, work: Path) -> Daemon:
    store = work / f"store-{name}"
    create_volume(store, name, 4 << 30)
    argv = [str(python), "-P", "-m", "fusedrive.fuse_adapter", str(store), str(work / name)]
    return Daemon(name, [*argv, "--volume", name], work / name, work / f"{name}.log")


def _memfs(work: Path) -> Daemon:
    argv = [sys.executable, "-m", "benchmarks.memfs", str(work / "memfs")]
    return Daemon("memfs", [*argv, "--attr-timeout", "3600"], work / "memfs", work / "memfs.log")


def code_revision(tree: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


# -- per-request work ------------------------------------------------------------------------
def ops_trial(root: Path, n: int, cpu: Callable[[], float] | None) -> dict[str, Any]:
    """The loops of operation kinds over ``n`` files (see the module docstring)."""
    d = root / "meta"
    d.mkdir()
    paths = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    moved = [os.path.join(d, f"g{i:06d}") for i in range(n)]
    dirs = [os.path.join(d, f"d{i:06d}") for i in range(n)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    payload = b"x" * 100

    def create(p: str) -> None:
        os.close(os.open(p, flags, 0o644))

    def write100(p: str) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)

    loops: list[tuple[str, Callable[[Any], Any], list[Any]]] = [
        ("create", create, paths),
        ("stat", os.stat, paths),
        ("chmod", functools.partial(_chmod, 0o600), paths),
        ("chown", functools.partial(_chown, 1, 1), paths),
        ("utime", functools.partial(_utime, (1_700_000_000 * 10**9,) * 2), paths),
        ("write100", write100, paths),
        ("rename", _rename_pair, list(zip(paths, moved, strict=True))),
        ("unlink", os.unlink, moved),
        ("mkdir", os.mkdir, dirs),
        ("rmdir", os.rmdir, dirs),
    ]
    out: dict[str, Any] = {"files": n}
    for op, fn, items in loops:
        c0 = cpu() if cpu else 0.0
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        elapsed = time.perf_counter() - t0
        row: dict[str, Any] = {"seconds": elapsed, "ops_per_s": n / elapsed}
        if cpu:
            c1 = cpu()
            time.sleep(SETTLE)
            c2 = cpu()
            row["daemon_cpu_us_per_op"] = (c2 - c0) / n * 1e6
            row["daemon_cpu_us_per_op_loop"] = (c1 - c0) / n * 1e6
        out[op] = row
    left = os.listdir(d)
    if left:
        raise RuntimeError(f"{len(left)} entries left in {d}")
    d.rmdir()
    out["loadavg_after"] = list(os.getloadavg())
    return out


def _chmod(mode: int, p: str) -> None:
    os.chmod(p, mode)


def _chown(uid: int, gid: int, p: str) -> None:
    os.chown(p, uid, gid)


def _utime(ns: tuple[int, int], p: str) -> None:
    os.utime(p, ns=ns)


def _rename_pair(pair: tuple[str, str]) -> None:
    os.rename(*pair)


# -- trees ---------------------------------------------------------------------------------------
def tree_trial(
    src: Path, tarball: Path, root: Path, expect: dict[str, int], cpu: Callable[[], float] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    steps: tuple[tuple[str, Path, list[str]], ...] = (
        ("tar_x", root / "tar-x", ["tar", "-xf", str(tarball), "-C", str(root / "tar-x")]),
        ("rsync", root / "rsync", ["rsync", "-a", f"{src}/", f"{root / 'rsync'}/"]),
    )
    for step, dest, cmd in steps:
        dest.mkdir()
        c0 = cpu() if cpu else 0.0
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out[f"{step}_s"] = time.perf_counter() - t0
        if cpu:
            out[f"{step}_daemon_cpu_s"] = cpu() - c0
        got = tree_size(dest / src.name if step == "tar_x" else dest)
        if got != (expect["files"], expect["bytes"]):
            raise RuntimeError(f"{step} into {dest} gave {got} (files, bytes), not {expect}")
    t0 = time.perf_counter()
    os.sync()
    out["sync_s"] = time.perf_counter() - t0
    for made in ("tar-x", "rsync"):
        shutil.rmtree(root / made)
    out["loadavg_after"] = list(os.getloadavg())
    return out


# -- the run -------------------------------------------------------------------------------------
def run(
    files: int,
    tree_bytes: int,
    trials: int,
    baseline: Path | None,
    out: Path,
    tmp_root: Path,
    console: Console,
    mode: str,
) -> dict[str, Any]:
    check_machine()
    for tool in ("tar", "rsync"):
        if shutil.which(tool) is None:
            raise OSError(f"meta_bench needs {tool} on PATH")
    if baseline is not None and not (baseline / ".venv" / "bin" / "python").exists():
        raise OSError(f"--baseline {baseline}: no .venv/bin/python there (make setup)")
    with work_directory(tmp_root) as work, contextlib.ExitStack() as stack:
        roots: dict[str, Path] = {"plain": work / "plain"}
        roots["plain"].mkdir()
        daemons: dict[str, Daemon] = {}
        code = {"fusedrive": REPO, **({"baseline": baseline} if baseline is not None else {})}
        for name, tree in code.items():
            d = _fusedrive(name, tree / ".venv" / "bin" / "python", work)
            stack.callback(d.stop)
            daemons[name] = d
        memfs = _memfs(work)
        stack.callback(memfs.stop)
        daemons["memfs"] = memfs
        for name, d in daemons.items():
            roots[name] = d.mountpoint
        targets = ("plain", "memfs", *code)
        console.print(f"making a {tree_bytes / MiB:.0f} MiB tree")
        src = work / "tree"
        src.mkdir()
        made = make_tree(src, tree_bytes)
        tarball = work / "tree.tar"
        subprocess.run(["tar", "-cf", str(tarball), "-C", str(work), "tree"], check=True)
        results: dict[str, Any] = {
            "benchmark": "fusedrive meta_bench",
            "mode": mode,
            "files": files,
            "trials": trials,
            "tree": made,
            "settle_seconds": SETTLE,
            "code": {
                name: {"tree": str(t), "revision": code_revision(t)} for name, t in code.items()
            },
            "machine": machine.describe(work, fusedrive_version=code_revision(REPO)),
        }
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {
            t: {"ops": [], "tree": []} for t in targets
        }
        for trial in range(trials):
            order = targets if trial % 2 == 0 else targets[::-1]
            for t in order:
                served = daemons.get(t)
                cpu = functools.partial(cpu_seconds, served.pid) if served else None
                console.print(f"  {t}: {files} files, trial {trial + 1}/{trials}")
                raw[t]["ops"].append(ops_trial(roots[t], files, cpu))
                console.print(f"  {t}: tar x and rsync -a, trial {trial + 1}/{trials}")
                raw[t]["tree"].append(tree_trial(src, tarball, roots[t], made, cpu))
        for name, d in daemons.items():
            code_ = d.stop()
            if code_ != 0:
                raise RuntimeError(f"{name} daemon exited {code_}:\n{d.log_tail()}")
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["trials_raw"] = raw
    results["summary"] = summarize(raw, targets)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    show(results, targets, console)
    return results


def summarize(raw: dict[str, dict[str, list[dict[str, Any]]]], targets: tuple[str, ...]) -> Any:
    """Medians per target, and each target's ratio to plain (>1 is faster for ops/s;
    for tree steps the ratio is time / plain's time, >1 is slower)."""
    med: dict[str, dict[str, Any]] = {}
    for t in targets:
        ops = raw[t]["ops"]
        tree = raw[t]["tree"]
        row: dict[str, Any] = {}
        for op in (*OPS, *DIR_OPS):
            row[f"{op}_ops_per_s"] = statistics.median(r[op]["ops_per_s"] for r in ops)
            cpus = [r[op].get("daemon_cpu_us_per_op") for r in ops]
            if all(c is not None for c in cpus):
                row[f"{op}_daemon_cpu_us"] = statistics.median(cpus)
        for step in TREE_STEPS:
            row[f"{step}_s"] = statistics.median(r[f"{step}_s"] for r in tree)
            cpus = [r.get(f"{step}_daemon_cpu_s") for r in tree]
            if all(c is not None for c in cpus):
                row[f"{step}_daemon_cpu_s"] = statistics.median(cpus)
        med[t] = row
    ratio = {
        t: {
            **{
                op: med[t][f"{op}_ops_per_s"] / med["plain"][f"{op}_ops_per_s"]
                for op in (*OPS, *DIR_OPS)
            },
            **{
                f"{step}_slowdown": med[t][f"{step}_s"] / med["plain"][f"{step}_s"]
                for step in TREE_STEPS
            },
        }
        for t in targets
        if t != "plain"
    }
    return {"median": med, "ratio_to_plain": ratio}


def show(results: dict[str, Any], targets: tuple[str, ...], console: Console) -> None:
    med, ratio = results["summary"]["median"], results["summary"]["ratio_to_plain"]
    table = Table(title="ops/s (x plain) [daemon CPU us/op], medians")
    table.add_column("op")
    for t in targets:
        table.add_column(t, justify="right")
    for op in (*OPS, *DIR_OPS):
        cells = []
        for t in targets:
            cell = f"{med[t][f'{op}_ops_per_s']:,.0f}"
            if t != "plain":
                cell += f" ({ratio[t][op]:.2f})"
            if f"{op}_daemon_cpu_us" in med[t]:
                cell += f" [{med[t][f'{op}_daemon_cpu_us']:.0f}]"
            cells.append(cell)
        table.add_row(op, *cells)
    for step in TREE_STEPS:
        cells = []
        for t in targets:
            cell = f"{med[t][f'{step}_s']:.2f} s"
            if t != "plain":
                cell += f" ({ratio[t][f'{step}_slowdown']:.2f}x)"
            if f"{step}_daemon_cpu_s" in med[t]:
                cell += f" [{med[t][f'{step}_daemon_cpu_s']:.1f} s]"
            cells.append(cell)
        table.add_row(step, *cells)
    console.print(table)
    m = results["machine"]
    console.print(f"load average start {m['loadavg_start']}, end {m['loadavg_end']}")


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (with its .venv) served as a second fusedrive target",
    )
    pre.add_argument("--trials", type=int, help="trials (default: 3; --quick 2)")
    known, rest = pre.parse_known_args(argv)
    args = command.parse(
        rest,
        prog="python -m benchmarks.meta_bench [--baseline DIR] [--trials N]",
        doc=__doc__ or "",
        default_out=DEFAULT_OUT,
        default_tmp=DEFAULT_TMP,
        quick_help="5,000 files, a 48 MiB tree, 2 trials (default: 20,000, 243 MiB, 3)",
        tmp_help="where the stores, the plain directory, the tree and the mount points live",
    )
    baseline = known.baseline.resolve() if known.baseline is not None else None
    files, tree_bytes, trials = (5_000, 48 * MiB, 2) if args.quick else (20_000, 243 * MiB, 3)
    if known.trials is not None:
        if known.trials < 1:
            console_err = Console(stderr=True)
            console_err.print("[red]error:[/] --trials must be at least 1")
            return 2
        trials = known.trials
    console = Console()
    t0 = time.perf_counter()
    try:
        run(files, tree_bytes, trials, baseline, args.out, args.tmp_dir, console, args.mode)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    console.print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
