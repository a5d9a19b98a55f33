"""A CSI client over a unix socket, used by the demo, the tests and ``call``.

``CsiClient.call("CreateVolume", {...})`` finds the service that owns the RPC,
builds the request from a dict (protobuf JSON names) and returns the response
message; failures raise ``grpc.RpcError`` with the server's code and message.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from .proto import csi_pb2, csi_pb2_grpc

SERVICES = {
    "Identity": csi_pb2_grpc.IdentityStub,
    "Controller": csi_pb2_grpc.ControllerStub,
    "GroupController": csi_pb2_grpc.GroupControllerStub,
    "Node": csi_pb2_grpc.NodeStub,
}


def rpc_index() -> dict[str, tuple[str, Any, Any]]:
    """RPC name -> (service name, request class, response class)."""
    out = {}
    for svc in csi_pb2.DESCRIPTOR.services_by_name.values():
        if svc.name not in SERVICES:
            continue
        for m in svc.methods:
            req = getattr(csi_pb2, m.input_type.name)
            resp = getattr(csi_pb2, m.output_type.name)
            out[m.name] = (svc.name, req, resp)
    return out


def mount_capability(mode: str = "SINGLE_NODE_WRITER") -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())
    cap.access_mode.mode = csi_pb2.VolumeCapability.AccessMode.Mode.Value(mode)
    return cap


def block_capability(mode: str = "SINGLE_NODE_WRITER") -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume())
    cap.access_mode.mode = csi_pb2.VolumeCapability.AccessMode.Mode.Value(mode)
    return cap


class CsiClient:
    def __init__(self, endpoint: str, timeout: float = 120.0) -> None:
        target = endpoint if endpoint.startswith("unix:") else f"unix://{endpoint}"
        self.channel = grpc.insecure_channel(target)
        self.timeout = timeout
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.group_controller = csi_pb2_grpc.GroupControllerStub(self.channel)
        self._index = rpc_index()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CsiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def call(self, method: str, request: dict[str, Any] | Message | None = None) -> Any:
        if method not in self._index:
            raise KeyError(f"unknown RPC {method!r}; known: {', '.join(sorted(self._index))}")
        service, req_cls, _ = self._index[method]
        if request is None:
            request = req_cls()
        elif isinstance(request, dict):
            request = json_format.ParseDict(request, req_cls())
        stub = {
            "Identity": self.identity,
            "Controller": self.controller,
            "GroupController": self.group_controller,
            "Node": self.node,
        }
        return getattr(stub[service], method)(request, timeout=self.timeout)


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
