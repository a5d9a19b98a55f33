"""Damage as a filesystem sees it: which files and byte ranges a damaged chunk reaches.

The store's fsck (``blockstore.fsck``) finds chunks whose stored copy is missing or
does not match its hash, and the volume and snapshot keys that see them; it knows
keys, not files. This module reads each such view's filesystem records
(``fusedrive.schema``) to turn a key into the file's paths (every hard link; an
inode with no name left is "unlinked inode N") and the byte range of the file the
chunk or patch holds.

``zero_damaged`` replaces the damaged ranges of live volumes by zeros (holes), one
write transaction per volume: a damaged chunk with no patches is deleted (a hole);
a chunk with patches is rebuilt from its sound parts, zeros in the damaged ones,
and stored whole without patches, so no stale bytes from under a damaged patch
come back. The inode's stored-bytes count (``alloc``) follows. Snapshots are never
changed (they are read-only); mounted volumes are skipped (read-write mounts hold
the volume's writer lock, read-only ones the caller names), because a daemon's
caches would not see the change. Zeroing loses the damaged
bytes for good: only an explicit request does it, and every change is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

from blockstore import Busy, ChunkRef, Corrupt, Store, View
from blockstore.fsck import FsckReport

from .schema import (
    CHUNK_KEY_LEN,
    ROOT_INO,
    SUPERBLOCK_KEY,
    InodeRecord,
    Superblock,
    chunk_index,
    chunk_ino,
    chunk_key,
    inode_key,
    patch_offset,
    unpack_dirent,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DamagedRange:
    """Bytes ``[start, end)`` of a file in a volume or snapshot that read as damage."""

    kind: str  # "volume" or "snapshot"
    name: str
    digest: bytes
    why: str
    key: bytes
    ino: int | None  # None: the key is not file data of a fusedrive filesystem
    paths: tuple[str, ...] = ()
    start: int = 0
    end: int = 0

    def where(self) -> str:
        """One line: the view, the file's names and the byte range (or the raw key)."""
        head = f"{self.kind} {self.name}"
        if self.ino is None:
            return f"{head}: key {self.key!r}"
        names = ", ".join(self.paths) if self.paths else f"unlinked inode {self.ino}"
        return f"{head}: {names} bytes {self.start}-{self.end - 1}"


def _superblock(view: View) -> Superblock | None:
    raw = view.get(SUPERBLOCK_KEY)
    if not isinstance(raw, bytes):
        return None
    try:
        return Superblock.unpack(raw)
    except Corrupt:
        return None


def _paths(view: View) -> dict[int, list[str]]:
    """Inode -> every path naming it, from the view's directory entries."""
    names: dict[int, list[tuple[int, bytes]]] = {}
    for key, value in view.scan(b"D"):
        if not isinstance(value, bytes):
            continue
        try:
            child, _ = unpack_dirent(value)
        except Corrupt:
            continue
        parent = int.from_bytes(key[1:9], "big")
        names.setdefault(child, []).append((parent, key[9:]))
    dirs: dict[int, str | None] = {ROOT_INO: ""}

    def dir_path(ino: int) -> str | None:
        """A directory's path ("" for the root); None if it does not lead to the root."""
        parts, cur, seen = [], ino, set()
        while cur not in dirs:
            if cur in seen or cur not in names:  # a cycle or a lost parent: damaged records
                dirs[ino] = None
                return None
            seen.add(cur)
            parent, name = names[cur][0]  # a directory has one name
            parts.append(name.decode(errors="backslashreplace"))
            cur = parent
        base = dirs[cur]
        dirs[ino] = None if base is None else base + "".join("/" + p for p in reversed(parts))
        return dirs[ino]

    out: dict[int, list[str]] = {}
    for ino, links in names.items():
        found = []
        for parent, name in links:  # a file has a name per hard link
            up = dir_path(parent)
            if up is not None:
                found.append(f"{up}/{name.decode(errors='backslashreplace')}")
        out[ino] = sorted(found)
    return out


