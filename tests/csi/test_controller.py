"""CSI Controller service conformance, one test per normative behaviour of the spec (v1.12).

Every call goes through real gRPC on the plugin's unix socket to the real plugin process
and its real store. Where a test needs to see inside the store (that a clone copied
nothing, that a parameter was applied) it opens the same store directory with blockstore,
as a second process of the shared LMDB environment would.

Every error is checked by ``Csi.error``: the status code the spec names, a non-empty
message, and no ``grpc-status-details-bin`` (the spec: status.details MUST be empty).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from blockstore import Store
from blockstore.catalog import check_name
from csi_frontend.errors import CsiError
from csi_frontend.plugin import TOPOLOGY_KEY, Config, Plugin
from csi_frontend.proto import csi_pb2 as pb

if TYPE_CHECKING:
    from conftest import Csi

Code = grpc.StatusCode
RPC = pb.ControllerServiceCapability.RPC
MiB = 1 << 20
ESCAPING_IDS = ("../x", "a/b", ".hidden", "../../etc/passwd", "x/../../y")


def open_store(csi: Csi) -> contextlib.AbstractContextManager[Store]:
    """The plugin's store, opened by this test process (LMDB is multi-process)."""
    return csi.open_store()


def fill(csi: Csi, volume_id: str, chunks: int = 8) -> dict[bytes, bytes]:
    """Write ``chunks`` distinct chunks into a volume through the store; returns them."""
    data = {f"blk{i:04d}".encode(): bytes([i % 251 + 1]) * 4096 + bytes(i) for i in range(chunks)}
    with open_store(csi) as store:
        view = store.volume(volume_id)
        for key, value in data.items():
            view.put_chunk(key, value)
    return data


def tree(base: Path) -> set[str]:
    """Every path below ``base`` except the store's own files, relative to ``base``."""
    return {
        str(p.relative_to(base))
        for p in base.rglob("*")
        if not str(p.relative_to(base)).startswith(("store/", "t/"))
        and p.name not in ("plugin.log",)
    }


# -- CreateVolume ---------------------------------------------------------------------------


def test_create_volume_without_name_is_invalid(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(volume_capabilities=[csi.mount_cap()])
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


def test_create_volume_without_capabilities_is_invalid(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(name=csi.unique("nocaps"))
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


@pytest.mark.parametrize("mode", ["MULTI_NODE_MULTI_WRITER", "MULTI_NODE_SINGLE_WRITER"])
def test_create_volume_with_a_multi_node_writer_mode_is_invalid(csi: Csi, mode: str) -> None:
    name = csi.unique("multi")
    req = pb.CreateVolumeRequest(name=name, volume_capabilities=[csi.mount_cap(mode)])
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)
    csi.error("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=name), Code.NOT_FOUND)


def test_create_volume_with_capability_without_access_mode_is_invalid(csi: Csi) -> None:
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume())
    req = pb.CreateVolumeRequest(name=csi.unique("nomode"), volume_capabilities=[cap])
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


def test_create_volume_mount_and_block_together_is_invalid(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("both"), volume_capabilities=[csi.mount_cap(), csi.block_cap()]
    )
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


def test_create_volume_twice_with_the_same_arguments_returns_the_same_volume(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("twice"),
        volume_capabilities=[csi.mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=32 * MiB),
        parameters={"compression_level": "3", "csi.storage.k8s.io/pvc/name": "data"},
    )
    first = csi.call("CreateVolume", req).volume
    second = csi.call("CreateVolume", req).volume
    assert first.volume_id == second.volume_id
    assert first.capacity_bytes == second.capacity_bytes == 32 * MiB
    assert first.volume_context == second.volume_context
    assert len(csi.call("ListVolumes").entries) == len(
        {e.volume.volume_id for e in csi.call("ListVolumes").entries}
    )


def test_create_volume_same_name_other_capacity_already_exists(csi: Csi) -> None:
    name = csi.unique("cap")
    csi.create_volume(size=32 * MiB, name=name)
    req = pb.CreateVolumeRequest(
        name=name,
        volume_capabilities=[csi.mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=64 * MiB, limit_bytes=64 * MiB),
    )
    csi.error("CreateVolume", req, Code.ALREADY_EXISTS)


def test_create_volume_same_name_other_access_type_already_exists(csi: Csi) -> None:
    name = csi.unique("kind")
    csi.create_volume(size=32 * MiB, name=name)
    req = pb.CreateVolumeRequest(
        name=name,
        volume_capabilities=[csi.block_cap()],
        capacity_range=pb.CapacityRange(required_bytes=32 * MiB),
    )
    csi.error("CreateVolume", req, Code.ALREADY_EXISTS)


def test_create_volume_limit_below_required_is_invalid(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("range"),
        volume_capabilities=[csi.mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=64 * MiB, limit_bytes=32 * MiB),
    )
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


@pytest.mark.parametrize(
    ("required", "limit"),
    [(32 * MiB, 0), (32 * MiB + 1, 0), (10 * MiB + 123, 11 * MiB), (16 * MiB, 16 * MiB)],
)
def test_create_volume_capacity_honours_the_range(csi: Csi, required: int, limit: int) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("range"),
        volume_capabilities=[csi.mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=required, limit_bytes=limit),
    )
    vol = csi.call("CreateVolume", req).volume
    assert vol.capacity_bytes >= required
    if limit:
        assert vol.capacity_bytes <= limit
    got = csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == vol.capacity_bytes


