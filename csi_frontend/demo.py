"""``make demo``: the plugin's whole lifecycle, driven the way kubelet and the sidecars do.

Starts ``fusedrive-csi`` on a temporary socket and store, then: creates a
1 GiB volume, stages and publishes it, writes files, snapshots it, restores
the snapshot into a new volume, clones the live volume, publishes both and
verifies their contents, expands the volume online, and does the same for a
block volume carrying an ext4 filesystem made on its loop device. It prints a
table of every step with its time and leaves nothing mounted or attached.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import loopdev, mounts
from .client import CsiClient, block_capability, mount_capability

GiB = 1 << 30
MiB = 1 << 20


class DemoFailure(Exception):
    """A step's verification failed."""


@dataclass
class Step:
    name: str
    seconds: float
    result: str


@dataclass
class Lifecycle:
    root: Path
    client: CsiClient
    steps: list[Step] = field(default_factory=list)
    staged: list[tuple[str, str]] = field(default_factory=list)
    published: list[tuple[str, str]] = field(default_factory=list)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.steps.append(Step(name, time.perf_counter() - t0, "" if out is None else str(out)))
        return out

    # -- CSI calls as the sidecars and kubelet make them ----------------------------
    def create(self, name: str, size: int, block: bool = False, source: dict | None = None) -> str:
        cap = block_capability() if block else mount_capability()
        req: dict[str, Any] = {
            "name": name,
            "capacity_range": {"required_bytes": str(size)},
            "volume_capabilities": [_to_dict(cap)],
        }
        if source:
            req["volume_content_source"] = source
        return str(self.client.call("CreateVolume", req).volume.volume_id)

    def stage(self, vid: str, block: bool = False) -> str:
        staging = str(self.root / "kubelet" / "staging" / vid)
        os.makedirs(staging, exist_ok=True)  # as kubelet does; the plugin creates no parents
        cap = block_capability() if block else mount_capability()
        self.client.call(
            "NodeStageVolume",
            {"volume_id": vid, "staging_target_path": staging, "volume_capability": _to_dict(cap)},
        )
        self.staged.append((vid, staging))
        return staging

    def publish(self, vid: str, staging: str, block: bool = False, readonly: bool = False) -> str:
        target = str(self.root / "kubelet" / "pods" / vid / ("dev" if block else "mount"))
        os.makedirs(os.path.dirname(target), exist_ok=True)  # kubelet makes the parent
        cap = block_capability() if block else mount_capability()
        self.client.call(
            "NodePublishVolume",
            {
                "volume_id": vid,
                "staging_target_path": staging,
                "target_path": target,
                "volume_capability": _to_dict(cap),
                "readonly": readonly,
            },
        )
        self.published.append((vid, target))
        return target

    def snapshot(self, vid: str, name: str) -> str:
        resp = self.client.call("CreateSnapshot", {"source_volume_id": vid, "name": name})
        if not resp.snapshot.ready_to_use:
            raise DemoFailure("snapshot not ready to use")
        return str(resp.snapshot.snapshot_id)

    def teardown(self) -> None:
        for vid, target in reversed(self.published):
            with contextlib.suppress(Exception):
                self.client.call("NodeUnpublishVolume", {"volume_id": vid, "target_path": target})
        for vid, staging in reversed(self.staged):
            with contextlib.suppress(Exception):
                self.client.call(
                    "NodeUnstageVolume", {"volume_id": vid, "staging_target_path": staging}
                )
        self.published.clear()
        self.staged.clear()


def _to_dict(msg: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True)