def locate(store: Store, report: FsckReport) -> list[DamagedRange]:
    """Every file range (or other key) of every volume and snapshot the damage reaches."""
    by_view: dict[tuple[str, str], list[tuple[bytes, bytes, str, int]]] = {}
    for d in report.damaged:
        for ref in d.refs:
            by_view.setdefault((ref.kind, ref.name), []).append(
                (ref.key, d.digest, d.why, d.raw_length)
            )
    out: list[DamagedRange] = []
    for (kind, name), keys in sorted(by_view.items()):
        view = store.volume(name) if kind == "volume" else store.snapshot(name)
        sb = _superblock(view)
        paths = _paths(view) if sb is not None else {}
        for key, digest, why, length in sorted(keys):
            if sb is None or key[:1] != b"C" or len(key) not in (CHUNK_KEY_LEN, CHUNK_KEY_LEN + 4):
                out.append(DamagedRange(kind, name, digest, why, key, None))
                continue
            ino, index = chunk_ino(key), chunk_index(key)
            start = index * sb.chunk_size + (patch_offset(key) or 0)
            out.append(
                DamagedRange(
                    kind, name, digest, why, key, ino, tuple(paths.get(ino, [])),
                    start, start + length,
                )
            )  # fmt: skip
    return out


def _lay(buf: bytearray, off: int, data: bytes) -> None:
    if len(buf) < off + len(data):
        buf.extend(bytes(off + len(data) - len(buf)))
    buf[off : off + len(data)] = data


def zero_damaged(
    store: Store, ranges: Iterable[DamagedRange], mounted: set[str]
) -> tuple[list[DamagedRange], list[tuple[DamagedRange, str]]]:
    """Replace the damaged file ranges of unmounted volumes by zeros.

    Returns (ranges zeroed, (range, why not) for the rest). A volume is changed only
    while this process holds its read-write mount lock, so no daemon serves it then.
    """
    from .fuse_adapter import _writer_lock  # the lock every read-write mount takes

    done: list[DamagedRange] = []
    skipped: list[tuple[DamagedRange, str]] = []
    per_volume: dict[str, dict[tuple[int, int], list[DamagedRange]]] = {}
    for r in ranges:
        if r.kind != "volume":
            skipped.append((r, "snapshots are read-only"))
        elif r.ino is None:
            skipped.append((r, "not file data of a fusedrive filesystem"))
        elif r.name in mounted:
            skipped.append((r, "the volume is mounted; unmount it first"))
        else:
            unit = (r.ino, chunk_index(r.key))
            per_volume.setdefault(r.name, {}).setdefault(unit, []).append(r)
    for name, units in sorted(per_volume.items()):
        try:
            with _writer_lock(store.path, name):  # no read-write mount starts meanwhile
                _zero_volume(store, name, units)
        except Busy:
            for group in units.values():
                skipped.extend((r, "the volume is mounted; unmount it first") for r in group)
            continue
        for group in units.values():
            done.extend(group)
            for one in group:
                log.warning("event=damage_zeroed %s digest=%s", one.where(), one.digest.hex()[:16])
    return done, skipped


def _zero_volume(store: Store, name: str, units: dict[tuple[int, int], list[DamagedRange]]) -> None:
    view = store.volume(name)
    alloc: dict[int, int] = {}
    with view.batch() as b:
        for (ino, index), rs in sorted(units.items()):
            base = chunk_key(ino, index)
            bad = {r.key for r in rs}
            refs = {k: v for k, v in b.scan(base) if isinstance(v, ChunkRef)}
            before = sum(ref.raw_length for ref in refs.values())
            cur = bytearray()
            for k in sorted(refs):  # the chunk first, then its patches
                ref = refs[k]
                data = bytes(ref.raw_length) if k in bad else b.read_chunks([ref])[0]
                _lay(cur, patch_offset(k) or 0, data)
            for k in refs:
                if k != base:
                    b.delete(k)
            # The rest of a short chunk reads as zeros: trailing zeros need no bytes.
            prep = store.prepare_chunk(bytes(cur).rstrip(b"\0"))
            b.put_chunk(base, prep)  # all zeros: a hole, the key is deleted
            alloc[ino] = alloc.get(ino, 0) + prep.raw_length - before
        for ino, delta in alloc.items():
            raw = b.get(inode_key(ino))
            if isinstance(raw, bytes):
                rec = InodeRecord.unpack(raw)
                b.put(inode_key(ino), replace(rec, alloc=max(rec.alloc + delta, 0)).pack())
