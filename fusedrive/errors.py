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
