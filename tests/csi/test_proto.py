"""The CSI wire contract in csi_frontend/proto: generated code is current, wire facts hold.

The generated modules are checked in, so they must be exactly what scripts/gen-proto
makes from csi.proto today. The wire facts (service and RPC names, field numbers and
types, enum values, option extensions) are what kubelet and the sidecars depend on;
they are checked against CSI v1.12.0 as written in the spec and in
/work/shared/CSI-FACTS.md, through the descriptors protoc produced.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from csi_frontend.proto import csi_pb2, csi_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "csi_frontend" / "proto"
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")
FILE = csi_pb2.DESCRIPTOR


# --- (a) checked-in generated code is current --------------------------------------------


def test_generated_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        [str(REPO / "scripts" / "gen-proto"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"scripts/gen-proto failed:\n{result.stderr}"
    for name in GENERATED:
        fresh = (tmp_path / "csi_frontend" / "proto" / name).read_bytes()
        checked_in = (PROTO_DIR / name).read_bytes()
        assert fresh == checked_in, f"{name} is stale: run `make proto` and commit the result"


def test_grpc_module_imports_the_messages_package_relative() -> None:
    # A bare `import csi_pb2` would only work with csi_frontend/proto on sys.path.
    source = (PROTO_DIR / "csi_pb2_grpc.py").read_text()
    assert "from csi_frontend.proto import csi_pb2" in source
    assert csi_pb2_grpc.csi__frontend_dot_proto_dot_csi__pb2 is csi_pb2


def test_package_is_csi_v1() -> None:
    assert FILE.package == "csi.v1"
    assert FILE.name == "csi_frontend/proto/csi.proto"
    assert FILE.message_types_by_name["Volume"].full_name == "csi.v1.Volume"


# --- (b) services and RPCs -----------------------------------------------------------------

SERVICES = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [
        "CreateVolume",
        "DeleteVolume",
        "ControllerPublishVolume",
        "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities",
        "ListVolumes",
        "GetCapacity",
        "ControllerGetCapabilities",
        "CreateSnapshot",
        "DeleteSnapshot",
        "ListSnapshots",
        "GetSnapshot",
        "ControllerExpandVolume",
        "ControllerGetVolume",
        "ControllerModifyVolume",
    ],
    "GroupController": [
        "GroupControllerGetCapabilities",
        "CreateVolumeGroupSnapshot",
        "DeleteVolumeGroupSnapshot",
        "GetVolumeGroupSnapshot",
    ],
    "SnapshotMetadata": ["GetMetadataAllocated", "GetMetadataDelta"],
    "Node": [
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    ],
}


def test_exactly_the_spec_services_exist() -> None:
    assert set(FILE.services_by_name) == set(SERVICES)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_rpcs_and_their_message_types(service: str) -> None:
    desc = FILE.services_by_name[service]
    assert desc.full_name == f"csi.v1.{service}"
    assert sorted(m.name for m in desc.methods) == sorted(SERVICES[service])
    for method in desc.methods:
        assert method.input_type.full_name == f"csi.v1.{method.name}Request"
        assert method.output_type.full_name == f"csi.v1.{method.name}Response"
        assert not method.client_streaming
        # Only the changed-block-tracking RPCs stream (server side).
        assert method.server_streaming == (service == "SnapshotMetadata")


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_grpc_module_exposes_stub_servicer_and_registration(service: str) -> None:
    assert hasattr(csi_pb2_grpc, f"{service}Stub")
    servicer = getattr(csi_pb2_grpc, f"{service}Servicer")
    for rpc in SERVICES[service]:
        assert callable(getattr(servicer, rpc))
    assert callable(getattr(csi_pb2_grpc, f"add_{service}Servicer_to_server"))


# --- (b) fields: number and type ----------------------------------------------------------

_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_BYTES: "bytes",
}


def _kind(field: FieldDescriptor) -> str:
    """Spell a field's wire type the way the .proto does, e.g. `repeated csi.v1.Topology`."""
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        key, value = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        return f"map<{_kind(key)}, {_kind(value)}>"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        base = field.message_type.full_name
    elif field.type == FieldDescriptor.TYPE_ENUM:
        base = field.enum_type.full_name
    else:
        base = _SCALARS[field.type]
    return f"repeated {base}" if field.is_repeated else base


def _message(full_name: str) -> Descriptor:
    parts = full_name.split(".")
    desc = FILE.message_types_by_name[parts[0]]
    for nested in parts[1:]:
        desc = desc.nested_types_by_name[nested]
    return desc


