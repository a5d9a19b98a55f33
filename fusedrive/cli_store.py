"""``fusedrive gc``, ``fsck`` and ``stats``: the store as a whole, its space and its health."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from typing import Any

from blockstore import fsck
from blockstore.fsck import DamagedChunk

from .cli_common import EXIT_CORRUPT, EXIT_OK, Output, _count, _open_store, _percent, _size
from .daemon import KIND_VOLUME, mounted_names
from .fsck import DamagedRange, zero_damaged
from .fsck import locate as locate_damage
from .units import format_size

log = logging.getLogger(__name__)

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
