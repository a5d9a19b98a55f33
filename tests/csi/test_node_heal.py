"""A dead FUSE daemon is noticed and healed without a plugin restart (issue 16, item 5).

Each test starts its own plugin, stages and publishes a volume through the socket,
kills that volume's daemon by the PID its mount record names (after checking the
process serves this test's store), and watches what the plugin does: within a bounded
wait the staging mount and every target work again (writes through the target land
in the volume), NodeGetVolumeStats says abnormal while the volume is down (never with
the host disk's numbers), and the metrics count the death and the heal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_frontend.proto import csi_pb2 as pb

if TYPE_CHECKING:
    from conftest import Csi

NewCsi = Callable[..., "Csi"]
Code = grpc.StatusCode
MiB = 1 << 20
WAIT = 120.0  # a generous bound on a shared, busy machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def daemon_pid(csi: Csi, staging: Path) -> int | None:
    recs = [d for d in csi.plugin.fuse_daemons() if d.get("mountpoint") == str(staging)]
    if not recs:
        return None
    pid = int(recs[0]["pid"])
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if str(csi.plugin.store).encode() in cmdline else None


def kill_daemon(csi: Csi, staging: Path) -> int:
    """SIGKILL the daemon this test's plugin started for ``staging``; wait until it is gone."""
    pid = daemon_pid(csi, staging)
    assert pid is not None, csi.plugin.fuse_daemons()
    os.kill(pid, signal.SIGKILL)
    wait_for(f"daemon {pid} to exit", lambda: not _alive(pid))
    return pid


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _writes(path: Path, data: bytes) -> bool:
    try:
        _write_synced(path, data)
        return path.read_bytes() == data
    except OSError:
        return False


def stats(csi: Csi, vid: str, path: Path) -> Any:
    return csi.call(
        "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(path))
    )


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def stage_and_publish(
    csi: Csi, base: Path, targets: int = 1, block: bool = False
) -> tuple[str, Path, list[Path]]:
    vol = csi.create_volume(size=16 * MiB, block=block)
    cap = csi.block_cap() if block else csi.mount_cap()
    staging = base / "kubelet" / "staging" / vol.volume_id
    staging.mkdir(parents=True)
    csi.call(
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=cap
        ),
    )
    paths = []
    for i in range(targets):
        target = base / "kubelet" / "pods" / f"pod-{i}" / vol.volume_id
        target.parent.mkdir(parents=True)
        csi.call(
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=cap,
            ),
        )
        paths.append(target)
    return vol.volume_id, staging, paths


def teardown(csi: Csi, vid: str, staging: Path, targets: list[Path]) -> None:
    for target in targets:
        csi.call(
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)),
        )
    csi.call(
        "NodeUnstageVolume",
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
    )
    assert csi.plugin.mounts() == []
    assert csi.plugin.loops() == []
    for target in targets:  # removed: nothing was ever written into the bare directory
        assert not target.exists()


@pytest.mark.needs_fuse
def test_a_killed_daemon_is_remounted_and_every_target_works_again(
    new_csi: NewCsi,
) -> None:
    port = free_port()
    csi = new_csi("--metrics-address", f"127.0.0.1:{port}")
    vid, staging, targets = stage_and_publish(csi, csi.plugin.base, targets=2)
    _write_synced(targets[0] / "before.txt", b"synced before the death\n")
    old = kill_daemon(csi, staging)
    for i, target in enumerate(targets):
        data = f"written through target {i} after the heal\n".encode()
        path = target / f"after{i}"
        wait_for(f"writes through {target}", lambda p=path, d=data: _writes(p, d))
        assert (staging / f"after{i}").read_bytes() == data
    new = daemon_pid(csi, staging)
    assert new is not None and new != old
    assert (targets[1] / "before.txt").read_bytes() == b"synced before the death\n"
    got = stats(csi, vid, targets[0])
    assert got.volume_condition.abnormal is False
    assert "restart the pod" in got.volume_condition.message
    assert [u.total for u in got.usage if u.unit == pb.VolumeUsage.BYTES] == [16 * MiB]
    m = metrics(port)
    assert m[("fusedrive_csi_daemon_deaths_total", ())] == 1.0
    assert m[("fusedrive_csi_daemon_heals_total", (("result", "ok"),))] == 1.0
    # the healed volume is watched again: a second death heals too
    kill_daemon(csi, staging)
    wait_for("writes after a second death", lambda: _writes(targets[0] / "again", b"again"))
    wait_for(
        "the second heal to be counted",
        lambda: metrics(port).get(("fusedrive_csi_daemon_heals_total", (("result", "ok"),))) == 2,
    )
    teardown(csi, vid, staging, targets)