SS = "map<string, string>"
V1 = "csi.v1."
FIELDS: dict[str, dict[str, tuple[int, str]]] = {
    "CreateVolumeRequest": {
        "name": (1, "string"),
        "capacity_range": (2, V1 + "CapacityRange"),
        "volume_capabilities": (3, "repeated " + V1 + "VolumeCapability"),
        "parameters": (4, SS),
        "secrets": (5, SS),
        "volume_content_source": (6, V1 + "VolumeContentSource"),
        "accessibility_requirements": (7, V1 + "TopologyRequirement"),
        "mutable_parameters": (8, SS),
    },
    "CreateVolumeResponse": {"volume": (1, V1 + "Volume")},
    "Volume": {
        "capacity_bytes": (1, "int64"),
        "volume_id": (2, "string"),
        "volume_context": (3, SS),
        "content_source": (4, V1 + "VolumeContentSource"),
        "accessible_topology": (5, "repeated " + V1 + "Topology"),
    },
    "CapacityRange": {"required_bytes": (1, "int64"), "limit_bytes": (2, "int64")},
    "VolumeContentSource": {
        "snapshot": (1, V1 + "VolumeContentSource.SnapshotSource"),
        "volume": (2, V1 + "VolumeContentSource.VolumeSource"),
    },
    "VolumeContentSource.SnapshotSource": {"snapshot_id": (1, "string")},
    "VolumeContentSource.VolumeSource": {"volume_id": (1, "string")},
    "TopologyRequirement": {
        "requisite": (1, "repeated " + V1 + "Topology"),
        "preferred": (2, "repeated " + V1 + "Topology"),
    },
    "Topology": {"segments": (1, SS)},
    "VolumeCapability": {
        "block": (1, V1 + "VolumeCapability.BlockVolume"),
        "mount": (2, V1 + "VolumeCapability.MountVolume"),
        "access_mode": (3, V1 + "VolumeCapability.AccessMode"),
    },
    "VolumeCapability.MountVolume": {
        "fs_type": (1, "string"),
        "mount_flags": (2, "repeated string"),
        "volume_mount_group": (3, "string"),
    },
    "VolumeCapability.AccessMode": {"mode": (1, V1 + "VolumeCapability.AccessMode.Mode")},
    "DeleteVolumeRequest": {"volume_id": (1, "string"), "secrets": (2, SS)},
    "ControllerPublishVolumeRequest": {
        "volume_id": (1, "string"),
        "node_id": (2, "string"),
        "volume_capability": (3, V1 + "VolumeCapability"),
        "readonly": (4, "bool"),
        "secrets": (5, SS),
        "volume_context": (6, SS),
    },
    "ValidateVolumeCapabilitiesRequest": {
        "volume_id": (1, "string"),
        "volume_context": (2, SS),
        "volume_capabilities": (3, "repeated " + V1 + "VolumeCapability"),
        "parameters": (4, SS),
        "secrets": (5, SS),
        "mutable_parameters": (6, SS),
    },
    "ListVolumesRequest": {"max_entries": (1, "int32"), "starting_token": (2, "string")},
    "ListVolumesResponse": {
        "entries": (1, "repeated " + V1 + "ListVolumesResponse.Entry"),
        "next_token": (2, "string"),
    },
    "ControllerModifyVolumeRequest": {
        "volume_id": (1, "string"),
        "secrets": (2, SS),
        "mutable_parameters": (3, SS),
    },
    "GetCapacityRequest": {
        "volume_capabilities": (1, "repeated " + V1 + "VolumeCapability"),
        "parameters": (2, SS),
        "accessible_topology": (3, V1 + "Topology"),
    },
    "GetCapacityResponse": {
        "available_capacity": (1, "int64"),
        "maximum_volume_size": (2, "google.protobuf.Int64Value"),
        "minimum_volume_size": (3, "google.protobuf.Int64Value"),
    },
    "CreateSnapshotRequest": {
        "source_volume_id": (1, "string"),
        "name": (2, "string"),
        "secrets": (3, SS),
        "parameters": (4, SS),
    },
    "CreateSnapshotResponse": {"snapshot": (1, V1 + "Snapshot")},
    "Snapshot": {
        "size_bytes": (1, "int64"),
        "snapshot_id": (2, "string"),
        "source_volume_id": (3, "string"),
        "creation_time": (4, "google.protobuf.Timestamp"),
        "ready_to_use": (5, "bool"),
        "group_snapshot_id": (6, "string"),
    },
    "ListSnapshotsRequest": {
        "max_entries": (1, "int32"),
        "starting_token": (2, "string"),
        "source_volume_id": (3, "string"),
        "snapshot_id": (4, "string"),
        "secrets": (5, SS),
    },
    "ControllerExpandVolumeRequest": {
        "volume_id": (1, "string"),
        "capacity_range": (2, V1 + "CapacityRange"),
        "secrets": (3, SS),
        "volume_capability": (4, V1 + "VolumeCapability"),
    },
    "ControllerExpandVolumeResponse": {
        "capacity_bytes": (1, "int64"),
        "node_expansion_required": (2, "bool"),
    },
    "NodeStageVolumeRequest": {
        "volume_id": (1, "string"),
        "publish_context": (2, SS),
        "staging_target_path": (3, "string"),
        "volume_capability": (4, V1 + "VolumeCapability"),
        "secrets": (5, SS),
        "volume_context": (6, SS),
    },
    "NodePublishVolumeRequest": {
        "volume_id": (1, "string"),
        "publish_context": (2, SS),
        "staging_target_path": (3, "string"),
        "target_path": (4, "string"),
        "volume_capability": (5, V1 + "VolumeCapability"),
        "readonly": (6, "bool"),
        "secrets": (7, SS),
        "volume_context": (8, SS),
    },
    "NodeUnpublishVolumeRequest": {"volume_id": (1, "string"), "target_path": (2, "string")},
    "NodeGetVolumeStatsRequest": {
        "volume_id": (1, "string"),
        "volume_path": (2, "string"),
        "staging_target_path": (3, "string"),
    },
    "NodeGetVolumeStatsResponse": {
        "usage": (1, "repeated " + V1 + "VolumeUsage"),
        "volume_condition": (2, V1 + "VolumeCondition"),
    },
    "VolumeUsage": {
        "available": (1, "int64"),
        "total": (2, "int64"),
        "used": (3, "int64"),
        "unit": (4, V1 + "VolumeUsage.Unit"),
    },
    "NodeExpandVolumeRequest": {
        "volume_id": (1, "string"),
        "volume_path": (2, "string"),
        "capacity_range": (3, V1 + "CapacityRange"),
        "staging_target_path": (4, "string"),
        "volume_capability": (5, V1 + "VolumeCapability"),
        "secrets": (6, SS),
    },
    "NodeGetInfoResponse": {
        "node_id": (1, "string"),
        "max_volumes_per_node": (2, "int64"),
        "accessible_topology": (3, V1 + "Topology"),
    },
    "PluginCapability": {
        "service": (1, V1 + "PluginCapability.Service"),
        "volume_expansion": (2, V1 + "PluginCapability.VolumeExpansion"),
    },
    "ProbeResponse": {"ready": (1, "google.protobuf.BoolValue")},
    "GetPluginInfoResponse": {
        "name": (1, "string"),
        "vendor_version": (2, "string"),
        "manifest": (3, SS),
    },
    "VolumeGroupSnapshot": {
        "group_snapshot_id": (1, "string"),
        "snapshots": (2, "repeated " + V1 + "Snapshot"),
        "creation_time": (3, "google.protobuf.Timestamp"),
        "ready_to_use": (4, "bool"),
    },
    "GetMetadataDeltaRequest": {
        "base_snapshot_id": (1, "string"),
        "target_snapshot_id": (2, "string"),
        "starting_offset": (3, "int64"),
        "max_results": (4, "int32"),
        "secrets": (5, SS),
    },
    "GetMetadataAllocatedResponse": {
        "block_metadata_type": (1, V1 + "BlockMetadataType"),
        "volume_capacity_bytes": (2, "int64"),
        "block_metadata": (3, "repeated " + V1 + "BlockMetadata"),
    },
}


