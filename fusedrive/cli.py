"""The ``fusedrive`` command line: a store's volumes and snapshots, and mounts by hand.

Commands (``fusedrive COMMAND --help`` for each):

    volume create|list|delete|expand     snapshot create|list|delete
    clone SOURCE NAME                    mount NAME MOUNTPOINT     umount MOUNTPOINT
    gc                                   fsck [--repair] [--zero-damaged]
    stats

The store is ``--store DIR``, else ``$FUSEDRIVE_STORE``, else ``/var/lib/fusedrive``
for root and ``$XDG_DATA_HOME/fusedrive`` (``~/.local/share/fusedrive``) otherwise.
Only ``volume create`` creates a missing store; every other command reports it.

Sizes are read and printed in human units (``parse_size``/``format_size`` in
``fusedrive.units``); ``--json`` prints machine-readable output, sizes in bytes. A
volume has at least ``MIN_CAPACITY``; one larger than the free space on the store's
disk is created (volumes are thin-provisioned) with a warning on stderr.
``--param KEY=VALUE`` is checked and made canonical by ``fusedrive.parameters``.
Volumes and snapshots share one namespace (the store refuses a name the other kind
holds); ``mount --volume|--snapshot`` and ``clone --from-volume|--from-snapshot``
name the kind anyway, for stores made before that rule.

Mounts (``fusedrive.daemon`` does the work): ``mount`` without ``--foreground``
starts a detached daemon and returns once its mount is live, or fails with the
daemon's own error and exit code if it exits first; ``--ready-fd N`` (internal,
hidden from ``--help``: how ``mount`` starts its daemon) serves in the calling process
and writes one byte to N once live. ``umount`` waits for the daemon to exit, so
everything is flushed when it returns; it asks the daemon to flush first and, if the
buffered writes cannot be stored, leaves the mount up and fails (exit 5 for a full
store, else 1) unless ``--discard``; writes lost in a failed final flush make it fail
too. Snapshots and clones of a volume mounted this way ask its mounts to flush first,
and so does ``volume expand`` (a live mount then shows the new size), and a mounted
volume or snapshot cannot be deleted.

Invariants: no command prints a traceback; every failure is one line on stderr,
``fusedrive: error: ...``, and an exit code from this table (``_EXIT_FOR`` maps
each exception to its code, the first matching row wins):

    0  success
    1  failure (an unexpected error, or the store cannot be opened)
    2  usage: unknown command or option, missing argument (argparse)
    3  not found: no such volume, snapshot or store
    4  already exists: the name is taken
    5  no space: the volume or the store's disk is full
    6  corrupt: fsck found problems (that remain after --repair), or corrupt data
    7  busy or mount problem: in use, not mounted, mount or unmount failed
    8  invalid argument: bad size, name, parameter, or ambiguous source
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
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
    fsck,
)
from blockstore.fsck import DamagedChunk

from . import parameters
from .daemon import (
    KIND_SNAPSHOT,
    KIND_VOLUME,
    DaemonFailed,
    MountError,
    NotStored,
    check_mountpoint,
    flush_volume_mounts,
    mounted_names,
    mountpoint_path,
    refuse_if_mounted,
    serve_recorded,
    spawn,
    unmount,
)
from .fsck import DamagedRange, zero_damaged
from .fsck import locate as locate_damage
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


# -- volumes ------------------------------------------------------------------


def cmd_volume_create(args: argparse.Namespace, out: Output) -> int:
    capacity = _size(args.size)
    params = _params(args.param)
    with _open_store(args, create=True) as store:
        with contextlib.suppress(NotFound):
            store.get_volume(args.name)
            raise AlreadyExists(f"volume {args.name!r} already exists")
        info = store.create_volume(args.name, capacity, args.mode, params)
        _warn_if_thin(store, info, out)
    if out.json:
        out.data(_volume_json(info))
    else:
        out.say(f"created volume {info.name!r} ({format_size(info.capacity)}, {info.mode})")
    return EXIT_OK


def cmd_volume_list(args: argparse.Namespace, out: Output) -> int:
    with _open_store(args) as store:
        volumes = store.list_volumes()
        snaps = store.list_snapshots()
        mounted = mounted_names(store.path, KIND_VOLUME)
    if out.json:
        out.data([_volume_json(v, mounted.get(v.name, [])) for v in volumes])
        return EXIT_OK
    from rich.table import Table

    nsnaps: dict[str, int] = {}
    for s in snaps:
        nsnaps[s.volume] = nsnaps.get(s.volume, 0) + 1
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "MODE", "CAPACITY", "USED", "USE%", "SNAPSHOTS", "SOURCE", "CREATED"):
        right = col in ("CAPACITY", "USED", "USE%", "SNAPSHOTS")
        table.add_column(col, justify="right" if right else "left", overflow="fold")
    table.add_column("MOUNTED AT", overflow="fold")
    for v in volumes:
        table.add_row(
            v.name,
            v.mode,
            format_size(v.capacity),
            format_size(v.used),
            _percent(v.used, v.capacity),
            str(nsnaps.get(v.name, 0)),
            v.source or "-",
            _when(v.created),
            ", ".join(mounted.get(v.name, [])) or "-",
        )
    if volumes:
        out.table(table)
    else:
        out.say("no volumes")
    return EXIT_OK


def _delete(args: argparse.Namespace, out: Output, kind: str) -> int:
    """Delete a volume or a snapshot that is not mounted; space waits for gc."""
    with _open_store(args) as store:
        get: Callable[[str], object]
        if kind == KIND_VOLUME:
            get, delete = store.get_volume, store.delete_volume
        else:
            get, delete = store.get_snapshot, store.delete_snapshot
        get(args.name)  # not found: exit code 3, before looking at mounts
        refuse_if_mounted(store.path, kind, args.name)
        delete(args.name)
        pending = store.gc_pending()
    if out.json:
        out.data({"deleted": args.name, "kind": kind, "gc_pending_layers": pending})
    else:
        hint = "; run `fusedrive gc` to release its space" if pending else ""
        out.say(f"deleted {kind} {args.name!r}{hint}")
    return EXIT_OK


def cmd_volume_delete(args: argparse.Namespace, out: Output) -> int:
    return _delete(args, out, KIND_VOLUME)


def cmd_volume_expand(args: argparse.Namespace, out: Output) -> int:
    capacity = _size(args.size)
    with _open_store(args) as store:
        before = store.get_volume(args.name).capacity
        info = store.expand_volume(args.name, capacity)
        _warn_if_thin(store, info, out)
        if info.capacity != before:
            # A live mount picks up the new capacity (df) when asked to flush, as in CSI.
            try:
                flush_volume_mounts(store.path, args.name)
            except MountError as exc:  # the volume did grow: say so, and what did not work
                out.warn(f"{exc}; its mount shows the new size once remounted")
    if out.json:
        out.data(_volume_json(info))
    elif before == info.capacity:
        out.say(f"volume {info.name!r} already has {format_size(info.capacity)}")
    else:
        out.say(
            f"expanded volume {info.name!r} from {format_size(before)} "
            f"to {format_size(info.capacity)}"
        )
    return EXIT_OK


# -- snapshots and clones ---------------------------------------------------------


def cmd_snapshot_create(args: argparse.Namespace, out: Output) -> int:
    with _open_store(args) as store:
        store.get_volume(args.volume)
        with contextlib.suppress(NotFound):
            store.get_snapshot(args.name)
            raise AlreadyExists(f"snapshot {args.name!r} already exists")
        flush_volume_mounts(store.path, args.volume)
        snap = store.create_snapshot(args.volume, args.name)
    if out.json:
        out.data(_snapshot_json(snap))
    else:
        out.say(f"created snapshot {snap.name!r} of volume {snap.volume!r}")
    return EXIT_OK


def cmd_snapshot_list(args: argparse.Namespace, out: Output) -> int:
    with _open_store(args) as store:
        snaps = store.list_snapshots(args.volume)
        mounted = mounted_names(store.path, KIND_SNAPSHOT)
    if out.json:
        out.data([_snapshot_json(s, mounted.get(s.name, [])) for s in snaps])
        return EXIT_OK
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NAME", "VOLUME", "SIZE", "CAPACITY", "MODE", "CREATED", "MOUNTED AT"):
        right = col in ("SIZE", "CAPACITY")
        table.add_column(col, justify="right" if right else "left", overflow="fold")
    for s in snaps:
        table.add_row(
            s.name,
            s.volume,
            format_size(s.size),
            format_size(s.capacity),
            s.mode,
            _when(s.created),
            ", ".join(mounted.get(s.name, [])) or "-",
        )
    if snaps:
        out.table(table)
    else:
        out.say("no snapshots")
    return EXIT_OK


def cmd_snapshot_delete(args: argparse.Namespace, out: Output) -> int:
    return _delete(args, out, KIND_SNAPSHOT)


def _exists(get: Callable[[str], object], name: str) -> bool:
    try:
        get(name)
    except NotFound:
        return False
    return True


def cmd_clone(args: argparse.Namespace, out: Output) -> int:
    capacity = _size(args.size) if args.size is not None else None
    params = _params(args.param) or None
    with _open_store(args) as store:
        kind = args.kind
        if kind is None:
            is_volume = _exists(store.get_volume, args.source)
            is_snapshot = _exists(store.get_snapshot, args.source)
            if is_volume and is_snapshot:
                raise InvalidArgument(
                    f"{args.source!r} is both a volume and a snapshot: "
                    "pass --from-volume or --from-snapshot"
                )
            if not (is_volume or is_snapshot):
                raise NotFound(f"no volume or snapshot named {args.source!r}")
            kind = "volume" if is_volume else "snapshot"
        with contextlib.suppress(NotFound):
            store.get_volume(args.name)
            raise AlreadyExists(f"volume {args.name!r} already exists")
        if kind == "volume":
            store.get_volume(args.source)
            flush_volume_mounts(store.path, args.source)
            info = store.clone_volume(args.source, args.name, capacity, params)
        else:
            info = store.clone_snapshot(args.source, args.name, capacity, params)
        _warn_if_thin(store, info, out)
    if out.json:
        out.data(_volume_json(info))
    else:
        out.say(
            f"cloned {kind} {args.source!r} to volume {info.name!r} "
            f"({format_size(info.capacity)}, {info.mode})"
        )
    return EXIT_OK


# -- space, gc, fsck ----------------------------------------------------------------


def cmd_gc(args: argparse.Namespace, out: Output) -> int:
    with _open_store(args) as store:
        before = store.stats()
        total = before.gc_pending_layers
        released = 0
        with out.progress("releasing layers") as update:
            update(0, total, None)
            last = total

            def progress(pending: int) -> None:
                nonlocal total, released, last
                # Releasing a layer can queue its parent, so the total may grow.
                released += max(last - pending, 0)
                total = max(total, released + pending)
                last = pending
                update(released, total, None)

            store.gc(progress=progress)
        after = store.stats()
    result = {
        "layers_released": before.layers - after.layers,
        "chunks_freed": before.chunk_count - after.chunk_count,
        "stored_bytes_freed": before.stored_bytes - after.stored_bytes,
        "gc_pending_layers": after.gc_pending_layers,
    }
    if out.json:
        out.data(result)
    else:
        out.say(
            f"released {_count(result['layers_released'], 'layer')}, freed "
            f"{_count(result['chunks_freed'], 'chunk')} "
            f"({format_size(max(result['stored_bytes_freed'], 0))} stored)"
        )
    return EXIT_OK


def cmd_fsck(args: argparse.Namespace, out: Output) -> int:
    repair = args.repair or args.zero_damaged
    zeroed: list[DamagedRange] = []
    skipped: list[tuple[DamagedRange, str]] = []
    with _open_store(args) as store:
        with out.progress("checking") as update:
            report = fsck(
                store,
                repair=repair,
                progress=lambda phase, done, total: update(done, total, f"checking {phase}"),
            )
        ranges = locate_damage(store, report)
        if args.zero_damaged and ranges:
            mounted = set(mounted_names(store.path, KIND_VOLUME))
            zeroed, skipped = zero_damaged(store, ranges, mounted)
            if zeroed:
                store.gc()  # the damaged chunks nothing sees any more go now
                report = fsck(store)  # what remains after zeroing
                ranges = locate_damage(store, report)
    remaining = report.unfixable if repair else report.problems + report.unfixable
    if out.json:
        out.data(
            {
                "clean": report.clean,
                "entries": report.entries,
                "chunks": report.chunks,
                "layers": report.layers,
                "problems": report.problems,
                "unfixable": report.unfixable,
                "repaired": report.repaired,
                "problems_remaining": len(remaining),
                "damaged": [_damage_json(d, ranges) for d in report.damaged],
                "marked": report.marked,
                "zeroed": [_range_json(r) for r in zeroed],
                "not_zeroed": [{**_range_json(r), "reason": why} for r, why in skipped],
            }
        )
        return EXIT_CORRUPT if remaining else EXIT_OK
    out.say(f"checked {report.entries} entries, {report.chunks} chunks, {report.layers} layers")
    for p in report.problems:
        out.say(f"{'repaired' if repair else 'problem'}: {p}")
    for p in report.unfixable:
        out.say(f"unfixable: {p}")
    for r in zeroed:
        out.say(f"zeroed (now a hole): {r.where()}")
    for r, why in skipped:
        out.say(f"not zeroed ({why}): {r.where()}")
    for d in report.damaged:
        mark = ", marked: the next write of these bytes rewrites it" if d.marked else ""
        out.say(f"damaged chunk {d.digest.hex()[:16]} ({d.why}{mark}) reaches:")
        mine = [r for r in ranges if r.digest == d.digest]
        for r in mine:
            out.say(f"  {r.where()}")
        if not mine:
            out.say("  nothing a volume or snapshot reads (space only)")
    if report.marked:
        out.say(
            f"marked {_count(report.marked, 'damaged chunk')}: the next write of the same "
            "bytes rewrites it; no file data was changed"
        )
    if report.clean:
        out.say("clean")
    elif not remaining:
        out.say(f"repaired {_count(report.repaired, 'problem')}; the store is consistent")
    elif not repair and not report.unfixable:
        out.say(f"{_count(len(remaining), 'problem')}; `fusedrive fsck --repair` fixes them")
    else:
        out.say(f"{_count(len(remaining), 'problem')} remaining")
    if report.damaged:
        zero = (
            "delete the snapshots that still hold damage, or unmount the volumes and run "
            "`fusedrive fsck --zero-damaged` again"
            if args.zero_damaged
            else "`fusedrive fsck --zero-damaged` replaces the damaged ranges of unmounted "
            "volumes by holes (the bytes are lost; snapshots are never changed)"
        )
        out.say(
            f"{_count(len(report.damaged), 'damaged chunk')}: reads of the ranges above fail "
            f"with EIO. Writing the same bytes again (from a backup) heals every copy; {zero}."
        )
    return EXIT_CORRUPT if remaining else EXIT_OK


def _range_json(r: DamagedRange) -> dict[str, Any]:
    return {
        "kind": r.kind,
        "name": r.name,
        "key": r.key.hex(),
        "ino": r.ino,
        "paths": list(r.paths),
        "start": r.start if r.ino is not None else None,
        "end": r.end if r.ino is not None else None,
    }


def _damage_json(d: DamagedChunk, ranges: list[DamagedRange]) -> dict[str, Any]:
    return {
        "digest": d.digest.hex(),
        "why": d.why,
        "marked": d.marked,
        "ranges": [_range_json(r) for r in ranges if r.digest == d.digest],
    }


def cmd_stats(args: argparse.Namespace, out: Output) -> int:
    with _open_store(args) as store:
        if args.set_reserve is not None:
            text = args.set_reserve.strip().lower()
            store.set_reserve(0 if text == "default" else _size(text, "reserve"))
        st = store.stats()
        volumes = store.list_volumes()
        snaps = store.list_snapshots()
        path = store.path
    nsnaps: dict[str, int] = {}
    for s in snaps:
        nsnaps[s.volume] = nsnaps.get(s.volume, 0) + 1
    per_volume = [
        {
            "name": v.name,
            "mode": v.mode,
            "capacity": v.capacity,
            "used": v.used,
            "snapshots": nsnaps.get(v.name, 0),
        }
        for v in volumes
    ]
    if out.json:
        out.data(
            {
                "store": str(path),
                **asdict(st),
                "dedup_ratio": st.dedup_ratio,
                "compression_ratio": st.compression_ratio,
                "per_volume": per_volume,
            }
        )
        return EXIT_OK
    from rich.table import Table

    space = Table(title=f"store {path}", box=None, show_header=False, title_justify="left")
    space.add_column("what")
    space.add_column("value", justify="right")
    rows = [
        ("volumes / snapshots", f"{st.volumes} / {st.snapshots}"),
        ("used by volumes (logical)", format_size(st.logical_used_bytes)),
        ("referenced by volumes and snapshots", format_size(st.referenced_raw_bytes)),
        ("unique data", format_size(st.unique_raw_bytes)),
        ("stored (compressed)", format_size(st.stored_bytes)),
        ("store file on disk", format_size(st.file_bytes)),
        ("dedup ratio", f"{st.dedup_ratio:.2f}x"),
        ("compression ratio", f"{st.compression_ratio:.2f}x"),
        ("chunks / entries / layers", f"{st.chunk_count} / {st.entries} / {st.layers}"),
        ("chunk hash", st.chunk_hash),
        ("layers waiting for gc", str(st.gc_pending_layers)),
        (
            "disk free",
            f"{format_size(st.disk_free_bytes)} of {format_size(st.disk_total_bytes)}",
        ),
        ("reserve kept free", format_size(st.reserve_bytes)),
        ("room for new data", format_size(st.room_bytes)),
    ]
    for what, value in rows:
        space.add_row(what, value)
    out.table(space)
    if per_volume:
        table = Table(box=None, header_style="bold")
        for col in ("VOLUME", "MODE", "CAPACITY", "USED", "USE%", "SNAPSHOTS"):
            table.add_column(col, justify="left" if col in ("VOLUME", "MODE") else "right")
        for v in volumes:
            table.add_row(
                v.name,
                v.mode,
                format_size(v.capacity),
                format_size(v.used),
                _percent(v.used, v.capacity),
                str(nsnaps.get(v.name, 0)),
            )
        out.say("")
        out.table(table)
    return EXIT_OK


# -- mount and umount -----------------------------------------------------------------


def _resolve_mount_source(store: Store, name: str, kind: str | None) -> str:
    """``"volume"`` or ``"snapshot"``: what ``name`` is, or ``kind`` (--volume, --snapshot)."""
    if kind == KIND_SNAPSHOT:
        store.get_snapshot(name)
        return KIND_SNAPSHOT
    if kind == KIND_VOLUME:
        store.get_volume(name)
        return KIND_VOLUME
    is_volume = _exists(store.get_volume, name)
    is_snapshot = _exists(store.get_snapshot, name)
    if is_volume and is_snapshot:
        # Only in a store from before volumes and snapshots shared one namespace.
        raise InvalidArgument(
            f"{name!r} is both a volume and a snapshot: pass --volume or --snapshot"
        )
    if is_volume:
        return KIND_VOLUME
    if is_snapshot:
        return KIND_SNAPSHOT
    raise NotFound(f"no volume or snapshot named {name!r}")


def cmd_mount(args: argparse.Namespace, out: Output) -> int:
    # The mount point must be alive here, so resolve it fully, as the kernel will.
    target = Path(os.path.realpath(os.path.expanduser(args.mountpoint)))
    if args.timeout <= 0:
        raise InvalidArgument("--timeout must be positive")
    with _open_store(args) as store:
        kind = _resolve_mount_source(store, args.name, args.kind)
        store_path = store.path.absolute()
    read_only = args.read_only or kind == KIND_SNAPSHOT
    mode = "read-only" if read_only else "read-write"
    check_mountpoint(target)
    if args.foreground or args.ready_fd is not None:

        def tell() -> None:
            if args.ready_fd is None:
                print(
                    f"mounted {kind} {args.name!r} at {target} ({mode}); "
                    "Ctrl-C or `fusedrive umount` to unmount",
                    file=sys.stderr,
                    flush=True,
                )

        serve_recorded(
            store_path,
            target,
            kind,
            args.name,
            read_only=read_only,
            allow_other=args.allow_other,
            debug=args.debug,
            ready_fd=args.ready_fd,
            on_ready=tell,
            writeback_cache=args.writeback_cache,
        )
        return EXIT_OK
    child = ["--store", str(store_path)] + ["-v"] * (getattr(args, "verbose", 0) or 0)
    child += ["mount", "--foreground"]
    child.append("--snapshot" if kind == KIND_SNAPSHOT else "--volume")
    if read_only:
        child.append("--read-only")
    if not args.allow_other:
        child.append("--no-allow-other")
    if args.debug:
        child.append("--debug")
    if args.writeback_cache is not None:
        child.append("--writeback-cache" if args.writeback_cache else "--no-writeback-cache")
    child += ["--", args.name, str(target)]  # a name may start with '-'
    try:
        pid, logfile = spawn(child, target, args.timeout)
    except DaemonFailed as exc:
        for line in exc.log_tail:
            print(f"  {line}", file=sys.stderr)
        print(f"fusedrive: error: {exc}", file=sys.stderr)
        # The daemon's own exit code says what went wrong (not found, ...) when it is ours.
        if exc.status in EXIT_CODES and exc.status not in (EXIT_OK, EXIT_USAGE):
            return int(exc.status)
        return EXIT_BUSY
    if out.json:
        out.data(
            {
                "mountpoint": str(target),
                "kind": kind,
                "name": args.name,
                "pid": pid,
                "read_only": read_only,
                "log": str(logfile),
            }
        )
    else:
        out.say(
            f"mounted {kind} {args.name!r} at {target} ({mode}), daemon pid {pid}, log {logfile}"
        )
    return EXIT_OK


def cmd_umount(args: argparse.Namespace, out: Output) -> int:
    if args.timeout <= 0:
        raise InvalidArgument("--timeout must be positive")
    target = mountpoint_path(args.mountpoint)
    try:
        rec = unmount(target, lazy=args.lazy, timeout=args.timeout, discard=args.discard)
    except NotStored as exc:
        if exc.lost and args.discard:
            print(f"fusedrive: warning: {exc}", file=sys.stderr)
            rec = None
        else:
            print(f"fusedrive: error: {exc}", file=sys.stderr)
            return EXIT_NO_SPACE if exc.errno == errno.ENOSPC else EXIT_FAILURE
    if out.json:
        out.data({"unmounted": str(target), "pid": rec.pid if rec else None})
    else:
        out.say(f"unmounted {target}")
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------


def _epilog() -> str:
    rows = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    return (
        "The store is --store DIR, else $FUSEDRIVE_STORE, else /var/lib/fusedrive (root)\n"
        "or $XDG_DATA_HOME/fusedrive. Sizes take units: 4096, 512MiB, 10GiB, 1.5TiB,\n"
        "1G (= 10^9 bytes).\n\nexit codes:\n" + rows
    )


def _common_options() -> argparse.ArgumentParser:
    # SUPPRESS keeps a subcommand's parser from resetting what was given before it,
    # so `fusedrive --json volume list` and `fusedrive volume list --json` both work.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="store directory (default: $FUSEDRIVE_STORE, /var/lib/fusedrive for root, "
        "else $XDG_DATA_HOME/fusedrive)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print machine-readable JSON (sizes in bytes)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more to stderr (twice for debug)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="fusedrive",
        description="Manage the volumes and snapshots of a fusedrive store and mount them.",
        epilog=_epilog(),
        formatter_class=fmt,
        parents=[common],
    )
    cmds = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(group: Any, name: str, help_text: str, func: Callable[..., int]) -> Any:
        p = group.add_parser(
            name, help=help_text, description=help_text, parents=[common], formatter_class=fmt
        )
        p.set_defaults(func=func)
        return p

    params_help = (
        "volume parameters (--param KEY=VALUE; others are refused):\n" + parameters.describe()
    )

    # volume
    vol = cmds.add_parser("volume", help="create, list, delete and expand volumes")
    vcmds = vol.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(vcmds, "create", "create an empty volume", cmd_volume_create)
    p.epilog = params_help
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--size",
        required=True,
        metavar="SIZE",
        help="capacity, at least 1MiB, e.g. 10GiB (volumes are thin-provisioned)",
    )
    p.add_argument("--mode", choices=("filesystem", "block"), default="filesystem")
    p.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="a volume parameter (repeatable)"
    )
    leaf(vcmds, "list", "list volumes", cmd_volume_list)
    p = leaf(vcmds, "delete", "delete a volume (its snapshots stay)", cmd_volume_delete)
    p.add_argument("name", metavar="NAME")
    p = leaf(vcmds, "expand", "grow a volume's capacity", cmd_volume_expand)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", required=True, metavar="SIZE", help="the new capacity, e.g. 20GiB")

    # snapshot
    snap = cmds.add_parser("snapshot", help="create, list and delete snapshots")
    scmds = snap.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(scmds, "create", "snapshot a volume (flushes its mounts first)", cmd_snapshot_create)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("name", metavar="NAME")
    p = leaf(scmds, "list", "list snapshots", cmd_snapshot_list)
    p.add_argument("--volume", metavar="VOLUME", help="only the snapshots of this volume")
    p = leaf(scmds, "delete", "delete a snapshot", cmd_snapshot_delete)
    p.add_argument("name", metavar="NAME")

    # clone
    p = leaf(cmds, "clone", "a new volume from a volume or a snapshot (copy-on-write)", cmd_clone)
    p.epilog = params_help
    p.add_argument("source", metavar="SOURCE", help="a volume or a snapshot")
    p.add_argument("name", metavar="NAME", help="the new volume")
    p.add_argument("--size", metavar="SIZE", help="capacity (default: the source's)")
    p.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="a volume parameter (repeatable)"
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--from-volume",
        dest="kind",
        action="store_const",
        const="volume",
        help="SOURCE is a volume",
    )
    kind.add_argument(
        "--from-snapshot",
        dest="kind",
        action="store_const",
        const=KIND_SNAPSHOT,
        help="SOURCE is a snapshot",
    )

    # mount / umount
    p = leaf(
        cmds,
        "mount",
        "mount a volume, or a snapshot read-only; returns once the mount is live",
        cmd_mount,
    )
    p.add_argument("name", metavar="NAME", help="a volume, or a snapshot (mounted read-only)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--volume", dest="kind", action="store_const", const=KIND_VOLUME, help="NAME is a volume"
    )
    which.add_argument(
        "--snapshot",
        dest="kind",
        action="store_const",
        const=KIND_SNAPSHOT,
        help="NAME is a snapshot",
    )
    p.add_argument("--read-only", action="store_true", help="mount read-only")
    p.add_argument(
        "--foreground", action="store_true", help="serve in this process until unmounted"
    )
    p.add_argument(
        "--no-allow-other",
        dest="allow_other",
        action="store_false",
        help="only the mounting user may access the mount",
    )
    p.add_argument("--debug", action="store_true", help="log every FUSE request")
    p.add_argument(
        "--writeback-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the kernel cache writes and send them later (default: on for read-write "
        "mounts of filesystem volumes, off for block volumes; docs/datapath.md)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the mount to go live (default 60)",
    )
    p.add_argument(  # internal: how `mount` starts its daemon (fusedrive.daemon.spawn)
        "--ready-fd", type=int, metavar="FD", help=argparse.SUPPRESS
    )
    p = leaf(cmds, "umount", "unmount and wait until the daemon has flushed and exited", cmd_umount)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now even if busy (umount -l)")
    p.add_argument(
        "--discard",
        action="store_true",
        help="unmount even if buffered writes cannot be stored (they are lost)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the daemon to exit (default 60)",
    )

    # maintenance
    leaf(cmds, "gc", "release deleted volumes' and snapshots' space", cmd_gc)
    p = leaf(cmds, "fsck", "check the store's consistency", cmd_fsck)
    p.add_argument(
        "--repair",
        action="store_true",
        help="fix what can be fixed and mark damaged chunks, so that writing the same bytes "
        "again rewrites them (holds the store's write lock while it runs)",
    )
    p.add_argument(
        "--zero-damaged",
        action="store_true",
        help="implies --repair; also replace the damaged ranges of unmounted volumes by holes and "
        "list the files changed (their damaged bytes are lost; snapshots are not changed)",
    )
    p = leaf(cmds, "stats", "space, dedup and compression ratios, usage per volume", cmd_stats)
    p.add_argument(
        "--set-reserve",
        metavar="SIZE",
        help="first set the free space the store keeps on its filesystem "
        "(e.g. 256MiB; 'default': 2%% of the filesystem, 16 MiB to 1 GiB)",
    )
    return parser


def _configure_logging(verbose: int, serving: bool) -> None:
    # A daemon logs its events (its stderr is the log file); commands stay quiet.
    base = logging.INFO if serving else logging.WARNING
    level = max(logging.DEBUG, base - 10 * verbose)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", 0) or 0
    serving = args.command == "mount" and (args.foreground or args.ready_fd is not None)
    _configure_logging(verbose, serving)
    out = Output(bool(getattr(args, "json", False)))
    try:
        return int(args.func(args, out))
    except KeyboardInterrupt:
        print("fusedrive: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`fusedrive volume list | head`); say nothing more.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:
        code = exit_code_for(exc)
        expected = isinstance(exc, (StoreError, OSError, MountError, SizeError))
        if expected:
            log.debug("event=command_failed", exc_info=True)
            print(f"fusedrive: error: {_message(exc)}", file=sys.stderr)
        else:
            log.info("event=internal_error", exc_info=True)
            print(
                f"fusedrive: error: internal error: {type(exc).__name__}: {exc}"
                + ("" if verbose else " (run with -v for details)"),
                file=sys.stderr,
            )
        return code


if __name__ == "__main__":
    sys.exit(main())
