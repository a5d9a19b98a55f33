"""Layers and versioned entries: the store's key spaces.

A *layer* is a set of entry versions. A *view* (a volume head or a snapshot)
sees one layer and its ancestors; the version in the nearest layer of the
ancestry wins and a tombstone hides older versions. Layers are created with a
parent that never changes afterwards, and layer ids grow monotonically, so an
ancestor always has a smaller id than its descendants.

Databases:

``layers``     layer id (8 bytes BE) -> struct ``>QQIB``: parent id (0 = none),
               family id, holder count, flags (bit 0: frozen). Holders are the
               volume whose head it is, the snapshots that name it and its child
               layers. A layer with no holders is garbage and sits in ``gcqueue``.
``entries``    family (8) + enc(key) + inv(layer) (8) -> value (see below).
               ``enc`` is self-delimiting and order-preserving (0x00 -> 0x00 0xFF,
               terminated by 0x00 0x01), ``inv(layer)`` is ``2**64-1-layer`` so the
               newest version of a key comes first: one cursor seek to
               ``family + enc(key) + inv(view layer)`` lands on the first version
               the view could see, and the first version whose layer is in the
               ancestry is the answer. Unrelated volumes live in other families,
               so they never sit between the versions of a key.
``layerkeys``  layer id (8) + enc(key) -> b"": the per-layer index, so a dead
               layer's entries are found without a scan of the store.
``gcqueue``    layer id (8) -> b"": layers with no holders, awaiting release.
``mergequeue`` layer id (8) -> b"": frozen layers left with one holder; if that
               holder is their only child layer (no snapshot names them), they are
               merged into the child: versions the child hides are released, the
               rest move down, and the child takes the merged layer's parent. This
               is how deleting a snapshot gives back the space of data the volume
               has overwritten since.

Entry values: ``b"V" + bytes`` a plain value; ``b"C" + digest(32) + raw length
(4 BE)`` a reference to a chunk (each such version holds one chunk reference);
``b"T"`` a tombstone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb

from . import chunks
from .errors import Corrupt, NotFound

_U64 = struct.Struct(">Q")
_LAYER = struct.Struct(">QQIB")
_MAX_U64 = 2**64 - 1
FROZEN = 1

TAG_VALUE = b"V"[0]
TAG_CHUNK = b"C"[0]
TAG_TOMBSTONE = b"T"[0]
TOMBSTONE = b"T"
_TERM = b"\x00\x01"


def u64(n: int) -> bytes:
    return _U64.pack(n)


def from_u64(b: bytes) -> int:
    return int(_U64.unpack(b)[0])


def enc_body(key: bytes) -> bytes:
    """The escaped key without its terminator: a prefix of enc(key + more)."""
    return key.replace(b"\x00", b"\x00\xff")


def enc(key: bytes) -> bytes:
    return enc_body(key) + _TERM


def dec(encoded: bytes) -> bytes:
    """Inverse of ``enc`` (``encoded`` includes the terminator)."""
    return encoded[:-2].replace(b"\x00\xff", b"\x00")


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """An entry that points at a stored chunk."""

    digest: bytes
    raw_length: int


Value = bytes | ChunkRef


def encode_value(value: Value) -> bytes:
    if isinstance(value, ChunkRef):
        return b"C" + value.digest + struct.pack(">I", value.raw_length)
    return b"V" + value


def decode_value(raw: bytes) -> Value | None:
    """None means tombstone."""
    tag = raw[0] if raw else -1
    if tag == TAG_VALUE:
        return bytes(raw[1:])
    if tag == TAG_CHUNK and len(raw) == 1 + chunks.DIGEST_SIZE + 4:
        return ChunkRef(bytes(raw[1:33]), struct.unpack(">I", raw[33:37])[0])
    if tag == TAG_TOMBSTONE:
        return None
    raise Corrupt(f"undecodable entry value of {len(raw)} bytes")


@dataclass(frozen=True, slots=True)
class LayerRecord:
    layer: int
    parent: int
    family: int
    holders: int
    frozen: bool

    def pack(self) -> bytes:
        return _LAYER.pack(self.parent, self.family, self.holders, FROZEN if self.frozen else 0)

    @classmethod
    def unpack(cls, layer: int, raw: bytes) -> LayerRecord:
        try:
            parent, family, holders, flags = _LAYER.unpack(raw)
        except struct.error as exc:
            raise Corrupt(f"bad layer record for layer {layer}") from exc
        return cls(layer, parent, family, holders, bool(flags & FROZEN))


@dataclass(frozen=True, slots=True)
class Lineage:
    """A layer and its ancestors, nearest first. Immutable once built."""

    layer: int
    family: int
    ancestry: tuple[int, ...]
    members: frozenset[int]


class Databases:
    """Handles of every named database in one environment."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.meta = env.open_db(b"meta")
        self.layers = env.open_db(b"layers")
        self.entries = env.open_db(b"entries")
        self.layerkeys = env.open_db(b"layerkeys")
        self.gcqueue = env.open_db(b"gcqueue")
        self.mergequeue = env.open_db(b"mergequeue")
        self.chunks = env.open_db(b"chunks")
        self.segments = env.open_db(b"segments")
        self.chunkrefs = env.open_db(b"chunkrefs")
        self.damaged = env.open_db(b"damaged")  # see chunks.py
        self.volumes = env.open_db(b"volumes")
        self.vstate = env.open_db(b"vstate")
        self.snapshots = env.open_db(b"snapshots")
        self.groups = env.open_db(b"groups")  # group snapshots: see catalog.GroupInfo


