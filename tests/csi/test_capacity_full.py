"""The CSI controller over a store whose filesystem is full (issue 16 item 6).

The plugin's store lives on a real ext4 filesystem of 64 MiB on a loop device
(``tests/smallfs.py``), mounted before the plugin starts. Once the store is down to
its reserve, CreateVolume, CreateSnapshot and clones fail with RESOURCE_EXHAUSTED
and a message, and GetCapacity never reports more than the store can hold: free
space minus the reserve.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from blockstore import NoSpace, Store
from csi_frontend.proto import csi_pb2 as pb
from tests.smallfs import small_filesystem

if TYPE_CHECKING:
    from conftest import PluginProcess

Code = grpc.StatusCode
MiB, GiB = 1 << 20, 1 << 30


def room_now(plugin: PluginProcess) -> int:
    """Free space on the store's filesystem minus the store's reserve, never negative."""
    with Store(plugin.store, create=False) as store:
        reserve = store.reserve_bytes()
    vfs = os.statvfs(plugin.store)
    return max(vfs.f_bavail * vfs.f_frsize - reserve, 0)


def mount_cap() -> pb.VolumeCapability:
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume())
    cap.access_mode.mode = pb.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER
    return cap


def exhausted(plugin: PluginProcess, method: str, request: Any) -> str:
    """Call ``method``; it must fail with RESOURCE_EXHAUSTED and a message (returned)."""
    assert plugin.client is not None
    with pytest.raises(grpc.RpcError) as info:
        plugin.client.call(method, request)
    err: Any = info.value
    assert err.code() == Code.RESOURCE_EXHAUSTED, (method, err.code(), err.details())
    assert err.details()
    return str(err.details())


def create(name: str, size: int = MiB, **kw: Any) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(
        name=name,
        volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=size),
        **kw,
    )


@pytest.mark.needs_loop
def test_a_full_store_refuses_creates_with_resource_exhausted_and_reports_no_capacity(
    new_plugin: Callable[..., PluginProcess],
) -> None:
    plugin = new_plugin(start=False)
    with small_filesystem(plugin.store, plugin.base / "store.img", 64):
        try:
            client = plugin.start()
            assert client is not None
            call = client.call
            capacity = call("GetCapacity").available_capacity
            assert 0 < capacity <= room_now(plugin)
            vol = call("CreateVolume", create("vol", GiB)).volume
            snap_req = pb.CreateSnapshotRequest(name="snap", source_volume_id=vol.volume_id)
            snap = call("CreateSnapshot", snap_req).snapshot
            # Fill the store through a second process of the same LMDB environment.
            with Store(plugin.store, create=False) as store:
                view = store.volume(vol.volume_id)
                try:
                    for i in range(100_000):
                        view.put_chunk(f"c{i}".encode(), os.urandom(64 << 10))
                except NoSpace:
                    pass
                else:
                    raise AssertionError("the store never filled up")
            assert call("GetCapacity").available_capacity <= room_now(plugin) < MiB

            assert "reserve" in exhausted(plugin, "CreateVolume", create("new"))
            snap_req = pb.CreateSnapshotRequest(name="snap2", source_volume_id=vol.volume_id)
            exhausted(plugin, "CreateSnapshot", snap_req)
            from_snap = pb.VolumeContentSource(
                snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
            )
            from_vol = pb.VolumeContentSource(
                volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id)
            )
            for source in (from_snap, from_vol):
                req = create("clone", 10 * GiB, volume_content_source=source)
                exhausted(plugin, "CreateVolume", req)
            # What exists is still there: the same CreateVolume again is answered.
            assert call("CreateVolume", create("vol", GiB)).volume.volume_id == vol.volume_id

            # Deleting gives space back (the plugin's gc), and creating works again.
            call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
            call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vol.volume_id))
            deadline = time.monotonic() + 60
            while room_now(plugin) < 16 * MiB and time.monotonic() < deadline:
                time.sleep(0.2)
            assert call("GetCapacity").available_capacity <= room_now(plugin)
            assert call("GetCapacity").available_capacity > 16 * MiB
            call("CreateVolume", create("new"))
        finally:
            plugin.stop()
