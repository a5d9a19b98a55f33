"""Live FUSE mounts for the model, exerciser and snapshot tests: ``fuse_mounts``.

Each mount is served by its own ``python -m fusedrive.fuse_adapter`` process, which
reports readiness on a pipe (the approach of ``test_mount.py``). The store lives in
pytest's private tmp directory; mount points live in a separate directory that is
only ever emptied with ``rmdir``, so a mount left behind by a crash can never be
wiped by a recursive delete.

Invariant: whatever a test does, the fixture's teardown unmounts every mount it
made (``fusermount3 -u``, then ``-uz``) and reaps every daemon it started (SIGKILL
by PID as the last resort), and fails if anything is still in the mount table.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockstore import Store

log = logging.getLogger(__name__)

MiB = 1 << 20
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


class MountDaemon:
    """One ``fuse_adapter`` process serving one mount."""

    def __init__(self, store: Path, mountpoint: Path, args: list[str], log_file: Path) -> None:
        self.mountpoint = mountpoint
        self.log_file = log_file
        r, w = os.pipe()
        try:
            with open(log_file, "ab") as out:
                cmd = [sys.executable, "-m", "fusedrive.fuse_adapter", str(store), str(mountpoint)]
                self.proc = subprocess.Popen(
                    [*cmd, *args, "--ready-fd", str(w)],
                    pass_fds=(w,),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        finally:
            os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
            got = os.read(r, 1) if ready else b""
        finally:
            os.close(r)
        if got != b"R":
            self.stop()
            raise RuntimeError(f"daemon for {mountpoint} did not become ready:\n{self.output()}")

    def output(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Unmount and reap, escalating as needed; never leaves a mount behind."""
        try:
            if self.proc.poll() is None and is_mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            try:
                self.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(EXIT_TIMEOUT)
        finally:
            if is_mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)


class FuseMounts:
    """A store and the daemons serving mounts of its volumes and snapshots."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = tmp / "store"
        self.points = Path(tempfile.mkdtemp(prefix="fusedrive-test-"))
        os.chmod(self.points, 0o755)
        self.daemons: dict[Path, MountDaemon] = {}

    def volume(self, name: str = "v", capacity: int = 64 * MiB, **params: str) -> str:
        with Store(self.store) as s:
            s.create_volume(name, capacity, parameters=params)
        return name

    def mount(self, *args: str, at: str = "mnt") -> Path:
        """Mount with ``fuse_adapter`` arguments (``--volume V``, ``--snapshot S``, ...)."""
        mp = self.points / at
        old = self.daemons.get(mp)
        if old is not None and old.proc.poll() is not None and not is_mounted(mp):
            del self.daemons[mp]  # its daemon was killed or stopped by the test: reuse
        if mp in self.daemons:
            raise RuntimeError(f"{mp} is already in use")
        mp.mkdir(exist_ok=True)
        d = MountDaemon(self.store, mp, list(args), self.tmp / f"{at}.log")
        self.daemons[mp] = d
        return mp

    def daemon(self, mp: Path) -> MountDaemon:
        return self.daemons[mp]

    def unmount(self, mp: Path) -> MountDaemon:
        """A clean unmount: the daemon must flush and exit 0 by itself."""
        d = self.daemons.pop(mp)
        try:
            subprocess.run(["fusermount3", "-u", str(mp)], check=True, capture_output=True)
            status = d.proc.wait(EXIT_TIMEOUT)
        finally:
            d.stop()
            if not is_mounted(mp):
                mp.rmdir()
        assert status == 0, d.output()
        return d

    def discard(self, mp: Path) -> None:
        """Stop a mount whatever state it is in (teardown paths)."""
        d = self.daemons.pop(mp, None)
        if d is not None:
            d.stop()
        if not is_mounted(mp) and mp.exists():
            mp.rmdir()

    def log_tail(self, mp: Path, lines: int = 30) -> str:
        d = self.daemons.get(mp)
        return "" if d is None else "\n".join(d.output().splitlines()[-lines:])

    def stop_all(self) -> None:
        for mp in list(self.daemons):
            self.discard(mp)
        left = [p for p in self.points.iterdir() if is_mounted(p)]
        if not left:
            for p in self.points.iterdir():
                p.rmdir()  # never a recursive delete: a mount left behind would be emptied
            self.points.rmdir()
        assert not left, f"mounts left behind: {left}"


@pytest.fixture
def fuse_mounts(tmp_path: Path) -> Iterator[FuseMounts]:
    m = FuseMounts(tmp_path)
    try:
        yield m
    finally:
        m.stop_all()