def test_create_volume_limit_only_is_honoured(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("limit"),
        volume_capabilities=[csi.mount_cap()],
        capacity_range=pb.CapacityRange(limit_bytes=8 * MiB),
    )
    vol = csi.call("CreateVolume", req).volume
    assert 0 < vol.capacity_bytes <= 8 * MiB


def test_create_volume_reports_topology_naming_this_node(csi: Csi) -> None:
    vol = csi.create_volume()
    assert [dict(t.segments) for t in vol.accessible_topology] == [{TOPOLOGY_KEY: "test-node"}]


def test_create_volume_with_requisite_topology_of_this_node_succeeds(csi: Csi) -> None:
    ours = pb.Topology(segments={TOPOLOGY_KEY: "test-node"})
    other = pb.Topology(segments={TOPOLOGY_KEY: "elsewhere"})
    req = pb.CreateVolumeRequest(
        name=csi.unique("topo"),
        volume_capabilities=[csi.mount_cap()],
        accessibility_requirements=pb.TopologyRequirement(
            requisite=[other, ours], preferred=[ours]
        ),
    )
    vol = csi.call("CreateVolume", req).volume
    assert dict(vol.accessible_topology[0].segments) == {TOPOLOGY_KEY: "test-node"}


def test_create_volume_with_requisite_topology_excluding_this_node_is_exhausted(
    csi: Csi,
) -> None:
    name = csi.unique("topo")
    req = pb.CreateVolumeRequest(
        name=name,
        volume_capabilities=[csi.mount_cap()],
        accessibility_requirements=pb.TopologyRequirement(
            requisite=[pb.Topology(segments={TOPOLOGY_KEY: "other-node"})]
        ),
    )
    csi.error("CreateVolume", req, Code.RESOURCE_EXHAUSTED)
    csi.error("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=name), Code.NOT_FOUND)


def test_create_volume_with_unknown_parameter_is_invalid(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("param"),
        volume_capabilities=[csi.mount_cap()],
        parameters={"no_such_parameter": "1"},
    )
    err = csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)
    assert "no_such_parameter" in err.details()


@pytest.mark.parametrize(
    "params", [{"compression_level": "99"}, {"chunk_size": "1000"}, {"chunk_size": "x"}]
)
def test_create_volume_with_bad_parameter_value_is_invalid(
    csi: Csi, params: dict[str, str]
) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("param"), volume_capabilities=[csi.mount_cap()], parameters=params
    )
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


@pytest.mark.parametrize(
    "params", [{"compression_level": "23"}, {"chunk_size": "12288"}, {"chunksize": "4096"}]
)
def test_create_volume_bad_parameter_message_is_the_shared_rule(
    csi: Csi, params: dict[str, str]
) -> None:
    """CSI, the command line and the daemon say the same thing (fusedrive.parameters)."""
    from fusedrive import parameters

    with pytest.raises(parameters.ParameterError) as expected:
        parameters.check(params)
    req = pb.CreateVolumeRequest(
        name=csi.unique("param"), volume_capabilities=[csi.mount_cap()], parameters=params
    )
    err = csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)
    assert err.details() == str(expected.value)


def test_create_volume_stores_parameters_in_canonical_form(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("param"),
        volume_capabilities=[csi.mount_cap()],
        parameters={"chunk_size": "128KiB", "root_mode": "700"},
    )
    vol = csi.call("CreateVolume", req).volume
    assert csi.call("CreateVolume", req).volume == vol  # idempotent
    with open_store(csi) as store:
        params = store.get_volume(vol.volume_id).parameters
    assert params == {"chunk_size": "131072", "root_mode": "0700"}


def test_create_volume_ignores_sidecar_parameters_and_applies_its_own(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("param"),
        volume_capabilities=[csi.mount_cap()],
        parameters={
            "csi.storage.k8s.io/pvc/name": "data",
            "csi.storage.k8s.io/pvc/namespace": "default",
            "compression_level": "7",
            "chunk_size": "131072",
        },
    )
    vol = csi.call("CreateVolume", req).volume
    with open_store(csi) as store:
        params = store.get_volume(vol.volume_id).parameters
    assert params == {"compression_level": "7", "chunk_size": "131072"}


