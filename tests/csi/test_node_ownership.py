"""The node service never touches what is not its own (issue 16, items 1-4).

Each case is a hostile or mistaken request sent through the real socket to the real
plugin process. "Ours" is a path the node state records for the volume *and* whose
mount is the one the plugin made (``csi_frontend/ownership.py``). Everything here runs
inside the test's own directory, except the one case that needs the real ``/etc``,
which runs the plugin in a private mount namespace (``unshare -m``), so a regression
can never mount over the machine's ``/etc``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from csi_frontend.proto import csi_pb2 as pb
from csi_frontend.validation import id_for_name

if TYPE_CHECKING:
    from conftest import Csi

Code = grpc.StatusCode
MiB = 1 << 20


def stage_req(csi: Csi, vid: str, staging: Path, block: bool = False) -> Any:
    return pb.NodeStageVolumeRequest(
        volume_id=vid,
        staging_target_path=str(staging),
        volume_capability=csi.block_cap() if block else csi.mount_cap(),
    )


def publish_req(csi: Csi, vid: str, staging: Path, target: Path, block: bool = False) -> Any:
    return pb.NodePublishVolumeRequest(
        volume_id=vid,
        staging_target_path=str(staging),
        target_path=str(target),
        volume_capability=csi.block_cap() if block else csi.mount_cap(),
    )


def unpublish_req(vid: str, target: Path | str) -> Any:
    return pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))


def unstage_req(vid: str, staging: Path | str) -> Any:
    return pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))


def stage(csi: Csi, vid: str, staging: Path, block: bool = False) -> None:
    staging.mkdir(parents=True, exist_ok=True)
    csi.call("NodeStageVolume", stage_req(csi, vid, staging, block))


def publish(csi: Csi, vid: str, staging: Path, target: Path, block: bool = False) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    csi.call("NodePublishVolume", publish_req(csi, vid, staging, target, block))


def mounted(path: Path, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """fstype of every mount stacked exactly at ``path``."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split(" ")[4] == str(path):
                out.append(right.split(" ")[0])
    return out


