"""CSI Node service conformance, through real gRPC, real FUSE mounts and real loop devices.

The plugin stages a volume by starting ``fusedrive mount`` (one FUSE daemon per staged
volume), publishes by bind-mounting, and for block volumes attaches a loop device to the
volume's image file. Tests that only check request validation run without FUSE; the rest
are marked ``needs_fuse`` (block volumes also ``needs_loop``).

Every test works in its own directory (``node_dir``), which is cleaned of mounts, loop
devices and FUSE daemons afterwards even if the test failed. Like kubelet, a test creates
the staging directory and the target's parent; the plugin creates the target itself.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import os
import signal
import stat
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from csi_frontend.plugin import TOPOLOGY_KEY
from csi_frontend.proto import csi_pb2 as pb

if TYPE_CHECKING:
    from conftest import Csi

Code = grpc.StatusCode
RPC = pb.NodeServiceCapability.RPC
Usage = pb.VolumeUsage
MiB = 1 << 20
BLKGETSIZE64 = 0x80081272
EPHEMERAL = "csi.storage.k8s.io/ephemeral"
ESCAPING_IDS = ("../x", "a/b", ".hidden", "../../etc/passwd")


# -- request builders ---------------------------------------------------------------------------


def stage_req(csi: Csi, vid: str, staging: Path, block: bool = False) -> Any:
    return pb.NodeStageVolumeRequest(
        volume_id=vid,
        staging_target_path=str(staging),
        volume_capability=csi.block_cap() if block else csi.mount_cap(),
    )


def publish_req(
    csi: Csi, vid: str, staging: Path, target: Path, readonly: bool = False, block: bool = False
) -> Any:
    return pb.NodePublishVolumeRequest(
        volume_id=vid,
        staging_target_path=str(staging),
        target_path=str(target),
        volume_capability=csi.block_cap() if block else csi.mount_cap(),
        readonly=readonly,
    )


def stage(csi: Csi, vid: str, staging: Path, block: bool = False) -> None:
    staging.mkdir(parents=True, exist_ok=True)
    csi.call("NodeStageVolume", stage_req(csi, vid, staging, block))


def publish(
    csi: Csi, vid: str, staging: Path, target: Path, readonly: bool = False, block: bool = False
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    csi.call("NodePublishVolume", publish_req(csi, vid, staging, target, readonly, block))


def unpublish(csi: Csi, vid: str, target: Path) -> None:
    csi.call(
        "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
    )


def unstage(csi: Csi, vid: str, staging: Path) -> None:
    csi.call(
        "NodeUnstageVolume",
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
    )


def mounted(csi: Csi, path: Path) -> list[tuple[str, str, str]]:
    """The mounts stacked exactly at ``path``."""
    return [m for m in csi.plugin.mounts(path.parent) if m[0] == str(path)]


def restore(csi: Csi, snapshot_id: str, size: int) -> str:
    return csi.create_volume(
        size=size,
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
        ),
    ).volume_id


def device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    finally:
        os.close(fd)
    return int(struct.unpack("Q", raw)[0])


# -- info and capabilities (no FUSE needed) --------------------------------------------------


def test_node_get_info_names_the_node_and_its_topology(csi: Csi) -> None:
    info = csi.call("NodeGetInfo")
    assert info.node_id == "test-node"
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: "test-node"}
    assert info.max_volumes_per_node >= 0


def test_node_topology_matches_what_create_volume_reports(csi: Csi) -> None:
    info = csi.call("NodeGetInfo")
    vol = csi.create_volume()
    assert [dict(t.segments) for t in vol.accessible_topology] == [
        dict(info.accessible_topology.segments)
    ]


def test_node_get_capabilities(csi: Csi) -> None:
    caps = {c.rpc.type for c in csi.call("NodeGetCapabilities").capabilities}
    assert {RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME} <= caps


# -- request validation (no FUSE needed) ------------------------------------------------------


@pytest.mark.parametrize("missing", ["volume_id", "staging_target_path", "volume_capability"])
def test_node_stage_with_a_missing_field_is_invalid(csi: Csi, node_dir: Path, missing: str) -> None:
    vol = csi.create_volume()
    staging = node_dir / "staging"
    staging.mkdir()
    req = stage_req(csi, vol.volume_id, staging)
    req.ClearField(missing)
    csi.error("NodeStageVolume", req, Code.INVALID_ARGUMENT)
    assert mounted(csi, staging) == []


def test_node_stage_with_an_unsupported_capability_is_invalid(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume()
    staging = node_dir / "staging"
    staging.mkdir()
    for cap in (csi.mount_cap("MULTI_NODE_MULTI_WRITER"), csi.block_cap()):
        req = stage_req(csi, vol.volume_id, staging)
        req.volume_capability.CopyFrom(cap)
        csi.error("NodeStageVolume", req, Code.INVALID_ARGUMENT)
    assert mounted(csi, staging) == []


def test_node_stage_of_an_unknown_volume_is_not_found(csi: Csi, node_dir: Path) -> None:
    staging = node_dir / "staging"
    staging.mkdir()
    csi.error("NodeStageVolume", stage_req(csi, csi.unique("ghost"), staging), Code.NOT_FOUND)
    assert mounted(csi, staging) == []


@pytest.mark.parametrize("missing", ["volume_id", "target_path", "volume_capability"])
def test_node_publish_with_a_missing_field_is_invalid(
    csi: Csi, node_dir: Path, missing: str
) -> None:
    vol = csi.create_volume()
    req = publish_req(csi, vol.volume_id, node_dir / "staging", node_dir / "target")
    req.ClearField(missing)
    csi.error("NodePublishVolume", req, Code.INVALID_ARGUMENT)


def test_node_publish_of_an_unstaged_volume_fails_precondition(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume()
    staging, target = node_dir / "staging", node_dir / "pod" / "target"
    staging.mkdir()
    target.parent.mkdir()
    req = publish_req(csi, vol.volume_id, staging, target)
    csi.error("NodePublishVolume", req, Code.FAILED_PRECONDITION)
    assert not target.exists()
    assert mounted(csi, target) == []


@pytest.mark.parametrize(
    "path", ["relative/dir", "/tmp/../etc/fusedrive-x", "/a/./b", "./x", "/a//b/../c"]
)
def test_node_paths_must_be_absolute_and_normalised(csi: Csi, node_dir: Path, path: str) -> None:
    vol = csi.create_volume()
    good = node_dir / "staging"
    good.mkdir()
    csi.error(
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=path, volume_capability=csi.mount_cap()
        ),
        Code.INVALID_ARGUMENT,
    )
    csi.error(
        "NodePublishVolume",
        pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=str(good),
            target_path=path,
            volume_capability=csi.mount_cap(),
        ),
        Code.INVALID_ARGUMENT,
    )
    for method, req in (
        (
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=path),
        ),
        (
            "NodeUnstageVolume",
            pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=path),
        ),
    ):
        csi.error(method, req, Code.INVALID_ARGUMENT)
    # Stats only reads: a path the volume is not staged or published at is NOT_FOUND
    # (csi-sanity sends "some/path" and expects NOT_FOUND).
    csi.error(
        "NodeGetVolumeStats",
        pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=path),
        Code.NOT_FOUND,
    )
    assert not Path("/etc/fusedrive-x").exists()
    assert not (csi.plugin.base / "relative").exists()
    assert not (Path(__file__).resolve().parents[2] / "relative").exists()  # plugin's cwd


@pytest.mark.parametrize("bad", ESCAPING_IDS)
def test_node_ids_that_leave_the_store_are_invalid(csi: Csi, node_dir: Path, bad: str) -> None:
    staging, target = node_dir / "staging", node_dir / "target"
    staging.mkdir()
    state_before = sorted(p.name for p in csi.plugin.state.rglob("*"))
    for method, req in (
        ("NodeStageVolume", stage_req(csi, bad, staging)),
        ("NodePublishVolume", publish_req(csi, bad, staging, target)),
        (
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(volume_id=bad, target_path=str(target)),
        ),
        (
            "NodeUnstageVolume",
            pb.NodeUnstageVolumeRequest(volume_id=bad, staging_target_path=str(staging)),
        ),
        (
            "NodeGetVolumeStats",
            pb.NodeGetVolumeStatsRequest(volume_id=bad, volume_path=str(staging)),
        ),
        (
            "NodeExpandVolume",
            pb.NodeExpandVolumeRequest(
                volume_id=bad,
                volume_path=str(staging),
                capacity_range=pb.CapacityRange(required_bytes=MiB),
            ),
        ),
    ):
        csi.error(method, req, Code.INVALID_ARGUMENT)
    assert sorted(p.name for p in csi.plugin.state.rglob("*")) == state_before
    assert not target.exists()


def test_node_get_volume_stats_of_unknown_volume_or_path_is_not_found(
    csi: Csi, node_dir: Path
) -> None:
    csi.error(
        "NodeGetVolumeStats",
        pb.NodeGetVolumeStatsRequest(volume_id=csi.unique("ghost"), volume_path=str(node_dir)),
        Code.NOT_FOUND,
    )
    vol = csi.create_volume()
    csi.error(
        "NodeGetVolumeStats",
        pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(node_dir)),
        Code.NOT_FOUND,
    )
    csi.error(
        "NodeGetVolumeStats",
        pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id),
        Code.INVALID_ARGUMENT,
    )


def test_node_unstage_and_unpublish_of_what_is_not_there_succeed(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume()
    staging, target = node_dir / "staging", node_dir / "target"
    staging.mkdir()
    unpublish(csi, vol.volume_id, target)
    unstage(csi, vol.volume_id, staging)
    unstage(csi, csi.unique("ghost"), staging)
    assert staging.is_dir()  # the CO's directory is left alone


# -- stage and publish (real FUSE) ------------------------------------------------------------


@pytest.mark.needs_fuse
def test_node_stage_twice_succeeds_and_the_mount_is_live(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume()
    staging = node_dir / "staging"
    stage(csi, vol.volume_id, staging)
    stage(csi, vol.volume_id, staging)  # identical request: OK, nothing stacked
    entries = mounted(csi, staging)
    assert len(entries) == 1, entries
    assert entries[0][1].startswith("fuse")
    (staging / "hello.txt").write_text("live\n")
    assert "hello.txt" in os.listdir(staging)
    assert (staging / "hello.txt").read_text() == "live\n"
    unstage(csi, vol.volume_id, staging)
    unstage(csi, vol.volume_id, staging)  # not staged any more: OK
    assert mounted(csi, staging) == []
    assert csi.plugin.mounts(node_dir) == []


@pytest.mark.needs_fuse
def test_node_stage_at_another_path_while_staged_fails(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume()
    staging, other = node_dir / "staging", node_dir / "other"
    stage(csi, vol.volume_id, staging)
    other.mkdir()
    try:
        csi.error("NodeStageVolume", stage_req(csi, vol.volume_id, other), Code.FAILED_PRECONDITION)
        assert mounted(csi, other) == []
    finally:
        unstage(csi, vol.volume_id, staging)


@pytest.mark.needs_fuse
def test_node_publish_writes_through_target_and_reads_through_staging(
    csi: Csi, node_dir: Path
) -> None:
    vol = csi.create_volume()
    staging, target = node_dir / "staging", node_dir / "pods" / "p1" / "mount"
    stage(csi, vol.volume_id, staging)
    publish(csi, vol.volume_id, staging, target)
    assert target.is_dir()  # the plugin created the target
    publish(csi, vol.volume_id, staging, target)  # the same publish again: OK
    assert len(mounted(csi, target)) == 1
    (target / "data.bin").write_bytes(b"x" * 100_000)
    os.mkdir(target / "sub")
    (target / "sub" / "f").write_text("nested")
    assert (staging / "data.bin").read_bytes() == b"x" * 100_000
    assert (staging / "sub" / "f").read_text() == "nested"
    unpublish(csi, vol.volume_id, target)
    assert not target.exists()
    assert mounted(csi, target) == []
    unpublish(csi, vol.volume_id, target)  # twice: OK
    assert (staging / "data.bin").stat().st_size == 100_000  # the staged volume is untouched
    unstage(csi, vol.volume_id, staging)
    assert csi.plugin.mounts(node_dir) == []


@pytest.mark.needs_fuse
def test_node_publish_same_target_with_other_readonly_already_exists(
    csi: Csi, node_dir: Path
) -> None:
    vol = csi.create_volume()
    staging, target = node_dir / "staging", node_dir / "target"
    stage(csi, vol.volume_id, staging)
    publish(csi, vol.volume_id, staging, target)
    try:
        req = publish_req(csi, vol.volume_id, staging, target, readonly=True)
        csi.error("NodePublishVolume", req, Code.ALREADY_EXISTS)
        assert len(mounted(csi, target)) == 1
        (target / "still-writable").write_text("yes")
    finally:
        unpublish(csi, vol.volume_id, target)
        unstage(csi, vol.volume_id, staging)


@pytest.mark.needs_fuse
def test_node_publish_readonly_rejects_writes_with_erofs(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume()
    staging = node_dir / "staging"
    rw, ro = node_dir / "rw", node_dir / "ro"
    stage(csi, vol.volume_id, staging)
    publish(csi, vol.volume_id, staging, rw)
    publish(csi, vol.volume_id, staging, ro, readonly=True)
    try:
        (rw / "file").write_text("from the writer")
        assert (ro / "file").read_text() == "from the writer"
        with pytest.raises(OSError) as info:
            (ro / "new").write_text("must fail")
        assert info.value.errno == errno.EROFS
        with pytest.raises(OSError) as info:
            os.open(ro / "file", os.O_WRONLY)
        assert info.value.errno == errno.EROFS
        assert not (staging / "new").exists()
    finally:
        unpublish(csi, vol.volume_id, ro)
        unpublish(csi, vol.volume_id, rw)
        unstage(csi, vol.volume_id, staging)
    assert csi.plugin.mounts(node_dir) == []


@pytest.mark.needs_fuse
def test_node_get_volume_stats_reports_bytes_and_inodes(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume(size=64 * MiB)
    staging, target = node_dir / "staging", node_dir / "target"
    stage(csi, vol.volume_id, staging)
    publish(csi, vol.volume_id, staging, target)
    try:
        (target / "f").write_bytes(os.urandom(3 * MiB))
        for path in (staging, target):
            resp = csi.call(
                "NodeGetVolumeStats",
                pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(path)),
            )
            by_unit = {u.unit: u for u in resp.usage}
            assert set(by_unit) == {Usage.BYTES, Usage.INODES}
            b, i = by_unit[Usage.BYTES], by_unit[Usage.INODES]
            assert b.total == vol.capacity_bytes
            assert 0 <= b.available <= b.total and 0 <= b.used <= b.total
            assert i.total > 0 and i.used >= 2  # the root and the file
            assert resp.volume_condition.abnormal is False
    finally:
        unpublish(csi, vol.volume_id, target)
        unstage(csi, vol.volume_id, staging)


@pytest.mark.needs_fuse
def test_controller_expand_of_a_staged_mount_volume_shows_at_once(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume(size=32 * MiB)
    staging = node_dir / "staging"
    stage(csi, vol.volume_id, staging)
    try:
        st = os.statvfs(staging)
        assert st.f_blocks * st.f_frsize == 32 * MiB
        resp = csi.call(
            "ControllerExpandVolume",
            pb.ControllerExpandVolumeRequest(
                volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=96 * MiB)
            ),
        )
        assert resp.node_expansion_required is False
        st = os.statvfs(staging)
        assert st.f_blocks * st.f_frsize == 96 * MiB
    finally:
        unstage(csi, vol.volume_id, staging)


@pytest.mark.needs_fuse
def test_controller_modify_of_a_staged_volume_changes_compression_at_once(
    csi: Csi, node_dir: Path
) -> None:
    texts = {
        name: b"".join(b"%s %d of a log that compresses well\n" % (name, i) for i in range(120_000))
        for name in (b"a", b"b")  # different bytes: no chunk of one dedups against the other
    }
    vol = csi.create_volume(size=64 * MiB, parameters={"compression_level": "3"})
    staging = node_dir / "staging"
    stage(csi, vol.volume_id, staging)
    try:

        def stored_after_writing(name: bytes) -> int:
            with csi.open_store() as store:
                before = store.stats().stored_bytes
            (staging / name.decode()).write_bytes(texts[name])
            snap = csi.create_snapshot(vol.volume_id)  # flushes the live mount
            csi.call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
            with csi.open_store() as store:
                return store.stats().stored_bytes - before

        compressed = stored_after_writing(b"a")
        assert compressed < len(texts[b"a"]) // 4
        csi.call(
            "ControllerModifyVolume",
            pb.ControllerModifyVolumeRequest(
                volume_id=vol.volume_id, mutable_parameters={"compression_level": "0"}
            ),
        )
        stored = stored_after_writing(b"b")
        assert stored > len(texts[b"b"]), (compressed, stored)  # raw, plus a codec byte each
        assert (staging / "a").read_bytes() == texts[b"a"]
        assert (staging / "b").read_bytes() == texts[b"b"]
    finally:
        unstage(csi, vol.volume_id, staging)


@pytest.mark.needs_fuse
def test_a_dead_fuse_daemon_shows_abnormal_and_the_volume_still_tears_down(
    new_csi: Any,
) -> None:
    # Its own plugin, told to wait before healing, so the volume stays dead meanwhile
    # (tests/csi/test_node_heal.py covers the heal itself).
    csi = new_csi("--heal-delay", "3600")
    node_dir = csi.plugin.base / "t"
    node_dir.mkdir()
    vol = csi.create_volume()
    staging, target = node_dir / "staging", node_dir / "target"
    stage(csi, vol.volume_id, staging)
    publish(csi, vol.volume_id, staging, target)
    daemons = [d for d in csi.plugin.fuse_daemons() if d.get("mountpoint") == str(staging)]
    assert len(daemons) == 1, csi.plugin.fuse_daemons()
    pid = int(daemons[0]["pid"])
    assert str(csi.plugin.store).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    os.kill(pid, signal.SIGKILL)  # the daemon the plugin started for this test's volume
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = csi.call(
        "NodeGetVolumeStats",
        pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(target)),
    )
    assert stats.volume_condition.abnormal is True
    assert stats.volume_condition.message
    got = csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.status.volume_condition.abnormal is True
    unpublish(csi, vol.volume_id, target)
    assert not os.path.lexists(target)
    unstage(csi, vol.volume_id, staging)
    assert csi.plugin.mounts(node_dir) == []


# -- snapshots and clones of a live volume ------------------------------------------------------


@pytest.mark.needs_fuse
def test_snapshot_of_a_staged_volume_holds_writes_that_returned_before_it(
    csi: Csi, node_dir: Path
) -> None:
    vol = csi.create_volume(size=64 * MiB)
    staging, target = node_dir / "staging", node_dir / "target"
    stage(csi, vol.volume_id, staging)
    publish(csi, vol.volume_id, staging, target)
    closed = os.urandom(300_000)
    still_open = os.urandom(200_000)
    (target / "closed.bin").write_bytes(closed)  # closed, never fsynced
    fd = os.open(target / "open.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, still_open) == len(still_open)  # no fsync, no close
        snap = csi.create_snapshot(vol.volume_id)
        os.write(fd, b"after the snapshot")
    finally:
        os.close(fd)
    assert snap.ready_to_use
    restored = restore(csi, snap.snapshot_id, 64 * MiB)
    r_staging, r_target = node_dir / "r-staging", node_dir / "r-target"
    stage(csi, restored, r_staging)
    publish(csi, restored, r_staging, r_target)
    try:
        assert (r_target / "closed.bin").read_bytes() == closed
        assert (r_target / "open.bin").read_bytes() == still_open
        # and the snapshot's volume is independent of its source
        (r_target / "closed.bin").write_bytes(b"changed in the restore")
        assert (target / "closed.bin").read_bytes() == closed
    finally:
        unpublish(csi, restored, r_target)
        unstage(csi, restored, r_staging)
        unpublish(csi, vol.volume_id, target)
        unstage(csi, vol.volume_id, staging)
    assert csi.plugin.mounts(node_dir) == []


@pytest.mark.needs_fuse
def test_clone_of_a_staged_volume_holds_writes_that_returned_before_it(
    csi: Csi, node_dir: Path
) -> None:
    vol = csi.create_volume(size=32 * MiB)
    staging = node_dir / "staging"
    stage(csi, vol.volume_id, staging)
    payload = os.urandom(150_000)
    fd = os.open(staging / "live.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        clone = csi.create_volume(
            size=32 * MiB,
            volume_content_source=pb.VolumeContentSource(
                volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id)
            ),
        ).volume_id
    finally:
        os.close(fd)
    c_staging = node_dir / "c-staging"
    stage(csi, clone, c_staging)
    try:
        assert (c_staging / "live.bin").read_bytes() == payload
    finally:
        unstage(csi, clone, c_staging)
        unstage(csi, vol.volume_id, staging)


@pytest.mark.needs_fuse
def test_snapshots_cut_while_writers_run_hold_every_write_that_returned_before_them(
    csi: Csi, node_dir: Path
) -> None:
    """Two threads keep rewriting 1 MiB blocks of their file in a ring while CreateSnapshot
    is called three times. Write number ``i`` goes to block ``i % RING`` and carries ``i``
    in its first bytes. In each restored snapshot, every block holds exactly the bytes of
    one write, no older than the last write to it that returned before the request and
    no newer than the writes started before the response."""
    ring, blk = 24, MiB
    pool = [os.urandom(blk) for _ in range(5)]

    def block(i: int) -> bytes:
        return struct.pack(">Q", i) + pool[i % len(pool)][8:]

    vol = csi.create_volume(size=128 * MiB)
    staging = node_dir / "staging"
    stage(csi, vol.volume_id, staging)
    started = [0, 0]  # per writer: writes issued (the next one's number)
    done = [0, 0]  # per writer: writes that returned
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            fd = os.open(staging / f"w{w}.bin", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                while not stop.is_set():
                    i = started[w]
                    started[w] = i + 1
                    assert os.pwrite(fd, block(i), (i % ring) * blk) == blk
                    done[w] = i + 1
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    cuts: list[tuple[str, list[int], list[int]]] = []  # snapshot, done before, started after
    restored: list[tuple[str, Path]] = []
    try:
        for t in threads:
            t.start()
        for _ in range(3):
            least = [d + ring for d in done]  # every block written at least once more
            deadline = time.monotonic() + 60
            while min(d - m for d, m in zip(done, least, strict=True)) < 0:
                assert not errors and time.monotonic() < deadline, (errors, done, least)
                time.sleep(0.01)
            assert not errors, errors
            assert all(t.is_alive() for t in threads)
            before = list(done)
            snap = csi.create_snapshot(vol.volume_id)
            cuts.append((snap.snapshot_id, before, list(started)))
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for n, (sid, before, after) in enumerate(cuts):
            vid = restore(csi, sid, 128 * MiB)
            r_staging = node_dir / f"r{n}"
            stage(csi, vid, r_staging)
            restored.append((vid, r_staging))
            for w in range(2):
                data = (r_staging / f"w{w}.bin").read_bytes()
                assert len(data) == ring * blk
                for p in range(ring):
                    got = data[p * blk : (p + 1) * blk]
                    i = struct.unpack(">Q", got[:8])[0]
                    # the last write to block p that returned before the request
                    last = before[w] - 1 - (before[w] - 1 - p) % ring
                    assert last <= i < after[w], (n, w, p, i, last, after[w])
                    assert i % ring == p and got == block(i), (n, w, p, i)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        for vid, r_staging in restored:
            unstage(csi, vid, r_staging)
        unstage(csi, vol.volume_id, staging)
    assert csi.plugin.mounts(node_dir) == []


# -- block volumes ------------------------------------------------------------------------------


@pytest.mark.needs_fuse
@pytest.mark.needs_loop
def test_block_volume_stage_attaches_a_loop_device_and_publish_makes_a_block_device(
    csi: Csi, node_dir: Path
) -> None:
    vol = csi.create_volume(size=16 * MiB, block=True)
    staging, target = node_dir / "staging", node_dir / "pod" / "dev"
    stage(csi, vol.volume_id, staging, block=True)
    try:
        loops = csi.plugin.loops(node_dir)
        assert len(loops) == 1, loops
        assert loops[0][1] == str(staging / "disk.img")
        stage(csi, vol.volume_id, staging, block=True)  # again: the same device, no second one
        assert csi.plugin.loops(node_dir) == loops
        publish(csi, vol.volume_id, staging, target, block=True)
        assert stat.S_ISBLK(os.stat(target).st_mode)
        assert device_size(target) == 16 * MiB
        block = os.urandom(4096)
        fd = os.open(target, os.O_RDWR)
        try:
            assert os.pwrite(fd, block, 5 * MiB) == 4096
            assert os.pwrite(fd, b"\x42" * 512, 0) == 512
            os.fsync(fd)
            assert os.pread(fd, 4096, 5 * MiB) == block
        finally:
            os.close(fd)
        # the bytes landed in the volume's image file, served from the store
        with open(staging / "disk.img", "rb") as img:
            img.seek(5 * MiB)
            assert img.read(4096) == block
        resp = csi.call(
            "NodeGetVolumeStats",
            pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(target)),
        )
        assert [u.total for u in resp.usage if u.unit == Usage.BYTES] == [16 * MiB]
        unpublish(csi, vol.volume_id, target)
        assert not target.exists()
    finally:
        unpublish(csi, vol.volume_id, target)
        unstage(csi, vol.volume_id, staging)
    assert csi.plugin.loops(node_dir) == []
    assert csi.plugin.mounts(node_dir) == []


@pytest.mark.needs_fuse
@pytest.mark.needs_loop
def test_block_volume_node_expand_after_controller_expand_grows_the_device(
    csi: Csi, node_dir: Path
) -> None:
    vol = csi.create_volume(size=16 * MiB, block=True)
    staging, target = node_dir / "staging", node_dir / "dev"
    stage(csi, vol.volume_id, staging, block=True)
    publish(csi, vol.volume_id, staging, target, block=True)
    try:
        assert device_size(target) == 16 * MiB
        rng = pb.CapacityRange(required_bytes=40 * MiB)
        resp = csi.call(
            "ControllerExpandVolume",
            pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id, capacity_range=rng),
        )
        assert resp.node_expansion_required is True
        node = csi.call(
            "NodeExpandVolume",
            pb.NodeExpandVolumeRequest(
                volume_id=vol.volume_id,
                volume_path=str(target),
                capacity_range=rng,
                volume_capability=csi.block_cap(),
            ),
        )
        assert node.capacity_bytes == 40 * MiB
        assert device_size(target) == 40 * MiB
        fd = os.open(target, os.O_RDWR)
        try:  # the new space is usable
            assert os.pwrite(fd, b"\x07" * 4096, 40 * MiB - 4096) == 4096
            os.fsync(fd)
            assert os.pread(fd, 4096, 40 * MiB - 4096) == b"\x07" * 4096
        finally:
            os.close(fd)
        too_big = pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id,
            volume_path=str(target),
            capacity_range=pb.CapacityRange(required_bytes=80 * MiB),
        )
        csi.error("NodeExpandVolume", too_big, Code.OUT_OF_RANGE)
    finally:
        unpublish(csi, vol.volume_id, target)
        unstage(csi, vol.volume_id, staging)
    assert csi.plugin.loops(node_dir) == []


# -- ephemeral inline volumes ------------------------------------------------------------------


@pytest.mark.needs_fuse
def test_ephemeral_inline_volume_is_created_at_publish_and_deleted_at_unpublish(
    csi: Csi, node_dir: Path
) -> None:
    vid = "csi-" + csi.unique("eph")
    target = node_dir / "pod" / "inline"
    target.parent.mkdir(parents=True)
    req = pb.NodePublishVolumeRequest(
        volume_id=vid,
        target_path=str(target),
        volume_capability=csi.mount_cap(),
        volume_context={EPHEMERAL: "true", "size": "32MiB"},
    )
    csi.call("NodePublishVolume", req)
    try:
        got = csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vid))
        assert got.volume.capacity_bytes == 32 * MiB
        assert len(mounted(csi, target)) == 1
        (target / "scratch").write_text("inline")
        assert (target / "scratch").read_text() == "inline"
        csi.call("NodePublishVolume", req)  # again: OK
    finally:
        unpublish(csi, vid, target)
    assert not target.exists()
    csi.error("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vid), Code.NOT_FOUND)
    assert csi.plugin.mounts(csi.plugin.state) == []  # its staging mount is gone too
    unpublish(csi, vid, target)  # twice: OK


# -- operations in flight ------------------------------------------------------------------------


def _fusedrive_mount_running(staging: Path) -> bool:
    needle = str(staging).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in cmd and b"mount" in cmd:
            return True
    return False


@pytest.mark.needs_fuse
def test_a_second_stage_while_the_first_is_in_flight_is_aborted(csi: Csi, node_dir: Path) -> None:
    # The first NodeStageVolume holds the volume's operation slot while `fusedrive mount`
    # runs; a second one sent while that process is seen running must get ABORTED. If the
    # first finishes before the second arrives the round proves nothing and is retried.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        for attempt in range(5):
            vol = csi.create_volume()
            staging = node_dir / f"staging-{attempt}"
            staging.mkdir()
            first = pool.submit(csi.call, "NodeStageVolume", stage_req(csi, vol.volume_id, staging))
            deadline = time.monotonic() + 60
            while not _fusedrive_mount_running(staging) and not first.done():
                assert time.monotonic() < deadline, "fusedrive mount never started"
                time.sleep(0.005)
            try:
                csi.call("NodeStageVolume", stage_req(csi, vol.volume_id, staging))
                second = Code.OK
            except grpc.RpcError as exc:
                second = exc.code()
                assert exc.details()
            first.result(timeout=120)
            unstage(csi, vol.volume_id, staging)
            assert second in (Code.OK, Code.ABORTED)
            if second == Code.ABORTED:
                assert mounted(csi, staging) == []
                return
        pytest.fail("five rounds without overlap: the first stage always finished first")
    finally:
        pool.shutdown(wait=True)
