"""The one table from failures to gRPC status codes, and the CSI error type.

Handlers raise ``CsiError(code, message)`` for protocol-level failures and let
store exceptions propagate; ``status_of`` turns either into the status the
server sends. status.details stays empty, as the spec requires.
"""

from __future__ import annotations

import grpc

from blockstore import (
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

# Most specific first: OutOfRange is an InvalidArgument.
STORE_CODES: tuple[tuple[type[StoreError], grpc.StatusCode], ...] = (
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Busy, grpc.StatusCode.FAILED_PRECONDITION),
    (ReadOnly, grpc.StatusCode.FAILED_PRECONDITION),
    (Corrupt, grpc.StatusCode.DATA_LOSS),
)


class CsiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, CsiError):
        return exc.code, exc.message
    for kind, code in STORE_CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