def read_layer(txn: lmdb.Transaction, dbs: Databases, layer: int) -> LayerRecord:
    raw = txn.get(u64(layer), db=dbs.layers)
    if raw is None:
        raise NotFound(f"layer {layer}")
    return LayerRecord.unpack(layer, raw)


def write_layer(txn: lmdb.Transaction, dbs: Databases, rec: LayerRecord) -> None:
    txn.put(u64(rec.layer), rec.pack(), db=dbs.layers)


class LineageCache:
    """Per-process cache of ancestries.

    A parent changes only when a layer is merged into its child; a cached lineage
    that still lists the merged layer reads the same, because that layer holds no
    versions any more and layer ids are never reused.
    """

    def __init__(self) -> None:
        self._cache: dict[int, Lineage] = {}

    def get(self, txn: lmdb.Transaction, dbs: Databases, layer: int) -> Lineage:
        lin = self._cache.get(layer)
        if lin is None:
            chain = []
            family = 0
            cur = layer
            while cur:
                rec = read_layer(txn, dbs, cur)
                chain.append(cur)
                family = rec.family
                cur = rec.parent
            lin = Lineage(layer, family, tuple(chain), frozenset(chain))
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[layer] = lin
        return lin


def _version_key(family: int, ekey: bytes, layer: int) -> bytes:
    return u64(family) + ekey + u64(_MAX_U64 - layer)


def lookup(txn: lmdb.Transaction, dbs: Databases, lin: Lineage, key: bytes) -> Value | None:
    """The value of ``key`` as the view ``lin`` sees it (None: absent)."""
    raw = lookup_raw(txn, dbs, lin, key)
    return None if raw is None else decode_value(raw)


def lookup_raw(txn: lmdb.Transaction, dbs: Databases, lin: Lineage, key: bytes) -> bytes | None:
    ekey = enc(key)
    prefix = u64(lin.family) + ekey
    cur = txn.cursor(db=dbs.entries)
    if not cur.set_range(prefix + u64(_MAX_U64 - lin.layer)):
        return None
    members = lin.members
    plen = len(prefix)
    for k, v in cur:
        if len(k) != plen + 8 or k[:plen] != prefix:
            return None
        if _MAX_U64 - from_u64(k[plen:]) in members:
            return None if v[:1] == TOMBSTONE else v
    return None


def own_version(txn: lmdb.Transaction, dbs: Databases, lin: Lineage, key: bytes) -> bytes | None:
    """The raw version of ``key`` written in the view's own (head) layer, if any."""
    return txn.get(_version_key(lin.family, enc(key), lin.layer), db=dbs.entries)


def parent_lookup_raw(
    txn: lmdb.Transaction, dbs: Databases, lin: Lineage, key: bytes
) -> bytes | None:
    """The version visible from the head's parent (what a tombstone would hide)."""
    if len(lin.ancestry) < 2:
        return None
    parent = Lineage(lin.ancestry[1], lin.family, lin.ancestry[1:], lin.members - {lin.layer})
    return lookup_raw(txn, dbs, parent, key)


