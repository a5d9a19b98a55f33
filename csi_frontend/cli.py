"""``fusedrive-csi``: run the CSI plugin, or call one of its RPCs by hand.

    fusedrive-csi serve --endpoint unix:///csi/csi.sock --node-id NODE --store DIR
    fusedrive-csi call CreateVolume --name v1 --size 1GiB [--endpoint ...]
    fusedrive-csi call NodeStageVolume --json '{"volume_id": "v1", ...}'
    fusedrive-csi mounter --socket /run/fusedrive-mounter/mounter.sock --store DIR

``mounter`` runs the long-lived owner of the FUSE daemons (``mounter.py``).
``serve`` is also the default when the first argument is an option, so
``fusedrive-csi --endpoint ... --node-id ...`` works as a container entrypoint.
``call`` prints the response as JSON; on failure it prints the status code and
message on stderr and exits 1 (2 for usage errors).

Every option's help states its default (the help texts are checked by
tests/csi/test_cli_help.py); the examples above are repeated in ``--help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

DEFAULT_ENDPOINT = "unix:///run/fusedrive/csi.sock"

EXAMPLES = """\
examples:
  fusedrive-csi serve --endpoint unix:///csi/csi.sock --node-id NODE --store DIR
  fusedrive-csi call CreateVolume --name v1 --size 1GiB
  fusedrive-csi call NodeStageVolume --json '{"volume_id": "v1", ...}'
  fusedrive-csi mounter --socket /run/fusedrive-mounter/mounter.sock --store DIR

