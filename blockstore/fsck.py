"""fsck: recount and verify everything the store's invariants promise.

Checks, from the entries up:
- every entry version belongs to a live layer of its family and has an index row,
  and every index row has its entry version;
- chunk reference counts equal the number of entry versions naming each chunk;
  chunks nobody references are orphans; references to missing chunks dangle;
- every chunk decodes and matches its hash;
- layer holder counts equal volume heads + snapshots + child layers, and a layer
  without holders is queued for release;
- each volume's logical usage equals the chunk bytes its head sees;
- the space counters in ``meta`` equal the sums over the chunks;
- every group snapshot lists member snapshots that exist and name it, and every
  snapshot naming a group is one of its members (``catalog.GroupInfo``);
- segment records count exactly the live chunk bytes of each segment file, and no
  segment record is kept without live chunks (except the active one). Segment
  files without live chunks and space a crash left un-punched are reported as
  ``reclaimable_bytes`` (not a problem: an aborted or killed transaction leaves
  them behind by design).

``repair=True`` fixes what can be fixed without inventing data: reference counts
(a lost record is rebuilt from the chunk it describes), orphaned chunks and index
rows, holder counts, the release queue, usage and counters, segment records,
group records (a missing member leaves its group; a member of a missing group
becomes a plain snapshot);
it deletes dead segment files and punches out reclaimable space. Dangling references
and corrupt chunks are reported, not removed: a read of them fails with an I/O
error rather than returning wrong bytes.

Damage: every chunk whose stored copy is missing or does not decode to its hash is
listed in ``FsckReport.damaged`` with the volume and snapshot keys that see it (the
store knows keys, not files: ``fusedrive.fsck`` maps them to paths and byte ranges).
``repair=True`` marks each damaged chunk (``chunks.py``, ``damaged``), so the next
put of the same bytes rewrites it even without checking, and drops marks of chunks
that are gone or read sound again. Storing the same bytes again heals a chunk for
every key that names it (``chunks.copy_is_sound``); nothing else can.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import chunks as ch
from . import layers as ly
from .catalog import GroupInfo, SnapshotInfo, pack_vstate, unpack_vstate
from .errors import Corrupt, NotFound

if TYPE_CHECKING:
    from .store import Store

_U64 = struct.Struct(">Q")


@dataclass(frozen=True)
class DamageRef:
    """A key that sees a damaged chunk: in volume (head) or snapshot ``name``."""

    kind: str  # "volume" or "snapshot"
    name: str
    key: bytes


@dataclass
class DamagedChunk:
    digest: bytes
    why: str
    raw_length: int
    marked: bool = False  # marked in ``damaged`` (after this fsck, if it repaired)
    refs: list[DamageRef] = field(default_factory=list)


@dataclass
class FsckReport:
    entries: int = 0
    chunks: int = 0
    layers: int = 0
    problems: list[str] = field(default_factory=list)
    unfixable: list[str] = field(default_factory=list)
    repaired: int = 0
    reclaimable_bytes: int = 0
    damaged: list[DamagedChunk] = field(default_factory=list)
    marked: int = 0  # damaged chunks this repair marked

    @property
    def clean(self) -> bool:
        return not self.problems and not self.unfixable


Progress = Callable[[str, int, int], None]


def fsck(store: Store, repair: bool = False, progress: Progress | None = None) -> FsckReport:
    rep = FsckReport()
    store.segments.settle()  # space freed before the check is given back, not "reclaimable"
    txn = store._begin(write=repair)
    after: list[Callable[[], None]] = []
    try:
        _check(store, txn, rep, repair, progress)
        _check_damage(store, txn, rep, repair)
        _check_groups(store, txn, rep, repair)
        _check_segments(store, txn, rep, repair, after)
        if repair:
            txn.commit()
        else:
            txn.abort()
    except BaseException:
        txn.abort()
        raise
    for action in after:  # file changes only once the repaired records are durable
        action()
    return rep


def _check_groups(store: Store, txn: object, rep: FsckReport, repair: bool) -> None:
    """Group records and their members' ``group`` fields agree (``catalog.GroupInfo``)."""
    import lmdb

    assert isinstance(txn, lmdb.Transaction)
    dbs = store.dbs
    snaps = {
        bytes(k).decode(): SnapshotInfo.from_json(bytes(v)) for k, v in txn.cursor(db=dbs.snapshots)
    }
    groups = [GroupInfo.from_json(bytes(v)) for v in txn.cursor(db=dbs.groups).iternext(keys=False)]
    members = set()
    for group in groups:
        keep = [s for s in group.snapshots if s in snaps and snaps[s].group == group.name]
        members.update(keep)
        if len(keep) == len(group.snapshots):
            continue
        gone = sorted(set(group.snapshots) - set(keep))
        rep.problems.append(f"group snapshot {group.name!r} lists missing members {gone}")
        if repair:
            vols = tuple(snaps[s].volume for s in keep)
            fixed = GroupInfo(group.name, vols, tuple(keep), group.created)
            txn.put(group.name.encode(), fixed.to_json(), db=dbs.groups)
            rep.repaired += 1
    for name, snap in snaps.items():
        if snap.group and name not in members:
            rep.problems.append(f"snapshot {name!r} names group {snap.group!r}, which lacks it")
            if repair:
                plain = dataclasses.replace(snap, group="")
                txn.put(name.encode(), plain.to_json(), db=dbs.snapshots)
                rep.repaired += 1


