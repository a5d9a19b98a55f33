"""Sites for the real-program tier: a fusedrive mount and its plain-directory referee.

``fusedrive_site`` mounts one volume with ``fuse_mounts`` (tests/fusedrive/conftest.py,
which unmounts and reaps whatever happens); ``plain_site`` is a fresh directory in
/tmp, removed afterwards. Both roots are mode 0755 so other users (``postgres``)
can reach what the test hands them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from referee import Site

if TYPE_CHECKING:
    from conftest import FuseMounts

GiB = 1 << 30
EXIT_TIMEOUT = 30.0


@pytest.fixture
def plain_site() -> Iterator[Site]:
    root = Path(tempfile.mkdtemp(prefix="fusedrive-referee-"))
    os.chmod(root, 0o755)
    try:
        yield Site("plain", root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fusedrive_site(fuse_mounts: FuseMounts) -> Site:
    fuse_mounts.volume("v", capacity=4 * GiB)
    mp = fuse_mounts.mount("--volume", "v", at="v")
    os.chmod(mp, 0o755)

    def remount() -> None:
        fuse_mounts.unmount(mp)
        fuse_mounts.mount("--volume", "v", at="v")

    def kill_daemon() -> None:
        d = fuse_mounts.daemon(mp)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(EXIT_TIMEOUT)
        subprocess.run(["fusermount3", "-uz", str(mp)], check=True, capture_output=True)

    def mount() -> None:
        fuse_mounts.mount("--volume", "v", at="v")

    return Site("fusedrive", mp, remount=remount, kill_daemon=kill_daemon, mount=mount)


@pytest.fixture(params=["plain", "fusedrive"])
def site(request: pytest.FixtureRequest) -> Site:
    """The scenario once on the referee, once on fusedrive (each checked on its own)."""
    site: Site = request.getfixturevalue(f"{request.param}_site")
    return site


@pytest.fixture
def sites(plain_site: Site, fusedrive_site: Site) -> tuple[Site, Site]:
    """(referee, fusedrive): run the scenario on both, compare what they leave."""
    return plain_site, fusedrive_site
