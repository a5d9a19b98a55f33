"""The demo's lifecycle as kubelet and the sidecars drive it, end to end.

Real plugin process, real gRPC, real FUSE mounts, loop devices and ext4.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from csi_frontend import demo


@pytest.mark.needs_fuse
@pytest.mark.needs_loop
def test_full_lifecycle_leaves_nothing_behind() -> None:
    # A short root: unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="fd-e2e-", dir="/tmp") as tmp:
        root = Path(tmp)
        try:
            steps = demo.run(root)
        finally:
            left = demo.leftovers(root)
            demo.force_cleanup(root)
        assert left == []
        names = [s.name for s in steps]
        assert any("verify r1" in n for n in names)
        assert any("verify c1" in n for n in names)
        assert any("bc1's ext4" in n for n in names)
        by_name = {s.name: s.result for s in steps}
        assert by_name["expand v1 online to 2 GiB"] == "df shows 2.0 GiB"
        assert by_name["mount bc1's ext4, verify"] == "ext4 on the clone holds hello.txt"