def test_create_volume_mutable_parameters_override_parameters(csi: Csi) -> None:
    req = pb.CreateVolumeRequest(
        name=csi.unique("mutable"),
        volume_capabilities=[csi.mount_cap()],
        parameters={"compression_level": "3"},
        mutable_parameters={"compression_level": "11"},
    )
    vol = csi.call("CreateVolume", req).volume
    assert csi.call("CreateVolume", req).volume == vol
    with open_store(csi) as store:
        assert store.get_volume(vol.volume_id).parameters == {"compression_level": "11"}
    # chunk_size cannot change after creation, so it is no mutable parameter
    req.mutable_parameters["chunk_size"] = "8192"
    req.name = csi.unique("mutable")
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


def test_create_volume_name_of_128_bytes_works_and_129_is_invalid(csi: Csi) -> None:
    base = csi.unique("n")
    ok = (base + "x" * 128)[:128]
    vol = csi.create_volume(name=ok)
    assert vol.volume_id
    too_long = (base + "y" * 129)[:129]
    req = pb.CreateVolumeRequest(name=too_long, volume_capabilities=[csi.mount_cap()])
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


def test_create_volume_parameters_over_4_kib_are_invalid(csi: Csi) -> None:
    # Sidecar keys are ignored by meaning, so only the size limit can reject these.
    def params(n: int) -> dict[str, str]:
        return {f"csi.storage.k8s.io/k{i:03d}": "v" * 100 for i in range(n)}

    under = params(30)
    assert sum(len(k) + len(v) for k, v in under.items()) <= 4096
    over = params(40)
    assert sum(len(k) + len(v) for k, v in over.items()) > 4096
    caps = [csi.mount_cap()]
    csi.call(
        "CreateVolume",
        pb.CreateVolumeRequest(name=csi.unique("map"), volume_capabilities=caps, parameters=under),
    )
    req = pb.CreateVolumeRequest(name=csi.unique("map"), volume_capabilities=caps, parameters=over)
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


def test_create_volume_secrets_over_4_kib_are_invalid(csi: Csi) -> None:
    secrets = {f"key{i:03d}": "s" * 120 for i in range(40)}
    req = pb.CreateVolumeRequest(
        name=csi.unique("sec"), volume_capabilities=[csi.mount_cap()], secrets=secrets
    )
    csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


def test_create_volume_name_that_looks_like_a_path_stays_inside_the_store(csi: Csi) -> None:
    before = tree(csi.plugin.base)
    names = ["../escape", "a/b/c", ".hidden", "/abs/path", "pvc-1/../../../x"]
    ids = {}
    for name in names:
        ids[name] = csi.create_volume(name=name).volume_id
    for name, vid in ids.items():
        check_name(vid)  # a store name: no '/', not starting with '.'
        assert "/" not in vid and not vid.startswith(".")
        # the same name maps to the same id: CreateVolume stays idempotent
        assert csi.create_volume(name=name).volume_id == vid
    assert len(set(ids.values())) == len(names)
    assert tree(csi.plugin.base) == before
    assert not Path("/tmp/escape").exists()


# -- content sources: snapshots and clones ---------------------------------------------------


def test_create_volume_from_snapshot_and_volume_copies_nothing(csi: Csi) -> None:
    src = csi.create_volume(size=32 * MiB)
    data = fill(csi, src.volume_id, chunks=32)
    snap = csi.create_snapshot(src.volume_id)
    with open_store(csi) as store:
        before = store.stats()
    from_snap = csi.create_volume(
        size=32 * MiB,
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
    )
    from_vol = csi.create_volume(
        size=32 * MiB,
        volume_content_source=pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id=src.volume_id)
        ),
    )
    assert from_snap.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert from_vol.content_source.volume.volume_id == src.volume_id
    with open_store(csi) as store:
        after = store.stats()
        # O(1): no entry or chunk was copied; each clone added one head layer (the volume
        # clone also froze the source's head: one more).
        assert after.entries == before.entries
        assert after.chunk_count == before.chunk_count
        assert after.stored_bytes == before.stored_bytes
        assert after.layers - before.layers <= 3
        for clone in (from_snap.volume_id, from_vol.volume_id):
            view = store.volume(clone)
            assert {k: view.read_chunk(k) for k in data} == data


def test_clone_may_be_larger_than_its_source(csi: Csi) -> None:
    src = csi.create_volume(size=16 * MiB)
    snap = csi.create_snapshot(src.volume_id)
    for source in (
        pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
        pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=src.volume_id)),
    ):
        vol = csi.create_volume(size=48 * MiB, volume_content_source=source)
        assert vol.capacity_bytes >= 48 * MiB


def test_clone_smaller_than_its_source_within_a_limit_is_out_of_range(csi: Csi) -> None:
    src = csi.create_volume(size=32 * MiB)
    snap = csi.create_snapshot(src.volume_id)
    for source in (
        pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
        pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=src.volume_id)),
    ):
        req = pb.CreateVolumeRequest(
            name=csi.unique("small"),
            volume_capabilities=[csi.mount_cap()],
            capacity_range=pb.CapacityRange(required_bytes=8 * MiB, limit_bytes=8 * MiB),
            volume_content_source=source,
        )
        csi.error("CreateVolume", req, Code.OUT_OF_RANGE)


