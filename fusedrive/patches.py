"""Patches: a partial write of one chunk stored as its own record (see ``schema``).

A write of part of one chunk that has no dirty buffer becomes a patch of the live
layer, so it needs no fetch and its flush stores only the bytes written. Deciding
costs no store access (``plan_patch``): within the live layer a patch absorbs the
older ones it overlaps or touches; past ``PATCH_MAX`` patches or ``1/PATCH_SHARE``
of a chunk in patch bytes the write makes a dirty buffer instead (whose commit
deletes the chunk's patches). The commit meets the stored patches
(``patch_unit``): it deletes those a new one covers, and if a new one overlaps a
stored one in part, or the chunk would pass the same limits, it rewrites the chunk
whole with every patch applied (``rewrite_whole``, reading it inside the
transaction). Reads apply patches oldest first: the stored ones (in the cache with
their chunk), then the committing layer's, then the live layer's. Patches cost
bytes beyond the file data they change: ``FileData.make_room`` merges stored ones
into their chunks (``patched_chunks``, ``rewrite_whole``) when a volume is full.
"""

from __future__ import annotations

from blockstore import Batch, ChunkRef, PreparedChunk

from .buffers import Layer
from .schema import CHUNK_KEY_LEN, chunk_key, patch_key, patch_offset

# A chunk carries at most PATCH_MAX patches holding at most 1/PATCH_SHARE of a chunk;
# past that it is rewritten whole. Measured through a mount (1 GiB file, three 10 s
# random 4 KiB write runs, then random reads): 8 patches and half a chunk wrote
# ~10% faster in the second run but read the patched file at 0.54 of an unpatched
# one and stored 30% more; 4 and a quarter: 0.71 and 13%; 2 and an eighth wrote
# ~20% slower.
PATCH_MAX = 4
PATCH_SHARE = 4

FIRST_CHUNK_KEY = b"C"  # every chunk and patch key starts with this

# One chunk's share of a commit: (stored bytes gained, ino, keys to delete, chunks to put).
Unit = tuple[int, int, list[bytes], list[tuple[bytes, PreparedChunk]]]
# A patch on its way to the store: (offset in its chunk, bytes, prepared chunk).
NewPatch = tuple[int, bytes | bytearray, PreparedChunk]


def plan_patch(
    layers: list[Layer], chunk_size: int, ino: int, size: int, index: int, s: int, data: memoryview
) -> tuple[int, bytes, list[int]] | None:
    """Whether writing ``data`` at ``s`` into chunk ``index`` can be a patch.

    None if not: the chunk has a dirty buffer or is hidden, or the live layer's
    patches of the chunk would pass the limits. Otherwise (offset, bytes, the
    live patches it replaces): a patch absorbs the live ones it overlaps or
    touches. The store is not consulted (the commit meets the stored patches).
    ``layers``: the live layer first, then the committing one, if any.
    """
    if index * chunk_size >= size or any(
        layer.lookup_chunk(ino, index) is not None for layer in layers
    ):
        return None
    e = s + len(data)
    mine = layers[0].patches_of(ino, index) or {}
    # Patches it overlaps or touches become one (small sequential writes grow one patch).
    replaced = [o for o, d in mine.items() if o <= e and o + len(d) >= s]
    start, stop = s, e
    for o in replaced:
        start, stop = min(start, o), max(stop, o + len(mine[o]))
    total = stop - start + sum(len(d) for d in mine.values()) - sum(len(mine[o]) for o in replaced)
    if len(mine) - len(replaced) >= PATCH_MAX or total > chunk_size // PATCH_SHARE:
        return None
    if start == s and stop == e:
        piece = bytes(data)
    else:
        buf = bytearray(stop - start)
        for o in replaced:
            buf[o - start : o - start + len(mine[o])] = mine[o]
        buf[s - start : e - start] = data
        piece = bytes(buf)
    if not piece.strip(b"\0"):
        return None  # all zeros would be a hole, which the store does not keep
    return start, piece, replaced


