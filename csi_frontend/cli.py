"""``fusedrive-csi``: run the CSI plugin, or call one of its RPCs by hand.

    fusedrive-csi serve --endpoint unix:///csi/csi.sock --node-id NODE --store DIR
    fusedrive-csi call CreateVolume --name v1 --size 1GiB [--endpoint ...]
    fusedrive-csi call NodeStageVolume --json '{"volume_id": "v1", ...}'

``serve`` is also the default when the first argument is an option, so
``fusedrive-csi --endpoint ... --node-id ...`` works as a container entrypoint.
``call`` prints the response as JSON; on failure it prints the status code and
message on stderr and exits 1 (2 for usage errors).
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


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the plugin (Identity, Controller and Node)")
    p.add_argument(
        "--endpoint",
        default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT),
        help="unix:///path/csi.sock (default: $CSI_ENDPOINT or %(default)s)",
    )
    p.add_argument(
        "--node-id",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="this node's id (default: $NODE_NAME or the host name)",
    )
    p.add_argument(
        "--store",
        default=os.environ.get("FUSEDRIVE_STORE", "/var/lib/fusedrive"),
        help="the store directory (default: $FUSEDRIVE_STORE or %(default)s)",
    )
    p.add_argument("--state-dir", default=None, help="node state directory (default: <store>-node)")
    p.add_argument("--driver-name", default=None, help="CSI driver name")
    p.add_argument(
        "--metrics-address",
        default=None,
        help="serve Prometheus metrics on HOST:PORT (off by default)",
    )
    p.add_argument("--socket-group", default=None, help="group allowed on the socket (0660)")
    p.add_argument("--max-volumes-per-node", type=int, default=0)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--allowed-path-prefix",
        action="append",
        default=[],
        metavar="DIR",
        help="staging and target paths must lie below DIR (kubelet's root directory, "
        "e.g. /var/lib/kubelet); repeatable; others are INVALID_ARGUMENT",
    )
    p.add_argument(
        "--heal-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long after a volume's FUSE daemon dies before remounting it",
    )


def _call_parser(sub: Any) -> None:
    p = sub.add_parser("call", help="call one RPC and print the response as JSON")
    p.add_argument("method", help="RPC name, e.g. CreateVolume, NodeStageVolume, Probe")
    p.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT))
    p.add_argument("--json", dest="body", default=None, help="the request as a JSON object")
    p.add_argument("--name")
    p.add_argument("--size", help="capacity_range.required_bytes, e.g. 1GiB")
    p.add_argument("--volume-id")
    p.add_argument("--snapshot-id")
    p.add_argument("--source-volume-id")
    p.add_argument("--from-snapshot", help="CreateVolume content source: snapshot id")
    p.add_argument("--from-volume", help="CreateVolume content source: volume id")
    p.add_argument("--staging-path")
    p.add_argument("--target-path")
    p.add_argument("--block", action="store_true", help="block access type (default: mount)")
    p.add_argument("--readonly", action="store_true")
    p.add_argument("--access-mode", default="SINGLE_NODE_WRITER")


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    parser = argparse.ArgumentParser(prog="fusedrive-csi", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _call_parser(sub)
    a = parser.parse_args(argv)
    return serve(a) if a.command == "serve" else call(a)


if __name__ == "__main__":
    sys.exit(main())
