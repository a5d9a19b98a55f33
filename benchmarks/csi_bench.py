"""The comparison benchmark: snapshots, restores and clones through CSI against baselines.

Owns the measurements of issue 19 (``report`` judges them against the targets and
writes ``REPORT.md`` and the plots). One run starts the real plugin
(``python -m csi_frontend.cli serve``, the demo's ``running_plugin``) on a store in a
work directory under ``--tmp-dir`` and drives it with ``csi_frontend.client``; every
baseline runs in the same run, on the same disk, on the same data:

1. ``compare``: for each size (full: 64 MiB, 1 GiB, 16 GiB) and mode (a filesystem
   volume; a block volume carrying ext4 on its loop device), the data is a
   directory of random data (one file) plus ``small_files`` small random files. At
   most ``real_cap`` bytes are random data; the rest of a size is a hole (a sparse
   file), and the JSON says how many bytes were real. Operations: snapshot
   (CreateSnapshot), restore (CreateVolume from the snapshot) and clone
   (CreateVolume from the live, staged volume). Baselines:
   - ``hostpath`` (what csi-driver-host-path does): filesystem: ``tar -S -czf`` of
     the directory (snapshot), ``tar -xzf`` into a new directory (restore), ``cp -a``
     (clone); block: ``cp --sparse=always`` of the ext4 image for all three;
   - ``dd``: block only, ``dd conv=sparse bs=1M`` of the image (clone);
   - ``btrfs``: ``btrfs subvolume snapshot`` (``-r`` for the snapshot) on a
     loop-backed btrfs this run makes; a block volume is a subvolume holding the image;
   - ``lvm-thin`` (what TopoLVM does) needs device-mapper; where the kernel lacks it
     the JSON says so and nothing is measured.
   Repetitions take turns (ours, then each baseline, per repetition) so a burst of
   load hits all of them; the slow baselines run fewer times (``slow_reps``). Every
   timed operation starts after an untimed ``sync``, so no system's time includes the
   writeback of what another wrote just before; at sizes where the slow baselines run
   fewer times, they run after the others' repetitions (their aftermath slowed every
   system's next operations for tens of seconds, see ``Compare.measure``).
2. ``busy``: CreateSnapshot every ``busy_interval`` s while fio writes sequentially at
   full speed into the volume: every latency, and the bytes the volume's FUSE daemon
   wrote (``/proc/PID/io``) during each call, which bounds what the flush committed.
   The same fio job runs alone first: its throughput against the one with snapshots
   is what the snapshots cost the writer (writes wait while a snapshot's flush runs).
3. ``lineage``: fio sequential read (cold daemon: the volume is unstaged and staged
   again, ``direct=1``) and write (fresh data, fsync'd) with 0, 10 and 100
   snapshots in the volume's lineage, each snapshot after a 64 KiB overwrite.
4. ``scale``: CreateVolume, ListVolumes, CreateSnapshot, ListSnapshots, DeleteSnapshot
   and DeleteVolume with 10, 100 and 1,000 objects in the store.
5. ``space``: the same random data written into two volumes, and text-like data into
   a third: the store's physical growth (allocated bytes) against the logical bytes.
6. ``floor``: what bounds one operation here: a CSI round trip (``Probe``), one
   durable LMDB commit on the disk under test, and a flush request to an idle staged
   volume (``measure_floor``), each back to back and after a moment of idleness; and
   the same ``Probe`` from a C HTTP/2 client (nghttp2's ``h2load``), to show how much
   of each time is our Python client.

Invariants: every plugin process, FUSE mount, loop device, btrfs mount and the work
directory are released even on failure (``contextlib.ExitStack``, the demo's
``force_cleanup``); data generation is never timed; ratios compare numbers of the
same run. A missed target is a measurement, not an error: the exit code is 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmdb
from google.protobuf.json_format import MessageToDict
from rich.console import Console

from csi_frontend.client import CsiClient, block_capability, mount_capability
from csi_frontend.demo import force_cleanup, leftovers, running_plugin
from csi_frontend.proto import csi_pb2
from fusedrive.control import request_flush
from fusedrive.filesystem import DEFAULT_DIRTY_LIMIT

from . import command, machine
from .fio_bench import fio_version, run_fio, seq_read_args, seq_write_args
from .store_bench import TextSource, summarize

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "csi.json"
DEFAULT_TMP = REPO / ".bench-tmp"
OPS = ("snapshot", "restore", "clone")
MODES = ("filesystem", "block")
NOISE_NOTE = (
    "The machine is shared with other engineers' test runs (2 cores), so absolute "
    "numbers are noisy; load averages are recorded before and after every section. "
    "Prefer the ratios, which compare numbers measured in the same run."
)


@dataclass(frozen=True)
class Config:
    """Sizes of one run (the defaults are the full run)."""

    sizes: tuple[int, ...] = (64 * MiB, 1 * GiB, 16 * GiB)
    real_cap: int = 2 * GiB  # random bytes per size at most; the rest of a size is a hole
    small_files: int = 2000
    reps: int = 5
    # hostpath and dd at sizes >= slow_from: two runs each, and at sizes > real_cap (the
    # logical sizes) one: tar -czf took 39 s a run at 1 GiB and 139 s at 16 GiB, and
    # with 3 and 2 runs `make bench` took 27 minutes against a budget of 25.
    slow_reps: int = 2
    slowest_reps: int = 1
    slow_from: int = 1 * GiB
    busy_seconds: int = 20  # twice: fio alone, then fio with the snapshots
    busy_interval: float = 0.25
    busy_file_bytes: int = 1 * GiB
    lineage_bytes: int = 256 * MiB
    lineage_depths: tuple[int, ...] = (0, 10, 100)
    lineage_reps: int = 3
    scale_counts: tuple[int, ...] = (10, 100, 1000)
    space_bytes: int = 1 * GiB
    btrfs_image_bytes: int = 64 * GiB
    floor_samples: int = 50
    floor_idle_seconds: float = 0.05  # before each of the floor's "after idle" samples


QUICK = Config(
    sizes=(64 * MiB, 256 * MiB, 1 * GiB),
    real_cap=256 * MiB,
    small_files=500,
    reps=3,
    slow_reps=2,
    slowest_reps=1,
    slow_from=256 * MiB,
    busy_seconds=6,
    busy_file_bytes=256 * MiB,
    lineage_bytes=64 * MiB,
    lineage_depths=(0, 10, 30),
    lineage_reps=2,
    scale_counts=(10, 100),
    space_bytes=128 * MiB,
)

# For the smoke test: every code path, no meaningful numbers.
TINY = Config(
    sizes=(4 * MiB, 16 * MiB),
    real_cap=4 * MiB,
    small_files=20,
    reps=2,
    slow_reps=1,
    slowest_reps=1,
    slow_from=16 * MiB,
    busy_seconds=3,
    busy_interval=0.5,
    busy_file_bytes=8 * MiB,
    lineage_bytes=4 * MiB,
    lineage_depths=(0, 2),
    lineage_reps=1,
    scale_counts=(3, 10),
    space_bytes=4 * MiB,
    btrfs_image_bytes=1 * GiB,
)


# -- small helpers -------------------------------------------------------------


def sh(*cmd: str | Path, timeout: float = 3600) -> str:
    """Run ``cmd``; its stdout. A failure raises with the command's stderr."""
    args = [str(c) for c in cmd]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def human(nbytes: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= size and nbytes % (size // 4) == 0:
            return f"{nbytes / size:g} {unit}"
    return f"{nbytes} B"


def allocated_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (st_blocks, like ``du``)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def tool_version(*cmd: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return "missing"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def ensure_tool(tool: str, package: str, console: Console) -> bool:
    """``tool`` on PATH, installing Debian ``package`` if it is missing (we are root)."""
    if shutil.which(tool):
        return True
    console.print(f"[yellow]{tool} is missing: installing Debian package {package}[/]")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            console.print(f"[red]could not install {package}:[/] {proc.stderr.strip()[-300:]}")
            return False
    return shutil.which(tool) is not None


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- data ------------------------------------------------------------------------


def make_data(directory: Path, size: int, cfg: Config, seed: int) -> dict[str, int]:
    """Fill ``directory`` with ``size`` logical bytes: small random files and one big file.

    The big file holds random bytes up to ``cfg.real_cap`` (in total); beyond that
    it is a hole.
    """
    rng = random.Random(seed)
    small = directory / "small"
    small.mkdir(parents=True)
    small_bytes = 0
    for i in range(cfg.small_files):
        n = rng.randint(512, 8 * KiB)
        (small / f"f{i:05d}.bin").write_bytes(os.urandom(n))
        small_bytes += n
    big = size - small_bytes
    real = max(0, min(big, cfg.real_cap - small_bytes))
    with open(directory / "big.bin", "wb") as f:
        left = real
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
        f.truncate(big)
    return {
        "logical_bytes": size,
        "random_bytes": real + small_bytes,
        "hole_bytes": big - real,
        "small_files": cfg.small_files,
        "small_file_bytes": small_bytes,
    }


def capacity_for(size: int) -> int:
    """A volume (or image) able to hold ``size`` bytes of files with ext4's overhead."""
    cap = size + size // 4 + 64 * MiB
    return -(-cap // MiB) * MiB


def make_image(image: Path, data: Path, size: int, mnt: Path) -> None:
    """An ext4 image file of ``capacity_for(size)`` bytes holding a copy of ``data``."""
    with open(image, "wb") as f:
        f.truncate(capacity_for(size))
    sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", image)
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", "-o", "loop", image, mnt)
    try:
        sh("cp", "-a", "--sparse=always", f"{data}/.", mnt)
    finally:
        sh("umount", mnt)


# -- the plugin ------------------------------------------------------------------


class Csi:
    """The CSI calls the sidecars and kubelet make, with staging under ``root``."""

    def __init__(self, client: CsiClient, root: Path) -> None:
        self.client = client
        self.root = root
        self.staged: dict[str, tuple[str, str, bool]] = {}  # vid -> staging, target, block

    @staticmethod
    def _cap(block: bool) -> dict[str, Any]:
        cap = block_capability() if block else mount_capability()
        return MessageToDict(cap, preserving_proto_field_name=True)

    def create(
        self, name: str, capacity: int, block: bool = False, source: dict[str, Any] | None = None
    ) -> str:
        req: dict[str, Any] = {
            "name": name,
            "capacity_range": {"required_bytes": str(capacity)},
            "volume_capabilities": [self._cap(block)],
        }
        if source:
            req["volume_content_source"] = source
        return str(self.client.call("CreateVolume", req).volume.volume_id)

    def restore(self, name: str, snap: str, capacity: int, block: bool) -> str:
        return self.create(name, capacity, block, {"snapshot": {"snapshot_id": snap}})

    def clone(self, name: str, vid: str, capacity: int, block: bool) -> str:
        return self.create(name, capacity, block, {"volume": {"volume_id": vid}})

    def delete(self, vid: str) -> None:
        self.client.call("DeleteVolume", {"volume_id": vid})

    def snapshot(self, vid: str, name: str) -> str:
        resp = self.client.call("CreateSnapshot", {"source_volume_id": vid, "name": name})
        if not resp.snapshot.ready_to_use:
            raise RuntimeError(f"snapshot {name} is not ready to use")
        return str(resp.snapshot.snapshot_id)

    def delete_snapshot(self, sid: str) -> None:
        self.client.call("DeleteSnapshot", {"snapshot_id": sid})

    def stage(self, vid: str, block: bool = False) -> str:
        """Stage and publish ``vid``; the published path (a directory, or the device)."""
        staging = str(self.root / "kubelet" / "staging" / vid)
        target = str(self.root / "kubelet" / "pods" / vid / ("dev" if block else "mount"))
        # As kubelet does: the staging directory and the target's parent exist before the
        # calls (the plugin creates no parents).
        os.makedirs(staging, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        cap = self._cap(block)
        self.client.call(
            "NodeStageVolume",
            {"volume_id": vid, "staging_target_path": staging, "volume_capability": cap},
        )
        self.staged[vid] = (staging, target, block)
        self.client.call(
            "NodePublishVolume",
            {
                "volume_id": vid,
                "staging_target_path": staging,
                "target_path": target,
                "volume_capability": cap,
            },
        )
        return target

    def staging_path(self, vid: str) -> Path:
        return Path(self.staged[vid][0])

    def unstage(self, vid: str) -> None:
        staging, target, _ = self.staged.pop(vid)
        self.client.call("NodeUnpublishVolume", {"volume_id": vid, "target_path": target})
        self.client.call("NodeUnstageVolume", {"volume_id": vid, "staging_target_path": staging})

    def unstage_all(self) -> None:
        for vid in list(self.staged):
            try:
                self.unstage(vid)
            except Exception as exc:  # cleanup goes on; force_cleanup catches the rest
                log.warning("event=unstage_failed volume=%s error=%s", vid, exc)
                self.staged.pop(vid, None)

    def list_all(self, method: str) -> int:
        resp = self.client.call(method, {})
        return len(resp.entries)


def daemon_pid(staging: Path) -> int | None:
    """The pid of the fusedrive daemon serving ``staging`` (found in /proc)."""
    needle = str(staging).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv and any(b"fusedrive" in a for a in argv) and b"--foreground" in argv:
            return int(entry.name)
    return None


def proc_io(pid: int | None) -> dict[str, int]:
    if pid is None:
        return {}
    try:
        lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def store_stats(store: Path) -> dict[str, int]:
    """The store's counters, read by a second process (the plugin holds it open too)."""
    from blockstore import Store

    with Store(store, create=False) as s:
        st = s.stats()
    return {
        "file_bytes": st.file_bytes,
        "stored_bytes": st.stored_bytes,
        "unique_raw_bytes": st.unique_raw_bytes,
        "referenced_raw_bytes": st.referenced_raw_bytes,
        "chunk_count": st.chunk_count,
    }


# -- baselines -------------------------------------------------------------------


class Btrfs:
    """A btrfs on a loop device backed by a sparse image file in the work directory."""

    def __init__(self, work: Path, image_bytes: int, stack: contextlib.ExitStack) -> None:
        self.image = work / "btrfs.img"
        self.mnt = work / "btrfs"
        with open(self.image, "wb") as f:
            f.truncate(image_bytes)
        sh("mkfs.btrfs", "-q", "-f", self.image)
        self.mnt.mkdir()
        self.device = sh("losetup", "--find", "--show", self.image).strip()
        stack.callback(self._detach)
        sh("mount", self.device, self.mnt)
        stack.callback(self._unmount)
        self.version = tool_version("btrfs", "--version")

    def _unmount(self) -> None:
        with contextlib.suppress(RuntimeError):
            sh("umount", self.mnt)

    def _detach(self) -> None:
        with contextlib.suppress(RuntimeError):
            sh("losetup", "-d", self.device)

    def subvolume(self, name: str) -> Path:
        path = self.mnt / name
        sh("btrfs", "subvolume", "create", path)
        return path

    def delete(self, path: Path) -> None:
        sh("btrfs", "subvolume", "delete", path)


def lvm_thin_status() -> str:
    """'' if LVM thin snapshots can be measured here, else why not."""
    if not os.path.exists("/dev/mapper/control"):
        return "not measured: this kernel has no device-mapper (/dev/mapper/control is missing)"
    try:
        targets = sh("dmsetup", "targets")
    except (RuntimeError, OSError) as exc:
        first = str(exc).split(": ", 1)[-1].splitlines()[0]
        return f"not measured: the kernel has no usable device-mapper driver ({first})"
    if "thin-pool" not in targets:
        return "not measured: the kernel's device-mapper lacks the thin-pool target"
    return "not measured: LVM thin pools are not wired into this benchmark yet"


# -- 1. snapshot, restore and clone against the baselines ----------------------------


def reps_for(system: str, size: int, cfg: Config) -> int:
    if system in ("hostpath", "dd"):
        if size > cfg.real_cap and size > cfg.slow_from:
            return cfg.slowest_reps
        if size >= cfg.slow_from:
            return cfg.slow_reps
    return cfg.reps


class Compare:
    """One size: the data, our volumes and each baseline's, and the timed rounds."""

    def __init__(
        self, csi: Csi, work: Path, btrfs: Btrfs | None, cfg: Config, size: int, index: int
    ) -> None:
        self.csi, self.work, self.btrfs, self.cfg, self.size = csi, work, btrfs, cfg, size
        self.tag = f"z{index}"
        self.dir = work / f"size-{index}"
        self.data = self.dir / "hostpath-volume"  # the data; also the hostpath volume
        self.image = self.dir / "hostpath-block.img"
        self.cap = capacity_for(size)

    def prepare(self) -> dict[str, Any]:
        self.dir.mkdir()
        info: dict[str, Any] = make_data(self.data, self.size, self.cfg, seed=self.size)
        make_image(self.image, self.data, self.size, self.dir / "mnt")
        info["block_image_bytes"] = self.cap
        info["block_image_allocated_bytes"] = allocated_bytes(self.image)
        # Ours: a filesystem volume with a copy of the directory, a block volume with
        # the image written onto its loop device; both stay staged (live).
        self.fs_vid = self.csi.create(f"{self.tag}-fs", self.cap)
        target = self.csi.stage(self.fs_vid)
        t = timed(lambda: sh("cp", "-a", "--sparse=always", f"{self.data}/.", target))
        request_flush(self.csi.staging_path(self.fs_vid))
        info["fill_fs_seconds"] = t
        self.blk_vid = self.csi.create(f"{self.tag}-blk", self.cap, block=True)
        dev = self.csi.stage(self.blk_vid, block=True)
        t = timed(lambda: sh("dd", f"if={self.image}", f"of={dev}", "bs=4M", "conv=sparse,fsync"))
        request_flush(self.csi.staging_path(self.blk_vid))
        info["fill_block_seconds"] = t
        if self.btrfs is not None:
            self.bt_fs = self.btrfs.subvolume(f"{self.tag}-fs")
            sh("cp", "-a", "--sparse=always", f"{self.data}/.", self.bt_fs)
            self.bt_blk = self.btrfs.subvolume(f"{self.tag}-blk")
            sh("cp", "--sparse=always", self.image, self.bt_blk / "disk.img")
            self.btrfs_snaps = self.btrfs.mnt / f"{self.tag}-snaps"
            self.btrfs_snaps.mkdir()
            os.sync()
        self.base_snaps = {
            "filesystem": self.csi.snapshot(self.fs_vid, f"{self.tag}-fs-base"),
            "block": self.csi.snapshot(self.blk_vid, f"{self.tag}-blk-base"),
        }
        return info

    # Each system's operations: name -> fn(rep) returning seconds (undoing is untimed).
    def ours(self, mode: str) -> dict[str, Callable[[int], float]]:
        block = mode == "block"
        vid = self.blk_vid if block else self.fs_vid
        base = self.base_snaps[mode]
        m = mode[:3]

        def snapshot(i: int) -> float:
            sid = ""

            def make() -> None:
                nonlocal sid
                sid = self.csi.snapshot(vid, f"{self.tag}-{m}-s{i}")

            t = timed(make)
            self.csi.delete_snapshot(sid)
            return t

        def restore(i: int) -> float:
            new = ""

            def make() -> None:
                nonlocal new
                new = self.csi.restore(f"{self.tag}-{m}-r{i}", base, self.cap, block)

            t = timed(make)
            if i == 0:
                self.stage_seconds[mode] = timed(lambda: self.csi.stage(new, block))
                self.csi.unstage(new)
            self.csi.delete(new)
            return t

        def clone(i: int) -> float:
            new = ""

            def make() -> None:
                nonlocal new
                new = self.csi.clone(f"{self.tag}-{m}-c{i}", vid, self.cap, block)

            t = timed(make)
            self.csi.delete(new)
            return t

        return {"snapshot": snapshot, "restore": restore, "clone": clone}

    def hostpath(self, mode: str) -> dict[str, Callable[[int], float]]:
        d = self.dir
        if mode == "filesystem":
            snap = d / "snap.tgz"
            t_snap: list[str | Path] = ["tar", "-S", "-czf", snap, "-C", self.data, "."]

            def snapshot(i: int) -> float:
                return timed(lambda: sh(*t_snap))

            def restore(i: int) -> float:
                if not snap.exists():
                    sh(*t_snap)
                new = d / f"restore-{i}"
                new.mkdir()
                t = timed(lambda: sh("tar", "-xzf", snap, "-C", new))
                shutil.rmtree(new)
                return t

            def clone(i: int) -> float:
                new = d / f"clone-{i}"
                t = timed(lambda: sh("cp", "-a", self.data, new))
                shutil.rmtree(new)
                return t

            return {"snapshot": snapshot, "restore": restore, "clone": clone}
        snap_img = d / "snap.img"

        def copy(src: Path, dst: Path, keep: bool) -> float:
            t = timed(lambda: sh("cp", "--sparse=always", src, dst))
            if not keep:
                dst.unlink()
            return t

        def restore_img(i: int) -> float:
            if not snap_img.exists():
                sh("cp", "--sparse=always", self.image, snap_img)
            return copy(snap_img, d / f"restore-{i}.img", False)

        return {
            "snapshot": lambda i: copy(self.image, snap_img, True),
            "restore": restore_img,
            "clone": lambda i: copy(self.image, d / f"clone-{i}.img", False),
        }

    def dd(self, mode: str) -> dict[str, Callable[[int], float]]:
        if mode != "block":
            return {}

        def clone(i: int) -> float:
            new = self.dir / f"dd-{i}.img"
            t = timed(lambda: sh("dd", f"if={self.image}", f"of={new}", "bs=1M", "conv=sparse"))
            new.unlink()
            return t

        return {"clone": clone}

    def btrfs_ops(self, mode: str) -> dict[str, Callable[[int], float]]:
        bt = self.btrfs
        if bt is None:
            return {}
        vol = self.bt_blk if mode == "block" else self.bt_fs
        snaps = self.btrfs_snaps
        m = mode[:3]
        base = snaps / f"{m}-base"

        def snapshot(i: int) -> float:
            dst = snaps / f"{m}-s{i}"
            t = timed(lambda: sh("btrfs", "subvolume", "snapshot", "-r", vol, dst))
            bt.delete(dst)
            return t

        def restore(i: int) -> float:
            if not base.exists():
                sh("btrfs", "subvolume", "snapshot", "-r", vol, base)
            dst = bt.mnt / f"{self.tag}-{m}-r{i}"
            t = timed(lambda: sh("btrfs", "subvolume", "snapshot", base, dst))
            bt.delete(dst)
            return t

        def clone(i: int) -> float:
            dst = bt.mnt / f"{self.tag}-{m}-c{i}"
            t = timed(lambda: sh("btrfs", "subvolume", "snapshot", vol, dst))
            bt.delete(dst)
            return t

        return {"snapshot": snapshot, "restore": restore, "clone": clone}

    def measure(self) -> dict[str, Any]:
        self.stage_seconds: dict[str, float] = {}
        systems = {
            mode: {
                "fusedrive": self.ours(mode),
                "hostpath": self.hostpath(mode),
                "dd": self.dd(mode),
                "btrfs": self.btrfs_ops(mode),
            }
            for mode in MODES
        }
        samples: dict[str, dict[str, dict[str, list[float]]]] = {
            mode: {s: {op: [] for op in ops} for s, ops in by_system.items() if ops}
            for mode, by_system in systems.items()
        }

        def every_rep(system: str) -> bool:
            return reps_for(system, self.size, self.cfg) >= self.cfg.reps

        # The systems that run every repetition take turns first, in both modes; those
        # that run fewer at this size (hostpath and dd, copying gigabytes) after them:
        # right after them every system's next operations were 3-10x slower for tens of
        # seconds (2026-12-06, 1 GiB: our snapshot 15-45 ms and btrfs's 11-20 ms,
        # against 4-5 ms for both otherwise; a sync and a 2 s pause did not help).
        for fast in (True, False):
            for mode in MODES:
                for rep in range(self.cfg.reps):
                    for system, ops in systems[mode].items():
                        if every_rep(system) != fast or rep >= reps_for(
                            system, self.size, self.cfg
                        ):
                            continue
                        for op, fn in ops.items():
                            # Untimed: the previous operation's dirty pages (a baseline's
                            # gigabytes) reach the disk first, so their writeback does not
                            # land in the next system's time (our commits and btrfs's wait
                            # behind it: a restore does no work that grows with size, yet
                            # the 16 GiB ones took 4x the 64 MiB ones' time after tar -x).
                            os.sync()
                            samples[mode][system][op].append(fn(rep))
        out: dict[str, Any] = {}
        for mode in MODES:
            out[mode] = {
                system: {op: {**summarize(ts, 1e3, "ms"), "seconds": ts} for op, ts in ops.items()}
                for system, ops in samples[mode].items()
            }
            out[mode]["fusedrive_stage_ms"] = self.stage_seconds.get(mode, 0.0) * 1e3
        return out

    def cleanup(self) -> None:
        for sid in getattr(self, "base_snaps", {}).values():
            with contextlib.suppress(Exception):
                self.csi.delete_snapshot(sid)
        for vid in (getattr(self, "fs_vid", None), getattr(self, "blk_vid", None)):
            if vid is None:
                continue
            with contextlib.suppress(Exception):
                if vid in self.csi.staged:
                    self.csi.unstage(vid)
                self.csi.delete(vid)
        if self.btrfs is not None:
            for path in sorted(self.btrfs.mnt.glob(f"{self.tag}-snaps/*"), reverse=True):
                with contextlib.suppress(RuntimeError):
                    self.btrfs.delete(path)
            for path in self.btrfs.mnt.glob(f"{self.tag}-*"):
                if path.name.endswith("-snaps"):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(RuntimeError):
                        self.btrfs.delete(path)
        shutil.rmtree(self.dir, ignore_errors=True)


def measure_compare(
    csi: Csi, work: Path, cfg: Config, console: Console, btrfs: Btrfs | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": {}}
    for index, size in enumerate(cfg.sizes):
        console.print(f"  size {human(size)}")
        c = Compare(csi, work, btrfs, cfg, size, index)
        try:
            entry: dict[str, Any] = {"loadavg_before": loadavg()}
            entry["data"] = c.prepare()
            entry["reps"] = {
                s: reps_for(s, size, cfg) for s in ("fusedrive", "hostpath", "dd", "btrfs")
            }
            entry.update(c.measure())
            entry["loadavg_after"] = loadavg()
            out["sizes"][str(size)] = entry
        finally:
            c.cleanup()
    return out


# -- 2. snapshot of a busy volume ------------------------------------------------------


def measure_busy(csi: Csi, work: Path, cfg: Config) -> dict[str, Any]:
    vid = csi.create("busy", capacity_for(2 * cfg.busy_file_bytes))
    snaps: list[str] = []
    try:
        target = Path(csi.stage(vid))
        staging = csi.staging_path(vid)
        pid = daemon_pid(staging)
        args = [
            "--rw=write",
            "--bs=1M",
            f"--size={cfg.busy_file_bytes}",
            "--refill_buffers=1",
            "--time_based=1",
            f"--runtime={cfg.busy_seconds}",
        ]
        # The same fio job alone first: what the snapshots cost the writer.
        alone = run_fio("alone", target / "alone.dat", args, cfg.busy_seconds + 600)
        (target / "alone.dat").unlink()
        fio: dict[str, Any] = {}
        errors: list[BaseException] = []

        def run() -> None:
            try:
                fio.update(run_fio("busy", target / "busy.dat", args, cfg.busy_seconds + 600))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        before = loadavg()
        thread.start()
        time.sleep(min(2.0, cfg.busy_seconds / 4))  # fio is writing at full speed
        samples: list[dict[str, float]] = []
        while thread.is_alive() and not errors:
            io0 = proc_io(pid)
            t0 = time.perf_counter()
            snaps.append(csi.snapshot(vid, f"busy-{len(snaps)}"))
            t = time.perf_counter() - t0
            io1 = proc_io(pid)
            samples.append(
                {
                    "seconds": t,
                    "daemon_write_bytes": io1.get("write_bytes", 0) - io0.get("write_bytes", 0),
                    "daemon_wchar": io1.get("wchar", 0) - io0.get("wchar", 0),
                }
            )
            time.sleep(cfg.busy_interval)
        thread.join()
        if errors:
            raise errors[0]
        if not samples:
            raise RuntimeError("fio ended before the first snapshot of the busy volume")
        # A snapshot taken while fio still runs is busy; the last may land after fio ended.
        secs = [s["seconds"] for s in samples]
        summary = summarize(secs, 1e3, "ms")
        xs = sorted(secs)
        summary["p99_ms"] = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))] * 1e3
        summary["p50_ms"] = summary["median_ms"]
        written = [s["daemon_write_bytes"] for s in samples]
        wchar = [s["daemon_wchar"] for s in samples]
        return {
            "fio": fio,
            "fio_alone": alone,
            "fio_args": args,
            "interval_s": cfg.busy_interval,
            "snapshots": len(samples),
            "latency": summary,
            "samples": samples,
            "daemon_pid_found": pid is not None,
            "dirty_limit_bytes": DEFAULT_DIRTY_LIMIT,
            "daemon_write_bytes_median": sorted(written)[len(written) // 2],
            "daemon_write_bytes_max": max(written),
            "daemon_wchar_median": sorted(wchar)[len(wchar) // 2],
            "daemon_wchar_max": max(wchar),
            "loadavg_before": before,
            "loadavg_after": loadavg(),
        }
    finally:
        for sid in snaps:
            with contextlib.suppress(Exception):
                csi.delete_snapshot(sid)
        with contextlib.suppress(Exception):
            if vid in csi.staged:
                csi.unstage(vid)
        with contextlib.suppress(Exception):
            csi.delete(vid)


# -- 3. throughput against lineage depth --------------------------------------------------


def measure_lineage(csi: Csi, work: Path, cfg: Config) -> dict[str, Any]:
    nbytes = cfg.lineage_bytes
    vid = csi.create("lineage", capacity_for(3 * nbytes))
    snaps: list[str] = []
    rng = random.Random(5)
    out: dict[str, Any] = {"bytes": nbytes, "depths": {}, "loadavg_before": loadavg()}
    try:
        target = Path(csi.stage(vid))
        data = target / "data.bin"
        run_fio("fill", data, seq_write_args(nbytes), 600 + nbytes / MiB)
        for depth in cfg.lineage_depths:
            while len(snaps) < depth:
                with open(data, "r+b") as f:
                    f.seek(rng.randrange(nbytes // (64 * KiB)) * 64 * KiB)
                    f.write(os.urandom(64 * KiB))
                snaps.append(csi.snapshot(vid, f"lineage-{len(snaps)}"))
            reads, writes = [], []
            for rep in range(cfg.lineage_reps):
                # A fresh daemon: its chunk cache is empty, reads reach the store.
                csi.unstage(vid)
                target = Path(csi.stage(vid))
                r = run_fio(
                    "read",
                    target / "data.bin",
                    [*seq_read_args(nbytes), "--direct=1"],
                    600 + nbytes / MiB,
                )
                reads.append(r["bw_mibps"])
                w = target / f"w-{rep}.bin"
                wr = run_fio("write", w, seq_write_args(nbytes), 600 + nbytes / MiB)
                writes.append(wr["bw_mibps"])
                w.unlink()
            out["depths"][str(depth)] = {
                "snapshots": len(snaps),
                "read_mibps": reads,
                "write_mibps": writes,
                "read_mibps_median": sorted(reads)[len(reads) // 2],
                "write_mibps_median": sorted(writes)[len(writes) // 2],
                "loadavg_after": loadavg(),
            }
        return out
    finally:
        with contextlib.suppress(Exception):
            if vid in csi.staged:
                csi.unstage(vid)
        for sid in snaps:
            with contextlib.suppress(Exception):
                csi.delete_snapshot(sid)
        with contextlib.suppress(Exception):
            csi.delete(vid)


# -- 4. scale ------------------------------------------------------------------------------


def measure_scale(csi: Csi, work: Path, cfg: Config) -> dict[str, Any]:
    """Per-operation times with 10, 100, 1,000 volumes and snapshots in the store.

    The time "at N" of a create is the median of the (up to) 10 creates that brought
    the count to N; of a delete, the 10 deletes that started from N; a list lists all N.
    """
    top = max(cfg.scale_counts)
    vols: list[str] = []
    snaps: list[str] = []
    ops: dict[str, list[float]] = {
        "CreateVolume": [],
        "CreateSnapshot": [],
        "DeleteSnapshot": [],
        "DeleteVolume": [],
    }
    lists: dict[str, dict[str, list[float]]] = {"ListVolumes": {}, "ListSnapshots": {}}
    before = loadavg()

    def list_times(method: str, n: int) -> None:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            got = csi.list_all(method)
            times.append(time.perf_counter() - t0)
        if got < n:
            raise RuntimeError(f"{method} listed {got} entries, expected at least {n}")
        lists[method][str(n)] = times

    try:
        for i in range(top):
            t0 = time.perf_counter()
            vols.append(csi.create(f"scale-v{i:05d}", 64 * MiB))
            ops["CreateVolume"].append(time.perf_counter() - t0)
            if len(vols) in cfg.scale_counts:
                list_times("ListVolumes", len(vols))
        for i in range(top):
            t0 = time.perf_counter()
            snaps.append(csi.snapshot(vols[i], f"scale-s{i:05d}"))
            ops["CreateSnapshot"].append(time.perf_counter() - t0)
            if len(snaps) in cfg.scale_counts:
                list_times("ListSnapshots", len(snaps))
        while snaps:
            sid = snaps.pop()
            ops["DeleteSnapshot"].append(timed(lambda s=sid: csi.delete_snapshot(s)))  # type: ignore[misc]
        while vols:
            vid = vols.pop()
            ops["DeleteVolume"].append(timed(lambda v=vid: csi.delete(v)))  # type: ignore[misc]
    finally:
        for sid in snaps:
            with contextlib.suppress(Exception):
                csi.delete_snapshot(sid)
        for vid in vols:
            with contextlib.suppress(Exception):
                csi.delete(vid)

    def at(times: list[float], n: int, creating: bool) -> dict[str, float | int]:
        window = times[max(0, n - 10) : n] if creating else times[top - n : top - n + 10]
        return summarize(window, 1e3, "ms")

    per_count: dict[str, dict[str, Any]] = {}
    for op, times in ops.items():
        creating = op.startswith("Create")
        per_count[op] = {str(n): at(times, n, creating) for n in cfg.scale_counts}
    for method, by_n in lists.items():
        per_count[method] = {n: summarize(ts, 1e3, "ms") for n, ts in by_n.items()}
    return {
        "counts": list(cfg.scale_counts),
        "per_count": per_count,
        "all_seconds": ops,
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }


# -- 6. the floor: what any CSI call and any store change costs here -----------------------


def measure_floor(csi: Csi, work: Path, cfg: Config, have_h2load: bool) -> dict[str, Any]:
    """What bounds a snapshot, restore or clone on this machine, measured in this run.

    - ``csi_round_trip``: ``Probe`` (no work in the plugin) through the same client
      and socket: the gRPC round trip every operation pays;
    - ``durable_commit``: a one-key LMDB write transaction in a scratch environment on
      the disk under test, with the store's sync settings (LMDB's commit flushes its
      pages, then its meta page): the least a change that must survive a crash pays;
    - ``flush_request``: ``control.request_flush`` of an idle staged volume (syncfs and
      the daemon's answer with nothing to commit): what a snapshot or clone of a live
      volume adds.
    Their sum bounds how fast one operation can be, so how many times faster than a
    baseline we can be: ``report`` shows it beside the ratios it caps. Each part is
    also measured after ``cfg.floor_idle_seconds`` of idleness (``after_idle``): what
    a call that arrives at a quiet node pays; the bound uses the back-to-back times,
    the least each part takes.
    """
    n, idle = cfg.floor_samples, cfg.floor_idle_seconds
    hot: dict[str, list[float]] = {}
    cold: dict[str, list[float]] = {}

    def sample(part: str, fn: Callable[[], object]) -> None:
        """``n`` samples back to back and ``n`` each after ``idle`` seconds of sleep,
        taken in turns: on a virtual machine a step right after another runs on a
        busy CPU, one after a pause wakes a halted one (both happen to a CSI call)."""
        hot[part], cold[part] = [], []
        for _ in range(n):
            hot[part].append(timed(fn))
            time.sleep(idle)
            cold[part].append(timed(fn))

    sample("csi_round_trip", lambda: csi.client.call("Probe", {}))
    scratch = work / "floor-lmdb"
    scratch.mkdir()
    # The store's own settings (blockstore/environment.py): sync and metasync on.
    with lmdb.open(str(scratch), map_size=64 * MiB, subdir=True, readahead=False) as env:

        def commit() -> None:
            with env.begin(write=True) as txn:
                txn.put(b"key", os.urandom(8))

        sample("durable_commit", commit)
    shutil.rmtree(scratch)
    vid = csi.create("floor", 64 * MiB)
    try:
        csi.stage(vid)
        staging = csi.staging_path(vid)
        sample("flush_request", lambda: request_flush(staging))
    finally:
        with contextlib.suppress(Exception):
            if vid in csi.staged:
                csi.unstage(vid)
        with contextlib.suppress(Exception):
            csi.delete(vid)
    out: dict[str, Any] = {k: {**summarize(v, 1e3, "ms"), "seconds": v} for k, v in hot.items()}
    out["after_idle"] = {
        "idle_seconds": idle,
        **{k: {**summarize(v, 1e3, "ms"), "seconds": v} for k, v in cold.items()},
    }
    if have_h2load:
        c_client = c_client_round_trips(work, n)
        out["csi_round_trip_c_client"] = {**summarize(c_client, 1e3, "ms"), "seconds": c_client}
    else:
        out["csi_round_trip_c_client"] = {"not_measured": "h2load (nghttp2-client) is missing"}
    out["loadavg_after"] = loadavg()
    return out


def c_client_round_trips(work: Path, n: int) -> list[float]:
    """``n`` ``Probe`` calls from nghttp2's ``h2load`` on one connection (seconds each).

    The benchmark's client is Python (grpcio); the sidecars that call a driver in a
    cluster are compiled Go. A C HTTP/2 client sending the same gRPC request shows how
    much of ``csi_round_trip`` is our client's own cost. The plugin's log must show
    ``n`` more successful ``Probe`` calls afterwards (h2load sees HTTP statuses only,
    not gRPC's).
    """
    sock, log = work / "csi.sock", work / "plugin.log"
    body = work / "probe-request.bin"
    msg = csi_pb2.ProbeRequest().SerializeToString()
    body.write_bytes(b"\0" + len(msg).to_bytes(4, "big") + msg)  # gRPC's message framing
    per_request = work / "h2load.tsv"
    ok_before = log.read_text().count("method=Probe code=OK")
    sh(
        "h2load",
        f"--requests={n}",
        "--clients=1",
        "--max-concurrent-streams=1",
        f"--data={body}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"--base-uri=unix:{sock}",
        f"--log-file={per_request}",
        "http://localhost/csi.v1.Identity/Probe",
    )
    rows = [line.split("\t") for line in per_request.read_text().splitlines() if line]
    ok = log.read_text().count("method=Probe code=OK") - ok_before
    if len(rows) != n or any(r[1] != "200" for r in rows) or ok != n:
        raise RuntimeError(f"h2load: {len(rows)} answers of {n}, {ok} Probe OK in the log")
    body.unlink()
    per_request.unlink()
    return [int(r[2]) / 1e6 for r in rows]


# -- 5. dedup and compression ----------------------------------------------------------------


def measure_space(csi: Csi, work: Path, store: Path, cfg: Config) -> dict[str, Any]:
    nbytes = cfg.space_bytes
    src = work / "space-random.bin"
    with open(src, "wb") as f:
        for _ in range(nbytes // (8 * MiB) or 1):
            f.write(os.urandom(min(nbytes, 8 * MiB)))
    text = work / "space-text.bin"
    ts = TextSource(seed=3)
    with open(text, "wb") as f:
        for c in ts.chunks(nbytes, 1 * MiB):
            f.write(c)
    vids: list[str] = []
    steps: list[dict[str, Any]] = []
    out: dict[str, Any] = {"bytes": nbytes, "loadavg_before": loadavg()}
    try:
        steps.append({"step": "start", **store_stats(store)})
        for name, source in (("dedup-a", src), ("dedup-b", src), ("text", text)):
            vid = csi.create(f"space-{name}", capacity_for(nbytes))
            vids.append(vid)
            target = Path(csi.stage(vid))
            sh("cp", source, target / "data.bin")
            csi.unstage(vid)  # the daemon flushes everything and exits
            steps.append({"step": name, "logical_bytes": nbytes, **store_stats(store)})
        for i in range(1, len(steps)):
            prev, cur = steps[i - 1], steps[i]
            cur["file_growth_bytes"] = cur["file_bytes"] - prev["file_bytes"]
            cur["stored_growth_bytes"] = cur["stored_bytes"] - prev["stored_bytes"]
            # Physical: what the store's files grew by on disk (chunk bytes + index).
            cur["physical_over_logical"] = cur["file_growth_bytes"] / nbytes
        plain = work / "space-plain"
        plain.mkdir()
        for name, source in (("a", src), ("b", src), ("text", text)):
            sh("cp", source, plain / f"{name}.bin")
        os.sync()
        out["plain_directory_allocated_bytes"] = allocated_bytes(plain)
        shutil.rmtree(plain)
        out["steps"] = steps
        out["loadavg_after"] = loadavg()
        return out
    finally:
        for vid in vids:
            with contextlib.suppress(Exception):
                if vid in csi.staged:
                    csi.unstage(vid)
            with contextlib.suppress(Exception):
                csi.delete(vid)
        src.unlink(missing_ok=True)
        text.unlink(missing_ok=True)


# -- running ----------------------------------------------------------------------------------


def machine_info(work: Path) -> dict[str, Any]:
    fstype = ""
    with contextlib.suppress(RuntimeError, OSError):
        fstype = sh("findmnt", "-n", "-o", "FSTYPE", "-T", work).strip()
    return machine.describe(work, work_dir_fstype=fstype)


def versions() -> dict[str, str]:
    try:
        commit = sh("git", "-C", REPO, "rev-parse", "--short", "HEAD").strip()
    except (RuntimeError, OSError):
        commit = "unknown"
    return {
        "fusedrive_commit": commit,
        "fio": fio_version(),
        "btrfs-progs": tool_version("btrfs", "--version"),
        "lvm2": tool_version("lvm", "version"),
        "h2load": tool_version("h2load", "--version"),
        "tar": tool_version("tar", "--version"),
        "coreutils": tool_version("cp", "--version"),
        "e2fsprogs": tool_version("mke2fs", "-V"),
    }


def check_machine() -> None:
    if os.geteuid() != 0:
        raise OSError("csi_bench needs root (FUSE mounts, loop devices, btrfs)")
    for tool, package in (("fio", "fio"), ("fusermount3", "fuse3"), ("mkfs.ext4", "e2fsprogs")):
        if shutil.which(tool) is None:
            raise OSError(f"csi_bench needs {tool} on PATH (Debian package {package})")
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        raise OSError("csi_bench needs /dev/fuse and /dev/loop-control")


@contextlib.contextmanager
def work_directory(root: Path) -> Iterator[Path]:
    """A fresh directory under ``root``; everything mounted or attached under it is
    released, and it is removed, afterwards."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="csi-", dir=root))
    try:
        yield work
    finally:
        left = leftovers(work)
        if left:
            log.warning("event=leftovers paths=%s", left)
            force_cleanup(work)
        if leftovers(work):
            log.error("event=leftovers_remain paths=%s; not removing %s", leftovers(work), work)
        else:
            _remove_tree(work)
            if created:
                with contextlib.suppress(OSError):
                    root.rmdir()


def _remove_tree(path: Path, wait: float = 10.0) -> None:
    """Remove ``path``, trying again while something still writes into it.

    A FUSE daemon ends a moment after its mount goes and may still write its log
    then: one rmtree can meet a file created behind its back (seen once in a full
    test run). Tries until ``wait`` seconds have passed, then logs what is left.
    """
    deadline = time.monotonic() + wait
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if path.exists():
        log.error("event=not_removed path=%s left=%s", path, sorted(os.listdir(path))[:10])


SECTIONS = ("compare", "busy", "lineage", "scale", "space", "floor")


def run(
    cfg: Config,
    out: Path,
    tmp_root: Path = DEFAULT_TMP,
    console: Console | None = None,
    mode: str = "full",
    sections: tuple[str, ...] = SECTIONS,
) -> dict[str, Any]:
    """Run the sections, write the JSON; returns the results."""
    console = console or Console()
    check_machine()
    have_btrfs = ensure_tool("mkfs.btrfs", "btrfs-progs", console)
    have_h2load = "floor" in sections and ensure_tool("h2load", "nghttp2-client", console)
    t_start = time.perf_counter()
    with work_directory(tmp_root) as work:
        results: dict[str, Any] = {
            "benchmark": "csi_bench",
            "mode": mode,
            "config": asdict(cfg),
            "machine": machine_info(work),
            "versions": versions(),
            "noise": NOISE_NOTE,
            "baselines": {
                "btrfs": "measured" if have_btrfs else "not measured: btrfs-progs is missing",
                "lvm-thin": lvm_thin_status(),
            },
        }
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(running_plugin(work))
            csi = Csi(client, work)
            stack.callback(csi.unstage_all)
            btrfs = Btrfs(work, cfg.btrfs_image_bytes, stack) if have_btrfs else None
            plan: dict[str, Callable[[], dict[str, Any]]] = {
                "space": lambda: measure_space(csi, work, work / "store", cfg),
                "compare": lambda: measure_compare(csi, work, cfg, console, btrfs),
                "busy": lambda: measure_busy(csi, work, cfg),
                "lineage": lambda: measure_lineage(csi, work, cfg),
                "scale": lambda: measure_scale(csi, work, cfg),
                "floor": lambda: measure_floor(csi, work, cfg, have_h2load),
            }
            # Space first: its store is fresh, so growth is not hidden by reused pages.
            for i, key in enumerate(k for k in plan if k in sections):
                console.print(f"[bold]{i + 1}/{len(sections)} {key}[/]")
                t0 = time.perf_counter()
                results[key] = plan[key]()
                results[key]["section_seconds"] = time.perf_counter() - t0
        results["machine"]["loadavg_end"] = loadavg()
        results["total_seconds"] = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    console.print(f"results: {out} ({results['total_seconds']:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    args = command.parse(
        argv,
        prog="python -m benchmarks.csi_bench",
        doc=__doc__ or "",
        default_out=DEFAULT_OUT,
        default_tmp=DEFAULT_TMP,
        quick_help="smaller sizes (a few minutes)",
        tmp_help="where the store, the baselines and the data live; the disk under test",
    )
    cfg = QUICK if args.quick else Config()
    console = Console()
    try:
        run(cfg, args.out, args.tmp_dir, console, mode=args.mode)
    except (OSError, RuntimeError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