def test_clone_twice_is_idempotent_and_other_source_already_exists(csi: Csi) -> None:
    src = csi.create_volume(size=16 * MiB)
    snap = csi.create_snapshot(src.volume_id)
    name = csi.unique("clone")
    source = pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
    )
    a = csi.create_volume(size=16 * MiB, name=name, volume_content_source=source)
    b = csi.create_volume(size=16 * MiB, name=name, volume_content_source=source)
    assert a == b
    other = pb.VolumeContentSource(
        volume=pb.VolumeContentSource.VolumeSource(volume_id=src.volume_id)
    )
    req = pb.CreateVolumeRequest(
        name=name,
        volume_capabilities=[csi.mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        volume_content_source=other,
    )
    csi.error("CreateVolume", req, Code.ALREADY_EXISTS)
    plain = pb.CreateVolumeRequest(
        name=name,
        volume_capabilities=[csi.mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
    )
    csi.error("CreateVolume", plain, Code.ALREADY_EXISTS)


@pytest.mark.parametrize("kind", ["snapshot", "volume"])
def test_create_volume_from_missing_source_is_not_found(csi: Csi, kind: str) -> None:
    if kind == "snapshot":
        source = pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=csi.unique("nosnap"))
        )
    else:
        source = pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id=csi.unique("novol"))
        )
    req = pb.CreateVolumeRequest(
        name=csi.unique("orphan"),
        volume_capabilities=[csi.mount_cap()],
        volume_content_source=source,
    )
    csi.error("CreateVolume", req, Code.NOT_FOUND)


def test_create_mount_volume_from_block_source_is_invalid(csi: Csi) -> None:
    src = csi.create_volume(size=16 * MiB, block=True)
    snap = csi.create_snapshot(src.volume_id)
    for source in (
        pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
        pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=src.volume_id)),
    ):
        req = pb.CreateVolumeRequest(
            name=csi.unique("mixed"),
            volume_capabilities=[csi.mount_cap()],
            volume_content_source=source,
        )
        csi.error("CreateVolume", req, Code.INVALID_ARGUMENT)


# -- DeleteVolume ---------------------------------------------------------------------------


def test_delete_volume_without_id_is_invalid(csi: Csi) -> None:
    csi.error("DeleteVolume", pb.DeleteVolumeRequest(), Code.INVALID_ARGUMENT)


def test_delete_unknown_volume_succeeds(csi: Csi) -> None:
    csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=csi.unique("never-was")))


def test_delete_volume_twice_succeeds(csi: Csi) -> None:
    vol = csi.create_volume()
    req = pb.DeleteVolumeRequest(volume_id=vol.volume_id)
    csi.call("DeleteVolume", req)
    csi.error(
        "ControllerGetVolume",
        pb.ControllerGetVolumeRequest(volume_id=vol.volume_id),
        Code.NOT_FOUND,
    )
    csi.call("DeleteVolume", req)


def test_delete_volume_with_snapshots_keeps_the_snapshots_restorable(csi: Csi) -> None:
    src = csi.create_volume(size=16 * MiB)
    data = fill(csi, src.volume_id, chunks=4)
    snap = csi.create_snapshot(src.volume_id)
    csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=src.volume_id))
    got = csi.call("GetSnapshot", pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot
    assert got.ready_to_use
    restored = csi.create_volume(
        size=16 * MiB,
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
    )
    with open_store(csi) as store:
        view = store.volume(restored.volume_id)
        assert {k: view.read_chunk(k) for k in data} == data


# -- ValidateVolumeCapabilities ----------------------------------------------------------------


def test_validate_capabilities_of_unknown_volume_is_not_found(csi: Csi) -> None:
    req = pb.ValidateVolumeCapabilitiesRequest(
        volume_id=csi.unique("ghost"), volume_capabilities=[csi.mount_cap()]
    )
    csi.error("ValidateVolumeCapabilities", req, Code.NOT_FOUND)


def test_validate_capabilities_without_capabilities_is_invalid(csi: Csi) -> None:
    vol = csi.create_volume()
    req = pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id)
    csi.error("ValidateVolumeCapabilities", req, Code.INVALID_ARGUMENT)
    csi.error(
        "ValidateVolumeCapabilities", pb.ValidateVolumeCapabilitiesRequest(), Code.INVALID_ARGUMENT
    )