def patch_unit(
    b: Batch, ino: int, index: int, new: list[NewPatch], chunk_size: int, level: int | None
) -> Unit:
    """Store a chunk's new patches over its stored ones (see the module docstring)."""
    key = chunk_key(ino, index)
    stored = refs(b, key)  # the chunk itself and its patches
    spans = [(off, off + len(data)) for off, data, _ in new]
    mine = {patch_key(ino, index, off) for off, _, _ in new}
    kept = kept_bytes = gone = 0
    deletes = []
    conflict = False
    for k, ref in stored.items():
        if k == key:
            continue
        o = patch_offset(k) or 0
        e = o + ref.raw_length
        hits = [(s, t) for s, t in spans if s < e and t > o]
        if not hits:
            kept += 1
            kept_bytes += ref.raw_length
        elif any(s <= o and e <= t for s, t in hits):
            gone += ref.raw_length
            if k not in mine:
                deletes.append(k)  # covered by a new patch (one at its offset replaces it)
        else:
            conflict = True
    total = kept_bytes + sum(len(data) for _, data, _ in new)
    if not conflict and kept + len(new) <= PATCH_MAX and total <= chunk_size // PATCH_SHARE:
        puts = [(patch_key(ino, index, off), prep) for off, _, prep in new]
        return sum(prep.raw_length for _, _, prep in new) - gone, ino, deletes, puts
    gained, deletes, puts = rewrite_whole(
        b, key, stored, [(off, data) for off, data, _ in new], level
    )
    return gained, ino, deletes, puts


def rewrite_whole(
    b: Batch,
    key: bytes,
    stored: dict[bytes, ChunkRef],
    new: list[tuple[int, bytes | bytearray]],
    level: int | None,
) -> tuple[int, list[bytes], list[tuple[bytes, PreparedChunk]]]:
    """A chunk rewritten whole: its stored bytes and patches (``stored``, read in the
    batch), then ``new`` patches. Returns (stored bytes gained, keys to delete, puts)."""
    keys = sorted(stored, key=lambda k: k != key)  # the chunk itself first, then its patches
    refs = [stored[k] for k in keys]
    buf = bytearray()
    for k, got in zip(keys, b.read_chunks(refs), strict=True):
        lay(buf, patch_offset(k) or 0, got)
    for off, data in new:
        lay(buf, off, data)
    prep = b.view.store.prepare_chunk(memoryview(buf), level)
    gained = prep.raw_length - sum(ref.raw_length for ref in refs)
    return gained, [k for k in stored if k != key], [(key, prep)]


def patched_chunks(b: Batch, start: bytes, limit: int) -> tuple[list[bytes], bytes | None]:
    """Keys of up to ``limit`` chunks with stored patches, from ``start`` in key order,
    and the key to resume at (None: the end was reached)."""
    found: list[bytes] = []
    for k, _ in b.scan(FIRST_CHUNK_KEY, start):
        if len(k) <= CHUNK_KEY_LEN:
            continue  # a chunk's own entry
        key = k[:CHUNK_KEY_LEN]
        if found and found[-1] == key:
            continue
        if len(found) == limit:
            return found, key
        found.append(key)
    return found, None


def lay(buf: bytearray, off: int, data: bytes | bytearray) -> None:
    """Write ``data`` into ``buf`` at ``off``, extending it with zeros if it is short."""
    if len(buf) < off:
        buf.extend(bytes(off - len(buf)))
    buf[off : off + len(data)] = data


def refs(b: Batch, key: bytes) -> dict[bytes, ChunkRef]:
    """The stored chunk under ``key`` and its patches, key -> reference, in key order."""
    return {k: v for k, v in b.scan(key) if isinstance(v, ChunkRef)}


def delete_patches(b: Batch, key: bytes, refs: dict[bytes, ChunkRef]) -> None:
    for k in refs:
        if k != key:
            b.delete(k)


def extent(refs: dict[bytes, ChunkRef]) -> int:
    """The length of a chunk with its patches applied."""
    return max([0, *((patch_offset(k) or 0) + ref.raw_length for k, ref in refs.items())])
