"""Issue 17: a plugin restart costs the volumes in pods nothing (docs/restart.md).

The container boundary without a cluster: the plugin runs as PID 1 of its own PID
and mount namespaces (``tests/nsutil.py``), the way a container runtime starts it,
and a restart is a SIGKILL of that init, which ends every process in it. The mounter
runs in the host's PID namespace, as its DaemonSet does (``hostPID``). Everything
lives below a shared directory, as under kubelet's Bidirectional hostPath.

The "pod" is a writer process in its own private mount namespace, started after the
volumes were published, so it holds its own copies of the target mounts like a
container does: if any mount it uses died and was replaced on the host, it would
not see the replacement. It appends fsynced records through a filesystem target
(a file held open, plus a new file opened per round) and writes fsynced blocks
through a block target, and records every error it gets.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_frontend import loopdev
from csi_frontend.client import CsiClient
from csi_frontend.mounter_client import MounterClient, MounterError
from csi_frontend.proto import csi_pb2
from tests.nsutil import NsProcess, SharedDir, mounts_below, process_starttime

pytestmark = [pytest.mark.needs_fuse, pytest.mark.needs_loop]

pb = csi_pb2
MiB = 1 << 20
BLOCK_RECORD = 4096
RECORD = 64

WRITER = r"""
import json, os, sys, time
fs_target, block_target, status, stop = sys.argv[1:5]
errors, n = [], 0
data = open(os.path.join(fs_target, "log"), "ab", buffering=0)
dev = os.open(block_target, os.O_RDWR)
def record(i):
    return (b"%08d " % i).ljust(63, b"x") + b"\n"