@pytest.mark.parametrize(
    "mode", ["SINGLE_NODE_WRITER", "SINGLE_NODE_READER_ONLY", "SINGLE_NODE_MULTI_WRITER"]
)
def test_validate_supported_capabilities_are_confirmed(csi: Csi, mode: str) -> None:
    vol = csi.create_volume()
    caps = [csi.mount_cap(mode)]
    req = pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id,
        volume_capabilities=caps,
        volume_context=dict(vol.volume_context),
        parameters={"compression_level": "3"},
    )
    resp = csi.call("ValidateVolumeCapabilities", req)
    assert resp.HasField("confirmed")
    assert list(resp.confirmed.volume_capabilities) == caps
    assert dict(resp.confirmed.volume_context) == dict(vol.volume_context)


@pytest.mark.parametrize(
    "cap_of",
    [
        lambda c: c.mount_cap("MULTI_NODE_MULTI_WRITER"),
        lambda c: c.mount_cap("MULTI_NODE_READER_ONLY"),
        lambda c: c.block_cap(),  # the volume is a mount volume
    ],
    ids=["multi-writer", "multi-reader", "block-of-mount"],
)
def test_validate_unsupported_capabilities_are_not_confirmed(csi: Csi, cap_of) -> None:
    vol = csi.create_volume()
    req = pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[csi.mount_cap(), cap_of(csi)]
    )
    resp = csi.call("ValidateVolumeCapabilities", req)
    assert not resp.HasField("confirmed")
    assert resp.message


def test_validate_with_unknown_parameter_is_not_confirmed(csi: Csi) -> None:
    vol = csi.create_volume()
    req = pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id,
        volume_capabilities=[csi.mount_cap()],
        parameters={"no_such_parameter": "1"},
    )
    resp = csi.call("ValidateVolumeCapabilities", req)
    assert not resp.HasField("confirmed")
    assert "no_such_parameter" in resp.message


# -- ListVolumes ------------------------------------------------------------------------------


def test_list_volumes_pages_return_every_volume_exactly_once(csi: Csi) -> None:
    mine = {csi.create_volume(size=8 * MiB).volume_id for _ in range(7)}
    seen: list[str] = []
    token, pages = "", 0
    while True:
        resp = csi.call("ListVolumes", pb.ListVolumesRequest(max_entries=3, starting_token=token))
        assert len(resp.entries) <= 3
        seen += [e.volume.volume_id for e in resp.entries]
        pages += 1
        token = resp.next_token
        if not token:
            break
        assert pages < 1000
    assert len(seen) == len(set(seen)), "a volume was listed twice"
    assert mine <= set(seen)
    everything = csi.call("ListVolumes", pb.ListVolumesRequest())
    assert not everything.next_token
    assert sorted(seen) == sorted(e.volume.volume_id for e in everything.entries)
    assert pages >= 3


def test_list_volumes_entries_carry_volume_and_condition(csi: Csi) -> None:
    vol = csi.create_volume()
    entries = {e.volume.volume_id: e for e in csi.call("ListVolumes").entries}
    entry = entries[vol.volume_id]
    assert entry.volume.capacity_bytes == vol.capacity_bytes
    assert entry.status.HasField("volume_condition")
    assert entry.status.volume_condition.abnormal is False


@pytest.mark.parametrize("token", ["invalid-token", "zzzzzz-not-issued", "../x", "!!"])
def test_list_volumes_with_a_bogus_starting_token_is_aborted(csi: Csi, token: str) -> None:
    csi.create_volume()
    csi.error("ListVolumes", pb.ListVolumesRequest(starting_token=token), Code.ABORTED)


def test_list_volumes_negative_max_entries_is_invalid(csi: Csi) -> None:
    csi.error("ListVolumes", pb.ListVolumesRequest(max_entries=-1), Code.INVALID_ARGUMENT)


# -- GetCapacity and capabilities --------------------------------------------------------------


def test_get_capacity_is_the_free_space_of_this_node(csi: Csi) -> None:
    resp = csi.call("GetCapacity")
    assert resp.available_capacity > 0
    ours = pb.GetCapacityRequest(
        volume_capabilities=[csi.mount_cap()],
        accessible_topology=pb.Topology(segments={TOPOLOGY_KEY: "test-node"}),
    )
    assert csi.call("GetCapacity", ours).available_capacity > 0


def test_get_capacity_of_another_nodes_topology_is_zero(csi: Csi) -> None:
    req = pb.GetCapacityRequest(
        accessible_topology=pb.Topology(segments={TOPOLOGY_KEY: "other-node"})
    )
    assert csi.call("GetCapacity", req).available_capacity == 0


def test_controller_capabilities_list_what_is_implemented(csi: Csi) -> None:
    caps = {c.rpc.type for c in csi.call("ControllerGetCapabilities").capabilities}
    for rpc in (
        RPC.CREATE_DELETE_VOLUME,
        RPC.LIST_VOLUMES,
        RPC.GET_CAPACITY,
        RPC.CREATE_DELETE_SNAPSHOT,
        RPC.LIST_SNAPSHOTS,
        RPC.CLONE_VOLUME,
        RPC.EXPAND_VOLUME,
        RPC.GET_VOLUME,
        RPC.VOLUME_CONDITION,
        RPC.GET_SNAPSHOT,
        RPC.MODIFY_VOLUME,
    ):
        assert rpc in caps, RPC.Name(rpc)
    # attachRequired is false: ControllerPublish is neither offered nor implemented.
    assert RPC.PUBLISH_UNPUBLISH_VOLUME not in caps
    assert RPC.PUBLISH_READONLY not in caps