@pytest.mark.parametrize("message", sorted(FIELDS))
def test_message_fields_have_the_spec_numbers_and_types(message: str) -> None:
    desc = _message(message)
    actual = {f.name: (f.number, _kind(f)) for f in desc.fields}
    # Exact equality: a missing, extra or renumbered field is a wire break.
    assert actual == FIELDS[message]


@pytest.mark.parametrize(
    ("message", "oneof", "members"),
    [
        ("VolumeCapability", "access_type", ["block", "mount"]),
        ("VolumeContentSource", "type", ["snapshot", "volume"]),
        ("PluginCapability", "type", ["service", "volume_expansion"]),
        ("ControllerServiceCapability", "type", ["rpc"]),
        ("NodeServiceCapability", "type", ["rpc"]),
        ("GroupControllerServiceCapability", "type", ["rpc"]),
    ],
)
def test_oneofs(message: str, oneof: str, members: list[str]) -> None:
    desc = _message(message)
    assert [f.name for f in desc.oneofs_by_name[oneof].fields] == members


def test_access_type_oneof_is_exclusive_on_the_wire() -> None:
    cap = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume())
    cap.mount.fs_type = "ext4"
    assert cap.WhichOneof("access_type") == "mount"
    assert not cap.HasField("block")


def test_field_numbers_on_the_wire() -> None:
    # Tag byte = (field number << 3) | wire type; proves the numbers, not just the descriptor.
    assert csi_pb2.Volume(capacity_bytes=1).SerializeToString() == b"\x08\x01"
    assert csi_pb2.Volume(volume_id="v").SerializeToString() == b"\x12\x01v"
    req = csi_pb2.NodePublishVolumeRequest(target_path="/t", readonly=True)
    assert req.SerializeToString() == b"\x22\x02/t\x30\x01"
    snap = csi_pb2.Snapshot(ready_to_use=True)
    assert snap.SerializeToString() == b"\x28\x01"


