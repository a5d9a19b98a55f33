"""The store's small set of exceptions.

Every failure the store reports is one of these; the layers above map them to
errno (fusedrive) or gRPC status codes (csi_frontend) in one table each.
"""

from __future__ import annotations

import errno

import lmdb


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class NotFound(StoreError):
    """A volume, snapshot, layer or chunk does not exist."""


class AlreadyExists(StoreError):
    """A name is taken by an object created with different arguments."""


class NoSpace(StoreError):
    """A volume's capacity or the store's disk is exhausted."""


class Corrupt(StoreError):
    """Stored data does not match its hash, or a record cannot be decoded."""


class Busy(StoreError):
    """The object is in use in a way that forbids the operation."""


class ReadOnly(StoreError):
    """A write was attempted through a snapshot (a frozen view)."""


class InvalidArgument(StoreError):
    """A name, size or parameter is malformed or out of range."""


class OutOfRange(InvalidArgument):
    """A size is outside what the operation supports (e.g. smaller than its source)."""


# errno values that mean "the store's filesystem is full" (EDQUOT: a quota says so).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def store_error_of(exc: BaseException) -> StoreError | None:
    """The store error for a failure of LMDB or of the filesystem under the store.

    The one place where ``OSError`` and ``lmdb.Error`` become store errors: a full
    filesystem (ENOSPC, EDQUOT, LMDB's "No space left") or a full LMDB map is
    ``NoSpace``; any other I/O error is a plain ``StoreError`` (EIO above). Returns
    None for anything else (a bug: let it propagate as it is).
    """
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, lmdb.MapFullError):
        return NoSpace(f"store is full: the LMDB map is full ({exc})")
    if isinstance(exc, OSError):
        if exc.errno in NO_SPACE_ERRNOS:
            return NoSpace(f"store is full: {exc.strerror or exc}")
        return StoreError(f"store I/O error: {exc}")
    if isinstance(exc, lmdb.Error):
        if "No space" in str(exc) or "Disk quota" in str(exc):
            return NoSpace(f"store is full: {exc}")
        return StoreError(f"LMDB error: {exc}")
    return None