def test_controller_publish_and_unpublish_are_unimplemented(csi: Csi) -> None:
    vol = csi.create_volume()
    csi.error(
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id="test-node", volume_capability=csi.mount_cap()
        ),
        Code.UNIMPLEMENTED,
    )
    csi.error(
        "ControllerUnpublishVolume",
        pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id="test-node"),
        Code.UNIMPLEMENTED,
    )


# -- snapshots ----------------------------------------------------------------------------------


def test_create_snapshot_without_name_or_source_is_invalid(csi: Csi) -> None:
    vol = csi.create_volume()
    csi.error(
        "CreateSnapshot",
        pb.CreateSnapshotRequest(source_volume_id=vol.volume_id),
        Code.INVALID_ARGUMENT,
    )
    csi.error(
        "CreateSnapshot", pb.CreateSnapshotRequest(name=csi.unique("s")), Code.INVALID_ARGUMENT
    )


def test_create_snapshot_of_unknown_volume_is_not_found(csi: Csi) -> None:
    req = pb.CreateSnapshotRequest(name=csi.unique("s"), source_volume_id=csi.unique("ghost"))
    csi.error("CreateSnapshot", req, Code.NOT_FOUND)


def test_create_snapshot_is_ready_with_size_and_creation_time(csi: Csi) -> None:
    vol = csi.create_volume(size=16 * MiB)
    fill(csi, vol.volume_id, chunks=3)
    snap = csi.create_snapshot(vol.volume_id)
    assert snap.snapshot_id
    assert snap.source_volume_id == vol.volume_id
    assert snap.ready_to_use is True
    # size_bytes is the restore size: the source's capacity, not the 3 chunks stored
    assert snap.size_bytes == vol.capacity_bytes == 16 * MiB
    assert snap.HasField("creation_time")
    assert snap.creation_time.seconds > 0


def test_create_snapshot_twice_is_idempotent(csi: Csi) -> None:
    vol = csi.create_volume()
    req = pb.CreateSnapshotRequest(name=csi.unique("s"), source_volume_id=vol.volume_id)
    a = csi.call("CreateSnapshot", req).snapshot
    fill(csi, vol.volume_id, chunks=2)  # the volume moves on; the snapshot stays the one cut
    b = csi.call("CreateSnapshot", req).snapshot
    assert a == b
    listed = csi.call("ListSnapshots", pb.ListSnapshotsRequest(source_volume_id=vol.volume_id))
    assert [e.snapshot.snapshot_id for e in listed.entries] == [a.snapshot_id]


def test_create_snapshot_same_name_other_source_already_exists(csi: Csi) -> None:
    a, b = csi.create_volume(), csi.create_volume()
    name = csi.unique("s")
    csi.create_snapshot(a.volume_id, name=name)
    req = pb.CreateSnapshotRequest(name=name, source_volume_id=b.volume_id)
    csi.error("CreateSnapshot", req, Code.ALREADY_EXISTS)


def test_create_snapshot_name_that_looks_like_a_path_gets_a_safe_id(csi: Csi) -> None:
    vol = csi.create_volume()
    before = tree(csi.plugin.base)
    snap = csi.create_snapshot(vol.volume_id, name="../../snapshots/escape")
    check_name(snap.snapshot_id)
    assert csi.create_snapshot(vol.volume_id, name="../../snapshots/escape") == snap
    assert tree(csi.plugin.base) == before


def test_delete_snapshot_is_idempotent(csi: Csi) -> None:
    vol = csi.create_volume()
    snap = csi.create_snapshot(vol.volume_id)
    req = pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)
    csi.call("DeleteSnapshot", req)
    csi.error("GetSnapshot", pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id), Code.NOT_FOUND)
    csi.call("DeleteSnapshot", req)
    csi.call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=csi.unique("never-was")))
    csi.error("DeleteSnapshot", pb.DeleteSnapshotRequest(), Code.INVALID_ARGUMENT)


def test_list_snapshots_by_id(csi: Csi) -> None:
    vol = csi.create_volume()
    snaps = [csi.create_snapshot(vol.volume_id) for _ in range(3)]
    resp = csi.call("ListSnapshots", pb.ListSnapshotsRequest(snapshot_id=snaps[1].snapshot_id))
    assert [e.snapshot for e in resp.entries] == [snaps[1]]
    unknown = pb.ListSnapshotsRequest(snapshot_id=csi.unique("none"))
    assert list(csi.call("ListSnapshots", unknown).entries) == []