@pytest.mark.needs_fuse
@pytest.mark.needs_loop
def test_a_killed_daemon_of_a_block_volume_gets_its_loop_device_back(
    new_csi: NewCsi,
) -> None:
    csi = new_csi()
    vid, staging, (target,) = stage_and_publish(csi, csi.plugin.base, block=True)
    before = os.urandom(4096)
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, before, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    # A process holding the device across the death (a pod's open file descriptor):
    # its loop device cannot go away, so the heal must attach a new one.
    held = os.open(target, os.O_RDWR | os.O_DIRECT)
    kill_daemon(csi, staging)

    def device_works() -> bool:
        try:
            fd = os.open(target, os.O_RDWR | os.O_DIRECT)
        except OSError:
            return False
        try:
            import mmap

            buf = mmap.mmap(-1, 4096)
            buf.write(b"\x5a" * 4096)
            os.pwritev(fd, [buf], 5 * MiB)
            os.fsync(fd)
            back = mmap.mmap(-1, 4096)
            os.preadv(fd, [back], 5 * MiB)
            again = mmap.mmap(-1, 4096)
            os.preadv(fd, [again], 3 * MiB)
            return bytes(back) == b"\x5a" * 4096 and bytes(again) == before
        except OSError:
            return False
        finally:
            os.close(fd)

    try:
        wait_for("the block device at the target to work again", device_works)
        import mmap

        with pytest.raises(OSError):  # the descriptor held across the death stays broken
            os.preadv(held, [mmap.mmap(-1, 4096)], 3 * MiB)
    finally:
        os.close(held)
    loops = csi.plugin.loops()
    assert [back for _dev, back in loops] == [str(staging / "disk.img")]
    got = stats(csi, vid, target)
    assert got.volume_condition.abnormal is False
    teardown(csi, vid, staging, [target])


@pytest.mark.needs_fuse
def test_while_the_daemon_is_dead_stats_say_so_and_the_volume_still_tears_down(
    new_csi: NewCsi,
) -> None:
    csi = new_csi("--heal-delay", "3600")  # keep it dead for the test's length
    vid, staging, (target,) = stage_and_publish(csi, csi.plugin.base)
    kill_daemon(csi, staging)
    for path in (staging, target):
        # The dead mount (ENOTCONN) can show before the death event (pidfd) is
        # recorded: wait for the message that names the death, then check the rest.
        got = wait_for(
            "stats to notice the death",
            lambda p=path: (
                (s := stats(csi, vid, p)).volume_condition.abnormal
                and "died" in s.volume_condition.message
                and s
            ),
        )
        assert "restart the pod" in got.volume_condition.message
        assert list(got.usage) == []
    with pytest.raises(OSError):
        os.listdir(target)  # not healed: the delay holds it
    teardown(csi, vid, staging, [target])
    assert not target.exists()


@pytest.mark.needs_fuse
def test_stats_never_report_a_staging_path_that_is_not_our_mount(new_csi: NewCsi) -> None:
    csi = new_csi("--heal-delay", "3600")
    vid, staging, _ = stage_and_publish(csi, csi.plugin.base, targets=0)
    # The daemon goes away cleanly (as after a full disk): staging is a plain directory
    # of the host's disk now, and its numbers must not be reported as the volume's.
    pid = daemon_pid(csi, staging)
    assert pid is not None
    subprocess.run(["umount", str(staging)], check=True)
    wait_for(f"daemon {pid} to exit", lambda: not _alive(pid))
    got = stats(csi, vid, staging)
    assert got.volume_condition.abnormal is True
    assert "not mounted" in got.volume_condition.message
    assert list(got.usage) == []
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(staging)], check=True)
    try:
        got = stats(csi, vid, staging)
        assert got.volume_condition.abnormal is True
        assert "not ours" in got.volume_condition.message
        assert list(got.usage) == []
        err = csi.error(
            "NodeUnstageVolume",
            pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
            Code.FAILED_PRECONDITION,
        )
        assert "tmpfs" in err.details()
    finally:
        subprocess.run(["umount", str(staging)], check=True)
    teardown(csi, vid, staging, [])


@pytest.mark.needs_fuse
def test_a_killed_daemon_of_an_ephemeral_inline_volume_is_healed(new_csi: NewCsi) -> None:
    csi = new_csi()
    vid = csi.unique("inline")
    target = csi.plugin.base / "kubelet" / "pods" / "p" / "inline"
    target.parent.mkdir(parents=True)
    req = pb.NodePublishVolumeRequest(
        volume_id=vid,
        target_path=str(target),
        volume_capability=csi.mount_cap(),
        volume_context={"csi.storage.k8s.io/ephemeral": "true", "size": "16MiB"},
    )
    csi.call("NodePublishVolume", req)
    staging = csi.plugin.state / "ephemeral" / vid
    _write_synced(target / "before", b"before")
    kill_daemon(csi, staging)
    wait_for("writes through the inline volume", lambda: _writes(target / "after", b"after"))
    assert (target / "before").read_bytes() == b"before"
    csi.call(
        "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
    )
    assert csi.plugin.mounts() == []
    assert not target.exists()
