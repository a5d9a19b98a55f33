"""The store: volumes, snapshots, group snapshots, clones and gc in one LMDB environment.

``Store`` builds on ``environment.Environment`` (opening the store directory,
transactions, the reserve of free space, chunk reads; see its docstring for how
processes share a store and how space is kept) and hands out ``View`` objects.

Locking rules:
- a ``Batch`` is one write transaction and belongs to one thread;
- background release (``gc_step``) holds the write lock for at most about
  ``budget`` seconds per call, so foreground writers never wait long;
- views re-read their volume's head on every operation, so a snapshot or clone
  taken by another process is seen by the next operation.

Import order: ``environment`` <- ``views`` <- ``store``. ``views`` used to import
``store`` for its types while ``store`` imported ``views`` at its end; views now
name ``Environment``, which needs neither.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import lmdb

from . import layers as ly
from .catalog import (
    MODE_FILESYSTEM,
    MODES,
    GroupInfo,
    SnapshotInfo,
    VolumeInfo,
    check_name,
    member_name,
    pack_vstate,
    refuse_other_kind,
    unpack_vstate,
)
from .environment import COUNTERS, Environment, _Txn
from .errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange
from .views import View

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreStats:
    chunk_count: int
    unique_raw_bytes: int
    stored_bytes: int
    referenced_raw_bytes: int
    entries: int
    layers: int
    gc_pending_layers: int
    volumes: int
    snapshots: int
    logical_used_bytes: int
    file_bytes: int
    disk_free_bytes: int
    disk_total_bytes: int
    chunk_hash: str
    reserve_bytes: int = 0  # free space the store keeps (see ``Store.reserve_bytes``)
    room_bytes: int = 0  # free space new data may still use: free minus reserve, >= 0

    @property
    def dedup_ratio(self) -> float:
        return self.referenced_raw_bytes / self.unique_raw_bytes if self.unique_raw_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_raw_bytes / self.stored_bytes if self.stored_bytes else 1.0


class Store(Environment):
    """A content-addressed chunk store with versioned per-volume key spaces."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- volumes ----------------------------------------------------------
    def create_volume(
        self,
        name: str,
        capacity: int,
        mode: str = MODE_FILESYSTEM,
        parameters: dict[str, str] | None = None,
    ) -> VolumeInfo:
        """Create an empty volume; the same call again returns the existing one."""
        key = check_name(name, "volume name")
        _check_capacity(capacity)
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        params = dict(parameters or {})
        with self._write() as t:
            if t.txn.get(key, db=self.dbs.volumes) is not None:
                existing = self._volume(t.txn, name)
                if (existing.capacity, existing.mode, existing.parameters, existing.source) != (
                    capacity,
                    mode,
                    params,
                    "",
                ):
                    raise AlreadyExists(f"volume {name!r} exists with different arguments")
                return existing
            refuse_other_kind(t.txn, self.dbs.snapshots, key, "volume")
            self._check_room(t.txn, f"volume {name!r}")
            head = t.new_layer(parent=0)
            info = VolumeInfo(name, capacity, mode, params, time.time(), "", head, 0)
            self._put_volume(t.txn, info)
        log.info("event=volume_created volume=%s capacity=%d mode=%s", name, capacity, mode)
        return info

    def list_volumes(self) -> list[VolumeInfo]:
        with self._read() as txn:
            names = [
                bytes(k).decode() for k in txn.cursor(db=self.dbs.volumes).iternext(values=False)
            ]
            return [self._volume(txn, n) for n in names]

    def delete_volume(self, name: str) -> None:
        """Delete a volume; its snapshots stay readable. Space is released by ``gc``."""
        key = check_name(name, "volume name")
        with self._write() as t:
            info = self._volume(t.txn, name)
            t.txn.delete(key, db=self.dbs.volumes)
            t.txn.delete(key, db=self.dbs.vstate)
            t.add_holders(info.head, -1)
        log.info("event=volume_deleted volume=%s", name)

    def expand_volume(self, name: str, capacity: int) -> VolumeInfo:
        _check_capacity(capacity)
        with self._write() as t:
            info = self._volume(t.txn, name)
            if capacity < info.capacity:
                raise OutOfRange(
                    f"volume {name!r} has {info.capacity} bytes; shrinking to {capacity} "
                    "is not supported"
                )
            if capacity != info.capacity:
                info = replace(info, capacity=capacity)
                self._put_volume(t.txn, info)
        return info

    def set_parameters(self, name: str, parameters: dict[str, str]) -> VolumeInfo:
        """Merge ``parameters`` into a volume's parameters (mutable parameters)."""
        with self._write() as t:
            info = self._volume(t.txn, name)
            info = replace(info, parameters={**info.parameters, **parameters})
            self._put_volume(t.txn, info)
        return info

    # -- snapshots and clones ---------------------------------------------
    def create_snapshot(self, volume: str, name: str) -> SnapshotInfo:
        """Freeze the volume's head as snapshot ``name``; O(1) in the volume's size."""
        key = check_name(name, "snapshot name")
        with self._write() as t:
            raw = t.txn.get(key, db=self.dbs.snapshots)
            if raw is not None:
                existing = SnapshotInfo.from_json(raw)
                if existing.volume != volume:
                    raise AlreadyExists(f"snapshot {name!r} exists for volume {existing.volume!r}")
                return existing
            refuse_other_kind(t.txn, self.dbs.volumes, key, "snapshot")
            info = self._volume(t.txn, volume)
            self._check_room(t.txn, f"snapshot {name!r}")
            frozen = self._freeze_head(t, info)
            t.add_holders(frozen, +1)
            snap = SnapshotInfo(
                name,
                volume,
                frozen,
                info.used,
                info.capacity,
                info.mode,
                dict(info.parameters),
                time.time(),
            )
            t.txn.put(key, snap.to_json(), db=self.dbs.snapshots)
        log.info("event=snapshot_created snapshot=%s volume=%s", name, volume)
        return snap

    def _freeze_head(self, t: _Txn, info: VolumeInfo) -> int:
        """Freeze the volume's head and give it a fresh head on top; returns the frozen id."""
        frozen = info.head
        rec = ly.read_layer(t.txn, self.dbs, frozen)
        new_head = t.new_layer(parent=frozen, family=rec.family)
        # The volume's hold moves to the new head and the new head holds the frozen
        # layer instead: the frozen layer's holder count is unchanged.
        ly.write_layer(t.txn, self.dbs, replace(rec, frozen=True))
        t.txn.put(info.name.encode(), pack_vstate(new_head, info.used), db=self.dbs.vstate)
        return frozen

    def list_snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        with self._read() as txn:
            snaps = [
                SnapshotInfo.from_json(v)
                for v in txn.cursor(db=self.dbs.snapshots).iternext(keys=False)
            ]
        return [s for s in snaps if volume is None or s.volume == volume]

    def delete_snapshot(self, name: str) -> None:
        key = check_name(name, "snapshot name")
        with self._write() as t:
            snap = self._snapshot(t.txn, name)
            if snap.group:
                raise InvalidArgument(
                    f"snapshot {name!r} belongs to group snapshot {snap.group!r}: "
                    "delete the group snapshot instead"
                )
            t.txn.delete(key, db=self.dbs.snapshots)
            t.add_holders(snap.layer, -1)
        log.info("event=snapshot_deleted snapshot=%s", name)

    # -- group snapshots (catalog.GroupInfo) ----------------------------------------
    def create_group_snapshot(
        self, name: str, volumes: list[str]
    ) -> tuple[GroupInfo, list[SnapshotInfo]]:
        """Snapshot every volume of ``volumes`` in ONE write transaction, as group ``name``.

        All members are cut at the same point of the store's history: a write committed
        before the transaction is in every member it touched, one committed after it in
        none. The same call again returns the existing group; the same name with another
        set of volumes is ``AlreadyExists``; an unknown volume is ``NotFound`` and then
        nothing is created.
        """
        key = check_name(name, "group snapshot name")
        if not volumes:
            raise InvalidArgument("a group snapshot needs at least one source volume")
        for vol in volumes:
            check_name(vol, "volume name")
        if len(set(volumes)) != len(volumes):
            raise InvalidArgument(f"source volumes are listed more than once: {volumes}")
        with self._write() as t:
            raw = t.txn.get(key, db=self.dbs.groups)
            if raw is not None:
                group = GroupInfo.from_json(raw)
                if set(group.volumes) != set(volumes):
                    raise AlreadyExists(
                        f"group snapshot {name!r} exists for volumes {', '.join(group.volumes)}"
                    )
                return group, [self._snapshot(t.txn, s) for s in group.snapshots]
            infos = [self._volume(t.txn, vol) for vol in volumes]
            self._check_room(t.txn, f"group snapshot {name!r}")
            created = time.time()
            snaps = []
            for info in infos:
                sname = member_name(name, info.name)
                skey = sname.encode()
                if t.txn.get(skey, db=self.dbs.snapshots) is not None:
                    raise AlreadyExists(f"a snapshot named {sname!r} exists already")
                refuse_other_kind(t.txn, self.dbs.volumes, skey, "snapshot")
                frozen = self._freeze_head(t, info)
                t.add_holders(frozen, +1)
                snap = SnapshotInfo(
                    sname,
                    info.name,
                    frozen,
                    info.used,
                    info.capacity,
                    info.mode,
                    dict(info.parameters),
                    created,
                    group=name,
                )
                t.txn.put(skey, snap.to_json(), db=self.dbs.snapshots)
                snaps.append(snap)
            group = GroupInfo(name, tuple(volumes), tuple(s.name for s in snaps), created)
            t.txn.put(key, group.to_json(), db=self.dbs.groups)
        log.info("event=group_snapshot_created group=%s volumes=%s", name, ",".join(volumes))
        return group, snaps

    def get_group_snapshot(self, name: str) -> tuple[GroupInfo, list[SnapshotInfo]]:
        """The group and its member snapshots, in the group's order; ``NotFound`` if unknown."""
        with self._read() as txn:
            return self._group(txn, name)

    def list_group_snapshots(self) -> list[GroupInfo]:
        with self._read() as txn:
            return [
                GroupInfo.from_json(v) for v in txn.cursor(db=self.dbs.groups).iternext(keys=False)
            ]

    def delete_group_snapshot(self, name: str) -> None:
        """Delete the group and all its member snapshots in one transaction."""
        key = check_name(name, "group snapshot name")
        with self._write() as t:
            _group, snaps = self._group(t.txn, name)
            for snap in snaps:
                t.txn.delete(snap.name.encode(), db=self.dbs.snapshots)
                t.add_holders(snap.layer, -1)
            t.txn.delete(key, db=self.dbs.groups)
        log.info("event=group_snapshot_deleted group=%s", name)

    def _group(self, txn: lmdb.Transaction, name: str) -> tuple[GroupInfo, list[SnapshotInfo]]:
        raw = txn.get(check_name(name, "group snapshot name"), db=self.dbs.groups)
        if raw is None:
            raise NotFound(f"group snapshot {name!r} not found")
        group = GroupInfo.from_json(raw)
        return group, [self._snapshot(txn, s) for s in group.snapshots]

    def clone_snapshot(
        self,
        snapshot: str,
        name: str,
        capacity: int | None = None,
        parameters: dict[str, str] | None = None,
    ) -> VolumeInfo:
        """A new volume whose head sits on the snapshot's frozen layer; O(1)."""
        source = f"snapshot:{snapshot}"
        with self._write() as t:
            snap = self._snapshot(t.txn, snapshot)
            existing = self._existing_clone(t.txn, name, source, capacity, parameters)
            if existing is not None:
                return existing
            info = self._new_clone(
                t,
                name,
                snap.layer,
                snap.size,
                snap.capacity,
                snap.mode,
                snap.parameters,
                source,
                capacity,
                parameters,
            )
        log.info("event=volume_cloned volume=%s source=%s", name, source)
        return info

    def clone_volume(
        self,
        volume: str,
        name: str,
        capacity: int | None = None,
        parameters: dict[str, str] | None = None,
    ) -> VolumeInfo:
        """A new volume with the live volume's current content; O(1)."""
        source = f"volume:{volume}"
        with self._write() as t:
            src = self._volume(t.txn, volume)
            existing = self._existing_clone(t.txn, name, source, capacity, parameters)
            if existing is not None:
                return existing
            frozen = self._freeze_head(t, src)
            info = self._new_clone(
                t,
                name,
                frozen,
                src.used,
                src.capacity,
                src.mode,
                src.parameters,
                source,
                capacity,
                parameters,
            )
        log.info("event=volume_cloned volume=%s source=%s", name, source)
        return info

    def _existing_clone(
        self,
        txn: lmdb.Transaction,
        name: str,
        source: str,
        capacity: int | None,
        parameters: dict[str, str] | None,
    ) -> VolumeInfo | None:
        key = check_name(name, "volume name")
        if txn.get(key, db=self.dbs.volumes) is None:
            return None
        existing = self._volume(txn, name)
        if existing.source != source or (capacity is not None and capacity != existing.capacity):
            raise AlreadyExists(f"volume {name!r} exists with different arguments")
        if parameters is not None and {**existing.parameters, **parameters} != existing.parameters:
            raise AlreadyExists(f"volume {name!r} exists with different parameters")
        return existing

    def _new_clone(
        self,
        t: _Txn,
        name: str,
        parent: int,
        used: int,
        src_capacity: int,
        mode: str,
        src_parameters: dict[str, str],
        source: str,
        capacity: int | None,
        parameters: dict[str, str] | None,
    ) -> VolumeInfo:
        refuse_other_kind(t.txn, self.dbs.snapshots, name.encode(), "volume")
        cap = src_capacity if capacity is None else capacity
        _check_capacity(cap)
        self._check_room(t.txn, f"volume {name!r}")
        if cap < src_capacity:
            raise OutOfRange(f"capacity {cap} is smaller than the source's {src_capacity} bytes")
        rec = ly.read_layer(t.txn, self.dbs, parent)
        head = t.new_layer(parent=parent, family=rec.family)
        t.add_holders(parent, +1)
        params = {**src_parameters, **(parameters or {})}
        info = VolumeInfo(name, cap, mode, params, time.time(), source, head, used)
        self._put_volume(t.txn, info)
        return info

    # -- views and chunks -------------------------------------------------
    def volume(self, name: str) -> View:
        """The writable view of a volume's head."""
        check_name(name, "volume name")
        return View(self, name, None)

    def snapshot(self, name: str) -> View:
        """The read-only view of a snapshot."""
        with self._read() as txn:
            snap = self._snapshot(txn, name)
        return View(self, snap.name, snap.layer)

    # -- space and release -------------------------------------------------
    def stats(self) -> StoreStats:
        """Counters and space. ``file_bytes`` may still count records freed moments ago
        whose space the reclaimer has not given back yet (``segments.settle()`` waits;
        closing the store does too): a metrics scrape must not wait for a large release.
        """
        with self._read() as txn:
            counters = {c: self._meta_int(txn, c.encode()) for c in COUNTERS}
            vfs = os.statvfs(self.path)
            reserve = self._reserve(txn, vfs)
            entries = txn.stat(self.dbs.entries)["entries"]
            layers = txn.stat(self.dbs.layers)["entries"]
            pending = (
                txn.stat(self.dbs.gcqueue)["entries"] + txn.stat(self.dbs.mergequeue)["entries"]
            )
            nvol = txn.stat(self.dbs.volumes)["entries"]
            nsnap = txn.stat(self.dbs.snapshots)["entries"]
            used = sum(
                unpack_vstate(v)[1] for v in txn.cursor(db=self.dbs.vstate).iternext(keys=False)
            )
        data = self.path / "data.mdb"
        file_bytes = data.stat().st_blocks * 512 if data.exists() else 0
        file_bytes += self.segments.allocated_bytes()
        return StoreStats(
            entries=entries,
            layers=layers,
            gc_pending_layers=pending,
            volumes=nvol,
            snapshots=nsnap,
            logical_used_bytes=used,
            file_bytes=file_bytes,
            disk_free_bytes=vfs.f_bavail * vfs.f_frsize,
            disk_total_bytes=vfs.f_blocks * vfs.f_frsize,
            chunk_hash=self.chunk_hash,
            reserve_bytes=reserve,
            room_bytes=max(vfs.f_bavail * vfs.f_frsize - reserve, 0),
            **counters,
        )

    def gc_pending(self) -> int:
        """Layers waiting to be released or merged."""
        with self._read() as txn:
            return int(
                txn.stat(self.dbs.gcqueue)["entries"] + txn.stat(self.dbs.mergequeue)["entries"]
            )

    def gc_step(self, budget: float = 0.005, batch: int = 128) -> bool:
        """Release garbage and merge single-child layers for about ``budget`` seconds.

        Returns True while work remains. Dead layers go first (they free space
        outright), then merges of frozen layers that only their child still holds.
        """
        if batch < 1:
            raise InvalidArgument(f"gc batch must be at least 1, not {batch}")
        with self._write() as t:
            # The clock starts once the write lock is held and every call makes
            # progress: time spent waiting for the lock must not stall release.
            deadline = time.monotonic() + budget
            txn, dbs = t.txn, self.dbs
            while True:
                dead, merge = txn.cursor(db=dbs.gcqueue), txn.cursor(db=dbs.mergequeue)
                if dead.first():
                    self._release_some(t, ly.from_u64(dead.key()), batch)
                elif merge.first():
                    self._merge_some(t, ly.from_u64(merge.key()), batch)
                else:
                    return False
                if time.monotonic() >= deadline:
                    break
            return bool(txn.cursor(db=dbs.gcqueue).first() or txn.cursor(db=dbs.mergequeue).first())

    def _release_some(self, t: _Txn, layer: int, batch: int) -> None:
        txn, dbs = t.txn, self.dbs
        rec = ly.read_layer(txn, dbs, layer)
        keys = list(itertools.islice(ly.iter_layer_keys(txn, dbs, layer), batch))
        for ekey in keys:
            vkey = ly.version_key(rec.family, ekey, layer)
            t.release_version(txn.get(vkey, db=dbs.entries))
            txn.delete(vkey, db=dbs.entries)
            txn.delete(ly.u64(layer) + ekey, db=dbs.layerkeys)
        if len(keys) < batch:
            txn.delete(ly.u64(layer), db=dbs.layers)
            txn.delete(ly.u64(layer), db=dbs.gcqueue)
            txn.delete(ly.u64(layer), db=dbs.mergequeue)
            if rec.parent:
                t.add_holders(rec.parent, -1)
            log.debug("event=layer_released layer=%d", layer)

    def _merge_some(self, t: _Txn, layer: int, batch: int) -> None:
        """Merge up to ``batch`` keys of frozen ``layer`` into its only child.

        Every intermediate state reads the same through any view: a version moves
        from the layer to the child in one transaction, and a version the child
        hides is simply released.
        """
        txn, dbs = t.txn, self.dbs
        qkey = ly.u64(layer)
        raw = txn.get(qkey, db=dbs.layers)
        rec = None if raw is None else ly.LayerRecord.unpack(layer, raw)
        kids = ly.children(txn, dbs, layer) if rec is not None and rec.holders == 1 else []
        if rec is None or len(kids) != 1 or self._snapshot_names(txn, layer):
            txn.delete(qkey, db=dbs.mergequeue)  # no longer (or never) mergeable
            return
        child = kids[0]
        below = self.lineages.get(txn, dbs, rec.parent) if rec.parent else None
        keys = list(itertools.islice(ly.iter_layer_keys(txn, dbs, layer), batch))
        for ekey in keys:
            vkey = ly.version_key(rec.family, ekey, layer)
            ckey = ly.version_key(rec.family, ekey, child)
            version = txn.get(vkey, db=dbs.entries)
            txn.delete(vkey, db=dbs.entries)
            txn.delete(qkey + ekey, db=dbs.layerkeys)
            mine = txn.get(ckey, db=dbs.entries)
            hides_nothing = below is None or ly.lookup_raw(txn, dbs, below, ly.dec(ekey)) is None
            if mine is not None:
                t.release_version(version)  # hidden by the child's own version
                if mine == ly.TOMBSTONE and hides_nothing:
                    txn.delete(ckey, db=dbs.entries)
                    txn.delete(ly.u64(child) + ekey, db=dbs.layerkeys)
            elif version == ly.TOMBSTONE and hides_nothing:
                pass  # a tombstone with nothing beneath it hides nothing
            else:
                txn.put(ckey, version, db=dbs.entries)
                txn.put(ly.u64(child) + ekey, b"", db=dbs.layerkeys)
        if len(keys) < batch:
            crec = ly.read_layer(txn, dbs, child)
            ly.write_layer(txn, dbs, replace(crec, parent=rec.parent))
            txn.delete(qkey, db=dbs.layers)
            txn.delete(qkey, db=dbs.mergequeue)
            log.debug("event=layer_merged layer=%d child=%d", layer, child)

    def _snapshot_names(self, txn: lmdb.Transaction, layer: int) -> bool:
        return any(
            SnapshotInfo.from_json(v).layer == layer
            for v in txn.cursor(db=self.dbs.snapshots).iternext(keys=False)
        )

    def gc(self, progress: Callable[[int], None] | None = None) -> int:
        """Run ``gc_step`` until nothing is left; returns the number of steps."""
        steps = 0
        while self.gc_step():
            steps += 1
            if progress:
                progress(self.gc_pending())
        return steps + 1


def _check_capacity(capacity: int) -> None:
    if not isinstance(capacity, int) or capacity <= 0:
        raise InvalidArgument(f"capacity must be a positive number of bytes, not {capacity!r}")
    if capacity > 2**62:
        raise OutOfRange(f"capacity {capacity} is too large")
