"""The filesystem's records and their keys inside one volume's key space.

Everything the filesystem stores is an entry of the volume's versioned key space
(``blockstore.View``), so a snapshot or clone covers the whole tree at once. Keys
start with one ASCII letter naming the record; inode numbers and chunk indexes are
8-byte big-endian, so a prefix scan returns them in numeric order.

``S``                          superblock: ``Superblock`` (format, chunk size, next
                               inode number, number of live inodes). Written at mkfs
                               and whenever an inode is allocated or freed.
``I`` ino                      inode: ``InodeRecord`` (type and mode, owner, link
                               count, size, rdev, times in ns, stored chunk bytes; for
                               directories also the parent directory and the next
                               readdir cookie).
``D`` parent name              directory entry: child ino (8) + cookie (8). The cookie
                               is unique within the directory and never reused, and
                               is the entry's readdir offset: the daemon orders a
                               directory by cookie, so offsets stay valid while
                               entries come and go.
``C`` ino index                file data: a chunk (``ChunkRef``) holding bytes
                               ``[index * chunk_size, index * chunk_size + length)``.
                               A chunk may be shorter than ``chunk_size``; the rest
                               reads as zeros. Missing chunks are holes. No chunk
                               holds bytes at or past the file's size.
``C`` ino index off            a patch (``ChunkRef``): bytes ``[off, off + length)``
                               of chunk ``index`` (``off`` is 4-byte big-endian,
                               relative to the chunk), laid over the chunk's
                               stored bytes (zeros where there are none). The
                               patches of one chunk never overlap, so their order
                               does not matter. A small write into a stored chunk
                               is stored as a patch: it costs its own bytes, not a
                               fetch and rewrite of the whole chunk. Patches sort
                               right after their chunk, so one cursor walk reads a
                               chunk with its patches, and deleting a range of
                               chunk keys deletes their patches too.
``L`` ino                      symbolic link target.
``X`` ino name                 extended attribute value.
``R`` ino                      orphan: the inode has no links but was open when this
                               was written. Opening the filesystem read-write
                               deletes every orphan (after a crash, or an unmount
                               that never saw the last release).

The root directory is inode 1. A block volume's filesystem holds one regular file,
``disk.img`` in the root, sized to the volume's capacity.

Design note: an earlier plan kept a second index ``O parent cookie -> name`` for
readdir. The cookie stored in each ``D`` value carries the same information; the
daemon builds the cookie order in memory when it loads a directory, which saves one
key per create, unlink and rename.
"""

from __future__ import annotations

import stat
import struct
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

from blockstore import Corrupt

ROOT_INO = 1
# Format 2: chunks may carry patches. A format-1 filesystem (from before patches) is
# read as it is and upgraded when it is first opened read-write, before anything can
# write a patch; a fusedrive that knows only format 1 refuses format 2 rather than
# reading chunks without their patches.
FORMAT = 2
READABLE_FORMATS = (1, 2)
MAGIC = b"FDFS"
DISK_IMAGE_NAME = b"disk.img"
NAME_MAX = 255
SYMLINK_MAX = 4095

_U64 = struct.Struct(">Q")
_SUPER = struct.Struct(">4sIIQQ")
_INODE = struct.Struct(">BIIIIQQqqqQQQ")
_INODE_VERSION = 1
_DIRENT = struct.Struct(">QQ")

SUPERBLOCK_KEY = b"S"


def u64(n: int) -> bytes:
    return _U64.pack(n)


def inode_key(ino: int) -> bytes:
    return b"I" + _U64.pack(ino)


def dirent_prefix(parent: int) -> bytes:
    return b"D" + _U64.pack(parent)


def dirent_key(parent: int, name: bytes) -> bytes:
    return b"D" + _U64.pack(parent) + name


def chunk_prefix(ino: int) -> bytes:
    return b"C" + _U64.pack(ino)


def chunk_key(ino: int, index: int) -> bytes:
    return b"C" + _U64.pack(ino) + _U64.pack(index)


def chunk_ino(key: bytes) -> int:
    """The inode number of a chunk or patch key."""
    return int(_U64.unpack_from(key, 1)[0])


def chunk_index(key: bytes) -> int:
    """The chunk index of a chunk or patch key."""
    return int(_U64.unpack_from(key, 9)[0])


CHUNK_KEY_LEN = 17
_U32 = struct.Struct(">I")


def patch_key(ino: int, index: int, off: int) -> bytes:
    return b"C" + _U64.pack(ino) + _U64.pack(index) + _U32.pack(off)


def patch_offset(key: bytes) -> int | None:
    """A patch key's offset inside its chunk; None for the chunk's own key."""
    if len(key) == CHUNK_KEY_LEN:
        return None
    if len(key) != CHUNK_KEY_LEN + 4:
        raise Corrupt(f"undecodable file data key {key!r}")
    return int(_U32.unpack_from(key, CHUNK_KEY_LEN)[0])