# --- (b) enums -------------------------------------------------------------------------------


def _enum_values(enum_type: object) -> dict[str, int]:
    return {v.name: v.number for v in enum_type.DESCRIPTOR.values}  # type: ignore[attr-defined]


ENUMS: dict[str, tuple[object, dict[str, int]]] = {
    "ControllerServiceCapability.RPC.Type": (
        csi_pb2.ControllerServiceCapability.RPC.Type,
        {
            "UNKNOWN": 0,
            "CREATE_DELETE_VOLUME": 1,
            "PUBLISH_UNPUBLISH_VOLUME": 2,
            "LIST_VOLUMES": 3,
            "GET_CAPACITY": 4,
            "CREATE_DELETE_SNAPSHOT": 5,
            "LIST_SNAPSHOTS": 6,
            "CLONE_VOLUME": 7,
            "PUBLISH_READONLY": 8,
            "EXPAND_VOLUME": 9,
            "LIST_VOLUMES_PUBLISHED_NODES": 10,
            "VOLUME_CONDITION": 11,
            "GET_VOLUME": 12,
            "SINGLE_NODE_MULTI_WRITER": 13,
            "MODIFY_VOLUME": 14,
            "GET_SNAPSHOT": 15,
        },
    ),
    "NodeServiceCapability.RPC.Type": (
        csi_pb2.NodeServiceCapability.RPC.Type,
        {
            "UNKNOWN": 0,
            "STAGE_UNSTAGE_VOLUME": 1,
            "GET_VOLUME_STATS": 2,
            "EXPAND_VOLUME": 3,
            "VOLUME_CONDITION": 4,
            "SINGLE_NODE_MULTI_WRITER": 5,
            "VOLUME_MOUNT_GROUP": 6,
        },
    ),
    "GroupControllerServiceCapability.RPC.Type": (
        csi_pb2.GroupControllerServiceCapability.RPC.Type,
        {"UNKNOWN": 0, "CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT": 1},
    ),
    "PluginCapability.Service.Type": (
        csi_pb2.PluginCapability.Service.Type,
        {
            "UNKNOWN": 0,
            "CONTROLLER_SERVICE": 1,
            "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
            "GROUP_CONTROLLER_SERVICE": 3,
            "SNAPSHOT_METADATA_SERVICE": 4,
        },
    ),
    "PluginCapability.VolumeExpansion.Type": (
        csi_pb2.PluginCapability.VolumeExpansion.Type,
        {"UNKNOWN": 0, "ONLINE": 1, "OFFLINE": 2},
    ),
    "VolumeCapability.AccessMode.Mode": (
        csi_pb2.VolumeCapability.AccessMode.Mode,
        {
            "UNKNOWN": 0,
            "SINGLE_NODE_WRITER": 1,
            "SINGLE_NODE_READER_ONLY": 2,
            "MULTI_NODE_READER_ONLY": 3,
            "MULTI_NODE_SINGLE_WRITER": 4,
            "MULTI_NODE_MULTI_WRITER": 5,
            "SINGLE_NODE_SINGLE_WRITER": 6,
            "SINGLE_NODE_MULTI_WRITER": 7,
        },
    ),
    "VolumeUsage.Unit": (csi_pb2.VolumeUsage.Unit, {"UNKNOWN": 0, "BYTES": 1, "INODES": 2}),
    "BlockMetadataType": (
        csi_pb2.BlockMetadataType,
        {"UNKNOWN": 0, "FIXED_LENGTH": 1, "VARIABLE_LENGTH": 2},
    ),
}


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enum_values(name: str) -> None:
    enum_type, expected = ENUMS[name]
    assert _enum_values(enum_type) == expected


