"""blockstore: content-addressed chunks and versioned per-volume key spaces.

Public surface: ``Store`` (open a store directory), ``View`` and ``Batch`` (a
volume head or snapshot key space and a write transaction on it), ``Environment``
(the part of a store a view works with: ``View.store``), the records
``VolumeInfo``, ``SnapshotInfo`` and ``GroupInfo``, ``ChunkRef`` and the exceptions.
"""

from __future__ import annotations

from .catalog import MODE_BLOCK, MODE_FILESYSTEM, GroupInfo, SnapshotInfo, VolumeInfo
from .chunks import HOLE, MAX_CHUNK_SIZE, PreparedChunk
from .environment import Environment
from .errors import (
    AlreadyExists,
    Busy,
    Corrupt,
    InvalidArgument,
    NoSpace,
    NotFound,
    OutOfRange,
    ReadOnly,
    StoreError,
)
from .fsck import FsckReport, fsck
from .layers import ChunkRef
from .store import Store, StoreStats
from .views import Batch, View

__all__ = [
    "HOLE",
    "MAX_CHUNK_SIZE",
    "MODE_BLOCK",
    "MODE_FILESYSTEM",
    "AlreadyExists",
    "Batch",
    "Busy",
    "ChunkRef",
    "Corrupt",
    "Environment",
    "FsckReport",
    "GroupInfo",
    "InvalidArgument",
    "NoSpace",
    "NotFound",
    "OutOfRange",
    "PreparedChunk",
    "ReadOnly",
    "SnapshotInfo",
    "Store",
    "StoreError",
    "StoreStats",
    "View",
    "VolumeInfo",
    "fsck",
]