serve is also the default when the first argument is an option, so
`fusedrive-csi --endpoint ... --node-id ...` works as a container entrypoint.
call prints the response as JSON; on failure it prints the status code and
message on stderr and exits 1 (2 for usage errors).
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; every option states its default in its help."""


def _store_argument(p: argparse.ArgumentParser) -> None:
    """``--store``: the same default for the plugin and the mounter, which share the store."""
    p.add_argument(
        "--store",
        metavar="DIR",
        default=os.environ.get("FUSEDRIVE_STORE", "/var/lib/fusedrive"),
        help="the store directory (default: $FUSEDRIVE_STORE, else %(default)s)",
    )


def _serve_parser(sub: Any) -> None:
    from .plugin import DEFAULT_DRIVER_NAME

    p = sub.add_parser(
        "serve",
        help="run the plugin (Identity, Controller and Node services)",
        description="Run the CSI plugin: Identity, Controller and Node on one socket.",
        formatter_class=_Help,
    )
    p.add_argument(
        "--endpoint",
        metavar="URL",
        default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT),
        help="the socket to serve on, unix:///path/csi.sock "
        "(default: $CSI_ENDPOINT, else %(default)s)",
    )
    p.add_argument(
        "--node-id",
        metavar="ID",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="this node's id (default: $NODE_NAME, else the host name: %(default)s)",
    )
    _store_argument(p)
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        default=None,
        help="the node's state directory (default: the store's path with -node appended)",
    )
    p.add_argument(
        "--mounter-socket",
        metavar="PATH",
        default=os.environ.get("FUSEDRIVE_MOUNTER_SOCKET", ""),
        help="the socket of the mounter that owns the FUSE daemons (`fusedrive-csi "
        "mounter`, docs/restart.md) (default: $FUSEDRIVE_MOUNTER_SOCKET, else a mounter "
        "inside the plugin process, whose daemons do not outlive a container restart)",
    )
    p.add_argument(
        "--driver-name",
        metavar="NAME",
        default=None,
        help=f"the CSI driver name, at most 63 characters (default: {DEFAULT_DRIVER_NAME})",
    )
    p.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics on HOST:PORT (default: off)",
    )
    p.add_argument(
        "--socket-group",
        metavar="GROUP",
        default=None,
        help="a group given access to the socket, mode 0660 (default: the socket is 0600)",
    )
    p.add_argument(
        "--max-volumes-per-node",
        metavar="N",
        type=int,
        default=0,
        help="the volume limit reported in NodeGetInfo (default: 0, no limit)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the least severe messages logged (default: %(default)s)",
    )
    p.add_argument(
        "--allowed-path-prefix",
        action="append",
        default=[],
        metavar="DIR",
        help="staging and target paths must lie below DIR (kubelet's root directory, "
        "e.g. /var/lib/kubelet); repeatable; others are INVALID_ARGUMENT (default: any path)",
    )
    p.add_argument(
        "--heal-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long after a volume's FUSE daemon dies before remounting it "
        "(default: %(default)s)",
    )


def _call_parser(sub: Any) -> None:
    p = sub.add_parser(
        "call",
        help="call one RPC and print the response as JSON",
        description="Call one RPC of a running plugin and print the response as JSON.\n"
        "Options fill in request fields; --json gives the whole request.",
        formatter_class=_Help,
    )
    p.add_argument("method", help="the RPC's name, e.g. CreateVolume, NodeStageVolume, Probe")
    p.add_argument(
        "--endpoint",
        metavar="URL",
        default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT),
        help="the plugin's socket (default: $CSI_ENDPOINT, else %(default)s)",
    )
    p.add_argument(
        "--json",
        dest="body",
        metavar="OBJECT",
        default=None,
        help="the request as a JSON object; the options below override its fields "
        "(default: an empty request)",
    )
    fields = p.add_argument_group("request fields (each unset by default)")
    fields.add_argument("--name", help="name (CreateVolume, CreateSnapshot)")
    fields.add_argument("--size", help="capacity_range.required_bytes, with units, e.g. 1GiB")
    fields.add_argument("--volume-id", metavar="ID", help="volume_id")
    fields.add_argument("--snapshot-id", metavar="ID", help="snapshot_id")
    fields.add_argument(
        "--source-volume-id", metavar="ID", help="source_volume_id (CreateSnapshot)"
    )
    fields.add_argument(
        "--from-snapshot", metavar="ID", help="CreateVolume's content source: a snapshot id"
    )
    fields.add_argument(
        "--from-volume", metavar="ID", help="CreateVolume's content source: a volume id"
    )
    fields.add_argument("--staging-path", metavar="PATH", help="staging_target_path")
    fields.add_argument(
        "--target-path",
        metavar="PATH",
        help="target_path (volume_path for NodeGetVolumeStats and NodeExpandVolume)",
    )
    fields.add_argument("--block", action="store_true", help="block access type (default: mount)")
    fields.add_argument("--readonly", action="store_true", help="readonly (default: false)")
    fields.add_argument(
        "--access-mode",
        metavar="MODE",
        default="SINGLE_NODE_WRITER",
        help="the capability's access mode (default: %(default)s)",
    )


def _mounter_parser(sub: Any) -> None:
    from .mounter_client import DEFAULT_SOCKET

    p = sub.add_parser(
        "mounter",
        help="run the mounter, the long-lived owner of this node's FUSE daemons",
        description="Run the mounter: it starts, stops and watches the FUSE daemons of "
        "staged volumes for the plugin, over a unix socket, so that they outlive the "
        "plugin's container (docs/restart.md).",
        formatter_class=_Help,
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=os.environ.get("FUSEDRIVE_MOUNTER_SOCKET", DEFAULT_SOCKET),
        help="the unix socket to serve on (default: $FUSEDRIVE_MOUNTER_SOCKET, else %(default)s)",
    )
    _store_argument(p)
    p.add_argument(
        "--allowed-path-prefix",
        action="append",
        default=[],
        metavar="DIR",
        help="mount only below DIR (repeatable; default: anywhere)",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="do not serve: print the live daemons of the mounter on --socket as JSON "
        "and exit (default: serve)",
    )
    p.add_argument(
        "--leave-daemons",
        action="store_true",
        help="on SIGTERM leave the daemons running, for a successor to adopt (default: "
        "stop each cleanly; in a container they would be killed anyway)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: %(default)s)",
    )


def mounter(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .mounter import MounterConfig, serve
    from .mounter_client import MounterClient, MounterError

    if a.list:
        try:
            daemons = MounterClient(a.socket, timeout=30).daemons()
        except MounterError as exc:
            print(f"fusedrive-csi: error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps([asdict(d) for d in daemons], indent=2))
        return 0
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = MounterConfig(
        store_path=Path(a.store),
        socket_path=Path(a.socket),
        allowed_prefixes=[os.path.normpath(p) for p in a.allowed_path_prefix],
        leave_daemons=a.leave_daemons,
    )
    try:
        return serve(config)
    except (MounterError, OSError) as exc:
        print(f"fusedrive-csi: error: {exc}", file=sys.stderr)
        return 1


def build_request(method: str, a: argparse.Namespace) -> dict[str, Any]:
    from fusedrive.units import parse_size

    req: dict[str, Any] = json.loads(a.body) if a.body else {}
    if a.name:
        req["name"] = a.name
    if a.size:
        req["capacity_range"] = {"required_bytes": str(parse_size(a.size))}
    if a.volume_id:
        req["volume_id"] = a.volume_id
    if a.snapshot_id:
        req["snapshot_id"] = a.snapshot_id
    if a.source_volume_id:
        req["source_volume_id"] = a.source_volume_id
    if a.from_snapshot:
        req["volume_content_source"] = {"snapshot": {"snapshot_id": a.from_snapshot}}
    if a.from_volume:
        req["volume_content_source"] = {"volume": {"volume_id": a.from_volume}}
    if a.staging_path:
        req["staging_target_path"] = a.staging_path
    if a.target_path:
        req["target_path"] = a.target_path
        if method == "NodeGetVolumeStats" or method == "NodeExpandVolume":
            req["volume_path"] = a.target_path
    if a.readonly:
        req["readonly"] = True
    cap = {"block" if a.block else "mount": {}, "access_mode": {"mode": a.access_mode}}
    if method in ("CreateVolume", "ValidateVolumeCapabilities"):
        req.setdefault("volume_capabilities", [cap])
    if method in ("NodeStageVolume", "NodePublishVolume"):
        req.setdefault("volume_capability", cap)
    return req


def call(a: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import ParseError

    from .client import CsiClient, to_dict

    try:
        request = build_request(a.method, a)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"fusedrive-csi: error: {exc}", file=sys.stderr)
        return 2
    with CsiClient(a.endpoint) as client:
        try:
            resp = client.call(a.method, request)
        except KeyError as exc:
            print(f"fusedrive-csi: error: {exc.args[0]}", file=sys.stderr)
            return 2
        except ParseError as exc:
            print(f"fusedrive-csi: error: bad request for {a.method}: {exc}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            print(f"fusedrive-csi: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(to_dict(resp), indent=2, sort_keys=True))
    return 0


def serve(a: argparse.Namespace) -> int:
    from blockstore import StoreError

    from .plugin import DEFAULT_DRIVER_NAME, Config
    from .server import Server

    logging.basicConfig(level=a.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    store = Path(a.store)
    config = Config(
        node_id=a.node_id,
        store_path=store,
        state_path=Path(a.state_dir) if a.state_dir else store.with_name(store.name + "-node"),
        driver_name=a.driver_name or DEFAULT_DRIVER_NAME,
        mounter_socket=a.mounter_socket,
        max_volumes_per_node=a.max_volumes_per_node,
        allowed_path_prefixes=a.allowed_path_prefix,
        heal_delay=a.heal_delay,
    )
    if len(config.driver_name) > 63:
        print("fusedrive-csi: error: --driver-name is longer than 63 characters", file=sys.stderr)
        return 2
    try:
        server = Server(config, a.endpoint, a.metrics_address, a.socket_group)
        server.serve_forever()
    except (ValueError, OSError, StoreError) as exc:
        print(f"fusedrive-csi: error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedrive-csi",
        description="Run the fusedrive CSI plugin, or call one of its RPCs by hand.",
        epilog=EXAMPLES,
        formatter_class=_Help,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _serve_parser(sub)
    _call_parser(sub)
    _mounter_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    a = build_parser().parse_args(argv)
    if a.command == "mounter":
        return mounter(a)
    return serve(a) if a.command == "serve" else call(a)


if __name__ == "__main__":
    sys.exit(main())