# --- (b) custom options ----------------------------------------------------------------------


def test_option_extensions_use_the_spec_numbers() -> None:
    expected = {
        "csi_secret": ("google.protobuf.FieldOptions", 1059),
        "alpha_field": ("google.protobuf.FieldOptions", 1060),
        "alpha_enum": ("google.protobuf.EnumOptions", 1060),
        "alpha_enum_value": ("google.protobuf.EnumValueOptions", 1060),
        "alpha_message": ("google.protobuf.MessageOptions", 1060),
        "alpha_method": ("google.protobuf.MethodOptions", 1060),
        "alpha_service": ("google.protobuf.ServiceOptions", 1060),
    }
    actual = {
        name: (ext.containing_type.full_name, ext.number)
        for name, ext in FILE.extensions_by_name.items()
    }
    assert actual == expected


def _all_messages() -> list[Descriptor]:
    found: list[Descriptor] = []
    stack = list(FILE.message_types_by_name.values())
    while stack:
        desc = stack.pop()
        found.append(desc)
        stack.extend(desc.nested_types)
    return found


SECRET_BEARERS = {
    "CreateVolumeRequest",
    "DeleteVolumeRequest",
    "ControllerPublishVolumeRequest",
    "ControllerUnpublishVolumeRequest",
    "ValidateVolumeCapabilitiesRequest",
    "ControllerModifyVolumeRequest",
    "CreateSnapshotRequest",
    "DeleteSnapshotRequest",
    "ListSnapshotsRequest",
    "GetSnapshotRequest",
    "ControllerExpandVolumeRequest",
    "CreateVolumeGroupSnapshotRequest",
    "DeleteVolumeGroupSnapshotRequest",
    "GetVolumeGroupSnapshotRequest",
    "GetMetadataAllocatedRequest",
    "GetMetadataDeltaRequest",
    "NodeStageVolumeRequest",
    "NodePublishVolumeRequest",
    "NodeExpandVolumeRequest",
}


def test_every_secrets_field_is_marked_csi_secret_and_nothing_else_is() -> None:
    marked: set[str] = set()
    with_secrets: set[str] = set()
    for desc in _all_messages():
        for field in desc.fields:
            if field.GetOptions().Extensions[csi_pb2.csi_secret]:
                marked.add(f"{desc.name}.{field.name}")
            if field.name == "secrets":
                with_secrets.add(desc.name)
                assert _kind(field) == SS, desc.name
    assert with_secrets == SECRET_BEARERS
    assert marked == {f"{name}.secrets" for name in SECRET_BEARERS}


def test_alpha_markings_follow_v1_12() -> None:
    controller = FILE.services_by_name["Controller"].methods_by_name
    alpha_methods = {
        name for name, m in controller.items() if m.GetOptions().Extensions[csi_pb2.alpha_method]
    }
    # ControllerModifyVolume went GA in v1.12.0.
    assert alpha_methods == {"GetSnapshot", "ControllerGetVolume"}

    services = FILE.services_by_name
    alpha_services = {
        n for n, s in services.items() if s.GetOptions().Extensions[csi_pb2.alpha_service]
    }
    assert alpha_services == {"SnapshotMetadata"}

    rpc_type = csi_pb2.ControllerServiceCapability.RPC.Type.DESCRIPTOR
    alpha_values = {
        v.name for v in rpc_type.values if v.GetOptions().Extensions[csi_pb2.alpha_enum_value]
    }
    assert alpha_values == {
        "VOLUME_CONDITION",
        "GET_VOLUME",
        "SINGLE_NODE_MULTI_WRITER",
        "GET_SNAPSHOT",
    }

    for message in ("VolumeCondition", "GetSnapshotRequest", "ControllerGetVolumeResponse"):
        assert _message(message).GetOptions().Extensions[csi_pb2.alpha_message], message
    assert (
        not _message("ControllerModifyVolumeRequest").GetOptions().Extensions[csi_pb2.alpha_message]
    )
    minimum = _message("GetCapacityResponse").fields_by_name["minimum_volume_size"]
    assert minimum.GetOptions().Extensions[csi_pb2.alpha_field]
