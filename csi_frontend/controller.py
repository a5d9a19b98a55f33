"""The CSI Controller service: volumes, snapshots, clones, capacity, expansion.

Every RPC maps onto one or two store operations; snapshots and clones are O(1).
Ids are store names: a CO-chosen name that is a safe store name is used as is,
any other name is hashed into one (``validation.id_for_name``), so the same
name always yields the same id and CreateVolume/CreateSnapshot stay idempotent.
ControllerPublish is not offered: the CSIDriver object sets attachRequired false.
"""

from __future__ import annotations

import contextlib
import logging
import time

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from blockstore import (
    MODE_BLOCK,
    MODE_FILESYSTEM,
    NoSpace,
    NotFound,
    SnapshotInfo,
    Store,
    VolumeInfo,
)
from blockstore.environment import CREATE_MIN_ROOM

from . import mounts
from . import validation as v
from .errors import CsiError, invalid
from .plugin import Plugin
from .proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

RPC = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.GET_CAPACITY,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.CLONE_VOLUME,
    RPC.EXPAND_VOLUME,
    RPC.GET_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.GET_SNAPSHOT,
    RPC.MODIFY_VOLUME,
    RPC.SINGLE_NODE_MULTI_WRITER,
)
MIN_CAPACITY = 1 << 20


def _check_room(store: Store, what: str) -> None:
    """RESOURCE_EXHAUSTED (the store's NoSpace) once the store is down to its reserve.

    The store refuses the create itself too; checking first keeps a full store from
    making a live mount flush for nothing.
    """
    if store.room() < CREATE_MIN_ROOM:
        raise NoSpace(
            f"cannot create {what}: the store is down to its reserve of "
            f"{store.reserve_bytes()} free bytes"
        )


def capacity_from_range(rng: csi_pb2.CapacityRange, default: int, floor: int = 0) -> int:
    """The capacity to provision for ``rng`` (at least ``floor``, e.g. a source's size)."""
    req, lim = rng.required_bytes, rng.limit_bytes
    if req < 0 or lim < 0:
        raise invalid("capacity_range bytes must not be negative")
    if lim and req > lim:
        raise invalid(f"required_bytes {req} exceeds limit_bytes {lim}")
    if req:
        cap = req
    elif lim:
        cap = min(default, lim)
    else:
        cap = default
    cap = max(cap, floor, MIN_CAPACITY)
    cap = -(-cap // 4096) * 4096  # whole pages: what statfs reports is exact
    if lim and cap > lim:
        raise CsiError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"cannot provision {cap} bytes within limit_bytes {lim}",
        )
    return cap


def volume_message(plugin: Plugin, info: VolumeInfo) -> csi_pb2.Volume:
    vol = csi_pb2.Volume(
        volume_id=info.name,
        capacity_bytes=info.capacity,
        volume_context={"mode": info.mode},
        accessible_topology=[csi_pb2.Topology(segments=plugin.topology)],
    )
    kind, _, name = info.source.partition(":")
    if kind == "snapshot":
        vol.content_source.snapshot.snapshot_id = name
    elif kind == "volume":
        vol.content_source.volume.volume_id = name
    return vol


def snapshot_message(snap: SnapshotInfo) -> csi_pb2.Snapshot:
    ts = Timestamp()
    ts.FromNanoseconds(int(snap.created * 1e9))
    return csi_pb2.Snapshot(
        snapshot_id=snap.name,
        source_volume_id=snap.volume,
        # The CO reads size_bytes as the smallest volume a restore needs (VolumeSnapshot
        # restoreSize): that is the source's capacity, not the bytes the snapshot stores.
        size_bytes=snap.capacity,
        creation_time=ts,
        ready_to_use=True,
        group_snapshot_id=snap.group,  # "" unless a member of a group snapshot
    )


def paginate(ids: list[str], max_entries: int, token: str) -> tuple[list[str], str]:
    if max_entries < 0:
        raise invalid("max_entries must not be negative")
    ids = sorted(ids)
    if token:
        # A token is the first id of the next page; one that names no entry was not issued
        # by us (or its entry is gone): ABORTED, so the CO restarts the listing.
        if token not in ids:
            raise CsiError(grpc.StatusCode.ABORTED, f"invalid starting_token {token!r}")
        ids = ids[ids.index(token) :]
    if max_entries and len(ids) > max_entries:
        return ids[:max_entries], ids[max_entries]
    return ids, ""


