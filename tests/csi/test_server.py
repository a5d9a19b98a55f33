"""The plugin process: its socket, signals, logs, metrics, debugging client and restarts.

Each test runs its own plugin (``new_plugin``) so that it can look at the socket, the log,
or kill and restart the process without disturbing other tests. The restart tests stage
and publish real FUSE mounts, kill the plugin (and in one case the FUSE daemon too) and
check that the restarted plugin finds, repairs and tears them down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from csi_frontend.client import CsiClient
from csi_frontend.proto import csi_pb2 as pb

if TYPE_CHECKING:
    from conftest import PluginProcess

Code = grpc.StatusCode
MiB = 1 << 20
SECRET = "hunter2-SECRET"
NewPlugin = Callable[..., "PluginProcess"]


def mount_cap() -> pb.VolumeCapability:
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume())
    cap.access_mode.mode = pb.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER
    return cap


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``fusedrive-csi`` as installed next to this interpreter (the console script)."""
    exe = Path(sys.executable).parent / "fusedrive-csi"
    assert exe.exists(), f"{exe} is missing: run `make setup` (pip install -e .)"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the socket and signals -------------------------------------------------------------------


def test_socket_is_created_with_mode_0600(new_plugin: NewPlugin) -> None:
    p = new_plugin()
    st = os.lstat(p.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_a_stale_socket_file_is_replaced_on_start(new_plugin: NewPlugin) -> None:
    p = new_plugin(start=False)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(p.socket))
    stale.close()  # the file stays, nobody listens: what a killed plugin leaves
    assert stat.S_ISSOCK(os.lstat(p.socket).st_mode)
    client = p.start()
    assert client is not None
    assert client.call("GetPluginInfo").name == "csi.fusedrive.io"


def test_a_path_that_is_not_a_socket_is_refused_without_a_traceback(
    new_plugin: NewPlugin,
) -> None:
    p = new_plugin(start=False)
    p.socket.write_text("precious data, not a socket")
    p.start(wait=False)
    assert p.proc is not None
    code = p.proc.wait(timeout=60)
    assert code != 0
    assert p.socket.read_text() == "precious data, not a socket"
    log = p.log()
    assert "not a socket" in log
    assert "Traceback" not in log


def test_a_store_path_that_is_a_file_is_refused_without_a_traceback(
    new_plugin: NewPlugin,
) -> None:
    p = new_plugin(start=False)
    p.store.write_text("not a directory")
    p.start(wait=False)
    assert p.proc is not None
    assert p.proc.wait(timeout=60) == 1
    log = p.log()
    assert "fusedrive-csi: error: " in log and "not a directory" in log
    assert "Traceback" not in log
    assert not p.socket.exists()


def test_sigterm_exits_zero_and_removes_the_socket(new_plugin: NewPlugin) -> None:
    p = new_plugin()
    assert p.socket.exists()
    assert p.stop(signal.SIGTERM) == 0
    assert not p.socket.exists()
    assert "event=stopped" in p.log()


# -- the debugging client -----------------------------------------------------------------------


def test_call_get_plugin_info_prints_json(new_plugin: NewPlugin) -> None:
    p = new_plugin()
    res = cli("call", "GetPluginInfo", "--endpoint", p.endpoint)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["name"] == "csi.fusedrive.io"
    assert info["vendor_version"]


def test_call_create_volume_with_name_and_size(new_plugin: NewPlugin) -> None:
    p = new_plugin()
    res = cli("call", "CreateVolume", "--name", "v1", "--size", "1GiB", "--endpoint", p.endpoint)
    assert res.returncode == 0, res.stderr
    vol = json.loads(res.stdout)["volume"]
    assert vol["volume_id"] == "v1"
    assert int(vol["capacity_bytes"]) == 1 << 30
    assert p.client is not None
    got = p.client.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id="v1"))
    assert got.volume.capacity_bytes == 1 << 30


def test_a_failing_call_prints_the_code_and_exits_1(new_plugin: NewPlugin) -> None:
    p = new_plugin()
    res = cli("call", "CreateVolume", "--size", "1GiB", "--endpoint", p.endpoint)
    assert res.returncode == 1
    assert re.search(r"INVALID_ARGUMENT: \S", res.stderr), res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    res = cli("call", "GetSnapshot", "--snapshot-id", "nope", "--endpoint", p.endpoint)
    assert res.returncode == 1
    assert "NOT_FOUND: " in res.stderr


def test_call_of_an_unknown_rpc_is_a_usage_error(new_plugin: NewPlugin) -> None:
    p = new_plugin()
    res = cli("call", "NoSuchRpc", "--endpoint", p.endpoint)
    assert res.returncode == 2
    assert "NoSuchRpc" in res.stderr
    assert "Traceback" not in res.stderr


# -- logs and metrics -------------------------------------------------------------------------


def test_one_log_line_per_rpc_with_method_code_and_duration(new_plugin: NewPlugin) -> None:
    p = new_plugin()
    assert p.client is not None
    for _ in range(3):
        p.client.call("Probe")
    with pytest.raises(grpc.RpcError):
        p.client.call("GetSnapshot", pb.GetSnapshotRequest(snapshot_id="nope"))
    p.stop()
    lines = [line for line in p.log().splitlines() if "event=rpc " in line]
    probe = [line for line in lines if "method=Probe " in line]
    assert len(probe) == 3
    assert all(re.search(r"code=OK ms=\d+\.\d", line) for line in probe)
    failed = [line for line in lines if "method=GetSnapshot " in line]
    assert len(failed) == 1
    assert "code=NOT_FOUND" in failed[0]


