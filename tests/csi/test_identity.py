"""CSI Identity service conformance, through real gRPC on the plugin's unix socket.

Spec (v1.12, Identity): GetPluginInfo names the plugin in domain notation of at most 63
characters with a vendor version; GetPluginCapabilities lists what the plugin offers;
Probe answers ready when the plugin can serve.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from csi_frontend.proto import csi_pb2 as pb

if TYPE_CHECKING:
    from conftest import Csi

Service = pb.PluginCapability.Service
Expansion = pb.PluginCapability.VolumeExpansion
# The spec's wording: "domain name notation", at most 63 characters, starting and ending
# with an alphanumeric character, with dashes, dots and alphanumerics between.
DRIVER_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$", re.IGNORECASE)


def test_get_plugin_info_names_the_driver_within_63_chars_with_a_version(csi: Csi) -> None:
    info = csi.call("GetPluginInfo")
    assert info.name == "csi.fusedrive.io"
    assert len(info.name) <= 63
    assert DRIVER_NAME.match(info.name), info.name
    assert info.vendor_version


def test_get_plugin_capabilities_offers_controller_topology_and_online_expansion(
    csi: Csi,
) -> None:
    caps = csi.call("GetPluginCapabilities").capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    expansion = {c.volume_expansion.type for c in caps if c.HasField("volume_expansion")}
    assert Service.CONTROLLER_SERVICE in services
    assert Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in services
    assert expansion == {Expansion.ONLINE}


def test_probe_is_ready(csi: Csi) -> None:
    resp = csi.call("Probe")
    assert resp.HasField("ready")
    assert resp.ready.value is True


def test_identity_answers_are_the_same_twice(csi: Csi) -> None:
    assert csi.call("GetPluginInfo") == csi.call("GetPluginInfo")
    assert csi.call("GetPluginCapabilities") == csi.call("GetPluginCapabilities")