class Controller(csi_pb2_grpc.ControllerServicer):
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    # -- volumes ------------------------------------------------------------
    def _check_topology(self, req: csi_pb2.CreateVolumeRequest) -> None:
        acc = req.accessibility_requirements
        ours = self.plugin.topology
        requisite = [dict(t.segments) for t in acc.requisite]
        preferred = [dict(t.segments) for t in acc.preferred]
        candidates = requisite or preferred
        if not requisite:
            return  # preferred alone never forbids this node
        if not any(all(ours.get(k) == val for k, val in seg.items()) for seg in candidates):
            raise CsiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this plugin serves only node {self.plugin.config.node_id!r}; "
                "accessibility requirements exclude it",
            )

    def CreateVolume(
        self, req: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        name = v.string(req.name, "name")
        caps = v.capabilities(req.volume_capabilities)
        mode = MODE_BLOCK if v.is_block(caps) else MODE_FILESYSTEM
        params = v.parameters(req.parameters, v.KNOWN_PARAMETERS)
        params.update(v.parameters(req.mutable_parameters, v.MUTABLE_PARAMETERS))
        v.mapping(req.secrets, "secrets")
        self._check_topology(req)
        vid = v.id_for_name(name, "vol")
        store = self.plugin.store
        with self.plugin.operation(vid):
            src = req.volume_content_source
            kind = src.WhichOneof("type") if req.HasField("volume_content_source") else None
            if kind == "snapshot":
                sid = v.object_id(src.snapshot.snapshot_id, "snapshot_id")
                snap = store.get_snapshot(sid)
                self._check_source_mode(snap.mode, mode)
                cap = capacity_from_range(req.capacity_range, snap.capacity, floor=snap.capacity)
                info = store.clone_snapshot(sid, vid, capacity=cap, parameters=params)
            elif kind == "volume":
                svid = v.object_id(src.volume.volume_id, "source volume_id")
                source = store.get_volume(svid)
                self._check_source_mode(source.mode, mode)
                cap = capacity_from_range(
                    req.capacity_range, source.capacity, floor=source.capacity
                )
                with self.plugin.operation(svid):
                    _check_room(store, f"clone {vid!r}")  # before asking a mount to flush
                    self.plugin.flush_volume(svid)
                    info = store.clone_volume(svid, vid, capacity=cap, parameters=params)
            elif kind is None:
                cap = capacity_from_range(req.capacity_range, self.plugin.config.default_capacity)
                info = store.create_volume(vid, cap, mode, params)
            else:
                raise invalid(f"unsupported volume content source {kind!r}")
        return csi_pb2.CreateVolumeResponse(volume=volume_message(self.plugin, info))

    @staticmethod
    def _check_source_mode(source_mode: str, mode: str) -> None:
        if source_mode != mode:
            raise invalid(f"source is a {source_mode} volume; the request asks for {mode}")

    def DeleteVolume(
        self, req: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        v.mapping(req.secrets, "secrets")
        with self.plugin.operation(vid):
            rec = self.plugin.state.get(vid)
            if rec is not None and (rec.staging_path or rec.targets):
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {vid!r} is still staged or published on this node",
                )
            # Deleting an unknown volume succeeds (idempotency).
            with contextlib.suppress(NotFound):
                self.plugin.store.delete_volume(vid)
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, req: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        if not req.volume_capabilities:
            raise invalid("volume_capabilities are required")
        info = self.plugin.store.get_volume(vid)
        resp = csi_pb2.ValidateVolumeCapabilitiesResponse()
        for cap in req.volume_capabilities:
            problem = v.capability_problem(cap)
            if problem is None:
                kind = cap.WhichOneof("access_type")
                if (kind == "block") != (info.mode == MODE_BLOCK):
                    problem = f"volume is a {info.mode} volume, not {kind}"
            if problem:
                resp.message = problem
                return resp
        for key in req.parameters:
            if not key.startswith("csi.storage.k8s.io/") and key not in v.KNOWN_PARAMETERS:
                resp.message = f"unknown parameter {key!r}"
                return resp
        resp.confirmed.volume_context.update(req.volume_context)
        resp.confirmed.volume_capabilities.extend(req.volume_capabilities)
        resp.confirmed.parameters.update(req.parameters)
        resp.confirmed.mutable_parameters.update(req.mutable_parameters)
        return resp

    def ListVolumes(
        self, req: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        vols = {i.name: i for i in self.plugin.store.list_volumes()}
        page, token = paginate(list(vols), req.max_entries, req.starting_token)
        resp = csi_pb2.ListVolumesResponse(next_token=token)
        for vid in page:
            entry = resp.entries.add()
            entry.volume.CopyFrom(volume_message(self.plugin, vols[vid]))
            entry.status.volume_condition.CopyFrom(self._condition(vid))
        return resp

    def _condition(self, vid: str) -> csi_pb2.VolumeCondition:
        rec = self.plugin.state.get(vid)
        staged = rec is not None and rec.staging_path and mounts.is_mounted(rec.staging_path)
        if staged and rec is not None and not mounts.is_healthy(rec.staging_path):
            return csi_pb2.VolumeCondition(
                abnormal=True, message=f"FUSE mount at {rec.staging_path} is not responding"
            )
        return csi_pb2.VolumeCondition(abnormal=False, message="volume is healthy")

    def ControllerGetVolume(
        self, req: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        info = self.plugin.store.get_volume(vid)
        resp = csi_pb2.ControllerGetVolumeResponse()
        resp.volume.CopyFrom(volume_message(self.plugin, info))
        resp.status.volume_condition.CopyFrom(self._condition(vid))
        return resp

    def GetCapacity(
        self, req: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
        v.capabilities(req.volume_capabilities, required=False)
        v.parameters(req.parameters, v.KNOWN_PARAMETERS)
        if req.HasField("accessible_topology"):
            seg = dict(req.accessible_topology.segments)
            if any(self.plugin.topology.get(k) != val for k, val in seg.items()):
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        # Never more than the store can hold: free space minus its reserve (>= 0).
        room = self.plugin.store.room()
        resp = csi_pb2.GetCapacityResponse(available_capacity=room)
        resp.minimum_volume_size.value = MIN_CAPACITY
        return resp

    def ControllerGetCapabilities(
        self, req: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        resp = csi_pb2.ControllerGetCapabilitiesResponse()
        for rpc in CAPABILITIES:
            resp.capabilities.add().rpc.type = rpc
        return resp

    def ControllerExpandVolume(
        self, req: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        if not req.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        with self.plugin.operation(vid):
            info = self.plugin.store.get_volume(vid)
            cap = capacity_from_range(req.capacity_range, info.capacity, floor=info.capacity)
            info = self.plugin.store.expand_volume(vid, cap)
            # A live mount picks up the new capacity when asked to flush (fusedrive.control).
            self.plugin.flush_volume(vid)
        # A mount volume's statfs then shows it at once; a block volume's loop device
        # grows on the node.
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=info.capacity, node_expansion_required=info.mode == MODE_BLOCK
        )

    def ControllerModifyVolume(
        self, req: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        params = v.parameters(req.mutable_parameters, v.MUTABLE_PARAMETERS)
        with self.plugin.operation(vid):
            self.plugin.store.get_volume(vid)
            if params:
                self.plugin.store.set_parameters(vid, params)
                self.plugin.flush_volume(vid)  # a live mount compresses at the new level
        return csi_pb2.ControllerModifyVolumeResponse()

    def ControllerPublishVolume(
        self, req: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        raise CsiError(grpc.StatusCode.UNIMPLEMENTED, "ControllerPublishVolume is not supported")

    def ControllerUnpublishVolume(
        self, req: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        raise CsiError(grpc.StatusCode.UNIMPLEMENTED, "ControllerUnpublishVolume is not supported")

    # -- snapshots ----------------------------------------------------------
    def CreateSnapshot(
        self, req: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        name = v.string(req.name, "name")
        vid = v.object_id(req.source_volume_id, "source_volume_id")
        v.mapping(req.parameters, "parameters")
        v.mapping(req.secrets, "secrets")
        sid = v.id_for_name(name, "snap")
        store = self.plugin.store
        with self.plugin.operation(sid, vid):
            try:
                existing = store.get_snapshot(sid)
            except NotFound:
                existing = None
            if existing is not None:
                if existing.volume != vid:
                    raise CsiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"snapshot {name!r} exists for volume {existing.volume!r}",
                    )
                return csi_pb2.CreateSnapshotResponse(snapshot=snapshot_message(existing))
            store.get_volume(vid)
            _check_room(store, f"snapshot {sid!r}")  # before asking a mount to flush
            t0 = time.perf_counter()
            self.plugin.flush_volume(vid)
            t1 = time.perf_counter()
            snap = store.create_snapshot(vid, sid)
            t2 = time.perf_counter()
        log.info(
            "event=snapshot_cut snapshot=%s volume=%s flush_ms=%.2f commit_ms=%.2f",
            sid,
            vid,
            (t1 - t0) * 1000,
            (t2 - t1) * 1000,
        )
        return csi_pb2.CreateSnapshotResponse(snapshot=snapshot_message(snap))

    def DeleteSnapshot(
        self, req: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        sid = v.object_id(req.snapshot_id, "snapshot_id")
        v.mapping(req.secrets, "secrets")
        with self.plugin.operation(sid), contextlib.suppress(NotFound):
            self.plugin.store.delete_snapshot(sid)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(
        self, req: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        store = self.plugin.store
        if req.snapshot_id:
            try:
                snaps = [store.get_snapshot(v.object_id(req.snapshot_id, "snapshot_id"))]
            except (NotFound, CsiError):
                snaps = []  # an unknown or malformed id lists nothing
        else:
            snaps = store.list_snapshots()
        if req.source_volume_id:
            snaps = [s for s in snaps if s.volume == req.source_volume_id]
        by_id = {s.name: s for s in snaps}
        page, token = paginate(list(by_id), req.max_entries, req.starting_token)
        resp = csi_pb2.ListSnapshotsResponse(next_token=token)
        for sid in page:
            resp.entries.add().snapshot.CopyFrom(snapshot_message(by_id[sid]))
        return resp

    def GetSnapshot(
        self, req: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetSnapshotResponse:
        sid = v.object_id(req.snapshot_id, "snapshot_id")
        snap = self.plugin.store.get_snapshot(sid)
        return csi_pb2.GetSnapshotResponse(snapshot=snapshot_message(snap))
