"""CSI GroupController conformance, through real gRPC to the real plugin.

Covers the spec's rules for CreateVolumeGroupSnapshot, GetVolumeGroupSnapshot and
DeleteVolumeGroupSnapshot (idempotency on name, ALREADY_EXISTS for another set of
volumes, NOT_FOUND, INVALID_ARGUMENT for missing fields and mismatched snapshot ids,
RESOURCE_EXHAUSTED on a store down to its reserve), how members show in the
Controller service (group_snapshot_id, DeleteSnapshot refused), and crash
consistency: two volumes mounted through NodeStage/NodePublish, a writer that writes
a sequence number to A then B (fsync each), group snapshots cut while it runs; each
restored group shows A equal to B or exactly one ahead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from blockstore import Store
from csi_frontend.proto import csi_pb2 as pb
from fusedrive import Filesystem
from fusedrive.schema import ROOT_INO

if TYPE_CHECKING:
    from conftest import Csi

Code = grpc.StatusCode
MiB = 1 << 20


def create_group(csi: Csi, volume_ids: list[str], name: str | None = None) -> Any:
    req = pb.CreateVolumeGroupSnapshotRequest(
        name=name or csi.unique("group"), source_volume_ids=volume_ids
    )
    return csi.call("CreateVolumeGroupSnapshot", req).group_snapshot


def get_req(group: Any, snapshot_ids: list[str] | None = None) -> Any:
    ids = [s.snapshot_id for s in group.snapshots] if snapshot_ids is None else snapshot_ids
    return pb.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids
    )


def delete_req(group: Any, snapshot_ids: list[str] | None = None) -> Any:
    ids = [s.snapshot_id for s in group.snapshots] if snapshot_ids is None else snapshot_ids
    return pb.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids
    )


def restore(csi: Csi, snapshot_id: str, size: int = 64 * MiB) -> str:
    return csi.create_volume(
        size=size,
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
        ),
    ).volume_id


# -- capabilities ---------------------------------------------------------------------------


def test_plugin_advertises_the_group_controller_service(csi: Csi) -> None:
    caps = csi.call("GetPluginCapabilities").capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in services
    resp = csi.call("GroupControllerGetCapabilities")
    assert [c.rpc.type for c in resp.capabilities] == [
        pb.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]


# -- create, get, delete --------------------------------------------------------------------


def test_create_get_delete_a_group_snapshot(csi: Csi) -> None:
    vols = [csi.create_volume(size=8 * MiB).volume_id for _ in range(3)]
    group = create_group(csi, vols)
    assert group.group_snapshot_id and group.ready_to_use
    assert group.creation_time.seconds > 0
    assert sorted(s.source_volume_id for s in group.snapshots) == sorted(vols)
    sids = [s.snapshot_id for s in group.snapshots]
    assert len(set(sids)) == 3
    for snap in group.snapshots:
        assert snap.group_snapshot_id == group.group_snapshot_id
        assert snap.ready_to_use and snap.size_bytes == 8 * MiB
        assert snap.creation_time == group.creation_time  # one transaction, one time

    got = csi.call("GetVolumeGroupSnapshot", get_req(group)).group_snapshot
    assert got == group
    # members are snapshots of the Controller service, naming their group
    listed = csi.call("ListSnapshots", pb.ListSnapshotsRequest(source_volume_id=vols[0]))
    assert [e.snapshot.group_snapshot_id for e in listed.entries] == [group.group_snapshot_id]
    one = csi.call("GetSnapshot", pb.GetSnapshotRequest(snapshot_id=sids[1])).snapshot
    assert one.group_snapshot_id == group.group_snapshot_id

    csi.call("DeleteVolumeGroupSnapshot", delete_req(group))
    csi.error("GetVolumeGroupSnapshot", get_req(group), Code.NOT_FOUND)
    for sid in sids:
        csi.error("GetSnapshot", pb.GetSnapshotRequest(snapshot_id=sid), Code.NOT_FOUND)
    # deleting it again, or any unknown group, succeeds
    csi.call("DeleteVolumeGroupSnapshot", delete_req(group))
    csi.call(
        "DeleteVolumeGroupSnapshot",
        pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=csi.unique("nogroup"), snapshot_ids=["x"]
        ),
    )


def test_a_member_restores_like_any_snapshot_and_cannot_be_deleted_alone(csi: Csi) -> None:
    vols = [csi.create_volume(size=8 * MiB).volume_id for _ in range(2)]
    group = create_group(csi, vols)
    member = group.snapshots[0].snapshot_id
    restored = restore(csi, member, 8 * MiB)
    vol = csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=restored))
    assert vol.volume.content_source.snapshot.snapshot_id == member
    err = csi.error(
        "DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=member), Code.INVALID_ARGUMENT
    )
    assert group.group_snapshot_id in err.details()
    csi.call("GetSnapshot", pb.GetSnapshotRequest(snapshot_id=member))  # still there
    csi.call("DeleteVolumeGroupSnapshot", delete_req(group))
    # the restored volume does not depend on the deleted group
    csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=restored))


def test_create_twice_returns_the_same_group(csi: Csi) -> None:
    vols = [csi.create_volume(size=8 * MiB).volume_id for _ in range(2)]
    name = csi.unique("group")
    first = create_group(csi, vols, name)
    again = create_group(csi, list(reversed(vols)), name)  # the same set, another order
    assert again == first


def test_same_name_with_another_volume_set_already_exists(csi: Csi) -> None:
    vols = [csi.create_volume(size=8 * MiB).volume_id for _ in range(3)]
    name = csi.unique("group")
    group = create_group(csi, vols[:2], name)
    for other in (vols, vols[:1], [vols[0], vols[2]]):
        csi.error(
            "CreateVolumeGroupSnapshot",
            pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=other),
            Code.ALREADY_EXISTS,
        )
    assert csi.call("GetVolumeGroupSnapshot", get_req(group)).group_snapshot == group


def test_an_unknown_source_volume_is_not_found_and_creates_nothing(csi: Csi) -> None:
    vol = csi.create_volume(size=8 * MiB).volume_id
    name = csi.unique("group")
    err = csi.error(
        "CreateVolumeGroupSnapshot",
        pb.CreateVolumeGroupSnapshotRequest(
            name=name, source_volume_ids=[vol, csi.unique("novol")]
        ),
        Code.NOT_FOUND,
    )
    assert "novol" in err.details()
    csi.error(
        "GetVolumeGroupSnapshot",
        pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=name, snapshot_ids=["x"]),
        Code.NOT_FOUND,
    )
    listed = csi.call("ListSnapshots", pb.ListSnapshotsRequest(source_volume_id=vol))
    assert list(listed.entries) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda vols: {"source_volume_ids": vols},  # no name
        lambda vols: {"name": "g-empty"},  # no source volumes
        lambda vols: {"name": "g-dup", "source_volume_ids": [vols[0], vols[0]]},
        lambda vols: {"name": "g-bad", "source_volume_ids": [vols[0], "../escape"]},
        lambda vols: {"name": "g" * 129, "source_volume_ids": vols},
    ],
    ids=["no-name", "no-volumes", "duplicate-volume", "bad-volume-id", "long-name"],
)
def test_create_with_bad_arguments_is_invalid(
    csi: Csi, make: Callable[[list[str]], dict[str, Any]]
) -> None:
    vols = [csi.create_volume(size=8 * MiB).volume_id for _ in range(2)]
    req = pb.CreateVolumeGroupSnapshotRequest(**make(vols))
    csi.error("CreateVolumeGroupSnapshot", req, Code.INVALID_ARGUMENT)


def test_get_and_delete_check_the_member_snapshot_ids(csi: Csi) -> None:
    vols = [csi.create_volume(size=8 * MiB).volume_id for _ in range(2)]
    group = create_group(csi, vols)
    sids = [s.snapshot_id for s in group.snapshots]
    for wrong in ([], sids[:1], [*sids, "other"]):
        csi.error("GetVolumeGroupSnapshot", get_req(group, wrong), Code.INVALID_ARGUMENT)
        csi.error("DeleteVolumeGroupSnapshot", delete_req(group, wrong), Code.INVALID_ARGUMENT)
    csi.error(
        "GetVolumeGroupSnapshot",
        pb.GetVolumeGroupSnapshotRequest(snapshot_ids=sids),
        Code.INVALID_ARGUMENT,
    )
    csi.error(
        "GetVolumeGroupSnapshot",
        pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=csi.unique("nogroup"), snapshot_ids=sids
        ),
        Code.NOT_FOUND,
    )
    # nothing was deleted by the refused calls; the ids in any order are accepted
    got = csi.call("GetVolumeGroupSnapshot", get_req(group, list(reversed(sids))))
    assert got.group_snapshot == group
    csi.call("DeleteVolumeGroupSnapshot", delete_req(group, list(reversed(sids))))


def test_a_store_down_to_its_reserve_refuses_with_resource_exhausted(csi: Csi) -> None:
    vols = [csi.create_volume(size=8 * MiB).volume_id for _ in range(2)]
    name = csi.unique("full")
    req = pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=vols)
    vfs = os.statvfs(csi.plugin.store)
    with csi.open_store() as store:
        store.set_reserve(vfs.f_blocks * vfs.f_frsize)  # all of it: no room is left
        try:
            err = csi.error("CreateVolumeGroupSnapshot", req, Code.RESOURCE_EXHAUSTED)
            assert "reserve" in err.details()
            assert name not in {g.name for g in store.list_group_snapshots()}
            assert {s.volume for s in store.list_snapshots()}.isdisjoint(vols)
        finally:
            store.set_reserve(0)  # back to the default: room again
    assert len(csi.call("CreateVolumeGroupSnapshot", req).group_snapshot.snapshots) == 2


def test_fusedrive_csi_call_reaches_the_group_controller(csi: Csi) -> None:
    vols = [csi.create_volume(size=8 * MiB).volume_id for _ in range(2)]
    name = csi.unique("cli")
    exe = Path(sys.executable).parent / "fusedrive-csi"
    body = json.dumps({"source_volume_ids": vols})
    argv = ["call", "CreateVolumeGroupSnapshot", "--name", name, "--json", body]
    res = subprocess.run(
        [str(exe), *argv, "--endpoint", csi.plugin.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    group = json.loads(res.stdout)["group_snapshot"]
    assert group["group_snapshot_id"] == name
    assert sorted(s["source_volume_id"] for s in group["snapshots"]) == sorted(vols)


# -- crash consistency of mounted volumes -----------------------------------------------------


def _stage_publish(csi: Csi, vid: str, staging: Path, target: Path | None) -> None:
    staging.mkdir(parents=True, exist_ok=True)
    csi.call(
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=csi.mount_cap()
        ),
    )
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        csi.call(
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=csi.mount_cap(),
            ),
        )


def _unpublish_unstage(csi: Csi, vid: str, staging: Path, target: Path | None) -> None:
    if target is not None:
        csi.call(
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)),
        )
    csi.call(
        "NodeUnstageVolume",
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
    )


class SeqWriter(threading.Thread):
    """Writes n to A's file, fsync, then n to B's file, fsync, for n = 1, 2, ..."""

    def __init__(self, path_a: Path, path_b: Path) -> None:
        super().__init__(daemon=True)
        self.paths = (path_a, path_b)
        self.done = 0  # the last n written (and fsynced) to both files
        self.stop = threading.Event()
        self.progress = threading.Condition()
        self.error: BaseException | None = None

    def run(self) -> None:
        fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in self.paths]
        try:
            n = 0
            while not self.stop.is_set():
                n += 1
                for fd in fds:
                    os.pwrite(fd, b"%020d\n" % n, 0)
                    os.fsync(fd)
                with self.progress:
                    self.done = n
                    self.progress.notify_all()
        except BaseException as exc:
            self.error = exc
        finally:
            for fd in fds:
                os.close(fd)
            with self.progress:
                self.progress.notify_all()

    def wait_for(self, n: int) -> int:
        with self.progress:
            ok = self.progress.wait_for(
                lambda: self.done >= n or self.error is not None or not self.is_alive(),
                timeout=120,
            )
        assert ok and self.error is None, f"writer stalled at {self.done}: {self.error!r}"
        return self.done


def _read_seq(store: Store, snapshot_id: str) -> int:
    """The sequence number in file ``seq`` of a snapshot, read by fusedrive in this process."""
    fs = Filesystem(store.snapshot(snapshot_id))
    try:
        attrs = fs.lookup(ROOT_INO, b"seq")
        fh = fs.open(attrs.ino, os.O_RDONLY)
        try:
            return int(fs.read(fh, 0, attrs.size))
        finally:
            fs.release(fh)
    finally:
        fs.close()


CUTS = 40


@pytest.mark.needs_fuse
def test_a_group_snapshot_of_mounted_volumes_is_write_order_consistent(
    csi: Csi, node_dir: Path
) -> None:
    """Every cut holds both writes of every n that returned before the call, and A == B
    or A == B + 1. The first and last cut are also restored through CSI and read through
    their mounts; all cuts are read from the store by fusedrive in this process."""
    vol_a = csi.create_volume(size=64 * MiB).volume_id
    vol_b = csi.create_volume(size=64 * MiB).volume_id
    paths = {
        vid: (node_dir / f"staging-{tag}", node_dir / f"target-{tag}")
        for vid, tag in ((vol_a, "a"), (vol_b, "b"))
    }
    staged: list[tuple[str, Path, Path | None]] = []
    cuts: list[tuple[int, dict[str, str]]] = []
    try:
        for vid, (staging, target) in paths.items():
            _stage_publish(csi, vid, staging, target)
            staged.append((vid, staging, target))
        writer = SeqWriter(paths[vol_a][1] / "seq", paths[vol_b][1] / "seq")
        writer.start()
        try:
            n = writer.wait_for(3)
            for _ in range(CUTS):
                # n: both writes of n had returned before the call, so the group holds them
                group = create_group(csi, [vol_a, vol_b])
                members = {s.source_volume_id: s.snapshot_id for s in group.snapshots}
                cuts.append((n, members))
                n = writer.wait_for(n + 1)
        finally:
            writer.stop.set()
            writer.join(timeout=120)
        assert writer.error is None, writer.error

        seen = []
        with csi.open_store() as store:
            for n, members in cuts:
                a, b = _read_seq(store, members[vol_a]), _read_seq(store, members[vol_b])
                assert a >= n and b >= n, (n, a, b)  # every write that returned before
                seen.append((a, b))
        bad = [(a, b) for a, b in seen if a not in (b, b + 1)]  # B ahead of A, or a gap
        assert not bad, f"inconsistent cuts (A, B): {bad} of {seen}"

        for i in (0, len(cuts) - 1):
            restored_seq = []
            for vid in (vol_a, vol_b):
                restored = restore(csi, cuts[i][1][vid])
                staging = node_dir / f"restored-{i}-{vid}"
                _stage_publish(csi, restored, staging, None)
                staged.append((restored, staging, None))
                restored_seq.append(int((staging / "seq").read_bytes()))
            assert tuple(restored_seq) == seen[i]
    finally:
        for vid, staging, target in reversed(staged):
            _unpublish_unstage(csi, vid, staging, target)
    assert csi.plugin.mounts(node_dir) == []
