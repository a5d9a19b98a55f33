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

from .mounter_client import MounterError

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


# What the mounter's answer codes (csi_frontend/mounter.py) become.
MOUNTER_CODES: dict[str, grpc.StatusCode] = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "busy": grpc.StatusCode.FAILED_PRECONDITION,
    "no_space": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "failed": grpc.StatusCode.INTERNAL,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


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
    if isinstance(exc, MounterError):
        return MOUNTER_CODES.get(exc.code, grpc.StatusCode.INTERNAL), exc.message
    for kind, code in STORE_CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