def test_list_snapshots_by_source_volume(csi: Csi) -> None:
    a, b = csi.create_volume(), csi.create_volume()
    mine = {csi.create_snapshot(a.volume_id).snapshot_id for _ in range(2)}
    csi.create_snapshot(b.volume_id)
    resp = csi.call("ListSnapshots", pb.ListSnapshotsRequest(source_volume_id=a.volume_id))
    assert {e.snapshot.snapshot_id for e in resp.entries} == mine
    assert all(e.snapshot.source_volume_id == a.volume_id for e in resp.entries)
    none = pb.ListSnapshotsRequest(source_volume_id=csi.unique("ghost"))
    assert list(csi.call("ListSnapshots", none).entries) == []


def test_list_snapshots_pages_return_every_snapshot_exactly_once(csi: Csi) -> None:
    vol = csi.create_volume()
    mine = {csi.create_snapshot(vol.volume_id).snapshot_id for _ in range(5)}
    seen: list[str] = []
    token = ""
    for _ in range(1000):
        resp = csi.call(
            "ListSnapshots", pb.ListSnapshotsRequest(max_entries=2, starting_token=token)
        )
        assert len(resp.entries) <= 2
        seen += [e.snapshot.snapshot_id for e in resp.entries]
        token = resp.next_token
        if not token:
            break
    assert len(seen) == len(set(seen))
    assert mine <= set(seen)
    assert sorted(seen) == sorted(e.snapshot.snapshot_id for e in csi.call("ListSnapshots").entries)
    csi.error(
        "ListSnapshots", pb.ListSnapshotsRequest(starting_token="invalid-token"), Code.ABORTED
    )


def test_get_snapshot(csi: Csi) -> None:
    vol = csi.create_volume()
    snap = csi.create_snapshot(vol.volume_id)
    got = csi.call("GetSnapshot", pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot
    assert got == snap
    csi.error("GetSnapshot", pb.GetSnapshotRequest(snapshot_id=csi.unique("none")), Code.NOT_FOUND)


# -- expansion, get, modify ----------------------------------------------------------------------


def test_controller_expand_volume_grows_it(csi: Csi) -> None:
    vol = csi.create_volume(size=16 * MiB)
    req = pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=48 * MiB)
    )
    resp = csi.call("ControllerExpandVolume", req)
    assert resp.capacity_bytes == 48 * MiB
    assert resp.node_expansion_required is False  # statfs of the FUSE mount reads it live
    got = csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == 48 * MiB
    # the same request again: same answer
    assert csi.call("ControllerExpandVolume", req) == resp


def test_controller_expand_block_volume_needs_node_expansion(csi: Csi) -> None:
    vol = csi.create_volume(size=16 * MiB, block=True)
    req = pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=32 * MiB)
    )
    resp = csi.call("ControllerExpandVolume", req)
    assert resp.capacity_bytes == 32 * MiB
    assert resp.node_expansion_required is True


def test_controller_expand_to_a_smaller_size_returns_the_current_size(csi: Csi) -> None:
    vol = csi.create_volume(size=32 * MiB)
    req = pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=16 * MiB)
    )
    assert csi.call("ControllerExpandVolume", req).capacity_bytes == 32 * MiB


def test_controller_expand_without_range_or_id_is_invalid(csi: Csi) -> None:
    vol = csi.create_volume()
    csi.error(
        "ControllerExpandVolume",
        pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id),
        Code.INVALID_ARGUMENT,
    )
    csi.error(
        "ControllerExpandVolume",
        pb.ControllerExpandVolumeRequest(capacity_range=pb.CapacityRange(required_bytes=MiB)),
        Code.INVALID_ARGUMENT,
    )


def test_controller_expand_unknown_volume_is_not_found(csi: Csi) -> None:
    req = pb.ControllerExpandVolumeRequest(
        volume_id=csi.unique("ghost"), capacity_range=pb.CapacityRange(required_bytes=64 * MiB)
    )
    csi.error("ControllerExpandVolume", req, Code.NOT_FOUND)


def test_controller_get_volume_reports_volume_and_condition(csi: Csi) -> None:
    vol = csi.create_volume()
    got = csi.call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.volume_id == vol.volume_id
    assert got.volume.capacity_bytes == vol.capacity_bytes
    assert got.status.HasField("volume_condition")
    assert got.status.volume_condition.abnormal is False
    assert got.status.volume_condition.message
    csi.error(
        "ControllerGetVolume",
        pb.ControllerGetVolumeRequest(volume_id=csi.unique("x")),
        Code.NOT_FOUND,
    )


def test_controller_modify_volume_applies_compression_level(csi: Csi) -> None:
    vol = csi.create_volume()
    req = pb.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"compression_level": "9"}
    )
    csi.call("ControllerModifyVolume", req)
    csi.call("ControllerModifyVolume", req)
    with open_store(csi) as store:
        assert store.get_volume(vol.volume_id).parameters["compression_level"] == "9"


