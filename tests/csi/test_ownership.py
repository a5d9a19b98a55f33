"""``csi_frontend.ownership`` without a plugin: the prefix rule and the target checks.

The RPC-level cases (through the real socket) are in test_node_ownership.py; these pin
the rules themselves on real directories, symlinks and mounts of a scratch tree.
"""

from __future__ import annotations

import os
import string
import subprocess
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_frontend.errors import CsiError
from csi_frontend.ownership import PathPolicy, check_free, make_target, remove_created

segment = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=8)


@given(st.lists(segment, min_size=0, max_size=4), st.lists(segment, min_size=1, max_size=3))
def test_policy_accepts_exactly_the_paths_below_the_prefix(
    tmp_path_factory: pytest.TempPathFactory, inside: list[str], other: list[str]
) -> None:
    root = tmp_path_factory.getbasetemp() / "policy"
    prefix = root / "kubelet"
    prefix.mkdir(parents=True, exist_ok=True)
    policy = PathPolicy([str(prefix)])
    candidate = os.path.normpath(os.path.join(str(prefix), *inside))
    below = candidate.startswith(str(prefix) + "/")
    try:
        policy.check(candidate, "target_path")
        accepted = True
    except CsiError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
        accepted = False
    assert accepted == below
    # A sibling whose name merely starts with the prefix's is outside.
    sibling = os.path.join(str(prefix) + "-" + other[0], *other[1:])
    with pytest.raises(CsiError):
        policy.check(sibling, "target_path")


def test_policy_follows_a_symlinked_parent_out_of_the_prefix(tmp_path: Path) -> None:
    prefix, outside = tmp_path / "kubelet", tmp_path / "etc"
    prefix.mkdir()
    outside.mkdir()
    (prefix / "pods").symlink_to(outside)
    policy = PathPolicy([str(prefix)])
    with pytest.raises(CsiError, match="resolves to"):
        policy.check(str(prefix / "pods" / "target"), "target_path")
    with pytest.raises(ValueError):
        PathPolicy(["relative/kubelet"])
    PathPolicy([]).check("/anywhere/at/all", "target_path")  # no prefix: all allowed


def test_make_target_creates_only_where_nothing_is_and_remove_only_what_is_empty(
    tmp_path: Path,
) -> None:
    d, f = tmp_path / "dir", tmp_path / "file"
    assert make_target(str(d), directory=True) is True
    assert make_target(str(f), directory=False) is True
    assert make_target(str(d), directory=True) is False  # existing, empty: usable
    (d / "data").write_text("x")
    with pytest.raises(CsiError) as info:
        make_target(str(d), directory=True)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    remove_created(str(d))
    assert (d / "data").exists()  # not empty: kept
    f.write_text("x")
    remove_created(str(f))
    assert f.exists()  # not empty: kept
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(CsiError) as info:
        make_target(str(link), directory=True)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    remove_created(str(link))
    assert link.is_symlink()
    with pytest.raises(CsiError) as info:
        make_target(str(tmp_path / "missing" / "target"), directory=True)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.needs_fuse  # root and mount(8): the same needs as the FUSE tests
def test_check_free_refuses_a_mount_point(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(m)], check=True)
    try:
        with pytest.raises(CsiError, match="tmpfs") as info:
            check_free(str(m), "target_path", directory=True)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        subprocess.run(["umount", str(m)], check=True)
    check_free(str(m), "target_path", directory=True)