def _read_record(store: Store, location: bytes) -> bytes:
    """The stored record at ``location``; Corrupt if it cannot be read."""
    try:
        return store.segments.read(bytes(location))
    except OSError as exc:
        raise Corrupt(f"segment read failed: {exc}") from exc


def _check_segments(
    store: Store, txn: object, rep: FsckReport, repair: bool, after: list[Callable[[], None]]
) -> None:
    import lmdb

    from .segments import aligned, pack_segment, punch, unpack_location, unpack_segment

    assert isinstance(txn, lmdb.Transaction)
    dbs, files = store.dbs, store.segments

    def problem(msg: str) -> None:
        rep.problems.append(msg)
        if repair:
            rep.repaired += 1

    ranges: dict[int, list[tuple[int, int]]] = {}
    for loc in txn.cursor(db=dbs.chunks).iternext(keys=False):
        seg, off, length = unpack_location(bytes(loc))
        ranges.setdefault(seg, []).append((off, aligned(length)))
    records = {ly.from_u64(k): unpack_segment(bytes(v)) for k, v in txn.cursor(db=dbs.segments)}
    raw = txn.get(b"active_segment", db=dbs.meta)
    active = _U64.unpack(raw)[0] if raw else 0
    for seg in sorted(set(records) | set(ranges)):
        live = sum(size for _, size in ranges.get(seg, []))
        end = max([records.get(seg, (0, 0))[1]] + [o + n for o, n in ranges.get(seg, [])])
        have = records.get(seg)
        if not live and seg != active:
            if have is not None:
                problem(f"segment {seg:x} has no live chunks but is kept")
                if repair:
                    txn.delete(ly.u64(seg), db=dbs.segments)
            continue
        if have is None or have[0] != live or have[1] < end:
            problem(f"segment {seg:x} records {have}, counted live={live} end={end}")
            if repair:
                txn.put(ly.u64(seg), pack_segment(live, end), db=dbs.segments)
    keep = {s for s in set(records) | set(ranges) if ranges.get(s) or s == active}
    for seg in files.existing():
        path = files.path(seg)
        if seg not in keep:
            # Left by a transaction that never committed, or by a crash between a
            # commit and the deletion it allowed: wasted space, not damage.
            rep.reclaimable_bytes += path.stat().st_blocks * 512
            if repair:
                after.append(functools.partial(files.release_now, [], [seg]))
            continue
        allocated = path.stat().st_blocks * 512
        live_ranges = sorted(ranges.get(seg, []))
        live = sum(n for _, n in live_ranges)
        if allocated > live:
            rep.reclaimable_bytes += allocated - live
            if repair:
                end = max([records.get(seg, (0, 0))[1]] + [o + n for o, n in live_ranges])

                def punch_gaps(seg: int = seg, spans: list = live_ranges, end: int = end) -> None:
                    fd, pos = files.fd(seg), 0
                    for off, size in [*spans, (end, 0)]:
                        if off > pos:
                            punch(fd, pos, off - pos)
                        pos = max(pos, off + size)

                after.append(punch_gaps)


