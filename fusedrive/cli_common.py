"""What every ``fusedrive`` command shares: exit codes, the store, output, arguments.

``EXIT_CODES`` and ``_EXIT_FOR`` are the one table from exception to exit code
(``cli``'s docstring lists them); ``default_store_path`` and ``_open_store`` find
and open the store (``--store``, ``$FUSEDRIVE_STORE``, the default); ``Output``
prints text or ``--json``; ``_size`` and ``_params`` read sizes and
``--param KEY=VALUE``. Names with an underscore are shared by the ``cli_*``
modules only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from blockstore import (
    AlreadyExists,
    Busy,
    Corrupt,
    InvalidArgument,
    NoSpace,
    NotFound,
    ReadOnly,
    SnapshotInfo,
    Store,
    StoreError,
    VolumeInfo,
)

from . import parameters
from .daemon import MountError
from .units import SizeError, format_size, parse_size

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_EXISTS = 4
EXIT_NO_SPACE = 5
EXIT_CORRUPT = 6
EXIT_BUSY = 7
EXIT_INVALID = 8
EXIT_INTERRUPTED = 130

MIN_CAPACITY = 1 << 20  # the smallest volume (as csi_frontend.controller.MIN_CAPACITY)

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FAILURE: "failure (an unexpected error, or the store cannot be opened)",
    EXIT_USAGE: "usage: unknown command or option, missing argument (argparse)",
    EXIT_NOT_FOUND: "not found: no such volume, snapshot or store",
    EXIT_EXISTS: "already exists: the name is taken",
    EXIT_NO_SPACE: "no space: the volume or the store's disk is full",
    EXIT_CORRUPT: "corrupt: fsck found problems (that remain after --repair), or corrupt data",
    EXIT_BUSY: "busy or mount problem: in use, not mounted, mount or unmount failed",
    EXIT_INVALID: "invalid argument: bad size, name, parameter, or ambiguous source",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


# The one table from exception to exit code; the first matching row wins.
_EXIT_FOR: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, EXIT_NOT_FOUND),
    (AlreadyExists, EXIT_EXISTS),
    (NoSpace, EXIT_NO_SPACE),
    (Corrupt, EXIT_CORRUPT),
    (Busy, EXIT_BUSY),
    (MountError, EXIT_BUSY),
    (InvalidArgument, EXIT_INVALID),  # includes OutOfRange
    (ReadOnly, EXIT_INVALID),
    (SizeError, EXIT_INVALID),
    (StoreError, EXIT_FAILURE),
    (OSError, EXIT_FAILURE),
)


def exit_code_for(exc: BaseException) -> int:
    for kind, code in _EXIT_FOR:
        if isinstance(exc, kind):
            return code
    return EXIT_FAILURE


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


# -- locations ---------------------------------------------------------------


def default_store_path() -> Path:
    env = os.environ.get("FUSEDRIVE_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/fusedrive")
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "fusedrive"


def _store_path(args: argparse.Namespace) -> Path:
    given = getattr(args, "store", None)
    # Resolved, so that the mount records of one store compare equal however it is spelled.
    return (Path(given) if given else default_store_path()).expanduser().resolve()


def _open_store(args: argparse.Namespace, create: bool = False) -> Store:
    path = _store_path(args)
    # Store() would happily initialise any existing directory; only create on purpose.
    if not create and not (path / "data.mdb").exists():
        raise NotFound(
            f"no store at {path} (create a volume first, or pass --store or set FUSEDRIVE_STORE)"
        )
    return Store(path, create=create)


# -- output --------------------------------------------------------------------


class Output:
    """Results go to stdout (JSON or human text); progress and errors to stderr."""

    def __init__(self, as_json: bool) -> None:
        from rich.console import Console

        self.json = as_json
        self.console = Console(highlight=False)
        if not self.console.is_terminal:
            # Piped output keeps whole rows (grep, awk) instead of wrapping at 80 columns.
            self.console = Console(highlight=False, width=4096)
        self.err_console = Console(stderr=True, highlight=False)

    def data(self, obj: Any) -> None:
        print(json.dumps(obj, indent=2, sort_keys=True), flush=True)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def warn(self, text: str) -> None:
        print(f"fusedrive: warning: {text}", file=sys.stderr, flush=True)

    def table(self, table: Any) -> None:
        self.console.print(table)

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[Callable[[int, int, str | None], None]]:
        """A progress bar on stderr (only on a terminal); yields ``update(done, total, desc)``."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        disabled = self.json or not self.err_console.is_terminal
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=self.err_console,
            transient=True,
            disable=disabled,
        ) as bar:
            task = bar.add_task(description, total=None)

            def update(done: int, total: int, desc: str | None = None) -> None:
                kw: dict[str, Any] = {"completed": done, "total": max(total, done)}
                if desc:
                    kw["description"] = desc
                bar.update(task, **kw)

            yield update


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _volume_json(v: VolumeInfo, mounts: list[str] | None = None) -> dict[str, Any]:
    d = asdict(v)
    if mounts is not None:
        d["mountpoints"] = mounts
    return d


def _snapshot_json(s: SnapshotInfo, mounts: list[str] | None = None) -> dict[str, Any]:
    d = asdict(s)
    if mounts is not None:
        d["mountpoints"] = mounts
    return d


# -- argument helpers -----------------------------------------------------------


def _size(text: str, what: str = "size") -> int:
    n = parse_size(text)
    if n <= 0:
        raise SizeError(f"invalid {what} {text!r}: must be larger than zero")
    if n < MIN_CAPACITY:
        raise SizeError(
            f"invalid {what} {text!r} ({format_size(n)}): a volume needs at least "
            f"{format_size(MIN_CAPACITY)} (sizes take units: 512MiB, 10GiB)"
        )
    return n


def _params(items: list[str] | None) -> dict[str, str]:
    """``--param KEY=VALUE`` options, checked (``fusedrive.parameters``) and canonical."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"invalid parameter {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return parameters.check(out)


def _warn_if_thin(store: Store, info: VolumeInfo, out: Output) -> None:
    """Volumes are thin-provisioned: say so when one is larger than the disk's free space."""
    free = shutil.disk_usage(store.path).free
    if info.capacity > free:
        out.warn(
            f"volume {info.name!r} ({format_size(info.capacity)}) is larger than the free "
            f"space on the store's disk ({format_size(free)}); volumes are thin-provisioned, "
            "so writes fail with ENOSPC once the disk is full"
        )


def _exists(get: Callable[[str], object], name: str) -> bool:
    try:
        get(name)
    except NotFound:
        return False
    return True
