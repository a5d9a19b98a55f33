"""The catalog: named volumes and snapshots and their records.

Databases:

``volumes``    name -> JSON ``VolumeInfo`` fields that change rarely (capacity,
               mode, parameters, creation time, source).
``vstate``     name -> struct ``>QQ``: head layer id, logical bytes used. Read by
               every view operation, so it is kept small and fixed-size.
``snapshots``  name -> JSON ``SnapshotInfo`` (the frozen layer, the source volume,
               the logical size at the moment it was cut, creation time, and the
               group snapshot it belongs to, if any).
``groups``     name -> JSON ``GroupInfo``: a group snapshot (see ``GroupInfo``).

Volumes and snapshots share one name space: creating a volume (or clone) named
like a snapshot, or a snapshot named like a volume, is refused (``refuse_other_kind``,
called inside the creating transaction), so a name given to ``mount`` or ``clone``
means one thing. (A store written before this rule may still hold both kinds under
one name; every lookup names its kind, so reads are unaffected.) Names are 1-128
characters of ``[A-Za-z0-9._:-]`` and never start with a dot, so a name can safely
become a file name or a path component.
"""

from __future__ import annotations

import hashlib
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
    group: str = ""  # the group snapshot this snapshot is a member of ("": none)

    def to_json(self) -> bytes:
        d = asdict(self)
        if not d["group"]:
            del d["group"]  # records of plain snapshots stay as they always were
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SnapshotInfo:
        return cls(**_load(raw))


@dataclass(frozen=True)
class GroupInfo:
    """A group snapshot: snapshots of several volumes cut in ONE write transaction.

    Record (``groups`` database, JSON): ``name``; ``volumes``, the source volumes in
    the order given at creation; ``snapshots``, the member snapshot names in the same
    order (``member_name(name, volume)``); ``created``, the one creation time every
    member also carries. Invariants: the group record and all its member snapshot
    records are written together and deleted together (``Store.create_group_snapshot``,
    ``Store.delete_group_snapshot``); each member's ``SnapshotInfo.group`` names the
    group, and a member cannot be deleted on its own. Because every member's head
    was frozen in the same transaction, the members hold exactly the writes committed
    before that transaction and none after it, on every volume alike.
    """

    name: str
    volumes: tuple[str, ...]
    snapshots: tuple[str, ...]
    created: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> GroupInfo:
        d = _load(raw)
        try:
            return cls(
                name=d["name"],
                volumes=tuple(d["volumes"]),
                snapshots=tuple(d["snapshots"]),
                created=float(d.get("created", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Corrupt("bad group snapshot record") from exc


def member_name(group: str, volume: str) -> str:
    """The name of ``group``'s snapshot of ``volume``: ``GROUP.VOLUME``, or a hash of
    both when that would be longer than a name may be."""
    name = f"{group}.{volume}"
    if len(name) <= 128:
        return name
    digest = hashlib.sha256(f"{group}\0{volume}".encode()).hexdigest()[:40]
    return f"{group[:80]}.{digest}"


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
