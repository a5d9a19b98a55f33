"""The CSI GroupController service: crash-consistent snapshots of several volumes.

A group snapshot is one store transaction (``Store.create_group_snapshot``): every
member volume's head is frozen in the same LMDB write transaction, so the members
hold the same point of the write history. A writer that writes A then B never sees
a restored group where B has a write that A lacks (write-order consistency, as the
spec requires of CreateVolumeGroupSnapshot).

Before that transaction every member's live mount is asked to flush, one after the
other, so the group holds every write that returned before the call; the flushes do
not need to be simultaneous because consistency comes from the one transaction,
not from the flushes. Ids: the group id is the CO's name when it is a safe store
name (else a hash, ``validation.id_for_name``); member snapshot ids are
``catalog.member_name(group id, volume id)``. Every member is an ordinary snapshot
(restorable with CreateVolume) whose ``group_snapshot_id`` names its group, and
which DeleteSnapshot refuses (INVALID_ARGUMENT, the spec's "snapshot is part of a
group"): only DeleteVolumeGroupSnapshot deletes members.
"""

from __future__ import annotations

import contextlib
import logging

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from blockstore import GroupInfo, NotFound, SnapshotInfo

from . import validation as v
from .controller import _check_room, snapshot_message
from .errors import invalid
from .plugin import Plugin
from .proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

RPC = csi_pb2.GroupControllerServiceCapability.RPC
CAPABILITIES = (RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,)


def group_message(group: GroupInfo, snaps: list[SnapshotInfo]) -> csi_pb2.VolumeGroupSnapshot:
    ts = Timestamp()
    ts.FromNanoseconds(int(group.created * 1e9))
    msg = csi_pb2.VolumeGroupSnapshot(
        group_snapshot_id=group.name, creation_time=ts, ready_to_use=True
    )
    for snap in snaps:
        msg.snapshots.append(snapshot_message(snap))
    msg.ready_to_use = all(s.ready_to_use for s in msg.snapshots)
    return msg


def _snapshot_ids(ids: list[str]) -> list[str]:
    """The request's member snapshot ids: REQUIRED by the spec, each a valid id."""
    if not ids:
        raise invalid("snapshot_ids are required (the group snapshot's member snapshot ids)")
    return [v.object_id(sid, "snapshot_ids entry") for sid in ids]


def _check_members(group: GroupInfo, snapshot_ids: list[str]) -> None:
    """INVALID_ARGUMENT when the CO's list of member ids is not the group's (spec)."""
    if set(snapshot_ids) != set(group.snapshots):
        raise invalid(
            f"snapshot_ids {sorted(snapshot_ids)} do not match group snapshot "
            f"{group.name!r}, whose snapshots are {sorted(group.snapshots)}"
        )


class GroupController(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    def GroupControllerGetCapabilities(
        self, req: csi_pb2.GroupControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        resp = csi_pb2.GroupControllerGetCapabilitiesResponse()
        for rpc in CAPABILITIES:
            resp.capabilities.add().rpc.type = rpc
        return resp

    def CreateVolumeGroupSnapshot(
        self, req: csi_pb2.CreateVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        name = v.string(req.name, "name")
        if not req.source_volume_ids:
            raise invalid("source_volume_ids are required")
        vids = [v.object_id(vid, "source_volume_ids entry") for vid in req.source_volume_ids]
        if len(set(vids)) != len(vids):
            raise invalid("source_volume_ids lists a volume more than once")
        # Parameters are opaque to us and change nothing, so any are compatible.
        v.mapping(req.parameters, "parameters")
        v.mapping(req.secrets, "secrets")
        gid = v.id_for_name(name, "group")
        store = self.plugin.store
        with self.plugin.operation(gid, *vids):
            try:
                group, snaps = store.get_group_snapshot(gid)
            except NotFound:
                pass
            else:
                # Same name and same volumes: the group already cut (idempotency);
                # other volumes: the store says ALREADY_EXISTS.
                group, snaps = store.create_group_snapshot(gid, vids)
                return csi_pb2.CreateVolumeGroupSnapshotResponse(
                    group_snapshot=group_message(group, snaps)
                )
            for vid in vids:
                store.get_volume(vid)  # NOT_FOUND before any mount is asked to flush
            _check_room(store, f"group snapshot {gid!r}")
            for vid in vids:
                self.plugin.flush_volume(vid)
            group, snaps = store.create_group_snapshot(gid, vids)
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=group_message(group, snaps))

    def GetVolumeGroupSnapshot(
        self, req: csi_pb2.GetVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        gid = v.object_id(req.group_snapshot_id, "group_snapshot_id")
        sids = _snapshot_ids(list(req.snapshot_ids))
        group, snaps = self.plugin.store.get_group_snapshot(gid)
        _check_members(group, sids)
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=group_message(group, snaps))

    def DeleteVolumeGroupSnapshot(
        self, req: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        gid = v.object_id(req.group_snapshot_id, "group_snapshot_id")
        sids = _snapshot_ids(list(req.snapshot_ids))
        v.mapping(req.secrets, "secrets")
        store = self.plugin.store
        with self.plugin.operation(gid):
            try:
                group, _snaps = store.get_group_snapshot(gid)
            except NotFound:
                return csi_pb2.DeleteVolumeGroupSnapshotResponse()  # idempotent
            _check_members(group, sids)
            with self.plugin.operation(*group.snapshots), contextlib.suppress(NotFound):
                store.delete_group_snapshot(gid)
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()
