"""The filesystem's errors: ``FsError(errno)`` and the one table from store errors to errno.

Every failure the filesystem reports is an ``FsError`` carrying a POSIX errno; the
FUSE adapter turns it into ``pyfuse3.FUSEError`` and nothing else. Store failures
are translated here and only here (``ERRNO_OF_STORE_ERROR``), so a new store
exception needs one new row, not a search through the filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

from blockstore import (
    AlreadyExists,
    Busy,
    Corrupt,
    InvalidArgument,
    NoSpace,
    NotFound,
    ReadOnly,
    StoreError,
)
from blockstore.errors import store_error_of

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

ERRNO_OF_STORE_ERROR: dict[type[StoreError], int] = {
    NotFound: errno.ENOENT,
    AlreadyExists: errno.EEXIST,
    NoSpace: errno.ENOSPC,
    Corrupt: errno.EIO,
    ReadOnly: errno.EROFS,
    InvalidArgument: errno.EINVAL,  # also covers OutOfRange, its subclass
    Busy: errno.EBUSY,
}


class FsError(OSError):
    """A filesystem operation failed with ``errno`` (an ``OSError``, so callers that
    report OS errors, like the command line, report these the same way)."""

    errno: int

    def __init__(self, errno_: int, message: str = "") -> None:
        super().__init__(errno_, message or os.strerror(errno_))
        self.message = message or os.strerror(errno_)

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno, self.errno)}] {self.message}"


class DataNotStored(FsError):
    """The mount ended with buffered changes that could not be stored: they are lost.

    Raised by ``fuse_adapter.serve`` after the final flush failed (the kernel had
    already detached the mount, or a signal stopped the daemon); ``pending_bytes``
    says how much buffered data went with them.
    """

    def __init__(self, errno_: int, message: str, pending_bytes: int) -> None:
        super().__init__(errno_, message)
        self.pending_bytes = pending_bytes


class FlushNeeded(Exception):
    """The operation can proceed only after buffered changes are flushed.

    Raised by ``Filesystem.try_write`` so that the async adapter can await the flush
    (in worker threads) and retry; the synchronous API flushes and retries itself.
    ``space``: raised because the volume may be full (only a complete flush tells),
    rather than because the dirty buffers are full (the flush in flight may do).
    """

    def __init__(self, message: str, *, space: bool = False) -> None:
        super().__init__(message)
        self.space = space


def errno_of(exc: StoreError) -> int:
    """The errno for a store exception (EIO for any store error without a row)."""
    for cls in type(exc).__mro__:
        code = ERRNO_OF_STORE_ERROR.get(cls)
        if code is not None:
            return code
    return errno.EIO


def translate(exc: StoreError) -> FsError:
    code = errno_of(exc)
    if code == errno.EIO:
        log.error("event=store_error errno=EIO error=%s", exc)
    return FsError(code, str(exc))


def failure(exc: BaseException, what: str = "flush") -> FsError:
    """The ``FsError`` for whatever a flush (or another store write) raised.

    ``FsError`` stays as it is; store errors go through the table; an ``OSError`` or
    LMDB error that escaped the store is translated as the store translates it
    (ENOSPC for a full filesystem); anything else is a bug, logged with its
    traceback and reported as EIO, so that it never takes the daemon down.
    """
    if isinstance(exc, FsError):
        return exc
    err = store_error_of(exc)
    if err is not None:
        return translate(err)
    log.error("event=%s_failed_unexpectedly errno=EIO", what, exc_info=exc)
    return FsError(errno.EIO, f"{what} failed: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Re-raise store exceptions raised inside the block as ``FsError``."""
    try:
        yield
    except StoreError as exc:
        raise translate(exc) from exc


def fs_op(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a public filesystem operation: store errors leave it as ``FsError``."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        # try/except, not ``with store_errors()``: a generator context manager costs
        # about a microsecond, and this wraps every request.
        try:
            return fn(*args, **kwargs)
        except StoreError as exc:
            raise translate(exc) from exc

    return wrapper
