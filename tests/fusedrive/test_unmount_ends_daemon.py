"""An unmount ends the daemon, even when a copy of the mount lives in another namespace.

The flaky ``test_snapshot_writer`` failure (a daemon alive 30 s after ``fusermount3
-u``) came from this: any process that copies the mount table into a private mount
namespace while a mount exists (``unshare -m --propagation private``, as other test
suites on a shared machine do) holds its own mount of the file system, so the kernel
does not end the FUSE session at our unmount, and the daemon served on until that
process exited. The daemon now watches its own namespace's mount table.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import FuseMounts

pytestmark = pytest.mark.needs_fuse


@pytest.mark.parametrize("kind", ["volume", "snapshot"])
def test_unmount_ends_the_daemon_while_a_private_namespace_holds_a_copy(
    fuse_mounts: FuseMounts, kind: str
) -> None:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is required")
    fuse_mounts.volume("v")
    if kind == "volume":
        mnt = fuse_mounts.mount("--volume", "v", at="v")
        (mnt / "kept").write_bytes(b"flushed at unmount")
    else:
        from blockstore import Store

        with Store(fuse_mounts.store) as s:
            s.create_snapshot("v", "s")
        mnt = fuse_mounts.mount("--snapshot", "s", at="s")
    # A process in a private mount namespace made now holds a copy of the mount.
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sleep", "600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # unshare makes the namespace, then becomes `sleep`: wait for the switch.
        deadline = time.monotonic() + 30
        while holder.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                    break
            time.sleep(0.02)
        assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""
        copy = Path(f"/proc/{holder.pid}/mountinfo").read_text(errors="replace")
        assert f" {mnt} " in copy, "the private namespace holds no copy of the mount"

        # A clean unmount: the daemon must flush and exit 0 by itself (conftest waits 30 s).
        d = fuse_mounts.unmount(mnt)
        assert "event=unmounted_here" in d.output()
        assert holder.poll() is None, "the namespace holding the copy is still there"
    finally:
        holder.kill()
        holder.wait()
    if kind == "volume":
        again = fuse_mounts.mount("--volume", "v", at="v")
        assert (again / "kept").read_bytes() == b"flushed at unmount"
        fuse_mounts.unmount(again)