def _damage(digest: bytes, why: str, raw_length: int) -> DamagedChunk:
    return DamagedChunk(digest, why.removeprefix(f"chunk {digest.hex()[:16]} "), raw_length)


def _check_damage(store: Store, txn: object, rep: FsckReport, repair: bool) -> None:
    """Marks of damaged chunks, and the volume and snapshot keys that see the damage."""
    import lmdb

    assert isinstance(txn, lmdb.Transaction)
    dbs = store.dbs
    damaged = {d.digest: d for d in rep.damaged}
    stale = []
    for digest, why in txn.cursor(db=dbs.damaged):
        digest = bytes(digest)
        if digest in damaged:
            damaged[digest].marked = True
        elif txn.get(digest, db=dbs.chunks) is None:
            rep.problems.append(f"chunk {digest.hex()[:16]} is marked damaged but is gone")
            stale.append(digest)
        else:
            rep.problems.append(
                f"chunk {digest.hex()[:16]} is marked damaged ({bytes(why).decode()}) "
                "but no referenced copy of it is damaged"
            )
            stale.append(digest)
    if repair:
        for digest in stale:
            txn.delete(digest, db=dbs.damaged)
            rep.repaired += 1
        for d in rep.damaged:
            if not d.marked and txn.get(d.digest, db=dbs.chunkrefs) is not None:
                txn.put(d.digest, d.why.encode(), db=dbs.damaged)
                d.marked = True
                rep.marked += 1
    if not damaged:
        return
    views: list[tuple[str, str, int]] = [
        ("volume", bytes(k).decode(), unpack_vstate(bytes(v))[0])
        for k, v in txn.cursor(db=dbs.vstate)
    ]
    for v in txn.cursor(db=dbs.snapshots).iternext(keys=False):
        snap = SnapshotInfo.from_json(bytes(v))
        views.append(("snapshot", snap.name, snap.layer))
    for kind, name, layer in views:
        try:
            lin = store.lineages.get(txn, dbs, layer)
        except NotFound:  # a missing layer is reported above
            continue
        for key, value in ly.scan(txn, dbs, lin, b""):
            if isinstance(value, ly.ChunkRef) and value.digest in damaged:
                d = damaged[value.digest]
                d.refs.append(DamageRef(kind, name, key))
                d.raw_length = d.raw_length or value.raw_length