def symlink_key(ino: int) -> bytes:
    return b"L" + _U64.pack(ino)


def xattr_prefix(ino: int) -> bytes:
    return b"X" + _U64.pack(ino)


def xattr_key(ino: int, name: bytes) -> bytes:
    return b"X" + _U64.pack(ino) + name


ORPHAN_PREFIX = b"R"


def orphan_key(ino: int) -> bytes:
    return b"R" + _U64.pack(ino)


def orphan_ino(key: bytes) -> int:
    return int(_U64.unpack_from(key, 1)[0])


@dataclass(frozen=True, slots=True)
class Superblock:
    chunk_size: int
    next_ino: int
    inode_count: int
    format: int = FORMAT

    def pack(self) -> bytes:
        return _SUPER.pack(MAGIC, self.format, self.chunk_size, self.next_ino, self.inode_count)

    @classmethod
    def unpack(cls, raw: bytes) -> Superblock:
        try:
            magic, fmt, chunk_size, next_ino, count = _SUPER.unpack(raw)
        except struct.error as exc:
            raise Corrupt("undecodable filesystem superblock") from exc
        if magic != MAGIC:
            raise Corrupt("the volume does not hold a fusedrive filesystem")
        if fmt not in READABLE_FORMATS:
            raise Corrupt(f"filesystem format {fmt} is not supported")
        return cls(chunk_size, next_ino, count, fmt)


@dataclass(frozen=True, slots=True)
class InodeRecord:
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    alloc: int = 0  # raw bytes of the chunks stored for this inode (st_blocks)
    parent: int = 0  # directories: the parent directory (the root names itself)
    next_cookie: int = 1  # directories: the cookie of the next entry

    def pack(self) -> bytes:
        return _INODE.pack(
            _INODE_VERSION,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.size,
            self.rdev,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.alloc,
            self.parent,
            self.next_cookie,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> InodeRecord:
        try:
            version, *fields = _INODE.unpack(raw)
        except struct.error as exc:
            raise Corrupt(f"undecodable inode record of {len(raw)} bytes") from exc
        if version != _INODE_VERSION:
            raise Corrupt(f"inode record version {version} is not supported")
        return cls(*fields)


def pack_dirent(child: int, cookie: int) -> bytes:
    return _DIRENT.pack(child, cookie)


def unpack_dirent(raw: bytes) -> tuple[int, int]:
    try:
        child, cookie = _DIRENT.unpack(raw)
    except struct.error as exc:
        raise Corrupt("undecodable directory entry") from exc
    return int(child), int(cookie)


@dataclass(slots=True, eq=False)
class Inode:
    """The in-memory, mutable twin of an ``InodeRecord`` plus the kernel's references."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    alloc: int = 0
    parent: int = 0
    next_cookie: int = 1
    lookups: int = 0  # kernel lookup count (FUSE lookup/forget); not stored
    opens: int = 0  # open file handles; not stored
    orphaned: bool = False  # an orphan marker was written for it; not stored

    @classmethod
    def from_record(cls, ino: int, r: InodeRecord) -> Inode:
        return cls(
            ino, r.mode, r.uid, r.gid, r.nlink, r.size, r.rdev, r.atime_ns, r.mtime_ns,
            r.ctime_ns, r.alloc, r.parent, r.next_cookie,
        )  # fmt: skip

    def record(self) -> InodeRecord:
        return InodeRecord(
            self.mode, self.uid, self.gid, self.nlink, self.size, self.rdev, self.atime_ns,
            self.mtime_ns, self.ctime_ns, self.alloc, self.parent, self.next_cookie,
        )  # fmt: skip

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class DirState:
    """A loaded directory (its ``D`` entries): name -> (child, cookie), in cookie order."""

    __slots__ = ("cookies", "entries", "names")

    def __init__(self, entries: dict[bytes, tuple[int, int]] | None = None) -> None:
        self.entries = entries or {}
        self.names = {cookie: name for name, (_, cookie) in self.entries.items()}
        self.cookies = sorted(self.names)  # may keep removed cookies; compacted lazily

    def add(self, name: bytes, child: int, cookie: int) -> None:
        self.entries[name] = (child, cookie)
        self.names[cookie] = name
        self.cookies.append(cookie)  # cookies only grow, so the list stays sorted

    def remove(self, name: bytes) -> None:
        _, cookie = self.entries.pop(name)
        del self.names[cookie]
        if len(self.cookies) > 2 * len(self.names) + 64:
            self.cookies = sorted(self.names)

    def after(self, cookie: int) -> Iterator[tuple[bytes, int, int]]:
        """(name, child, cookie) of the entries whose cookie is greater than ``cookie``."""
        cookies = self.cookies  # compaction replaces the list; keep walking this one
        i = bisect_right(cookies, cookie)
        while i < len(cookies):
            c = cookies[i]
            i += 1
            name = self.names.get(c)
            if name is not None:
                yield name, self.entries[name][0], c
