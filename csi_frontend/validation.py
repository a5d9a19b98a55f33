"""Request checks shared by the services: sizes, ids, paths, capabilities.

The spec's limits: strings at most 128 bytes, maps at most 4 KiB in total
(target and staging paths exempt from the string limit). Ids are store names, so
an id can never name something outside the store; paths must be absolute and
normalised, so nothing is created or removed outside the directories the CO gave.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping

from blockstore import InvalidArgument
from blockstore.catalog import check_name
from fusedrive import parameters as volume_parameters

from .errors import invalid
from .proto import csi_pb2

MAX_STRING = 128
MAX_MAP = 4096
MAX_PATH = 4096

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
SUPPORTED_MODES = frozenset(
    {
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
    }
)
READ_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})

# Parameters a StorageClass may set: the volume parameters, whose rules live in
# fusedrive.parameters; keys under csi.storage.k8s.io/ come from the sidecars and
# are ignored.
KNOWN_PARAMETERS = volume_parameters.KNOWN
MUTABLE_PARAMETERS = volume_parameters.MUTABLE


def string(value: str, what: str, required: bool = True) -> str:
    if required and not value:
        raise invalid(f"{what} is required")
    if len(value.encode()) > MAX_STRING:
        raise invalid(f"{what} is longer than {MAX_STRING} bytes")
    return value


def mapping(values: Mapping[str, str], what: str) -> dict[str, str]:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in values.items())
    if size > MAX_MAP:
        raise invalid(f"{what} is larger than {MAX_MAP} bytes")
    return dict(values)


def object_id(value: str, what: str) -> str:
    """A volume or snapshot id: must be a valid store name."""
    string(value, what)
    try:
        check_name(value, what)
    except InvalidArgument as exc:
        raise invalid(str(exc)) from None
    return value


def id_for_name(name: str, prefix: str) -> str:
    """The id a CO-chosen name maps to: itself when it is a safe store name.

    A name starting with '-' is hashed too: a command line could take it for an option.
    """
    try:
        check_name(name)
        if not name.startswith("-"):
            return name
    except InvalidArgument:
        pass
    return f"{prefix}-{hashlib.sha256(name.encode()).hexdigest()[:40]}"


def path(value: str, what: str) -> str:
    if not value:
        raise invalid(f"{what} is required")
    if len(value) > MAX_PATH or "\x00" in value:
        raise invalid(f"{what} is not a valid path")
    if (
        not os.path.isabs(value)
        or os.path.normpath(value) != value.rstrip("/")
        or ".." in value.split("/")
    ):
        raise invalid(f"{what} must be an absolute, normalised path: {value!r}")
    return value.rstrip("/") or "/"


def parameters(values: Mapping[str, str], allowed: Iterable[str]) -> dict[str, str]:
    """Our own parameters out of ``values``, checked and canonical (``fusedrive.parameters``).

    An unknown key or a value breaking its rule is INVALID_ARGUMENT with the message
    the command line prints for it.
    """
    mapping(values, "parameters")
    try:
        return volume_parameters.check(values, allowed, ignore_sidecar=True)
    except volume_parameters.ParameterError as exc:
        raise invalid(str(exc)) from None


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why we cannot serve ``cap``, or None if we can."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "volume capability has no access type (mount or block)"
    if kind == "mount" and cap.mount.fs_type not in ("", "fuse", "fusedrive"):
        return f"fs_type {cap.mount.fs_type!r} is not supported (fusedrive serves its own)"
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        return "volume capability has no access mode"
    if cap.access_mode.mode not in SUPPORTED_MODES:
        return f"access mode {Mode.Name(cap.access_mode.mode)} is not supported (node-local)"
    return None


def capabilities(
    caps: Iterable[csi_pb2.VolumeCapability], required: bool = True
) -> list[csi_pb2.VolumeCapability]:
    caps = list(caps)
    if required and not caps:
        raise invalid("volume_capabilities are required")
    for cap in caps:
        problem = capability_problem(cap)
        if problem:
            raise invalid(problem)
    return caps


def is_block(caps: Iterable[csi_pb2.VolumeCapability]) -> bool:
    kinds = {c.WhichOneof("access_type") for c in caps}
    if kinds == {"block", "mount"}:
        raise invalid("a volume cannot be both block and mount")
    return kinds == {"block"}