def set_version(
    txn: lmdb.Transaction, dbs: Databases, lin: Lineage, key: bytes, raw: bytes | None
) -> bytes | None:
    """Write (or with None remove) the head layer's version of ``key``.

    Returns the version it replaced. Chunk reference counts are the caller's job.
    """
    ekey = enc(key)
    vkey = _version_key(lin.family, ekey, lin.layer)
    old = txn.get(vkey, db=dbs.entries)
    if raw is None:
        if old is not None:
            txn.delete(vkey, db=dbs.entries)
            txn.delete(u64(lin.layer) + ekey, db=dbs.layerkeys)
        return old
    txn.put(vkey, raw, db=dbs.entries)
    if old is None:
        txn.put(u64(lin.layer) + ekey, b"", db=dbs.layerkeys)
    return old


def any_version(
    txn: lmdb.Transaction, dbs: Databases, lin: Lineage, start: bytes, stop: bytes
) -> bool:
    """Whether any layer of ``lin``'s family holds a version of a key in [start, stop).

    One cursor seek; True does not mean the view sees such a key (``scan`` decides).
    """
    fam = u64(lin.family)
    cur = txn.cursor(db=dbs.entries)
    return bool(cur.set_range(fam + enc(start))) and cur.key() < fam + enc(stop)


def scan(
    txn: lmdb.Transaction,
    dbs: Databases,
    lin: Lineage,
    prefix: bytes,
    start: bytes | None = None,
    stop: bytes | None = None,
) -> Iterator[tuple[bytes, Value]]:
    """Visible (key, value) pairs whose key starts with ``prefix``, in key order.

    With ``start``, keys before ``start`` are skipped (``start`` itself included);
    with ``stop``, the scan ends before ``stop``.
    """
    fam = u64(lin.family)
    eprefix = fam + enc_body(prefix)
    seek = eprefix if start is None or start < prefix else fam + enc(start)
    # enc is order-preserving and no encoded key is a prefix of another, so an
    # entry's key sorts before fam + enc(stop) exactly when its key is below stop.
    estop = None if stop is None else fam + enc(stop)
    cur = txn.cursor(db=dbs.entries)
    if not cur.set_range(seek):
        return
    members = lin.members
    head = lin.layer
    ok = True
    while ok:
        k = cur.key()
        if not k.startswith(eprefix) or (estop is not None and k >= estop):
            return
        ekey_end = len(k) - 8
        keypart = k[:ekey_end]
        # Walk this key's versions, newest first; take the first in the ancestry.
        found: bytes | None = None
        decided = False
        while True:
            layer = _MAX_U64 - from_u64(k[ekey_end:])
            if not decided and layer <= head and layer in members:
                found = cur.value()
                decided = True
            ok = cur.next()
            if not ok:
                break
            k = cur.key()
            if len(k) != ekey_end + 8 or k[:ekey_end] != keypart:
                break
        if found is not None and found[:1] != TOMBSTONE:
            yield dec(keypart[8:]), decode_value(found)  # type: ignore[misc]


def iter_layer_keys(txn: lmdb.Transaction, dbs: Databases, layer: int) -> Iterator[bytes]:
    """Encoded keys (with terminator) that ``layer`` holds a version of."""
    lk = u64(layer)
    cur = txn.cursor(db=dbs.layerkeys)
    if not cur.set_range(lk):
        return
    for k in cur.iternext(values=False):
        if not k.startswith(lk):
            return
        yield bytes(k[8:])


def children(txn: lmdb.Transaction, dbs: Databases, layer: int) -> list[int]:
    """Layers whose parent is ``layer`` (a scan of the layer table; merges are rare)."""
    out = []
    for k, v in txn.cursor(db=dbs.layers):
        if LayerRecord.unpack(from_u64(k), v).parent == layer:
            out.append(from_u64(k))
    return out


def version_key(family: int, ekey: bytes, layer: int) -> bytes:
    return _version_key(family, ekey, layer)


def split_version_key(k: bytes) -> tuple[int, bytes, int]:
    """(family, encoded key with terminator, layer) of an ``entries`` key."""
    return from_u64(k[:8]), bytes(k[8:-8]), _MAX_U64 - from_u64(k[-8:])
