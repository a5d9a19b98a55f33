"""Volume parameters: the one table of their names, rules, units and defaults.

A volume record carries string parameters (``KEY=VALUE``). They are filesystem
parameters, read by the daemon when it opens a volume (``Filesystem``), so their
rules live here, and every way in checks them with this module: the command line
(``fusedrive volume create --param``, ``clone --param``), the CSI controller
(StorageClass ``parameters`` and ``mutable_parameters``) and the daemon when it
opens a volume.

=====================  ==============================================  ==========  =========
name                   rule                                            default     mutable
=====================  ==============================================  ==========  =========
``compression_level``  an integer from 0 (no compression) to 22        the store's yes
                       (zstd levels)                                   (3)
``chunk_size``         a power of two from 4 KiB to 4 MiB, in bytes    64 KiB      no
                       or with a unit (``128KiB``, ``1MiB``)
``root_mode``          octal permissions of the root directory,        ``0755``    no
                       0-7777
``root_uid``           owner of the root directory, 0-4294967294       0           no
``root_gid``           group of the root directory, 0-4294967294       0           no
=====================  ==============================================  ==========  =========

"Mutable" parameters may change on a live volume (CSI ``ControllerModifyVolume``;
a live mount picks the change up when asked to flush); the others only take effect
when the filesystem is created (its first mount), and ``chunk_size`` is then fixed
in its superblock.

Invariants: ``check`` returns the parameters in canonical form (``chunk_size`` in
bytes, ``root_mode`` as four octal digits), so that what is stored is what the
daemon reads; every failure is ``ParameterError``, an ``InvalidArgument`` (CLI exit
code 8, CSI INVALID_ARGUMENT, errno EINVAL), whose message names the parameter and
its rule; an unknown key is refused with the list of known ones. The store itself
does not check parameters: a record may still hold a bad value (written by an older
version, or on purpose by a test), and ``value`` refuses it when it is read.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from blockstore import MAX_CHUNK_SIZE, InvalidArgument

from .units import SizeError, parse_size

log = logging.getLogger(__name__)

MIN_CHUNK_SIZE = 4096
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_COMPRESSION_LEVEL = 22
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to chown(2)

# Keys that the CSI sidecars add to a StorageClass's parameters; not ours.
SIDECAR_PREFIX = "csi.storage.k8s.io/"


class ParameterError(InvalidArgument):
    """A volume parameter that is unknown or breaks its rule."""


def _integer(raw: str, lo: int, hi: int) -> int:
    text = raw.strip()
    if not text.isdigit():
        raise ValueError
    n = int(text)
    if not lo <= n <= hi:
        raise ValueError
    return n


def _chunk_size(raw: str) -> int:
    try:
        n = parse_size(raw)
    except SizeError as exc:
        raise ValueError from exc
    if n < MIN_CHUNK_SIZE or n > MAX_CHUNK_SIZE or n & (n - 1):
        raise ValueError
    return n


def _mode(raw: str) -> int:
    text = raw.strip()
    text = text[2:] if text[:2].lower() == "0o" else text
    if not text or any(c not in "01234567" for c in text):
        raise ValueError
    n = int(text, 8)
    if n > 0o7777:
        raise ValueError
    return n


@dataclass(frozen=True)
class Parameter:
    name: str
    rule: str  # completes "NAME must be ..."
    default: str  # for help texts
    parse: Callable[[str], int]  # raises ValueError when the value breaks the rule
    canonical: Callable[[int], str]
    mutable: bool = False


def _ids(raw: str) -> int:
    return _integer(raw, 0, MAX_ID)


PARAMETERS: dict[str, Parameter] = {
    p.name: p
    for p in (
        Parameter(
            "compression_level",
            f"an integer from 0 (no compression) to {MAX_COMPRESSION_LEVEL}",
            "the store's level, 3 unless set",
            lambda raw: _integer(raw, 0, MAX_COMPRESSION_LEVEL),
            str,
            mutable=True,
        ),
        Parameter(
            "chunk_size",
            f"a power of two from 4KiB to {MAX_CHUNK_SIZE >> 20}MiB, in bytes or "
            "with a unit (e.g. 65536, 128KiB, 1MiB)",
            "64KiB",
            _chunk_size,
            str,
        ),
        Parameter("root_mode", "octal permissions from 0 to 7777", "0755", _mode, "{:04o}".format),
        Parameter("root_uid", f"a user id from 0 to {MAX_ID}", "0", _ids, str),
        Parameter("root_gid", f"a group id from 0 to {MAX_ID}", "0", _ids, str),
    )
}
KNOWN = frozenset(PARAMETERS)
MUTABLE = frozenset(name for name, p in PARAMETERS.items() if p.mutable)


def _unknown(key: str, allowed: Iterable[str]) -> ParameterError:
    names = ", ".join(sorted(allowed))
    if key in PARAMETERS:
        return ParameterError(f"parameter {key!r} cannot be changed here (only: {names})")
    return ParameterError(f"unknown parameter {key!r} (known parameters: {names})")


def parse(key: str, raw: str) -> int:
    """The value of one parameter; ``ParameterError`` naming the rule if it breaks it."""
    spec = PARAMETERS.get(key)
    if spec is None:
        raise _unknown(key, KNOWN)
    try:
        return spec.parse(raw)
    except ValueError:
        raise ParameterError(
            f"invalid parameter {key}={raw!r}: {key} must be {spec.rule}"
        ) from None


def check(
    params: Mapping[str, str], allowed: Iterable[str] = KNOWN, ignore_sidecar: bool = False
) -> dict[str, str]:
    """``params`` checked against their rules, in canonical form.

    Keys outside ``allowed`` (e.g. ``MUTABLE``) are refused; with ``ignore_sidecar``
    the CSI sidecars' ``csi.storage.k8s.io/`` keys are dropped instead.
    """
    allowed = frozenset(allowed)
    out: dict[str, str] = {}
    for key, raw in params.items():
        if ignore_sidecar and key.startswith(SIDECAR_PREFIX):
            continue
        if key not in allowed:
            raise _unknown(key, allowed)
        out[key] = PARAMETERS[key].canonical(parse(key, raw))
    return out


def value(params: Mapping[str, str], key: str, default: int) -> int:
    """Parameter ``key`` of a volume record, or ``default`` if unset (empty counts as unset)."""
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    return parse(key, raw)


def check_record(params: Mapping[str, str], what: str) -> None:
    """Refuse a record whose known parameters break their rules; unknown keys are logged."""
    for key, raw in params.items():
        if key not in PARAMETERS:
            log.warning("event=unknown_parameter %s parameter=%s", what, key)
        elif raw != "":
            try:
                parse(key, raw)
            except ParameterError as exc:
                raise ParameterError(f"{what}: {exc}") from None


def describe(width: int = 79) -> str:
    """The parameters and their rules, wrapped for help texts."""
    return "\n".join(
        textwrap.fill(
            f"{p.name}: {p.rule}; default {p.default}"
            + ("; may change on a live volume" if p.mutable else ""),
            width,
            initial_indent="  ",
            subsequent_indent="      ",
        )
        for p in PARAMETERS.values()
    )