def tmpfs_at(path: Path) -> None:
    """A foreign mount (the test's own tmpfs); node_dir's cleanup removes it."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)


@pytest.fixture
def live(csi: Csi, node_dir: Path) -> Any:
    """A staged and published mount volume A, torn down after the test."""
    vol = csi.create_volume()
    staging, target = node_dir / "a-staging", node_dir / "pods" / "a" / "mount"
    stage(csi, vol.volume_id, staging)
    publish(csi, vol.volume_id, staging, target)
    (target / "a-data.txt").write_text("volume A's data\n")

    class Live:
        vid = vol.volume_id

    Live.staging, Live.target = staging, target  # type: ignore[attr-defined]
    try:
        yield Live
    finally:
        for method, req in (
            ("NodeUnpublishVolume", unpublish_req(vol.volume_id, target)),
            ("NodeUnstageVolume", unstage_req(vol.volume_id, staging)),
        ):
            try:
                csi.call(method, req)
            except grpc.RpcError as exc:
                print(f"teardown {method}: {exc.code().name}: {exc.details()}")


# -- item 1: NodeUnpublishVolume removes only what is ours ------------------------------------


def test_unpublish_of_an_unknown_volume_leaves_a_file_and_a_directory_alone(
    csi: Csi, node_dir: Path
) -> None:
    some_file = node_dir / "some" / "file.txt"
    some_file.parent.mkdir()
    some_file.write_text("a user's file\n")
    empty_dir = node_dir / "empty"
    empty_dir.mkdir()
    csi.call("NodeUnpublishVolume", unpublish_req("zzz", some_file))
    csi.call("NodeUnpublishVolume", unpublish_req("zzz", empty_dir))
    vol = csi.create_volume()  # a real volume that is not published there either
    csi.call("NodeUnpublishVolume", unpublish_req(vol.volume_id, some_file))
    csi.call("NodeUnpublishVolume", unpublish_req(vol.volume_id, empty_dir))
    assert some_file.read_text() == "a user's file\n"
    assert empty_dir.is_dir()


@pytest.mark.needs_fuse
def test_unpublish_and_unstage_leave_a_foreign_mount_mounted(csi: Csi, node_dir: Path) -> None:
    foreign = node_dir / "tmpfs"
    tmpfs_at(foreign)
    (foreign / "kept").write_text("x")
    vol = csi.create_volume()
    csi.call("NodeUnpublishVolume", unpublish_req("zzz", foreign))
    csi.call("NodeUnpublishVolume", unpublish_req(vol.volume_id, foreign))
    csi.call("NodeUnstageVolume", unstage_req(vol.volume_id, foreign))
    assert mounted(foreign) == ["tmpfs"]
    assert (foreign / "kept").read_text() == "x"


@pytest.mark.needs_fuse
def test_unpublish_with_another_volumes_id_does_not_unmount_its_target(
    csi: Csi, node_dir: Path, live: Any
) -> None:
    other = csi.create_volume()
    stage(csi, other.volume_id, node_dir / "b-staging")
    try:
        err = csi.error(
            "NodeUnpublishVolume",
            unpublish_req(other.volume_id, live.target),
            Code.FAILED_PRECONDITION,
        )
        assert live.vid in err.details()
        err = csi.error(
            "NodeUnstageVolume",
            unstage_req(other.volume_id, live.staging),
            Code.FAILED_PRECONDITION,
        )
        assert mounted(live.target) == ["fuse.fusedrive"]
        assert mounted(live.staging) == ["fuse.fusedrive"]
        assert (live.target / "a-data.txt").read_text() == "volume A's data\n"
        rec = csi.plugin.state / "volumes" / f"{live.vid}.json"
        assert str(live.target) in rec.read_text()
    finally:
        csi.call("NodeUnstageVolume", unstage_req(other.volume_id, node_dir / "b-staging"))


@pytest.mark.needs_fuse
def test_unpublish_of_our_target_under_a_foreign_mount_is_refused(
    csi: Csi, node_dir: Path, live: Any
) -> None:
    tmpfs_at(live.target)  # someone mounted over our bind
    err = csi.error(
        "NodeUnpublishVolume", unpublish_req(live.vid, live.target), Code.FAILED_PRECONDITION
    )
    assert "tmpfs" in err.details()
    assert mounted(live.target) == ["fuse.fusedrive", "tmpfs"]
    subprocess.run(["umount", str(live.target)], check=True)
    csi.call("NodeUnpublishVolume", unpublish_req(live.vid, live.target))
    assert mounted(live.target) == []


@pytest.mark.needs_fuse
def test_unpublish_removes_only_an_empty_target_it_created(
    csi: Csi, node_dir: Path, live: Any
) -> None:
    # A target kubelet made (it existed, empty) is unmounted but not removed.
    given = node_dir / "pods" / "given"
    given.mkdir(parents=True)
    publish(csi, live.vid, live.staging, given)
    csi.call("NodeUnpublishVolume", unpublish_req(live.vid, given))
    assert given.is_dir() and mounted(given) == []
    # The one the plugin created is removed.
    csi.call("NodeUnpublishVolume", unpublish_req(live.vid, live.target))
    assert not live.target.exists()


# -- item 2: NodePublishVolume and NodeStageVolume mount only where they may -------------------


@pytest.mark.needs_fuse
def test_publish_onto_a_directory_with_data_is_refused(csi: Csi, node_dir: Path, live: Any) -> None:
    etc = node_dir / "etc"  # a stand-in for /etc: a directory holding someone's files
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    err = csi.error(
        "NodePublishVolume", publish_req(csi, live.vid, live.staging, etc), Code.FAILED_PRECONDITION
    )
    assert "not empty" in err.details()
    assert mounted(etc) == []
    assert (etc / "passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"


@pytest.mark.needs_fuse
def test_publish_onto_a_symlink_is_refused_and_nothing_lands_on_its_destination(
    csi: Csi, node_dir: Path, live: Any
) -> None:
    elsewhere = node_dir / "elsewhere"
    elsewhere.mkdir()
    link = node_dir / "pods" / "link"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere)
    err = csi.error(
        "NodePublishVolume", publish_req(csi, live.vid, live.staging, link), Code.INVALID_ARGUMENT
    )
    assert "symbolic link" in err.details()
    assert mounted(elsewhere) == [] and mounted(link) == []
    assert link.is_symlink()
    csi.call("NodeUnpublishVolume", unpublish_req(live.vid, link))  # nothing of ours: OK
    assert link.is_symlink() and elsewhere.is_dir()


@pytest.mark.needs_fuse
def test_publish_onto_a_foreign_mount_is_refused_and_not_recorded(
    csi: Csi, node_dir: Path, live: Any
) -> None:
    foreign = node_dir / "pods" / "foreign"
    tmpfs_at(foreign)
    err = csi.error(
        "NodePublishVolume",
        publish_req(csi, live.vid, live.staging, foreign),
        Code.FAILED_PRECONDITION,
    )
    assert "tmpfs" in err.details()
    assert mounted(foreign) == ["tmpfs"]
    rec = csi.plugin.state / "volumes" / f"{live.vid}.json"
    assert str(foreign) not in rec.read_text()
    csi.call("NodeUnpublishVolume", unpublish_req(live.vid, foreign))
    assert mounted(foreign) == ["tmpfs"]


@pytest.mark.needs_fuse
def test_paths_inside_another_volume_are_refused_and_nothing_is_created_in_its_data(
    csi: Csi, node_dir: Path, live: Any
) -> None:
    other = csi.create_volume()
    inside_target = live.target / "b-staging"
    inside_staging = live.staging / "b-staging"
    for path in (inside_target, inside_staging):
        err = csi.error(
            "NodeStageVolume", stage_req(csi, other.volume_id, path), Code.INVALID_ARGUMENT
        )
        assert "inside" in err.details()
    err = csi.error(
        "NodePublishVolume",
        publish_req(csi, live.vid, live.staging, live.target / "nested"),
        Code.INVALID_ARGUMENT,
    )
    assert sorted(os.listdir(live.target)) == ["a-data.txt"]


def test_proc_self_as_staging_path_is_refused(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume()
    csi.error(
        "NodeStageVolume", stage_req(csi, vol.volume_id, Path("/proc/self")), Code.INVALID_ARGUMENT
    )


@pytest.mark.needs_fuse
def test_an_unconfined_plugin_refuses_symlinks_and_pseudo_filesystems(
    new_csi: Callable[..., Csi],
) -> None:
    csi = new_csi(confine=False)
    vol = csi.create_volume()
    for path in (Path("/proc/self"), Path("/proc/sys/fusedrive-x"), Path("/sys/fusedrive-x")):
        csi.error("NodeStageVolume", stage_req(csi, vol.volume_id, path), Code.INVALID_ARGUMENT)
    assert not Path("/sys/fusedrive-x").exists()


def test_paths_outside_the_allowed_prefix_are_invalid(csi: Csi, node_dir: Path) -> None:
    vol = csi.create_volume()
    outside = Path("/tmp") / csi.unique("outside-prefix")
    inside_staging = node_dir / "staging"
    inside_staging.mkdir()
    try:
        for method, req in (
            ("NodeStageVolume", stage_req(csi, vol.volume_id, outside / "staging")),
            ("NodePublishVolume", publish_req(csi, vol.volume_id, inside_staging, outside)),
            ("NodeUnpublishVolume", unpublish_req(vol.volume_id, outside)),
            ("NodeUnstageVolume", unstage_req(vol.volume_id, outside)),
        ):
            err = csi.error(method, req, Code.INVALID_ARGUMENT)
            assert "allowed path prefix" in err.details()
        assert not outside.exists()
        # A symlinked directory inside the prefix that leads out of it is refused too.
        outside.mkdir()
        escape = node_dir / "escape"
        escape.symlink_to(outside)
        err = csi.error(
            "NodeStageVolume",
            stage_req(csi, vol.volume_id, escape / "staging"),
            Code.INVALID_ARGUMENT,
        )
        assert "resolves to" in err.details()
        assert os.listdir(outside) == []
    finally:
        # Were a regression to mount out there, undo it (node_dir's cleanup cannot see it).
        with open("/proc/self/mountinfo") as f:
            points = [line.split(" ")[4] for line in f]
        for point in reversed(points):
            if point == str(outside) or point.startswith(f"{outside}/"):
                subprocess.run(["umount", "--lazy", point], check=False)
        shutil.rmtree(outside, ignore_errors=True)


@pytest.mark.needs_fuse
def test_publish_onto_the_real_etc_is_refused_in_a_private_mount_namespace(
    new_csi: Callable[..., Csi],
) -> None:
    """The plugin runs unconfined (no prefix) in its own mount namespace: even if it
    mounted over /etc, only that namespace would see it."""
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is required")
    csi = new_csi(confine=False, wrapper=("unshare", "-m", "--propagation", "private", "--"))
    p = csi.plugin
    assert p.proc is not None
    mountinfo = f"/proc/{p.proc.pid}/mountinfo"
    vol = csi.create_volume()
    staging = p.base / "staging"
    stage(csi, vol.volume_id, staging)
    try:
        before = mounted(Path("/etc"), mountinfo)
        err = csi.error(
            "NodePublishVolume",
            publish_req(csi, vol.volume_id, staging, Path("/etc")),
            Code.FAILED_PRECONDITION,
        )
        assert "/etc" in err.details()
        assert mounted(Path("/etc"), mountinfo) == before
        csi.call("NodeUnpublishVolume", unpublish_req(vol.volume_id, "/etc"))
        assert mounted(Path("/etc"), mountinfo) == before
        assert Path("/etc/passwd").exists()
    finally:
        csi.call("NodeUnstageVolume", unstage_req(vol.volume_id, staging))
    assert mounted(staging, mountinfo) == []


# -- item 3: ids that look like options ----------------------------------------------------------


def test_create_volume_maps_a_name_starting_with_a_dash_to_a_safe_id(csi: Csi) -> None:
    for name in ("-rf", "--debug"):
        vol = csi.create_volume(name=name)
        assert not vol.volume_id.startswith("-")
        assert vol.volume_id == id_for_name(name, "vol")
        assert csi.create_volume(name=name).volume_id == vol.volume_id  # idempotent
        csi.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vol.volume_id))


@pytest.mark.needs_fuse
@pytest.mark.needs_loop
@pytest.mark.parametrize("vid", ["-rf", "--debug"])
@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_a_volume_id_starting_with_a_dash_stages_and_publishes(
    csi: Csi, node_dir: Path, vid: str, block: bool
) -> None:
    vid = f"{vid}-{os.urandom(3).hex()}"
    with csi.open_store() as store:  # made by hand: CreateVolume would hash such a name
        store.create_volume(vid, 16 * MiB, "block" if block else "filesystem")
    staging, target = node_dir / "staging", node_dir / "pods" / "p" / "t"
    stage(csi, vid, staging, block)
    try:
        publish(csi, vid, staging, target, block)
        if block:
            fd = os.open(target, os.O_RDWR)
            try:
                os.pwrite(fd, b"dash" * 1024, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            (target / "f").write_text("dash")
        assert (staging / ("disk.img" if block else "f")).read_bytes()[:4] == b"dash"
        csi.call("NodeUnpublishVolume", unpublish_req(vid, target))
    finally:
        csi.call("NodeUnstageVolume", unstage_req(vid, staging))
    assert csi.plugin.mounts(node_dir) == []


# -- item 4: error codes csi-sanity checks ----------------------------------------------------


def test_stats_and_expand_of_an_unknown_volume_are_not_found_whatever_the_path(csi: Csi) -> None:
    ghost = csi.unique("ghost")
    for path in ("some/path", "/some/path"):
        csi.error(
            "NodeGetVolumeStats",
            pb.NodeGetVolumeStatsRequest(volume_id=ghost, volume_path=path),
            Code.NOT_FOUND,
        )
        csi.error(
            "NodeExpandVolume",
            pb.NodeExpandVolumeRequest(
                volume_id=ghost,
                volume_path=path,
                capacity_range=pb.CapacityRange(required_bytes=MiB),
            ),
            Code.NOT_FOUND,
        )


@pytest.mark.needs_fuse
def test_stats_of_a_live_volume_at_a_path_it_is_not_at_is_not_found(
    csi: Csi, node_dir: Path, live: Any
) -> None:
    for path in ("some/path", "/path/does/not/exist", str(node_dir)):
        csi.error(
            "NodeGetVolumeStats",
            pb.NodeGetVolumeStatsRequest(volume_id=live.vid, volume_path=path),
            Code.NOT_FOUND,
        )
    csi.error(
        "NodeGetVolumeStats",
        pb.NodeGetVolumeStatsRequest(volume_id=live.vid),
        Code.INVALID_ARGUMENT,
    )


def test_publish_of_an_unknown_volume_is_not_found_and_without_staging_fails_precondition(
    csi: Csi, node_dir: Path
) -> None:
    staging, target = node_dir / "staging", node_dir / "target"
    staging.mkdir()
    csi.error(
        "NodePublishVolume",
        publish_req(csi, csi.unique("ghost"), staging, target),
        Code.NOT_FOUND,
    )
    vol = csi.create_volume()
    req = publish_req(csi, vol.volume_id, staging, target)
    req.staging_target_path = ""
    csi.error("NodePublishVolume", req, Code.FAILED_PRECONDITION)
    assert not target.exists()