def block(i):
    return (b"%08d " % i) * (4096 // 9) + b"\n" * (4096 % 9)
last = time.monotonic()
while not os.path.exists(stop) and n < 8000:
    try:
        data.write(record(n))
        os.fsync(data.fileno())
        os.pwrite(dev, block(n), n * 4096)
        os.fsync(dev)
        name = os.path.join(fs_target, "f%d" % (n % 8))
        with open(name, "wb") as f:
            f.write(record(n))
        os.listdir(fs_target)
        n += 1
    except OSError as exc:
        errors.append("%d %s" % (n, exc))
        time.sleep(0.05)
        if len(errors) > 50:
            break
    if time.monotonic() - last > 0.2 or errors:
        last = time.monotonic()
        with open(status + ".tmp", "w") as f:
            json.dump({"n": n, "errors": errors}, f)
        os.replace(status + ".tmp", status)
with open(status + ".tmp", "w") as f:
    json.dump({"n": n, "errors": errors, "done": True}, f)
os.replace(status + ".tmp", status)
"""


def record(i: int) -> bytes:
    return (b"%08d " % i).ljust(RECORD - 1, b"x") + b"\n"


def block(i: int) -> bytes:
    return (b"%08d " % i) * (BLOCK_RECORD // 9) + b"\n" * (BLOCK_RECORD % 9)


def fuse_dev(path: str) -> str | None:
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a = line.split(" - ")[0].split()
            if a[4] == path:
                found = a[2]
    return found


class Node:
    """A mounter, a restartable plugin in its own namespaces, and what they serve."""

    def __init__(self) -> None:
        self.shared = SharedDir("fdr-")
        self.base = self.shared.path
        self.store = self.base / "store"
        self.state = self.base / "state"
        self.runtime = self.base / "run"
        self.kubelet = self.base / "kubelet"
        for d in (self.runtime, self.kubelet / "stg", self.kubelet / "pods"):
            d.mkdir(parents=True)
        self.msock = self.base / "m.sock"
        self.csock = self.base / "csi.sock"
        self.env = {"FUSEDRIVE_RUNTIME_DIR": str(self.runtime)}
        self.mounter: NsProcess | None = None
        self.plugin: NsProcess | None = None
        self.plugins_started = 0
        self.client: CsiClient | None = None
        self.writer: subprocess.Popen[bytes] | None = None

    def start_mounter(self) -> None:
        argv = [sys.executable, "-m", "csi_frontend.cli", "mounter", "--socket", str(self.msock)]
        argv += ["--store", str(self.store), "--allowed-path-prefix", str(self.kubelet)]
        self.mounter = NsProcess(argv, self.base / "mounter.log", self.env, pid_ns=False)
        deadline = time.monotonic() + 60
        while True:
            try:
                MounterClient(self.msock).status()
                return
            except MounterError:
                assert self.mounter.alive() and time.monotonic() < deadline, self.tail("mounter")
                time.sleep(0.1)

    def start_plugin(self) -> CsiClient:
        with contextlib.suppress(FileNotFoundError):
            self.csock.unlink()  # the killed plugin's socket file
        argv = [sys.executable, "-m", "csi_frontend.cli", "serve"]
        argv += ["--endpoint", f"unix://{self.csock}", "--node-id", "n1"]
        argv += ["--store", str(self.store), "--state-dir", str(self.state)]
        argv += ["--mounter-socket", str(self.msock)]
        argv += ["--allowed-path-prefix", str(self.kubelet)]
        self.plugin = NsProcess(argv, self.base / "plugin.log", self.env, pid_ns=True)
        self.plugins_started += 1
        deadline = time.monotonic() + 90
        while not self.csock.exists():
            assert self.plugin.alive() and time.monotonic() < deadline, self.tail("plugin")
            time.sleep(0.05)
        if self.client is not None:
            self.client.close()
        self.client = CsiClient(f"unix://{self.csock}")
        self.client.wait_ready(timeout=60)
        return self.client

    def kill_plugin(self) -> None:
        assert self.plugin is not None
        self.plugin.kill()
        assert not self.plugin.alive()

    def tail(self, which: str) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.base / f"{which}.log").read_text().splitlines()[-40:])
        return ""

    def call(self, method: str, req: Any) -> Any:
        assert self.client is not None
        return self.client.call(method, req)

    def volume(self, name: str, block: bool) -> tuple[str, pb.VolumeCapability]:
        cap = pb.VolumeCapability()
        if block:
            cap.block.SetInParent()
        else:
            cap.mount.SetInParent()
        cap.access_mode.mode = pb.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER
        req = pb.CreateVolumeRequest(
            name=name,
            volume_capabilities=[cap],
            capacity_range=pb.CapacityRange(required_bytes=64 * MiB),
        )
        return self.call("CreateVolume", req).volume.volume_id, cap

    def publish(self, name: str, block: bool) -> tuple[str, str, str]:
        vid, cap = self.volume(name, block)
        staging = str(self.kubelet / "stg" / name)
        os.mkdir(staging)
        pod = self.kubelet / "pods" / name
        pod.mkdir()
        target = str(pod / ("dev" if block else "mount"))
        self.call(
            "NodeStageVolume",
            pb.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=staging, volume_capability=cap
            ),
        )
        self.call(
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=staging,
                target_path=target,
                volume_capability=cap,
            ),
        )
        return vid, staging, target

    def healthy(self, vid: str, path: str) -> bool:
        resp = self.call(
            "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path)
        )
        return not resp.volume_condition.abnormal

    def start_writer(self, fs_target: str, block_target: str) -> None:
        # A private mount namespace: the writer keeps the mounts it starts with, like a
        # container, and never sees a mount made after it started.
        self.status = self.base / "writer.json"
        self.stop_file = self.base / "writer.stop"
        argv = ["unshare", "--mount", "--", sys.executable, "-c", WRITER]
        argv += [fs_target, block_target, str(self.status), str(self.stop_file)]
        with open(self.base / "writer.log", "ab") as log:
            self.writer = subprocess.Popen(argv, stdout=log, stderr=log, cwd="/")
        self.wait_progress(5)

    def progress(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status.read_text()))
        except (OSError, ValueError):
            return {"n": 0, "errors": []}

    def wait_progress(self, more: int) -> int:
        """Wait until the writer has written ``more`` further rounds (without errors)."""
        start = self.progress()["n"]
        deadline = time.monotonic() + 120
        while True:
            p = self.progress()
            assert not p["errors"], p["errors"]
            if p["n"] >= start + more:
                return int(p["n"])
            assert self.writer is not None and self.writer.poll() is None, self.tail("writer")
            assert time.monotonic() < deadline, f"writer stuck at {p['n']}"
            time.sleep(0.05)

    def stop_writer(self) -> dict[str, Any]:
        assert self.writer is not None
        self.stop_file.touch()
        self.writer.wait(timeout=120)
        return self.progress()

    def close(self) -> list[str]:
        if self.writer is not None and self.writer.poll() is None:
            self.writer.kill()
            self.writer.wait()
        if self.client is not None:
            self.client.close()
        if self.plugin is not None and self.plugin.alive():
            self.plugin.kill()
        self.shared.detach_loops()  # while the daemons live (see SharedDir.loops)
        # SIGTERM: the daemons store what they hold and exit; then nothing is left.
        mounter = self.mounter
        if mounter is not None and mounter.alive() and mounter.terminate(timeout=60) is None:
            mounter.kill()
        return self.shared.cleanup()


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    try:
        yield n
    finally:
        problems = n.close()
        assert not problems, problems


def loops_on(dev: str) -> list[str]:
    """Loop devices whose backing file lives on the file system ``dev`` (major:minor)."""
    out = subprocess.run(
        ["losetup", "--json", "--list", "--output", "NAME,BACK-MAJ:MIN"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    devs = json.loads(out or '{"loopdevices": []}')["loopdevices"]
    return sorted(d["name"] for d in devs if str(d.get("back-maj:min", "")).strip() == dev)


def attachment(block_target: str) -> tuple[str, int | None]:
    """The loop device bound at ``block_target`` and the sequence number of its attachment."""
    rdev = os.stat(block_target).st_rdev
    name = f"/dev/loop{os.minor(rdev)}"
    assert os.major(rdev) == 7, block_target
    return name, loopdev.diskseq(name)


def check_data(fs_staging: str, block_target: str, n: int) -> None:
    log = (Path(fs_staging) / "log").read_bytes()
    assert log == b"".join(record(i) for i in range(n))
    with open(block_target, "rb") as f:
        for i in range(n):
            assert f.read(BLOCK_RECORD) == block(i), f"block record {i}"


def run_restarts(node: Node, times: int) -> None:
    node.start_mounter()
    node.start_plugin()
    fs_vid, fs_staging, fs_target = node.publish("fsvol", block=False)
    blk_vid, blk_staging, blk_target = node.publish("blkvol", block=True)
    daemons = {d.volume: (d.pid, d.dev) for d in MounterClient(node.msock).daemons()}
    fs_dev, blk_dev = fuse_dev(fs_staging), fuse_dev(blk_staging)
    assert daemons == {
        fs_vid: (daemons[fs_vid][0], fs_dev),
        blk_vid: (daemons[blk_vid][0], blk_dev),
    }
    assert blk_dev is not None
    loops = loops_on(blk_dev)
    assert len(loops) == 1
    node.start_writer(fs_target, blk_target)

    for _ in range(times):
        old = node.plugin
        assert old is not None
        node.kill_plugin()  # every process of the "container" dies at once
        assert process_starttime(old.init_pid) is None
        node.wait_progress(10)  # the pod writes on while no plugin runs
        node.start_plugin()
        deadline = time.monotonic() + 60
        while not (node.healthy(fs_vid, fs_target) and node.healthy(blk_vid, blk_target)):
            assert time.monotonic() < deadline, node.tail("plugin")
            time.sleep(0.2)
        node.wait_progress(10)
        # Adopted, not replaced: the same daemons, mounts and loop device.
        now = {d.volume: (d.pid, d.dev) for d in MounterClient(node.msock).daemons()}
        assert now == daemons
        assert (fuse_dev(fs_staging), fuse_dev(blk_staging)) == (fs_dev, blk_dev)
        assert loops_on(blk_dev) == loops

    result = node.stop_writer()
    assert result["errors"] == [] and result.get("done"), result
    check_data(fs_staging, blk_target, int(result["n"]))
    assert node.plugins_started == times + 1

    # The restarted plugin still tears everything down cleanly.
    for vid, staging, target in (
        (fs_vid, fs_staging, fs_target),
        (blk_vid, blk_staging, blk_target),
    ):
        node.call(
            "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
        )
        node.call(
            "NodeUnstageVolume",
            pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
        )
    assert MounterClient(node.msock).daemons() == []
    assert mounts_below(node.kubelet) == []  # no dead layer left below a target either
    assert loops_on(blk_dev) == []


def test_a_killed_plugin_costs_the_pods_nothing(node: Node) -> None:
    run_restarts(node, 1)


def test_ten_plugin_restarts_in_a_row_under_write_load(node: Node) -> None:
    run_restarts(node, 10)


def test_the_plugin_waits_for_a_mounter_that_is_not_there_yet(node: Node) -> None:
    """Staging without a mounter is UNAVAILABLE (the CO retries), never a crash."""
    import grpc

    node.start_plugin()
    vid, cap = node.volume("early", block=False)
    staging = str(node.kubelet / "stg" / "early")
    os.mkdir(staging)
    req = pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging, volume_capability=cap
    )
    with pytest.raises(grpc.RpcError) as err:
        node.call("NodeStageVolume", req)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "mounter" in (err.value.details() or "")
    assert fuse_dev(staging) is None
    node.start_mounter()
    node.call("NodeStageVolume", req)
    assert fuse_dev(staging) is not None
    node.call(
        "NodeUnstageVolume", pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging)
    )
    assert fuse_dev(staging) is None


@pytest.mark.parametrize("plugin_down", [False, True], ids=["plugin-up", "plugin-down"])
def test_a_mounter_upgrade_as_documented_loses_nothing_written(
    node: Node, plugin_down: bool
) -> None:
    """The mounter replaced without a drain (docs/restart.md): its daemons store what
    they hold and end; the plugin mounts every volume again through the new mounter and
    stacks fresh binds on the targets, where new opens see all the data. With
    ``plugin_down`` the plugin is killed too and comes back only after the new mounter:
    the loop device it attached from its dead mount namespace, over a dead mount, can
    then be found only by the attachment the node state recorded."""
    node.start_mounter()
    node.start_plugin()
    fs_vid, fs_staging, fs_target = node.publish("fsvol", block=False)
    blk_vid, blk_staging, blk_target = node.publish("blkvol", block=True)
    before = {d.volume: d.pid for d in MounterClient(node.msock).daemons()}
    first_loop = attachment(blk_target)
    payload = os.urandom(3 * MiB)
    (Path(fs_target) / "unsynced").write_bytes(payload)  # buffered in the daemon only
    blocks = os.urandom(MiB)
    fd = os.open(blk_target, os.O_RDWR)
    try:
        os.pwrite(fd, blocks, 8 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)

    assert node.mounter is not None
    if plugin_down:
        node.kill_plugin()
    assert node.mounter.terminate(timeout=90) == 0, node.tail("mounter")
    node.start_mounter()
    if plugin_down:
        node.start_plugin()
    deadline = time.monotonic() + 90
    while not (node.healthy(fs_vid, fs_target) and node.healthy(blk_vid, blk_target)):
        assert time.monotonic() < deadline, node.tail("plugin")
        time.sleep(0.2)
    after = {d.volume: d.pid for d in MounterClient(node.msock).daemons()}
    assert set(after) == {fs_vid, blk_vid} and not set(after.values()) & set(before.values())
    assert (Path(fs_target) / "unsynced").read_bytes() == payload
    second_loop = attachment(blk_target)  # the fresh bind over the dead one
    assert second_loop != first_loop
    with open(blk_target, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(MiB) == blocks
    resp = node.call(
        "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id=fs_vid, volume_path=fs_target)
    )
    assert "died" in resp.volume_condition.message  # a pod that held files open must restart

    for vid, staging, target in (
        (fs_vid, fs_staging, fs_target),
        (blk_vid, blk_staging, blk_target),
    ):
        node.call(
            "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
        )
        node.call(
            "NodeUnstageVolume",
            pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
        )
    assert MounterClient(node.msock).daemons() == []
    assert mounts_below(node.kubelet) == []  # no dead layer left below a target either
    # Neither the device over the dead mount's image nor the new one is left attached.
    for name, seq in (first_loop, second_loop):
        assert loopdev.diskseq(name) != seq, f"{name} (attachment {seq}) was left attached"