def test_controller_modify_volume_with_unknown_key_applies_nothing(csi: Csi) -> None:
    vol = csi.create_volume(parameters={"compression_level": "3"})
    for bad in (
        {"no_such_key": "1"},
        {"compression_level": "5", "no_such_key": "1"},
        {"chunk_size": "8192"},
    ):
        req = pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters=bad)
        csi.error("ControllerModifyVolume", req, Code.INVALID_ARGUMENT)
    with open_store(csi) as store:
        assert store.get_volume(vol.volume_id).parameters == {"compression_level": "3"}


def test_controller_modify_unknown_volume_is_not_found(csi: Csi) -> None:
    req = pb.ControllerModifyVolumeRequest(
        volume_id=csi.unique("ghost"), mutable_parameters={"compression_level": "1"}
    )
    csi.error("ControllerModifyVolume", req, Code.NOT_FOUND)


# -- ids that try to leave the store ------------------------------------------------------------


def _id_requests(bad: str, csi: Csi) -> list[tuple[str, object]]:
    rng = pb.CapacityRange(required_bytes=64 * MiB)
    return [
        ("DeleteVolume", pb.DeleteVolumeRequest(volume_id=bad)),
        ("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=bad)),
        (
            "ValidateVolumeCapabilities",
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=bad, volume_capabilities=[csi.mount_cap()]
            ),
        ),
        (
            "ControllerExpandVolume",
            pb.ControllerExpandVolumeRequest(volume_id=bad, capacity_range=rng),
        ),
        (
            "ControllerModifyVolume",
            pb.ControllerModifyVolumeRequest(
                volume_id=bad, mutable_parameters={"compression_level": "1"}
            ),
        ),
        ("CreateSnapshot", pb.CreateSnapshotRequest(name=csi.unique("s"), source_volume_id=bad)),
        ("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=bad)),
        ("GetSnapshot", pb.GetSnapshotRequest(snapshot_id=bad)),
        (
            "CreateVolume",
            pb.CreateVolumeRequest(
                name=csi.unique("c"),
                volume_capabilities=[csi.mount_cap()],
                volume_content_source=pb.VolumeContentSource(
                    snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=bad)
                ),
            ),
        ),
        (
            "CreateVolume",
            pb.CreateVolumeRequest(
                name=csi.unique("c"),
                volume_capabilities=[csi.mount_cap()],
                volume_content_source=pb.VolumeContentSource(
                    volume=pb.VolumeContentSource.VolumeSource(volume_id=bad)
                ),
            ),
        ),
    ]


@pytest.mark.parametrize("bad", ESCAPING_IDS)
def test_ids_that_leave_the_store_are_invalid_and_touch_nothing(csi: Csi, bad: str) -> None:
    before = tree(csi.plugin.base)
    outside = csi.plugin.base.parent
    outside_before = {p.name for p in outside.iterdir() if not p.name.startswith("csi-")}
    for method, req in _id_requests(bad, csi):
        csi.error(method, req, Code.INVALID_ARGUMENT)
    assert tree(csi.plugin.base) == before
    outside_after = {p.name for p in outside.iterdir() if not p.name.startswith("csi-")}
    assert not {"x", "y", "etc", "a", ".hidden"} & (outside_after - outside_before)


# -- operations in flight ----------------------------------------------------------------------


def test_a_second_operation_on_a_busy_volume_is_aborted(tmp_path: Path) -> None:
    plugin = Plugin(
        Config(node_id="n", store_path=tmp_path / "store", state_path=tmp_path / "state")
    )
    try:
        with plugin.operation("vol-a"):
            with pytest.raises(CsiError) as info, plugin.operation("vol-a"):
                pass
            assert info.value.code == Code.ABORTED
            assert "vol-a" in info.value.message
            # Taking several slots is all or nothing: "vol-b" must not stay taken.
            with pytest.raises(CsiError), plugin.operation("vol-b", "vol-a"):
                pass
            with plugin.operation("vol-b"):
                pass
        with plugin.operation("vol-a"):  # released on exit
            pass
        with contextlib.suppress(RuntimeError), plugin.operation("vol-c"):
            raise RuntimeError("the RPC failed")
        with plugin.operation("vol-c"):  # released when the body raised
            pass
    finally:
        plugin.close()


def test_operation_slots_exclude_concurrent_threads(tmp_path: Path) -> None:
    plugin = Plugin(
        Config(node_id="n", store_path=tmp_path / "store", state_path=tmp_path / "state")
    )
    inside = threading.Event()
    release = threading.Event()
    codes: list[grpc.StatusCode] = []

    def holder() -> None:
        with plugin.operation("vol"):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(10)
        try:
            with plugin.operation("vol"):
                codes.append(Code.OK)
        except CsiError as exc:
            codes.append(exc.code)
        with plugin.operation("other"):  # a different volume is not blocked
            codes.append(Code.OK)
    finally:
        release.set()
        t.join()
        plugin.close()
    assert codes == [Code.ABORTED, Code.OK]