def _tree_digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _write_files(target: str, count: int, big: int) -> str:
    os.makedirs(os.path.join(target, "docs"), exist_ok=True)
    for i in range(count):
        with open(os.path.join(target, "docs", f"note-{i:04d}.txt"), "w") as f:
            f.write(f"note {i}\n" * (i % 50 + 1))
    with open(os.path.join(target, "blob.bin"), "wb") as f:
        f.write(os.urandom(big))
    return _tree_digest(target)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def lifecycle(lc: Lifecycle) -> None:
    c = lc.client
    vid = lc.step("CreateVolume v1 (1 GiB, mount)", lambda: lc.create("v1", GiB))
    staging = lc.step("NodeStageVolume v1 (starts fusedrive mount)", lambda: lc.stage(vid))
    target = lc.step("NodePublishVolume v1 (bind mount)", lambda: lc.publish(vid, staging))
    digest = lc.step("write 300 files + 32 MiB to v1", lambda: _write_files(target, 300, 32 * MiB))
    snap = lc.step("CreateSnapshot s1 of v1 (live)", lambda: lc.snapshot(vid, "s1"))
    lc.step("write after the snapshot to v1", lambda: Path(target, "after.txt").write_text("x"))
    restored = lc.step(
        "CreateVolume r1 from snapshot s1",
        lambda: lc.create("r1", GiB, source={"snapshot": {"snapshot_id": snap}}),
    )
    clone = lc.step(
        "CreateVolume c1 cloned from live v1",
        lambda: lc.create("c1", GiB, source={"volume": {"volume_id": vid}}),
    )
    r_target = lc.step(
        "stage + publish r1 (read-only)",
        lambda: lc.publish(restored, lc.stage(restored), readonly=True),
    )
    c_target = lc.step("stage + publish c1", lambda: lc.publish(clone, lc.stage(clone)))

    def verify_restore() -> str:
        if _tree_digest(r_target) != digest:
            raise DemoFailure("restored volume differs from the snapshot's content")
        return "identical to v1 at snapshot time"

    def verify_clone() -> str:
        if not Path(c_target, "after.txt").exists():
            raise DemoFailure("clone of the live volume misses the latest write")
        Path(c_target, "after.txt").unlink()
        if _tree_digest(c_target) != digest:
            raise DemoFailure("clone differs from v1")
        return "holds every write to v1, independent of it"

    lc.step("verify r1 content", verify_restore)
    lc.step("verify c1 content", verify_clone)

    def expand() -> str:
        c.call(
            "ControllerExpandVolume",
            {"volume_id": vid, "capacity_range": {"required_bytes": str(2 * GiB)}},
        )
        c.call("NodeExpandVolume", {"volume_id": vid, "volume_path": target})
        st = os.statvfs(target)
        size = st.f_blocks * st.f_frsize
        if size != 2 * GiB:
            raise DemoFailure(f"df shows {size} bytes after expansion, expected {2 * GiB}")
        return "df shows 2.0 GiB"

    lc.step("expand v1 online to 2 GiB", expand)

    # Block volume with ext4 made on its loop device.
    bid = lc.step("CreateVolume b1 (256 MiB, block)", lambda: lc.create("b1", 256 * MiB, True))
    b_staging = lc.step(
        "NodeStageVolume b1 (mount + loop device)", lambda: lc.stage(bid, block=True)
    )
    dev = lc.step(
        "NodePublishVolume b1 (device bind)", lambda: lc.publish(bid, b_staging, block=True)
    )
    fs_dir = lc.root / "ext4"
    fs_dir.mkdir(exist_ok=True)

    def make_ext4() -> str:
        _run("mkfs.ext4", "-q", "-F", dev)
        _run("mount", dev, str(fs_dir))
        try:
            Path(fs_dir, "hello.txt").write_text("hello from ext4 on fusedrive\n")
        finally:
            _run("umount", str(fs_dir))
        return "mkfs.ext4, wrote hello.txt"

    lc.step("mkfs.ext4 on the device, write a file", make_ext4)
    bsnap = lc.step("CreateSnapshot bs1 of b1", lambda: lc.snapshot(bid, "bs1"))
    bclone = lc.step(
        "CreateVolume bc1 from bs1 (block)",
        lambda: lc.create("bc1", 256 * MiB, True, {"snapshot": {"snapshot_id": bsnap}}),
    )
    bc_dev = lc.step(
        "stage + publish bc1", lambda: lc.publish(bclone, lc.stage(bclone, block=True), block=True)
    )

    def verify_block() -> str:
        _run("mount", "-o", "ro,noload", bc_dev, str(fs_dir))
        try:
            text = Path(fs_dir, "hello.txt").read_text()
        finally:
            _run("umount", str(fs_dir))
        if text != "hello from ext4 on fusedrive\n":
            raise DemoFailure("block clone's ext4 lacks the file")
        return "ext4 on the clone holds hello.txt"

    lc.step("mount bc1's ext4, verify", verify_block)
    lc.step("unpublish + unstage everything", lc.teardown)

    def delete_all() -> str:
        for s in ("s1", "bs1"):
            c.call("DeleteSnapshot", {"snapshot_id": s})
        for v in ("v1", "r1", "c1", "b1", "bc1"):
            c.call("DeleteVolume", {"volume_id": v})
        return "5 volumes, 2 snapshots"

    lc.step("DeleteSnapshot + DeleteVolume", delete_all)


