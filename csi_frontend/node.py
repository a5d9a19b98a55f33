"""The CSI Node service: stage, publish, stats, expansion, and restart recovery.

- NodeStageVolume runs ``fusedrive mount`` for the volume at the staging path
  (one daemon per staged volume; the command returns once the mount is live).
  For a block volume it also attaches a loop device to the image file
  ``disk.img`` inside that mount.
- NodePublishVolume bind-mounts the staging path onto the target directory
  (read-only when asked); for a block volume it bind-mounts the loop device node
  onto the target file. Ephemeral inline volumes are created, staged under the
  state directory and published in one step, and deleted at unpublish.
- Every change is recorded in ``NodeState`` before the RPC returns, so a
  restarted plugin (``recover``) finds its mounts again, remounts what died and
  drops what the CO already removed.

Order of teardown is the reverse of setup: unpublish binds, then detach the loop
device, then unmount the FUSE mount (the daemon flushes and exits).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc

from blockstore import MODE_BLOCK, MODE_FILESYSTEM, NotFound

from . import loopdev, mounts
from . import validation as v
from .errors import CsiError, invalid
from .plugin import Plugin
from .proto import csi_pb2, csi_pb2_grpc
from .state import VolumeRecord

log = logging.getLogger(__name__)

RPC = csi_pb2.NodeServiceCapability.RPC
CAPABILITIES = (
    RPC.STAGE_UNSTAGE_VOLUME,
    RPC.GET_VOLUME_STATS,
    RPC.EXPAND_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
)
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
IMAGE_NAME = "disk.img"


def _failed(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, message)


class Node(csi_pb2_grpc.NodeServicer):
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    # -- the fusedrive daemon -------------------------------------------------
    def _fusedrive(self, *args: str) -> None:
        cmd = self.plugin.config.fusedrive_command or [sys.executable, "-m", "fusedrive.cli"]
        full = [*cmd, "--store", str(self.plugin.config.store_path), *args]
        proc = subprocess.run(full, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise CsiError(
                grpc.StatusCode.INTERNAL,
                f"fusedrive {args[0]} failed: {msg[-1] if msg else proc.returncode}",
            )

    def _mount(self, volume_id: str, path: str, read_only: bool) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self._fusedrive("mount", volume_id, path, *(["--read-only"] if read_only else []))

    def _unmount(self, path: str) -> None:
        if not mounts.is_mounted(path):
            return
        if mounts.is_healthy(path):
            self._fusedrive("umount", path)
        else:
            mounts.unmount(path)

    def _stage(self, rec: VolumeRecord) -> None:
        """Bring the staging mount (and loop device) of ``rec`` up; idempotent."""
        path = rec.staging_path
        if mounts.is_mounted(path) and not mounts.is_healthy(path):
            log.warning("event=stale_mount path=%s volume=%s", path, rec.volume_id)
            if rec.loop_device:
                loopdev.detach(rec.loop_device)
                rec.loop_device = ""
            mounts.unmount(path)
        if not mounts.is_mounted(path):
            self._mount(rec.volume_id, path, rec.read_only)
        if rec.block:
            image = os.path.join(path, IMAGE_NAME)
            self._fit_image(rec.volume_id, image)
            rec.loop_device = loopdev.attach(image, read_only=rec.read_only).name

    def _fit_image(self, volume_id: str, image: str) -> None:
        """Grow the block image to the volume's capacity (after an expansion)."""
        cap = self.plugin.store.get_volume(volume_id).capacity
        if os.path.getsize(image) < cap:
            os.truncate(image, cap)

    def _unstage(self, rec: VolumeRecord) -> None:
        if rec.loop_device:
            loopdev.detach(rec.loop_device)
            rec.loop_device = ""
        elif rec.block and rec.staging_path:
            dev = loopdev.find_by_backing_file(os.path.join(rec.staging_path, IMAGE_NAME))
            if dev is not None:
                loopdev.detach(dev.name)
        if rec.staging_path:
            self._unmount(rec.staging_path)

    # -- stage -------------------------------------------------------------------
    def NodeStageVolume(
        self, req: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        staging = v.path(req.staging_target_path, "staging_target_path")
        if not req.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        cap = v.capabilities([req.volume_capability])[0]
        v.mapping(req.secrets, "secrets")
        v.mapping(req.volume_context, "volume_context")
        block = cap.WhichOneof("access_type") == "block"
        read_only = cap.access_mode.mode in v.READ_ONLY_MODES
        with self.plugin.operation(vid):
            info = self.plugin.store.get_volume(vid)
            if (info.mode == MODE_BLOCK) != block:
                raise invalid(f"volume {vid!r} is a {info.mode} volume")
            rec = self.plugin.state.get(vid) or VolumeRecord(vid)
            if rec.staging_path and rec.staging_path != staging:
                raise _failed(f"volume {vid!r} is already staged at {rec.staging_path}")
            if rec.staging_path == staging and (rec.block, rec.read_only) != (block, read_only):
                raise CsiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"volume {vid!r} is staged at {staging} with another capability",
                )
            rec.staging_path, rec.block, rec.read_only = staging, block, read_only
            try:
                self._stage(rec)
            except BaseException:
                self._unstage(rec)
                raise
            self.plugin.state.put(rec)
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(
        self, req: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        staging = v.path(req.staging_target_path, "staging_target_path")
        with self.plugin.operation(vid):
            rec = self.plugin.state.get(vid)
            if rec is None or rec.staging_path != staging:
                # Not staged here (or already unstaged): make sure nothing of ours
                # is left at the path, then succeed.
                if rec is None and mounts.is_mounted(staging):
                    entry = mounts.find_mount(staging)
                    if entry is not None and entry.fstype.startswith("fuse.fusedrive"):
                        self._unmount(staging)
                return csi_pb2.NodeUnstageVolumeResponse()
            if rec.targets:
                raise _failed(f"volume {vid!r} is still published at {sorted(rec.targets)}")
            self._unstage(rec)
            rec.staging_path = ""
            self.plugin.state.delete(vid)
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish -----------------------------------------------------------------
    def NodePublishVolume(
        self, req: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        target = v.path(req.target_path, "target_path")
        if not req.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        cap = v.capabilities([req.volume_capability])[0]
        context_map = v.mapping(req.volume_context, "volume_context")
        v.mapping(req.secrets, "secrets")
        block = cap.WhichOneof("access_type") == "block"
        read_only = req.readonly or cap.access_mode.mode in v.READ_ONLY_MODES
        ephemeral = context_map.get(EPHEMERAL_KEY) == "true"
        with self.plugin.operation(vid):
            rec: VolumeRecord | None
            if ephemeral:
                rec = self._ephemeral_stage(vid, context_map, block)
            else:
                staging = v.path(req.staging_target_path, "staging_target_path")
                rec = self.plugin.state.get(vid)
                if rec is None or rec.staging_path != staging or not mounts.is_mounted(staging):
                    raise _failed(f"volume {vid!r} is not staged at {staging}")
                if rec.block != block:
                    raise invalid(
                        f"volume {vid!r} was staged as {'block' if rec.block else 'mount'}"
                    )
            existing = rec.targets.get(target)
            if existing is not None:
                if existing.get("read_only") != read_only:
                    raise CsiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"{target} is published with another read-only setting",
                    )
                if mounts.is_mounted(target):
                    return csi_pb2.NodePublishVolumeResponse()
            if rec.targets and target not in rec.targets:
                mode = cap.access_mode.mode
                if mode == v.Mode.SINGLE_NODE_SINGLE_WRITER:
                    raise _failed(f"volume {vid!r} is already published at another target")
            self._publish(rec, target, read_only)
            rec.targets[target] = {"read_only": read_only}
            self.plugin.state.put(rec)
        return csi_pb2.NodePublishVolumeResponse()

    def _publish(self, rec: VolumeRecord, target: str, read_only: bool) -> None:
        if rec.block:
            mounts.ensure_file(Path(target))
            source = rec.loop_device
        else:
            mounts.ensure_dir(Path(target))
            source = rec.staging_path
        if not mounts.is_mounted(target):
            mounts.bind_mount(source, target, read_only=read_only)

    def _ephemeral_stage(self, vid: str, ctx: dict[str, str], block: bool) -> VolumeRecord:
        if block:
            raise invalid("ephemeral inline volumes must be mount volumes")
        rec = self.plugin.state.get(vid)
        if rec is not None:
            return rec
        size = ctx.get("size", "")
        cap = _parse_size(size) if size else self.plugin.config.default_capacity
        params = v.parameters(
            {k: val for k, val in ctx.items() if k in v.KNOWN_PARAMETERS}, v.KNOWN_PARAMETERS
        )
        self.plugin.store.create_volume(vid, cap, MODE_FILESYSTEM, params)
        staging = str(self.plugin.config.state_path / "ephemeral" / vid)
        rec = VolumeRecord(vid, staging_path=staging, ephemeral=True)
        try:
            self._stage(rec)
        except BaseException:
            self._unstage(rec)
            self.plugin.store.delete_volume(vid)
            raise
        self.plugin.state.put(rec)
        return rec

    def NodeUnpublishVolume(
        self, req: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        target = v.path(req.target_path, "target_path")
        with self.plugin.operation(vid):
            rec = self.plugin.state.get(vid)
            if rec is not None and target in rec.targets:
                mounts.unmount(target)
                del rec.targets[target]
                self.plugin.state.put(rec)
            elif mounts.is_mounted(target):
                # Published before a state loss: remove only our own kind of mount.
                entry = mounts.find_mount(target)
                if entry is not None and (
                    entry.fstype.startswith("fuse.fusedrive")
                    or entry.source.startswith("/dev/loop")
                ):
                    mounts.unmount(target)
            _remove_target(target)
            if rec is not None and rec.ephemeral and not rec.targets:
                self._unstage(rec)
                self.plugin.state.delete(vid)
                shutil.rmtree(rec.staging_path, ignore_errors=True)
                with contextlib.suppress(NotFound):
                    self.plugin.store.delete_volume(vid)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- stats, expansion, info ----------------------------------------------------
    def _record_for_path(self, vid: str, path: str) -> VolumeRecord:
        rec = self.plugin.state.get(vid)
        if rec is None or (path != rec.staging_path and path not in rec.targets):
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {vid!r} is not available at {path}")
        return rec

    def NodeGetVolumeStats(
        self, req: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        path = v.path(req.volume_path, "volume_path")
        rec = self._record_for_path(vid, path)
        resp = csi_pb2.NodeGetVolumeStatsResponse()
        Unit = csi_pb2.VolumeUsage
        if not mounts.is_healthy(rec.staging_path):
            resp.volume_condition.abnormal = True
            resp.volume_condition.message = f"FUSE mount at {rec.staging_path} is not responding"
            return resp
        if rec.block:
            size = loopdev.size_bytes(rec.loop_device) if rec.loop_device else 0
            resp.usage.add(total=size, unit=Unit.BYTES)
        else:
            st = os.statvfs(rec.staging_path)
            resp.usage.add(
                total=st.f_blocks * st.f_frsize,
                available=st.f_bavail * st.f_frsize,
                used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                unit=Unit.BYTES,
            )
            resp.usage.add(
                total=st.f_files,
                available=st.f_favail,
                used=st.f_files - st.f_ffree,
                unit=Unit.INODES,
            )
        resp.volume_condition.abnormal = False
        resp.volume_condition.message = "volume is healthy"
        return resp

    def NodeExpandVolume(
        self, req: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        path = v.path(req.volume_path, "volume_path")
        with self.plugin.operation(vid):
            rec = self._record_for_path(vid, path)
            info = self.plugin.store.get_volume(vid)
            want = req.capacity_range.required_bytes
            if want > info.capacity:
                raise CsiError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"volume {vid!r} has {info.capacity} bytes; expand it first (controller)",
                )
            if rec.block and rec.loop_device:
                self._fit_image(vid, os.path.join(rec.staging_path, IMAGE_NAME))
                loopdev.refresh_size(rec.loop_device)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=info.capacity)

    def NodeGetCapabilities(
        self, req: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        resp = csi_pb2.NodeGetCapabilitiesResponse()
        for rpc in CAPABILITIES:
            resp.capabilities.add().rpc.type = rpc
        return resp

    def NodeGetInfo(
        self, req: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.plugin.config.node_id,
            max_volumes_per_node=self.plugin.config.max_volumes_per_node,
            accessible_topology=csi_pb2.Topology(segments=self.plugin.topology),
        )

    # -- restart recovery -------------------------------------------------------------
    def recover(self) -> None:
        """Re-establish recorded stages and publishes after a plugin restart."""
        for rec in self.plugin.state.all():
            try:
                self._recover_one(rec)
            except Exception as exc:
                log.error("event=recover_failed volume=%s error=%s", rec.volume_id, exc)

    def _recover_one(self, rec: VolumeRecord) -> None:
        staging = rec.staging_path
        # A mount whose daemon died fails stat (ENOTCONN): a mount point still counts as there.
        present = os.path.isdir(staging) or mounts.is_mounted(staging)
        if not staging or not (present or rec.ephemeral):
            # The CO removed the staging directory: nothing to bring back.
            for target in list(rec.targets):
                mounts.unmount(target)
            self._unstage(rec)
            self.plugin.state.delete(rec.volume_id)
            log.info("event=recover_dropped volume=%s", rec.volume_id)
            return
        try:
            self.plugin.store.get_volume(rec.volume_id)
        except NotFound:
            log.warning("event=recover_volume_gone volume=%s", rec.volume_id)
            for target in list(rec.targets):
                mounts.unmount(target)
            self._unstage(rec)
            self.plugin.state.delete(rec.volume_id)
            return
        was_healthy = mounts.is_mounted(staging) and mounts.is_healthy(staging)
        self._stage(rec)
        for target, opts in list(rec.targets.items()):
            if not os.path.exists(target) and not mounts.is_mounted(target):
                del rec.targets[target]
                continue
            if mounts.is_mounted(target) and (not was_healthy or not mounts.is_healthy(target)):
                mounts.unmount(target)
            self._publish(rec, target, opts.get("read_only", False))
        self.plugin.state.put(rec)
        log.info("event=recovered volume=%s remounted=%s", rec.volume_id, not was_healthy)


def _remove_target(target: str) -> None:
    try:
        if os.path.isdir(target):
            os.rmdir(target)
        elif os.path.exists(target):
            os.unlink(target)
    except OSError as exc:
        log.warning("event=target_not_removed target=%s error=%s", target, exc)


def _parse_size(text: str) -> int:
    from fusedrive.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise invalid(f"bad size {text!r} in volume_context: {exc}") from None
