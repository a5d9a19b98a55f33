"""The store's small set of exceptions.

Every failure the store reports is one of these; the layers above map them to
errno (fusedrive) or gRPC status codes (csi_frontend) in one table each.
"""

from __future__ import annotations


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