@contextlib.contextmanager
def running_plugin(root: Path) -> Iterator[CsiClient]:
    """A ``fusedrive-csi`` process on a socket under ``root``; stopped on exit."""
    sock = root / "csi.sock"
    log = open(root / "plugin.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "csi_frontend.cli",
            "serve",
            "--endpoint",
            f"unix://{sock}",
            "--node-id",
            "demo-node",
            "--store",
            str(root / "store"),
            "--state-dir",
            str(root / "state"),
            "--allowed-path-prefix",
            str(root / "kubelet"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = CsiClient(str(sock))
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DemoFailure(f"plugin did not start; see {root / 'plugin.log'}")
            time.sleep(0.05)
        client.wait_ready()
        yield client
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def leftovers(root: Path) -> list[str]:
    """Mounts and loop devices under ``root`` that should not be there."""
    prefix = str(root)
    out = [m.mountpoint for m in mounts.mount_table() if m.mountpoint.startswith(prefix)]
    out += [d.name for d in loopdev.list_devices() if d.backing_file.startswith(prefix)]
    return out


def force_cleanup(root: Path) -> None:
    for dev in loopdev.list_devices():
        if dev.backing_file.startswith(str(root)):
            with contextlib.suppress(Exception):
                loopdev.detach(dev.name)
    for m in sorted(mounts.mount_table(), key=lambda m: -len(m.mountpoint)):
        if m.mountpoint.startswith(str(root)):
            with contextlib.suppress(Exception):
                mounts.unmount(m.mountpoint)


def run(root: Path) -> list[Step]:
    """The lifecycle under ``root``; raises DemoFailure if a verification fails."""
    with running_plugin(root) as client:
        lc = Lifecycle(root, client)
        try:
            lifecycle(lc)
        finally:
            lc.teardown()
    left = leftovers(root)
    if left:
        force_cleanup(root)
        raise DemoFailure(f"left behind: {left}")
    return lc.steps


def main() -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="fusedrive-demo-") as tmp:
        root = Path(tmp)
        try:
            steps = run(root)
        except Exception as exc:
            force_cleanup(root)
            console.print(f"[red]demo failed:[/red] {exc}")
            log = root / "plugin.log"
            if log.exists():
                console.print(log.read_text()[-4000:])
            return 1
    table = Table(title="fusedrive CSI lifecycle")
    table.add_column("#", justify="right")
    table.add_column("step")
    table.add_column("result")
    table.add_column("time", justify="right")
    for i, s in enumerate(steps, 1):
        result = s.result.replace(str(root), "…")
        table.add_row(str(i), s.name, result[:60], f"{s.seconds * 1000:.0f} ms")
    console.print(table)
    console.print("nothing left mounted or attached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
