"""``fusedrive volume ...``, ``snapshot ...`` and ``clone``: the store's catalog.

Volumes and snapshots share one namespace (the store refuses a name the other kind
holds); ``clone --from-volume|--from-snapshot`` names the kind anyway, for stores
made before that rule. Snapshots and clones of a volume mounted by hand ask its
mounts to flush first, and so does ``volume expand``; a mounted volume or snapshot
cannot be deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable

from blockstore import AlreadyExists, InvalidArgument, NotFound

from .cli_common import (
    EXIT_OK,
    Output,
    _exists,
    _open_store,
    _params,
    _percent,
    _size,
    _snapshot_json,
    _volume_json,
    _warn_if_thin,
    _when,
)
from .daemon import (
    KIND_SNAPSHOT,
    KIND_VOLUME,
    MountError,
    flush_volume_mounts,
    mounted_names,
    refuse_if_mounted,
)
from .units import format_size

log = logging.getLogger(__name__)

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