def test_secrets_are_never_logged(new_plugin: NewPlugin) -> None:
    p = new_plugin("--log-level", "DEBUG")
    assert p.client is not None
    secrets = {"password": SECRET, "token": SECRET + "-2"}
    ok = pb.CreateVolumeRequest(
        name="with-secrets",
        volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        secrets=secrets,
    )
    p.client.call("CreateVolume", ok)
    bad = pb.CreateVolumeRequest(
        name="bad-param", volume_capabilities=[mount_cap()], parameters={"x": "y"}, secrets=secrets
    )
    with pytest.raises(grpc.RpcError):
        p.client.call("CreateVolume", bad)
    for req, method in (
        (pb.DeleteVolumeRequest(volume_id="with-secrets", secrets=secrets), "DeleteVolume"),
        (
            pb.NodeStageVolumeRequest(
                volume_id="ghost",
                staging_target_path=str(p.base / "stage"),
                volume_capability=mount_cap(),
                secrets=secrets,
            ),
            "NodeStageVolume",
        ),
    ):
        try:
            p.client.call(method, req)
        except grpc.RpcError as exc:
            assert SECRET not in (exc.details() or "")
    p.stop()
    log = p.log()
    assert "method=CreateVolume" in log
    assert SECRET not in log


def test_metrics_are_served_with_rpc_counts(new_plugin: NewPlugin) -> None:
    port = free_port()
    p = new_plugin("--metrics-address", f"127.0.0.1:{port}")
    assert p.client is not None
    p.client.call("GetPluginInfo")
    p.client.call("GetPluginInfo")
    with pytest.raises(grpc.RpcError):
        p.client.call("GetSnapshot", pb.GetSnapshotRequest(snapshot_id="nope"))
    # No proxies: the metrics endpoint is on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    counts = {}
    for line in text.splitlines():
        m = re.match(r"fusedrive_csi_rpc_total\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            counts[(labels["method"], labels["code"])] = float(m.group(2))
    assert counts[("GetPluginInfo", "OK")] == 2.0
    assert counts[("GetSnapshot", "NOT_FOUND")] == 1.0
    assert "fusedrive_csi_rpc_seconds" in text
    assert "fusedrive_store_disk_free_bytes" in text


# -- restart recovery (real FUSE mounts) ----------------------------------------------------------


def _stage_and_publish(client: CsiClient, base: Path, name: str) -> tuple[str, Path, Path]:
    vid = client.call(
        "CreateVolume",
        pb.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_cap()],
            capacity_range=pb.CapacityRange(required_bytes=64 * MiB),
        ),
    ).volume.volume_id
    staging = base / "kubelet" / "staging" / vid
    target = base / "kubelet" / "pods" / "pod-1" / vid
    staging.mkdir(parents=True)
    target.parent.mkdir(parents=True)
    client.call(
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=mount_cap()
        ),
    )
    client.call(
        "NodePublishVolume",
        pb.NodePublishVolumeRequest(
            volume_id=vid,
            staging_target_path=str(staging),
            target_path=str(target),
            volume_capability=mount_cap(),
        ),
    )
    return vid, staging, target


def _teardown_node(client: CsiClient, vid: str, staging: Path, target: Path) -> None:
    client.call(
        "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
    )
    client.call(
        "NodeUnstageVolume",
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
    )


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.needs_fuse
def test_restart_after_sigkill_keeps_live_mounts_and_tears_them_down(
    new_plugin: NewPlugin,
) -> None:
    p = new_plugin()
    assert p.client is not None
    vid, staging, target = _stage_and_publish(p.client, p.base, "restart-live")
    _write_synced(target / "before.txt", b"written before the plugin died\n")
    p.stop(signal.SIGKILL)
    assert p.socket.exists()  # a killed plugin leaves its socket behind
    client = p.restart()
    assert client.call("Probe").ready.value
    mounted = {point for point, _, _ in p.mounts()}
    assert {str(staging), str(target)} <= mounted
    assert (target / "before.txt").read_bytes() == b"written before the plugin died\n"
    assert (staging / "before.txt").read_bytes() == b"written before the plugin died\n"
    _teardown_node(client, vid, staging, target)
    assert p.mounts() == []
    assert not target.exists()


@pytest.mark.needs_fuse
def test_restart_remounts_a_volume_whose_fuse_daemon_died(new_plugin: NewPlugin) -> None:
    p = new_plugin()
    assert p.client is not None
    vid, staging, target = _stage_and_publish(p.client, p.base, "restart-stale")
    _write_synced(target / "kept.txt", b"synced before the crash\n")
    daemons = [d for d in p.fuse_daemons() if d.get("mountpoint") == str(staging)]
    assert len(daemons) == 1, p.fuse_daemons()
    pid = int(daemons[0]["pid"])
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert str(p.store).encode() in cmdline  # the daemon this test's plugin started
    p.stop(signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError):
        os.listdir(target)  # the published mount is dead (ENOTCONN)
    client = p.restart()
    assert (target / "kept.txt").read_bytes() == b"synced before the crash\n"
    (target / "after.txt").write_bytes(b"the remounted volume takes writes\n")
    assert (staging / "after.txt").read_bytes() == b"the remounted volume takes writes\n"
    _teardown_node(client, vid, staging, target)
    assert p.mounts() == []
