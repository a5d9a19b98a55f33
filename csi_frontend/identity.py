"""The CSI Identity service: who we are, what we offer, whether we are healthy."""

from __future__ import annotations

import grpc

from .errors import CsiError
from .plugin import VERSION, Plugin
from .proto import csi_pb2, csi_pb2_grpc

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion


class Identity(csi_pb2_grpc.IdentityServicer):
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    def GetPluginInfo(
        self, req: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(
            name=self.plugin.config.driver_name, vendor_version=VERSION
        )

    def GetPluginCapabilities(
        self, req: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        resp = csi_pb2.GetPluginCapabilitiesResponse()
        for svc in (
            Service.CONTROLLER_SERVICE,
            Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
            Service.GROUP_CONTROLLER_SERVICE,  # group_controller.py
        ):
            resp.capabilities.add().service.type = svc
        resp.capabilities.add().volume_expansion.type = Expansion.ONLINE
        return resp

    def Probe(
        self, req: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        try:
            self.plugin.store.stats()
        except Exception as exc:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, f"store unusable: {exc}") from exc
        resp = csi_pb2.ProbeResponse()
        resp.ready.value = True
        return resp