def _check(
    store: Store, txn: object, rep: FsckReport, repair: bool, progress: Progress | None
) -> None:
    import lmdb

    assert isinstance(txn, lmdb.Transaction)
    dbs = store.dbs

    def problem(msg: str) -> None:
        rep.problems.append(msg)
        if repair:
            rep.repaired += 1

    # Layers and their families.
    layers: dict[int, ly.LayerRecord] = {}
    for k, v in txn.cursor(db=dbs.layers):
        layer = ly.from_u64(k)
        layers[layer] = ly.LayerRecord.unpack(layer, v)
    rep.layers = len(layers)

    # Entries, their index rows and chunk references.
    refs: Counter[bytes] = Counter()
    total_entries = txn.stat(dbs.entries)["entries"]
    bad_versions: list[bytes] = []
    for i, (k, v) in enumerate(txn.cursor(db=dbs.entries)):
        rep.entries += 1
        if progress and i % 4096 == 0:
            progress("entries", i, total_entries)
        family, ekey, layer = ly.split_version_key(bytes(k))
        rec = layers.get(layer)
        if rec is None or rec.family != family:
            problem(f"entry version in unknown layer {layer}")
            bad_versions.append(bytes(k))
            continue
        if txn.get(ly.u64(layer) + ekey, db=dbs.layerkeys) is None:
            problem(f"entry version in layer {layer} has no index row")
            if repair:
                txn.put(ly.u64(layer) + ekey, b"", db=dbs.layerkeys)
        try:
            value = ly.decode_value(bytes(v))
        except Corrupt as exc:
            rep.unfixable.append(f"layer {layer}: {exc}")
            continue
        if isinstance(value, ly.ChunkRef):
            refs[value.digest] += 1
    if repair:
        for k in bad_versions:
            raw = txn.get(k, db=dbs.entries)
            txn.delete(k, db=dbs.entries)
            if raw is not None and raw[:1] == b"C":
                refs[bytes(raw[1:33])] += 0  # counted below as unreferenced if nobody else

    orphan_index = []
    for k in txn.cursor(db=dbs.layerkeys).iternext(values=False):
        layer = ly.from_u64(k[:8])
        rec = layers.get(layer)
        if (
            rec is None
            or txn.get(ly.version_key(rec.family, bytes(k[8:]), layer), db=dbs.entries) is None
        ):
            orphan_index.append(bytes(k))
    for k in orphan_index:
        problem(f"index row of layer {ly.from_u64(k[:8])} without an entry version")
        if repair:
            txn.delete(k, db=dbs.layerkeys)

    # Chunks: counts, orphans, dangling references, hashes.
    totals = dict.fromkeys(
        ("chunk_count", "unique_raw_bytes", "stored_bytes", "referenced_raw_bytes"), 0
    )
    seen: set[bytes] = set()
    total_chunks = txn.stat(dbs.chunkrefs)["entries"]
    to_delete: list[bytes] = []
    for i, (digest, rv) in enumerate(list(txn.cursor(db=dbs.chunkrefs))):
        digest = bytes(digest)
        if progress and i % 256 == 0:
            progress("chunks", i, total_chunks)
        rep.chunks += 1
        seen.add(digest)
        count, raw_len, stored_len = ch.unpack_refs(bytes(rv))
        location = txn.get(digest, db=dbs.chunks)
        want = refs.get(digest, 0)
        if location is None:
            if want:
                rep.unfixable.append(f"chunk {digest.hex()[:16]} is missing ({want} references)")
                rep.damaged.append(_damage(digest, "its stored copy is missing", raw_len))
            else:
                problem(f"reference record of absent chunk {digest.hex()[:16]}")
                if repair:
                    txn.delete(digest, db=dbs.chunkrefs)
            continue
        try:
            stored = _read_record(store, location)
            ch.decode(digest, stored, raw_len, store.chunk_hash)
        except Corrupt as exc:
            rep.unfixable.append(str(exc))
            if want:
                rep.damaged.append(_damage(digest, str(exc), raw_len))
            stored = b""
        if want == 0:
            problem(f"orphaned chunk {digest.hex()[:16]}")
            to_delete.append(digest)
            continue
        if stored and len(stored) != stored_len:
            problem(f"chunk {digest.hex()[:16]} stored length {stored_len} != {len(stored)}")
            stored_len = len(stored)
            if repair:
                txn.put(digest, ch.pack_refs(count, raw_len, stored_len), db=dbs.chunkrefs)
        if count != want:
            problem(f"chunk {digest.hex()[:16]} has count {count}, referenced {want} times")
            if repair:
                txn.put(digest, ch.pack_refs(want, raw_len, stored_len), db=dbs.chunkrefs)
        totals["chunk_count"] += 1
        totals["unique_raw_bytes"] += raw_len
        totals["stored_bytes"] += stored_len
        totals["referenced_raw_bytes"] += raw_len * want
    if repair:
        for digest in to_delete:
            txn.delete(digest, db=dbs.chunkrefs)
            txn.delete(digest, db=dbs.chunks)
    for digest, location in list(txn.cursor(db=dbs.chunks)):
        digest = bytes(digest)
        if digest in seen:
            continue
        want = refs.get(digest, 0)
        if not want:
            problem(f"chunk {digest.hex()[:16]} has no reference record")
            if repair:
                txn.delete(digest, db=dbs.chunks)
            continue
        # Referenced bytes without a record: rebuild the record, never drop the data.
        try:
            stored = _read_record(store, location)
            raw_len = len(ch.decode(digest, stored, None, store.chunk_hash))
        except Corrupt as exc:
            rep.unfixable.append(str(exc))
            rep.damaged.append(_damage(digest, str(exc), 0))
            continue
        seen.add(digest)
        problem(f"chunk {digest.hex()[:16]} has no reference record ({want} references)")
        if repair:
            txn.put(digest, ch.pack_refs(want, raw_len, len(stored)), db=dbs.chunkrefs)
        totals["chunk_count"] += 1
        totals["unique_raw_bytes"] += raw_len
        totals["stored_bytes"] += len(stored)
        totals["referenced_raw_bytes"] += raw_len * want
    known = {d.digest for d in rep.damaged}
    for digest in refs:
        if digest not in seen:
            rep.unfixable.append(f"{refs[digest]} references to missing chunk {digest.hex()[:16]}")
            if digest not in known:
                rep.damaged.append(_damage(digest, "its stored copy is missing", 0))

    # Layer holders and the release queue.
    holders: Counter[int] = Counter()
    volumes = {}
    for k, v in txn.cursor(db=dbs.vstate):
        head, used = unpack_vstate(bytes(v))
        volumes[bytes(k)] = (head, used)
        holders[head] += 1
        if head not in layers:
            rep.unfixable.append(f"volume {bytes(k).decode()!r} has a missing head layer {head}")
    for v in txn.cursor(db=dbs.snapshots).iternext(keys=False):
        snap = SnapshotInfo.from_json(bytes(v))
        holders[snap.layer] += 1
        if snap.layer not in layers:
            rep.unfixable.append(f"snapshot {snap.name!r} has a missing layer {snap.layer}")
    for rec in layers.values():
        if rec.parent:
            holders[rec.parent] += 1
    queued = {ly.from_u64(k) for k in txn.cursor(db=dbs.gcqueue).iternext(values=False)}
    for layer, rec in layers.items():
        want = holders.get(layer, 0)
        if rec.holders != want:
            problem(f"layer {layer} has {rec.holders} holders, counted {want}")
            if repair:
                from dataclasses import replace

                ly.write_layer(txn, dbs, replace(rec, holders=want))
        if want == 0 and layer not in queued:
            problem(f"layer {layer} has no holders and is not queued for release")
            if repair:
                txn.put(ly.u64(layer), b"", db=dbs.gcqueue)
    for layer in queued:
        if layer not in layers:
            problem(f"release queue names unknown layer {layer}")
            if repair:
                txn.delete(ly.u64(layer), db=dbs.gcqueue)

    # Volume usage: the chunk bytes each head sees.
    for key, (head, used) in volumes.items():
        if head not in layers:
            continue
        lin = store.lineages.get(txn, dbs, head)
        seen_bytes = sum(
            v.raw_length for _, v in ly.scan(txn, dbs, lin, b"") if isinstance(v, ly.ChunkRef)
        )
        if seen_bytes != used:
            problem(f"volume {key.decode()!r} records {used} bytes used, sees {seen_bytes}")
            if repair:
                txn.put(key, pack_vstate(head, seen_bytes), db=dbs.vstate)

    # Space counters.
    for name, want in totals.items():
        raw = txn.get(name.encode(), db=dbs.meta)
        have = _U64.unpack(raw)[0] if raw else 0
        if have != want:
            problem(f"counter {name} is {have}, counted {want}")
            if repair:
                txn.put(name.encode(), _U64.pack(want), db=dbs.meta)
