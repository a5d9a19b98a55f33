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

Mounts (``cli_mounts``; ``fusedrive.daemon`` does the work): ``mount`` returns once
the mount is live, ``umount`` once the daemon has flushed everything and exited.
Snapshots and clones of a volume mounted this way ask its mounts to flush first,
and so does ``volume expand`` (a live mount then shows the new size), and a mounted
volume or snapshot cannot be deleted.

Modules: this one parses the command line and runs a command (``main``, the
console script); ``cli_volumes`` (volume, snapshot, clone), ``cli_store`` (gc,
fsck, stats) and ``cli_mounts`` (mount, umount) hold the commands, and
``cli_common`` what they share (exit codes, the store, output, arguments).

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
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from blockstore import StoreError

from . import parameters
from .cli_common import EXIT_CODES, EXIT_FAILURE, EXIT_INTERRUPTED, Output, _message, exit_code_for
from .cli_mounts import cmd_mount, cmd_umount
from .cli_store import cmd_fsck, cmd_gc, cmd_stats
from .cli_volumes import (
    cmd_clone,
    cmd_snapshot_create,
    cmd_snapshot_delete,
    cmd_snapshot_list,
    cmd_volume_create,
    cmd_volume_delete,
    cmd_volume_expand,
    cmd_volume_list,
)
from .daemon import KIND_SNAPSHOT, KIND_VOLUME, MountError
from .units import SizeError

log = logging.getLogger(__name__)

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
        help="let the kernel cache writes and send them later (default: off; snapshots "
        "of the mount may then miss recent writes; block volumes refuse it; docs/datapath.md)",
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
