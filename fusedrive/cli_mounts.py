"""``fusedrive mount`` and ``umount``: mounts by hand (``fusedrive.daemon`` does the work).

``mount`` without ``--foreground`` starts a detached daemon and returns once its
mount is live, or fails with the daemon's own error and exit code if it exits
first; ``--ready-fd N`` (internal, hidden from ``--help``: how ``mount`` starts its
daemon) serves in the calling process and writes one byte to N once live.
``umount`` waits for the daemon to exit, so everything is flushed when it returns;
it asks the daemon to flush first and, if the buffered writes cannot be stored,
leaves the mount up and fails (exit 5 for a full store, else 1) unless
``--discard``; writes lost in a failed final flush make it fail too.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from blockstore import InvalidArgument, NotFound, Store

from .cli_common import (
    EXIT_BUSY,
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_NO_SPACE,
    EXIT_OK,
    EXIT_USAGE,
    Output,
    _exists,
    _open_store,
)
from .daemon import (
    KIND_SNAPSHOT,
    KIND_VOLUME,
    DaemonFailed,
    NotStored,
    check_mountpoint,
    mountpoint_path,
    serve_recorded,
    spawn,
    unmount,
)

log = logging.getLogger(__name__)

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
