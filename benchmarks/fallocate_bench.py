"""fallocate through a mount: what serving it (``fusedrive.fallocate_shim``) changes.

Owns the measurements behind docs/datapath.md's "fallocate and discard" section. In
one run, on the same disk (a work directory under ``--tmp-dir``, removed afterwards):

1. ``posix_fallocate`` of a new file of ``prealloc_bytes``, trial after trial, taking
   turns on a plain directory, a fusedrive mount, and a fusedrive mount whose daemon
   runs without the shim (``FUSEDRIVE_FALLOCATE_SHIM=off``: pyfuse3 alone, where glibc
   falls back to writing a byte per block): seconds, this process's write system calls
   (``syscw``), the daemon's CPU seconds.
2. A block volume as the node uses it (ext4 on a loop device over the volume's
   image), with and without the shim, for ``fstrim`` and for ``mount -o discard``:
   ``mkfs.ext4`` time, then the volume's used bytes and the store's stored and
   on-disk bytes when empty, after writing ``trim_bytes`` of random data, after
   removing it, and after the trim.

Results: every trial, medians and ratios, in ``benchmarks/results/fallocate.json``.
Invariants: every mount unmounted, loop device detached and daemon reaped, even on
failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from csi_frontend import loopdev
from fusedrive.control import request_flush

from . import command, machine
from .fio_bench import Daemon, check_machine, cpu_seconds, fusedrive_cli, work_directory

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "fallocate.json"
DEFAULT_TMP = REPO / ".bench-tmp"
MiB = 1 << 20
PREALLOC_TARGETS = ("plain", "fusedrive", "fusedrive_no_shim")


def start(store: Path, volume: str, mountpoint: Path, shim: bool) -> Daemon:
    argv = [sys.executable, "-m", "fusedrive.fuse_adapter", str(store), str(mountpoint)]
    if not shim:  # env execs python: the daemon keeps env's PID
        argv = ["env", "FUSEDRIVE_FALLOCATE_SHIM=off", *argv]
    return Daemon(volume, [*argv, "--volume", volume], mountpoint, mountpoint.with_suffix(".log"))


def write_syscalls() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise OSError("no syscw in /proc/self/io")


def preallocate(root: Path, name: str, nbytes: int, daemon: Daemon | None) -> dict[str, Any]:
    path = root / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        cpu0 = cpu_seconds(daemon.pid) if daemon else 0.0
        w0, t0 = write_syscalls(), time.perf_counter()
        os.posix_fallocate(fd, 0, nbytes)
        os.fsync(fd)
        seconds = time.perf_counter() - t0
        writes = write_syscalls() - w0
        trial: dict[str, Any] = {"seconds": seconds, "write_syscalls": writes}
        if daemon:
            trial["daemon_cpu_s"] = cpu_seconds(daemon.pid) - cpu0
    finally:
        os.close(fd)
    path.unlink()
    trial["loadavg_after"] = list(os.getloadavg())
    return trial


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def space(store: Path, volume: str) -> dict[str, int]:
    stats = json.loads(fusedrive_cli(store, "stats", "--json"))
    used = next(v["used"] for v in stats["per_volume"] if v["name"] == volume)
    return {
        "volume_used": used,
        "store_stored_bytes": stats["stored_bytes"],
        "store_file_bytes": stats["file_bytes"],
    }


def settled(store: Path, volume: str, mnt: Path) -> dict[str, int]:
    """The figures once the daemon has committed what it was sent (discards come late)."""
    last: dict[str, int] = {}
    steady = 0
    for _ in range(40):
        request_flush(mnt)
        now = space(store, volume)
        steady = steady + 1 if now == last else 0
        if steady >= 4:
            break
        last = now
        time.sleep(0.5)
    return last


def block_volume_run(
    work: Path, store: Path, name: str, shim: bool, how: str, nbytes: int, console: Console
) -> dict[str, Any]:
    fusedrive_cli(store, "volume", "create", name, "--size", "1GiB", "--mode", "block")
    mnt, ext = work / name, work / f"{name}-ext4"
    ext.mkdir()
    result: dict[str, Any] = {"shim": shim, "how": how}
    with contextlib.ExitStack() as stack:
        daemon = start(store, name, mnt, shim)
        stack.callback(daemon.stop)
        dev = loopdev.attach(mnt / "disk.img")
        stack.callback(loopdev.detach, dev.name)
        queue = Path("/sys/block") / Path(dev.name).name / "queue"
        result["loop_discard_max_bytes"] = int((queue / "discard_max_bytes").read_text())
        t0 = time.perf_counter()
        subprocess.run(["mkfs.ext4", "-q", "-F", dev.name], check=True, capture_output=True)
        result["mkfs_seconds"] = time.perf_counter() - t0
        opts = ["-o", "discard"] if how == "discard" else []
        subprocess.run(["mount", "-t", "ext4", *opts, dev.name, str(ext)], check=True)
        stack.callback(unmount, ext)
        os.sync()
        result["empty"] = settled(store, name, mnt)
        with open(ext / "big", "wb") as f:
            left = nbytes
            while left:
                f.write(os.urandom(min(MiB, left)))
                left -= min(MiB, left)
            os.fsync(f.fileno())
        request_flush(mnt)
        result["written"] = space(store, name)
        (ext / "big").unlink()
        os.sync()
        if how == "fstrim":
            request_flush(mnt)
            result["removed"] = space(store, name)
            t0 = time.perf_counter()
            proc = subprocess.run(["fstrim", "-v", str(ext)], capture_output=True, text=True)
            result["fstrim_seconds"] = time.perf_counter() - t0
            result["fstrim_exit"] = proc.returncode
            result["fstrim_output"] = (proc.stdout + proc.stderr).strip()
        result["after"] = settled(store, name, mnt)
    given_back = result["written"]["volume_used"] - result["after"]["volume_used"]
    result["volume_bytes_given_back"] = given_back
    used = [result[k]["volume_used"] / MiB for k in ("empty", "written", "after")]
    console.print(
        f"  block volume, {how}, shim {'on' if shim else 'off'}: mkfs "
        f"{result['mkfs_seconds']:.2f} s, used MiB: empty {used[0]:.1f}, written {used[1]:.1f}, "
        f"after {used[2]:.1f}"
    )
    return result


def run(
    prealloc_bytes: int, trim_bytes: int, trials: int, out: Path, tmp_root: Path, mode: str
) -> dict[str, Any]:
    console = Console()
    check_machine()
    with work_directory(tmp_root) as work, contextlib.ExitStack() as stack:
        store = work / "store"
        results: dict[str, Any] = {
            "benchmark": "fusedrive fallocate_bench",
            "mode": mode,
            "machine": machine.describe(work),
            "prealloc_bytes": prealloc_bytes,
            "trim_bytes": trim_bytes,
            "trials": trials,
        }
        roots: dict[str, Path] = {"plain": work / "plain"}
        roots["plain"].mkdir()
        daemons: dict[str, Daemon] = {}
        for target, shim in (("fusedrive", True), ("fusedrive_no_shim", False)):
            fusedrive_cli(store, "volume", "create", target, "--size", "8GiB")
            d = start(store, target, work / target, shim)
            stack.callback(d.stop)
            daemons[target] = d
            roots[target] = d.mountpoint
        raw: dict[str, list[dict[str, Any]]] = {t: [] for t in PREALLOC_TARGETS}
        for trial in range(trials):
            order = PREALLOC_TARGETS if trial % 2 == 0 else PREALLOC_TARGETS[::-1]
            for t in order:
                r = preallocate(roots[t], f"f{trial}", prealloc_bytes, daemons.get(t))
                console.print(f"  posix_fallocate on {t}, trial {trial + 1}: {r['seconds']:.3f} s")
                raw[t].append(r)
        for d in daemons.values():
            d.stop()
        med = {t: statistics.median(r["seconds"] for r in raw[t]) for t in PREALLOC_TARGETS}
        results["posix_fallocate"] = {
            "trials_raw": raw,
            "median_seconds": med,
            "ratio_to_plain": {t: med[t] / med["plain"] for t in PREALLOC_TARGETS},
            "no_shim_over_shim": med["fusedrive_no_shim"] / med["fusedrive"],
        }
        blocks = []
        for how in ("fstrim", "discard"):
            for shim in (True, False):
                name = f"b-{how}-{'shim' if shim else 'noshim'}"
                blocks.append(block_volume_run(work, store, name, shim, how, trim_bytes, console))
        results["block_volume"] = blocks
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(
        "posix_fallocate median s: "
        + ", ".join(f"{t} {med[t]:.3f}" for t in PREALLOC_TARGETS)
        + f"; load average {results['machine']['loadavg_start']} -> "
        f"{results['machine']['loadavg_end']}"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    args = command.parse(
        argv,
        prog="python -m benchmarks.fallocate_bench",
        doc=__doc__ or "",
        default_out=DEFAULT_OUT,
        default_tmp=DEFAULT_TMP,
        quick_help="64 MiB preallocations, 2 trials (default: 256 MiB, 3 trials)",
        tmp_help="where the store, the plain directory and the mount points live",
    )
    prealloc, trials = (64 * MiB, 2) if args.quick else (256 * MiB, 3)
    t0 = time.perf_counter()
    try:
        run(prealloc, 64 * MiB, trials, args.out, args.tmp_dir, args.mode)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        Console().print(f"[red]error:[/] {exc}")
        return 1
    Console().print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
