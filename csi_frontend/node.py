"""The CSI Node service: stage, publish, stats, expansion, restart recovery and healing.

- NodeStageVolume asks the mounter (``mounter.py``; ``--mounter-socket``, else one
  inside this process) to serve the volume at the staging path: one
  ``fusedrive mount`` daemon per staged volume, owned by the mounter so that it
  outlives this process's container (docs/restart.md). For a block volume it
  also attaches a loop device to the image file ``disk.img`` inside that mount.
- NodePublishVolume bind-mounts the staging path onto the target directory
  (read-only when asked); for a block volume it bind-mounts the loop device node
  onto the target file. Ephemeral inline volumes are created, staged under the
  state directory and published in one step, and deleted at unpublish.
- Every change is recorded in ``NodeState`` before the RPC returns, so a
  restarted plugin (``recover``) finds its mounts again, adopts what is live (a
  daemon the mounter lists at the staging path, with the device number of the
  mount there; the loop device over that mount's image, found by the image's
  device and inode number), remounts what died and drops what the CO already
  removed. Not knowing (the mounter does not answer) is never taken for dead.
- Healing: the mounter reports every daemon's death (``DaemonDeaths``, over its
  event stream). When one dies, the plugin remounts the staging path, re-attaches the
  loop device of a block volume and re-binds every target of that volume, under
  the volume's operation slot, retrying until it succeeds or the volume is
  unstaged. NodeGetVolumeStats reports the volume abnormal while it is down.

What the service may touch is decided in ``ownership.py`` alone: paths outside
the allowed prefix are refused, a symlink is never followed, a mount that is not
ours is never unmounted or mounted over, and only what the plugin created is
removed. Teardown is the reverse of setup: unpublish binds, then detach the loop
device, then unmount the FUSE mount (the daemon flushes and exits).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Protocol

import grpc

from blockstore import MODE_BLOCK, MODE_FILESYSTEM, NotFound

from . import loopdev, mounts
from . import validation as v
from .errors import MOUNTER_CODES, CsiError, invalid
from .mounter import EmbeddedMounter, MounterConfig
from .mounter_client import DaemonDeaths, DaemonInfo, MounterClient, MounterError
from .ownership import (
    Held,
    PathPolicy,
    check_free,
    check_placement,
    fuse_source,
    is_fusedrive_mount,
    make_target,
    occupied,
    present,
    remove_created,
    retired_identity,
    staging_verdict,
    target_verdict,
)
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
HEAL_RETRY_SECONDS = 5.0
MAX_RETIRED = 32  # identities of dead staging mounts remembered per volume
OPEN_FILES_ADVICE = (
    "files held open across the daemon's death stay broken (ENOTCONN/EIO); "
    "restart the pod for full recovery"
)


class NodeEvents(Protocol):
    """Where the node reports daemon deaths and heals (the server's metrics)."""

    def daemon_died(self, volume_id: str) -> None: ...

    def daemon_healed(self, volume_id: str, ok: bool) -> None: ...


class _NoEvents:
    def daemon_died(self, volume_id: str) -> None:
        pass

    def daemon_healed(self, volume_id: str, ok: bool) -> None:
        pass


def _failed(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, message)


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


class Node(csi_pb2_grpc.NodeServicer):
    def __init__(self, plugin: Plugin, events: NodeEvents | None = None) -> None:
        self.plugin = plugin
        self.policy = PathPolicy(plugin.config.allowed_path_prefixes)
        self.events: NodeEvents = events or _NoEvents()
        # The FUSE daemons belong to the mounter (docs/restart.md): a separate process
        # given by --mounter-socket, else one inside this process.
        config = plugin.config
        self.embedded: EmbeddedMounter | None = None
        socket_path = config.mounter_socket or str(config.state_path / "mounter.sock")
        if not config.mounter_socket:
            self.embedded = EmbeddedMounter(
                MounterConfig(
                    store_path=config.store_path,
                    socket_path=Path(socket_path),
                    fusedrive_command=config.fusedrive_command,
                )
            )
        self.mounter = MounterClient(socket_path)
        self.watcher = DaemonDeaths(self.mounter, self._daemon_died, self._mounter_hello)
        self._heal_lock = threading.Lock()
        self._heal_wake = threading.Event()
        self._pending: dict[str, float] = {}  # volume id -> when to try healing it
        self._died: dict[str, float] = {}  # volume id -> when its daemon died (until healed)
        self._healed: dict[str, float] = {}  # volume id -> when it was last healed
        self._stopping = threading.Event()
        self._healer: threading.Thread | None = None

    # -- lifecycle (the server calls these) --------------------------------------------
    def start(self) -> None:
        """Recover recorded volumes, then watch their daemons and heal what dies."""
        if self.embedded is not None:
            self.embedded.start()
        self.recover()
        self.watcher.start()
        if self._healer is None:
            self._healer = threading.Thread(target=self._heal_loop, name="heal", daemon=True)
            self._healer.start()

    def stop(self) -> None:
        self._stopping.set()
        self._heal_wake.set()
        self.watcher.stop()
        if self._healer is not None:
            self._healer.join(timeout=10)
        if self.embedded is not None:
            self.embedded.close()  # its daemons stay; the next mounter adopts them

    # -- the FUSE daemons, through the mounter --------------------------------------
    def _mounter_failed(self, exc: MounterError, what: str) -> CsiError:
        code = MOUNTER_CODES.get(exc.code, grpc.StatusCode.INTERNAL)
        if exc.code == "unavailable":
            return CsiError(code, f"cannot {what}: {exc.message} (docs/restart.md)")
        return CsiError(code, f"cannot {what}: the mounter says: {exc.message}")

    def _mount_staging(self, rec: VolumeRecord) -> None:
        """Have the mounter start the volume's daemon at its (empty, unmounted) staging path."""
        path = rec.staging_path
        try:
            info, existing = self.mounter.start(rec.volume_id, path, rec.read_only)
        except MounterError as exc:
            raise self._mounter_failed(exc, f"mount volume {rec.volume_id!r}") from None
        entry = mounts.find_mount(path)
        if entry is None or entry.source != fuse_source(rec.volume_id):
            raise CsiError(grpc.StatusCode.INTERNAL, f"the mounter left no mount at {path}")
        if info.dev and entry.dev != info.dev:
            raise CsiError(
                grpc.StatusCode.INTERNAL,
                f"the mount at {path} ({entry.dev}) is not the one the mounter serves ({info.dev})",
            )
        rec.staging_dev = entry.dev
        log.info(
            "event=staged volume=%s path=%s pid=%d dev=%s existing=%s",
            rec.volume_id,
            path,
            info.pid,
            entry.dev,
            existing,
        )
        self._watch(rec, info)

    def _daemon(self, rec: VolumeRecord) -> DaemonInfo | None:
        """The live daemon the mounter runs for ``rec`` at its staging path, if any.

        UNAVAILABLE when the mounter does not answer: not knowing is never taken for
        "dead", so a live mount is never mounted again for want of an answer.
        """
        try:
            daemons = self.mounter.daemons()
        except MounterError as exc:
            raise self._mounter_failed(exc, "ask the mounter") from None
        real = os.path.realpath(rec.staging_path)
        for d in daemons:
            if d.volume == rec.volume_id and d.path in (rec.staging_path, real):
                return d
        return None

    def _live(self, rec: VolumeRecord) -> bool:
        """Our FUSE mount is at staging and the mounter runs its daemon (kernel-cached
        attributes can make a dead mount's root stat fine for a while, so the daemon is
        checked too), and it is the daemon of that very mount (same device number)."""
        staged = staging_verdict(rec)
        if staged.held is not Held.OURS or not mounts.is_healthy(rec.staging_path):
            return False
        d = self._daemon(rec)
        return d is not None and (not d.dev or staged.entry is None or d.dev == staged.entry.dev)

    def _watch(self, rec: VolumeRecord, info: DaemonInfo | None = None) -> None:
        """Rely on the live daemon serving ``rec``'s staging mount: its death starts a heal."""
        try:
            d = info or self._daemon(rec)
        except CsiError as exc:
            log.warning("event=daemon_unknown volume=%s error=%s", rec.volume_id, exc.message)
            d = None
        if d is not None and self.watcher.watch(rec.volume_id, d.pid):
            return
        log.warning("event=daemon_not_found volume=%s path=%s", rec.volume_id, rec.staging_path)
        self._schedule_heal(rec.volume_id, HEAL_RETRY_SECONDS)

    def _mounter_hello(self, daemons: list[DaemonInfo]) -> None:
        """The mounter (re)connected: a staged volume it does not serve is brought back,
        and one it serves that nobody watches is looked at (a heal of a live volume only
        adopts it)."""
        live = {(d.volume, d.path) for d in daemons}
        for rec in self.plugin.state.all():
            if not rec.staging_path or self.watcher.pid_of(rec.volume_id) is not None:
                continue
            real = os.path.realpath(rec.staging_path)
            there = (rec.volume_id, rec.staging_path) in live or (rec.volume_id, real) in live
            log.info("event=mounter_hello volume=%s served=%s", rec.volume_id, there)
            self._schedule_heal(rec.volume_id, 0 if there else self.plugin.config.heal_delay)

    def _our_loops(self, rec: VolumeRecord) -> list[str]:
        """Every loop device attached to ``rec``'s image: by its path (a dead mount's
        included), or by the file system it lives on, our staging mount (a device
        attached by an earlier plugin, whose mount namespace is gone, shows its backing
        file as ``/disk.img``)."""
        if not rec.block or not rec.staging_path:
            return []
        image = os.path.join(rec.staging_path, IMAGE_NAME)
        backs = {image, os.path.realpath(image)}
        found = [
            d.name
            for d in loopdev.list_devices()
            if d.backing_file in backs or (rec.staging_dev and d.backing_dev == rec.staging_dev)
        ]
        # A device over a dead mount's image: only its recorded attachment names it.
        found += [e.rpartition("@")[0] for e in self._attached(rec)]
        return sorted(set(found))

    def _attach_loop(self, rec: VolumeRecord) -> None:
        image = os.path.join(rec.staging_path, IMAGE_NAME)
        self._fit_image(rec.volume_id, image)
        rec.loop_device = loopdev.attach(image, read_only=rec.read_only).name
        seq = loopdev.diskseq(rec.loop_device)
        if seq is not None and f"{rec.loop_device}@{seq}" not in rec.loops:
            rec.loops = [*self._attached(rec), f"{rec.loop_device}@{seq}"]

    @staticmethod
    def _attached(rec: VolumeRecord) -> list[str]:
        """The entries of ``rec.loops`` whose attachment still exists."""
        out = []
        for entry in rec.loops:
            name, _, seq = entry.rpartition("@")
            if seq.isdigit() and loopdev.diskseq(name) == int(seq):
                out.append(entry)
        return out

    def _fit_image(self, volume_id: str, image: str) -> None:
        """Grow the block image to the volume's capacity (after an expansion)."""
        cap = self.plugin.store.get_volume(volume_id).capacity
        if os.path.getsize(image) < cap:
            os.truncate(image, cap)

    def _unmount_staging(self, rec: VolumeRecord) -> None:
        """Detach our loop device and unmount our FUSE mount; a foreign mount is refused."""
        verdict = staging_verdict(rec)
        if verdict.held is Held.FOREIGN:
            raise occupied(f"not unstaging: {verdict.why}")
        self.watcher.unwatch(rec.volume_id)
        try:
            for dev in self._our_loops(rec):
                loopdev.detach(dev)  # one still held open is detached when released
            rec.loop_device = ""
            rec.loops = self._attached(rec)  # the held ones, to try again later
            if verdict.held is Held.OURS:
                if mounts.is_healthy(rec.staging_path):
                    try:
                        self.mounter.stop(rec.staging_path)
                    except MounterError as exc:
                        raise self._mounter_failed(
                            exc, f"unmount volume {rec.volume_id!r}"
                        ) from None
                else:
                    mounts.unmount(rec.staging_path)
        except BaseException:
            if staging_verdict(rec).held is Held.OURS and mounts.is_healthy(rec.staging_path):
                self._watch(rec)
            raise

    def _bind(self, rec: VolumeRecord, target: str, read_only: bool) -> None:
        source = rec.loop_device if rec.block else rec.staging_path
        try:
            mounts.bind_mount(source, target, read_only=read_only)
        except mounts.MountError as exc:
            raise CsiError(grpc.StatusCode.INTERNAL, str(exc)) from None
        got = target_verdict(rec, target, binding=True)
        if got.held is not Held.OURS:
            raise CsiError(grpc.StatusCode.INTERNAL, f"bind onto {target} went wrong: {got.why}")

    def _unbind_ours(self, rec: VolumeRecord, target: str) -> None:
        """Unmount our binds at ``target``, the live one and dead ones below it."""
        while target_verdict(rec, target).held in (Held.OURS, Held.STALE):
            self._unbind(target)
        if mounts.is_mounted(target):
            log.warning("event=foreign_mount_left target=%s", target)

    def _unbind(self, target: str) -> None:
        try:
            mounts.unmount(target)
        except mounts.MountError as exc:
            raise _failed(str(exc)) from None

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
        self.policy.check(staging, "staging_target_path")
        block = cap.WhichOneof("access_type") == "block"
        read_only = cap.access_mode.mode in v.READ_ONLY_MODES
        with self.plugin.operation(vid):
            info = self.plugin.store.get_volume(vid)
            if (info.mode == MODE_BLOCK) != block:
                raise invalid(f"volume {vid!r} is a {info.mode} volume")
            rec = self.plugin.state.get(vid)
            if rec is not None and rec.staging_path:
                if rec.staging_path != staging:
                    raise _failed(f"volume {vid!r} is already staged at {rec.staging_path}")
                if (rec.block, rec.read_only) != (block, read_only):
                    raise CsiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"volume {vid!r} is staged at {staging} with another capability",
                    )
                # Staged already: make sure it is up (idempotent); a target's trouble is
                # the business of its publish, not of this stage.
                self._restore(rec, strict=False)
                self.plugin.state.put(rec)
                return csi_pb2.NodeStageVolumeResponse()
            others = [r for r in self.plugin.state.all() if r.volume_id != vid]
            check_placement(others, staging, "staging_target_path")
            self._prepare_staging_dir(staging)
            rec = VolumeRecord(vid, staging_path=staging, block=block, read_only=read_only)
            try:
                self._mount_staging(rec)
                if block:
                    self._attach_loop(rec)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._unmount_staging(rec)
                raise
            self.plugin.state.put(rec)
        return csi_pb2.NodeStageVolumeResponse()

    @staticmethod
    def _prepare_staging_dir(staging: str) -> None:
        try:
            os.mkdir(staging, 0o750)
        except FileExistsError:
            check_free(staging, "staging_target_path", directory=True)
        except FileNotFoundError:
            raise _failed(
                f"the directory holding staging_target_path {staging} does not exist"
            ) from None

    def NodeUnstageVolume(
        self, req: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        staging = v.path(req.staging_target_path, "staging_target_path")
        self.policy.check(staging, "staging_target_path")
        with self.plugin.operation(vid):
            rec = self.plugin.state.get(vid)
            if rec is None or rec.staging_path != staging:
                # Not staged here (or already unstaged): touch nothing. Succeed unless a
                # fusedrive mount is there that the state does not give to this volume.
                entry = mounts.find_mount(staging)
                if is_fusedrive_mount(entry):
                    assert entry is not None
                    raise occupied(
                        f"{staging} carries a fusedrive mount ({entry.source}) that is not "
                        f"recorded as volume {vid!r}'s staging mount; left alone "
                        "(`fusedrive umount` it by hand if it is stale)"
                    )
                return csi_pb2.NodeUnstageVolumeResponse()
            if rec.targets:
                raise _failed(f"volume {vid!r} is still published at {sorted(rec.targets)}")
            self._unmount_staging(rec)
            self._cancel_heal(vid)
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
        staging = ""
        if not ephemeral:
            if not req.staging_target_path:
                raise _failed(
                    "staging_target_path is required: this plugin stages volumes "
                    "(STAGE_UNSTAGE_VOLUME)"
                )
            staging = v.path(req.staging_target_path, "staging_target_path")
            self.policy.check(staging, "staging_target_path")
        self.policy.check(target, "target_path")
        with self.plugin.operation(vid):
            rec: VolumeRecord | None
            if ephemeral:
                rec = self._ephemeral_stage(vid, context_map, block)
            else:
                self.plugin.store.get_volume(vid)  # NOT_FOUND for an unknown volume
                rec = self.plugin.state.get(vid)
                if rec is None or rec.staging_path != staging:
                    raise _failed(f"volume {vid!r} is not staged at {staging}")
                if rec.block != block:
                    raise invalid(
                        f"volume {vid!r} was staged as {'block' if rec.block else 'mount'}"
                    )
            staged = staging_verdict(rec)
            if staged.held is not Held.OURS or not mounts.is_healthy(rec.staging_path):
                raise _failed(
                    f"volume {vid!r} is not live at {rec.staging_path} "
                    f"({staged.why or 'its FUSE daemon is down'}); the plugin is healing it"
                )
            existing = rec.targets.get(target)
            created = False
            if existing is not None:
                if existing.get("read_only") != read_only:
                    raise CsiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"{target} is published with another read-only setting",
                    )
                there = target_verdict(rec, target)
                if there.held is Held.OURS:
                    return csi_pb2.NodePublishVolumeResponse()
                if there.held is Held.FOREIGN:
                    raise occupied(f"not publishing: {there.why}")
                created = bool(existing.get("created"))
                if there.held is Held.NOTHING:  # (a STALE bind gets a fresh one over it)
                    if not os.path.lexists(target):
                        created = make_target(target, directory=not block)
                    else:
                        check_free(target, "target_path", directory=not block)
            else:
                if rec.targets and cap.access_mode.mode == v.Mode.SINGLE_NODE_SINGLE_WRITER:
                    raise _failed(f"volume {vid!r} is already published at another target")
                check_placement(self.plugin.state.all(), target, "target_path")
                created = make_target(target, directory=not block)
            try:
                self._bind(rec, target, read_only)
            except BaseException:
                if created:
                    remove_created(target)
                raise
            rec.targets[target] = {"read_only": read_only, "created": created}
            self.plugin.state.put(rec)
        return csi_pb2.NodePublishVolumeResponse()

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
        staging = self.plugin.config.state_path / "ephemeral" / vid
        staging.mkdir(parents=True, exist_ok=True)
        rec = VolumeRecord(vid, staging_path=str(staging), ephemeral=True)
        try:
            self._mount_staging(rec)
        except BaseException:
            with contextlib.suppress(Exception):
                self._unmount_staging(rec)
            self.plugin.store.delete_volume(vid)
            raise
        self.plugin.state.put(rec)
        return rec

    def NodeUnpublishVolume(
        self, req: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        target = v.path(req.target_path, "target_path")
        self.policy.check(target, "target_path")
        with self.plugin.operation(vid):
            rec = self.plugin.state.get(vid)
            if rec is None or target not in rec.targets:
                # Not published here (or already unpublished): touch nothing. Succeed
                # unless something of ours is there that the state gives to no one here.
                self._refuse_unrecorded_target(vid, target)
                return csi_pb2.NodeUnpublishVolumeResponse()
            there = target_verdict(rec, target)
            if there.held is Held.FOREIGN:
                raise occupied(f"not unpublishing: {there.why}")
            self._unbind_ours(rec, target)
            if rec.targets[target].get("created") and not mounts.is_mounted(target):
                remove_created(target)
            del rec.targets[target]
            self.plugin.state.put(rec)
            if rec.ephemeral and not rec.targets:
                self._unmount_staging(rec)
                self._cancel_heal(vid)
                self.plugin.state.delete(vid)
                with contextlib.suppress(OSError):
                    os.rmdir(rec.staging_path)  # created by us under the state directory
                with contextlib.suppress(NotFound):
                    self.plugin.store.delete_volume(vid)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _refuse_unrecorded_target(self, vid: str, target: str) -> None:
        entry = mounts.find_mount(target)
        if entry is None:
            return
        ours = is_fusedrive_mount(entry)
        if not ours:
            for other in self.plugin.state.all():
                if other.block and other.loop_device and target in other.targets:
                    ours = True
        if ours:
            raise occupied(
                f"{target} carries a fusedrive mount ({entry.source}) that is not recorded "
                f"as a publish of volume {vid!r}; left alone"
            )

    # -- stats, expansion, info ----------------------------------------------------
    def _record_for_path(self, req_volume_id: str, path: str) -> VolumeRecord:
        """The record of a known volume at ``path``: NOT_FOUND for an unknown one.

        The volume is looked up before the path is judged (the spec's order): an
        unknown volume is NOT_FOUND whatever the path, and a path this volume is not
        staged or published at (relative ones included) is NOT_FOUND too.
        """
        vid = v.object_id(req_volume_id, "volume_id")
        if not path:
            raise invalid("volume_path is required")
        try:
            self.plugin.store.get_volume(vid)
        except NotFound:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {vid!r} does not exist") from None
        rec = self.plugin.state.get(vid)
        if rec is None or (path != rec.staging_path and path not in rec.targets):
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {vid!r} is not available at {path}")
        return rec

    def condition(self, rec: VolumeRecord, path: str | None = None) -> tuple[bool, str]:
        """(abnormal, message) for ``rec`` (and, if given, the target ``path``)."""
        vid = rec.volume_id
        died = self._died.get(vid)
        death = f"its FUSE daemon died at {_clock(died)}; " if died else ""
        staged = staging_verdict(rec)
        if staged.held is Held.FOREIGN:
            return True, f"staging path is not ours: {staged.why}"
        if staged.held is Held.NOTHING:
            return True, (
                f"volume {vid!r} is not mounted at its staging path {rec.staging_path}; "
                f"{death}the plugin is remounting it; {OPEN_FILES_ADVICE}"
            )
        if died is not None or not mounts.is_healthy(rec.staging_path):
            return True, (
                f"the FUSE mount of volume {vid!r} at {rec.staging_path} is dead "
                f"(transport endpoint is not connected); {death or 'its FUSE daemon is gone; '}"
                f"the plugin is remounting it; {OPEN_FILES_ADVICE}"
            )
        if path is not None and path != rec.staging_path:
            there = target_verdict(rec, path)
            if there.held is not Held.OURS:
                return True, f"target is not ours: {there.why}"
        healed = self._healed.get(vid)
        if healed is not None:
            return False, (
                f"volume is healthy; its FUSE daemon died and was remounted at "
                f"{_clock(healed)}: {OPEN_FILES_ADVICE}"
            )
        return False, "volume is healthy"

    def NodeGetVolumeStats(
        self, req: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        rec = self._record_for_path(req.volume_id, req.volume_path)
        path = req.volume_path
        resp = csi_pb2.NodeGetVolumeStatsResponse()
        abnormal, message = self.condition(rec, path)
        if not abnormal:
            try:
                self._usage(rec, resp)
            except OSError as exc:
                del resp.usage[:]
                abnormal, message = True, f"cannot read the volume's usage: {exc.strerror}"
        resp.volume_condition.abnormal = abnormal
        resp.volume_condition.message = message
        return resp

    def _usage(self, rec: VolumeRecord, resp: csi_pb2.NodeGetVolumeStatsResponse) -> None:
        """Usage of our own mount only: a statvfs of anything else (the host disk) is refused."""
        Unit = csi_pb2.VolumeUsage
        if rec.block:
            size = loopdev.size_bytes(rec.loop_device) if rec.loop_device else 0
            resp.usage.add(total=size, unit=Unit.BYTES)
            return
        staged = staging_verdict(rec)
        if staged.entry is None or staged.held is not Held.OURS:
            raise OSError(errno.ENOTCONN, "the staging mount is gone")
        major, _, minor = staged.entry.dev.partition(":")
        fd = os.open(rec.staging_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_dev != os.makedev(int(major), int(minor)):
                raise OSError(errno.ENOTCONN, "the staging path is not our mount")
            st = os.fstatvfs(fd)
        finally:
            os.close(fd)
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

    def NodeExpandVolume(
        self, req: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        vid = v.object_id(req.volume_id, "volume_id")
        with self.plugin.operation(vid):
            rec = self._record_for_path(vid, req.volume_path)
            info = self.plugin.store.get_volume(vid)
            want = req.capacity_range.required_bytes
            if want > info.capacity:
                raise CsiError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"volume {vid!r} has {info.capacity} bytes; expand it first (controller)",
                )
            if rec.block and rec.loop_device:
                if staging_verdict(rec).held is not Held.OURS:
                    raise _failed(f"volume {vid!r} is not live at {rec.staging_path}")
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

    # -- bringing a staged volume back: restart recovery and healing ------------------
    def _restore(self, rec: VolumeRecord, strict: bool = True) -> None:
        """Make ``rec``'s staging mount, loop device and targets live again.

        A dead FUSE mount (or none) is replaced: the loop device is detached and the
        dead mount unmounted, the daemon is started again, the loop device attached
        again, and a fresh bind is stacked over every target's dead one (whose
        identity goes to ``rec.retired``). Anything that is not ours is left where it
        is and reported. Targets the CO removed meanwhile are dropped from the record.
        """
        staged = staging_verdict(rec)
        if staged.held is Held.FOREIGN:
            raise occupied(f"cannot bring volume {rec.volume_id!r} back: {staged.why}")
        live = self._live(rec)
        if not live:
            # The targets keep their dead binds until fresh ones are stacked over them,
            # so a pod never sees (and writes into) the bare target directory.
            if any(target_verdict(rec, t).held is Held.OURS for t in rec.targets):
                ident = retired_identity(rec)
                if ident not in rec.retired:
                    rec.retired = [*rec.retired, ident][-MAX_RETIRED:]
                if rec.volume_id not in self._died:
                    # Published over a dead daemon that no watch reported (it died while
                    # no plugin ran): a death all the same, for the condition and metrics.
                    self._died[rec.volume_id] = time.time()
                    self.events.daemon_died(rec.volume_id)
            self._unmount_staging(rec)
            self._mount_staging(rec)
            self.plugin.state.put(rec)  # the new device number, before any bind uses it
        else:
            if not rec.staging_dev and staged.entry is not None:
                rec.staging_dev = staged.entry.dev  # a record written before it was kept
            if self.watcher.pid_of(rec.volume_id) is None:
                self._watch(rec)
        if rec.block:
            self._attach_loop(rec)  # the device attached to the current image, or a new one
        problems = []
        for target, opts in list(rec.targets.items()):
            there = target_verdict(rec, target)
            if there.held is Held.OURS:
                continue
            if there.held is Held.FOREIGN:
                problems.append(there.why)
                continue
            if there.held is Held.NOTHING and not present(target):
                log.info("event=target_gone volume=%s target=%s", rec.volume_id, target)
                del rec.targets[target]
                continue
            try:
                if there.held is Held.NOTHING:
                    check_free(target, "target_path", directory=not rec.block)
                self._bind(rec, target, bool(opts.get("read_only")))
            except CsiError as exc:
                problems.append(exc.message)
        self.plugin.state.put(rec)
        if problems:
            log.warning("event=targets_not_restored volume=%s why=%r", rec.volume_id, problems)
            if strict:
                raise occupied("; ".join(problems))

    def recover(self) -> None:
        """Re-establish recorded stages and publishes after a plugin restart."""
        for rec in self.plugin.state.all():
            try:
                self._recover_one(rec)
            except Exception as exc:
                log.error("event=recover_failed volume=%s error=%s", rec.volume_id, exc)
                self._schedule_heal(rec.volume_id, HEAL_RETRY_SECONDS)

    def _recover_one(self, rec: VolumeRecord) -> None:
        staging = rec.staging_path
        gone = False
        if not staging:
            gone = True
        elif not rec.ephemeral and not present(staging):
            gone = True  # the CO removed the staging directory: nothing to bring back
        else:
            try:
                self.plugin.store.get_volume(rec.volume_id)
            except NotFound:
                log.warning("event=recover_volume_gone volume=%s", rec.volume_id)
                gone = True
        if gone:
            for target in list(rec.targets):
                self._unbind_ours(rec, target)
            if staging:
                self._unmount_staging(rec)
            self.plugin.state.delete(rec.volume_id)
            log.info("event=recover_dropped volume=%s", rec.volume_id)
            return
        with self.plugin.operation(rec.volume_id):
            self._restore(rec)
        if self._died.pop(rec.volume_id, None) is not None:
            self._healed[rec.volume_id] = time.time()
            self.events.daemon_healed(rec.volume_id, True)
            log.warning("event=daemon_healed volume=%s at=recovery", rec.volume_id)
        log.info("event=recovered volume=%s", rec.volume_id)

    # -- healing a volume whose daemon died ---------------------------------------------
    def _daemon_died(self, vid: str, pid: int) -> None:
        self._died.setdefault(vid, time.time())
        self.events.daemon_died(vid)
        self._schedule_heal(vid, self.plugin.config.heal_delay)

    def _schedule_heal(self, vid: str, delay: float) -> None:
        with self._heal_lock:
            self._pending[vid] = time.monotonic() + delay
        self._heal_wake.set()

    def _cancel_heal(self, vid: str) -> None:
        with self._heal_lock:
            self._pending.pop(vid, None)
        self._died.pop(vid, None)
        self._healed.pop(vid, None)

    def _heal_loop(self) -> None:
        while not self._stopping.is_set():
            with self._heal_lock:
                now = time.monotonic()
                due = [vid for vid, at in self._pending.items() if at <= now]
                later = [at for at in self._pending.values() if at > now]
            for vid in due:
                if self._stopping.is_set():
                    return
                self._heal_one(vid)
            wait = min(later) - time.monotonic() if later else 60.0
            self._heal_wake.wait(timeout=max(0.05, min(wait, 60.0)))
            self._heal_wake.clear()

    def _heal_one(self, vid: str) -> None:
        with self._heal_lock:
            self._pending.pop(vid, None)
        rec = self.plugin.state.get(vid)
        if rec is None or not rec.staging_path:
            self._cancel_heal(vid)
            return
        try:
            with self.plugin.operation(vid):
                rec = self.plugin.state.get(vid)  # as the RPC that held the slot left it
                if rec is None or not rec.staging_path:
                    self._cancel_heal(vid)
                    return
                self._restore(rec)
        except CsiError as exc:
            if exc.code == grpc.StatusCode.ABORTED:  # an RPC holds the volume: soon again
                self._schedule_heal(vid, 0.5)
                return
            self._heal_failed(vid, exc.message)
            return
        except Exception as exc:
            self._heal_failed(vid, f"{type(exc).__name__}: {exc}")
            return
        if vid in self._died:
            self._died.pop(vid, None)
            self._healed[vid] = time.time()
            self.events.daemon_healed(vid, True)
            log.warning("event=daemon_healed volume=%s", vid)

    def _heal_failed(self, vid: str, why: str) -> None:
        log.error(
            "event=heal_failed volume=%s error=%s retry_in=%.0fs", vid, why, HEAL_RETRY_SECONDS
        )
        self.events.daemon_healed(vid, False)
        self._schedule_heal(vid, HEAL_RETRY_SECONDS)


def _parse_size(text: str) -> int:
    from fusedrive.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise invalid(f"bad size {text!r} in volume_context: {exc}") from None
