"""The catalog: named volumes and snapshots and their records.

Databases:

``volumes``    name -> JSON ``VolumeInfo`` fields that change rarely (capacity,
               mode, parameters, creation time, source).
``vstate``     name -> struct ``>QQ``: head layer id, logical bytes used. Read by
               every view operation, so it is kept small and fixed-size.
``snapshots``  name -> JSON ``SnapshotInfo`` (the frozen layer, the source volume,
               the logical size at the moment it was cut, creation time).

Volumes and snapshots share one name space: creating a volume (or clone) named
like a snapshot, or a snapshot named like a volume, is refused (``refuse_other_kind``,
called inside the creating transaction), so a name given to ``mount`` or ``clone``
means one thing. (A store written before this rule may still hold both kinds under
one name; every lookup names its kind, so reads are unaffected.) Names are 1-128
characters of ``[A-Za-z0-9._:-]`` and never start with a dot, so a name can safely
become a file name or a path component.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AlreadyExists, Corrupt, InvalidArgument

MODE_FILESYSTEM = "filesystem"
MODE_BLOCK = "block"
MODES = (MODE_FILESYSTEM, MODE_BLOCK)

_NAME = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}")
_VSTATE = struct.Struct(">QQ")


def check_name(name: str, what: str = "name") -> bytes:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} {name!r}: use 1-128 characters of A-Z a-z 0-9 . _ : - "
            "not starting with a dot"
        )
    return name.encode()


def refuse_other_kind(txn: Any, other_db: Any, key: bytes, kind: str) -> None:
    """Refuse creating a ``kind`` ("volume" or "snapshot") whose name the other kind holds.

    ``other_db`` is the other kind's catalog database, ``txn`` the creating transaction.
    """
    if txn.get(key, db=other_db) is not None:
        other = "snapshot" if kind == "volume" else "volume"
        raise AlreadyExists(
            f"cannot create {kind} {key.decode()!r}: a {other} has that name "
            "(volumes and snapshots share one namespace)"
        )


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    capacity: int
    mode: str = MODE_FILESYSTEM
    parameters: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    source: str = ""  # "snapshot:NAME", "volume:NAME" or ""
    head: int = 0
    used: int = 0

    def to_json(self) -> bytes:
        d = asdict(self)
        del d["head"], d["used"]
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, head: int, used: int) -> VolumeInfo:
        d = _load(raw)
        return cls(head=head, used=used, **d)


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    volume: str
    layer: int
    size: int  # logical bytes used by the volume when the snapshot was cut
    capacity: int
    mode: str = MODE_FILESYSTEM
    parameters: dict[str, str] = field(default_factory=dict)
    created: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SnapshotInfo:
        return cls(**_load(raw))


def _load(raw: bytes) -> dict[str, Any]:
    try:
        d = json.loads(bytes(raw))
    except ValueError as exc:
        raise Corrupt("undecodable catalog record") from exc
    if not isinstance(d, dict):
        raise Corrupt("catalog record is not an object")
    return d


def pack_vstate(head: int, used: int) -> bytes:
    return _VSTATE.pack(head, used)


def unpack_vstate(raw: bytes) -> tuple[int, int]:
    try:
        head, used = _VSTATE.unpack(raw)
    except struct.error as exc:
        raise Corrupt("bad volume state record") from exc
    return int(head), int(used)
