"""Faults under a real mount: a store that cannot store, a store disk that fills up.

What a user may rely on (README "Faults"): fsync, close and unmount report every
failure to store data (EIO, or ENOSPC for a full store), data the daemon could not
store is never reported as stored and stays buffered while the daemon keeps serving,
and a daemon never unmounts itself or exits on its own while mounted.

Every test mounts with ``fusedrive mount`` (a detached daemon, as a user would) and
unmounts with ``fusedrive umount``; the ``mounts`` fixture unmounts and ends by PID
whatever a test leaves behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from blockstore import Store
from blockstore.environment import default_reserve
from fusedrive import cli
from fusedrive.control import request_flush
from fusedrive.daemon import process_starttime
from fusedrive.flusher import FLUSH_INTERVAL
from tests.smallfs import small_filesystem

MiB, GiB = 1 << 20, 1 << 30


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def alive(pid: int) -> bool:
    return process_starttime(pid) is not None


class Mounts:
    def __init__(self, runtime: Path) -> None:
        self.runtime = runtime
        self.points: list[Path] = []
        self.pids: list[int] = []

    def run(self, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FUSEDRIVE_RUNTIME_DIR": str(self.runtime)}
        return subprocess.run(
            [sys.executable, "-m", "fusedrive", "--store", str(store), *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    def mount(self, store: Path, volume: str, mnt: Path) -> dict[str, object]:
        mnt.mkdir(exist_ok=True)
        self.points.append(mnt)
        res = self.run(store, "mount", volume, str(mnt), "--json")
        assert res.returncode == 0, res.stderr
        info: dict[str, object] = json.loads(res.stdout)
        self.pids.append(int(info["pid"]))  # type: ignore[call-overload]
        return info

    def cleanup(self) -> None:
        for mp in self.points:
            if mounted(mp):
                subprocess.run(["fusermount3", "-uz", str(mp)], check=False)
        deadline = time.monotonic() + 30
        for pid in self.pids:
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for log in self.runtime.glob("*.log"):
            print(f"--- {log.name}\n{log.read_text()[-20000:]}")


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path / "run")
    try:
        yield m
    finally:
        m.cleanup()


def force_parameters(store_path: Path, volume: str, params: dict[str, str]) -> None:
    """Write ``params`` into the volume's record behind every validation (fault injection)."""
    with Store(store_path, create=False) as s, s._write() as t:
        info = s._volume(t.txn, volume)
        s._put_volume(t.txn, replace(info, parameters={**info.parameters, **params}))


def write_file(path: Path, data: bytes) -> None:
    """Write, fsync and close with the raw calls, so each one's error is seen."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


# -- a flush that fails --------------------------------------------------------------------


@pytest.mark.needs_fuse
def test_a_failing_flush_is_reported_by_fsync_close_and_umount_and_the_data_kept(
    tmp_path: Path, mounts: Mounts
) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    assert mounts.run(store, "volume", "create", "v", "--size", "64MiB").returncode == 0
    info = mounts.mount(store, "v", mnt)
    pid = int(info["pid"])  # type: ignore[call-overload]
    before = os.urandom(300 << 10)
    write_file(mnt / "before.bin", before)

    # The store cannot compress at this level: every flush of file data fails.
    force_parameters(store, "v", {"compression_level": "99"})
    request_flush(mnt)  # nothing buffered; the daemon picks up the volume's parameters
    payload = os.urandom(1000) * 1100  # compressible: the store compresses it (at level 99)
    fd = os.open(mnt / "after.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, payload) == len(payload)  # buffered
        with pytest.raises(OSError) as fsync_err:
            os.fsync(fd)
        assert fsync_err.value.errno == errno.EIO
    finally:
        with pytest.raises(OSError) as close_err:
            os.close(fd)  # close(2) reports it too (the descriptor is closed all the same)
    assert close_err.value.errno == errno.EIO

    # The daemon keeps serving, with the data still buffered.
    assert mounted(mnt) and alive(pid)
    assert (mnt / "after.bin").read_bytes() == payload
    assert (mnt / "before.bin").read_bytes() == before

    # umount refuses: the data is not stored, and the mount stays up.
    res = mounts.run(store, "umount", str(mnt))
    assert res.returncode == 1, res
    assert "not unmounted" in res.stderr and "Input/output error" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert mounted(mnt) and alive(pid)

    # Once the cause is fixed the same daemon stores it, and umount succeeds.
    force_parameters(store, "v", {"compression_level": "3"})
    res = mounts.run(store, "umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert not mounted(mnt) and not alive(pid)
    assert not Path(str(info["log"])).exists()  # a clean unmount: its log is removed
    assert mounts.run(store, "fsck").returncode == 0

    mounts.mount(store, "v", mnt)
    assert (mnt / "after.bin").read_bytes() == payload
    assert (mnt / "before.bin").read_bytes() == before
    assert mounts.run(store, "umount", str(mnt)).returncode == 0


@pytest.mark.needs_fuse
def test_writes_lost_at_unmount_are_reported_lost_never_as_stored(
    tmp_path: Path, mounts: Mounts
) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    assert mounts.run(store, "volume", "create", "v", "--size", "64MiB").returncode == 0
    info = mounts.mount(store, "v", mnt)
    pid = int(info["pid"])  # type: ignore[call-overload]
    force_parameters(store, "v", {"compression_level": "99"})
    request_flush(mnt)
    (mnt / "lost.bin").write_bytes(os.urandom(1000) * 300)  # buffered: no fsync

    # --discard unmounts although the final flush fails, and says what was lost.
    res = mounts.run(store, "umount", "--discard", str(mnt))
    assert not mounted(mnt) and not alive(pid)
    assert res.returncode == 0, res.stderr
    assert "could not store" in res.stderr and "lost" in res.stderr, res.stderr
    log = Path(str(info["log"])).read_text()
    assert "event=data_not_stored" in log


# -- a store disk that fills up ---------------------------------------------------------------


@pytest.mark.needs_fuse
@pytest.mark.needs_loop
def test_a_full_store_disk_gives_enospc_and_the_mount_stays_up(
    tmp_path: Path, mounts: Mounts
) -> None:
    with small_filesystem(tmp_path / "fs", tmp_path / "fs.img", 64) as fs:
        store, mnt = fs / "store", tmp_path / "mnt"
        assert mounts.run(store, "volume", "create", "v", "--size", "1GiB").returncode == 0
        with Store(store, create=False) as s:
            s.create_volume("ballast", GiB)
            view = s.volume("ballast")
            for i in range(12 * 16):  # 12 MiB of incompressible data
                view.put_chunk(f"b{i}".encode(), os.urandom(64 << 10))
            reserve = s.reserve_bytes()
        info = mounts.mount(store, "v", mnt)
        pid = int(info["pid"])  # type: ignore[call-overload]

        # Fill it up: 1 MiB files, each fsync'd, until something fails.
        stored: dict[str, bytes] = {}
        failure: OSError | None = None
        for i in range(200):
            data = os.urandom(MiB)
            try:
                write_file(mnt / f"f{i:03d}", data)
            except OSError as exc:
                failure = exc
                break
            stored[f"f{i:03d}"] = data
        assert failure is not None, "the store never filled up"
        assert failure.errno == errno.ENOSPC, failure
        assert len(stored) >= 8
        st = json.loads(mounts.run(store, "stats", "--json").stdout)
        assert st["reserve_bytes"] == reserve and st["disk_free_bytes"] >= reserve // 2

        # Past the daemon's flush interval (its timer retried whatever is buffered),
        # the mount is still up and later writes still fail with ENOSPC.
        time.sleep(FLUSH_INTERVAL + 1)
        assert mounted(mnt) and alive(pid)
        with pytest.raises(OSError) as again:
            write_file(mnt / "more.bin", os.urandom(MiB))
        assert again.value.errno == errno.ENOSPC
        assert mounted(mnt) and alive(pid)
        for name, data in stored.items():
            assert (mnt / name).read_bytes() == data

        # Free space (another volume deleted, gc), and writing works again.
        assert mounts.run(store, "volume", "delete", "ballast").returncode == 0
        assert mounts.run(store, "gc").returncode == 0
        resumed = os.urandom(4 * MiB)
        write_file(mnt / "more.bin", resumed)
        # Deleting files inside the mount gives space back too.
        for name in list(stored)[:4]:
            (mnt / name).unlink()
            del stored[name]
        write_file(mnt / "again.bin", again_data := os.urandom(2 * MiB))

        res = mounts.run(store, "umount", str(mnt))
        assert res.returncode == 0, res.stderr
        assert not mounted(mnt) and not alive(pid)
        assert list(mnt.iterdir()) == []  # nothing ever landed beneath the mount point
        assert mounts.run(store, "fsck").returncode == 0
        mounts.mount(store, "v", mnt)
        for name, data in {**stored, "more.bin": resumed, "again.bin": again_data}.items():
            assert (mnt / name).read_bytes() == data
        assert mounts.run(store, "umount", str(mnt)).returncode == 0


# -- the reserve in `fusedrive stats` ---------------------------------------------------------


def test_stats_shows_the_reserve_and_sets_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"

    def fd(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--store", str(store), *args])
        out, err = capsys.readouterr()
        return code, out, err

    assert fd("volume", "create", "v", "--size", "4MiB")[0] == 0
    code, out, _ = fd("stats", "--json")
    st = json.loads(out)
    vfs = os.statvfs(store)
    assert code == 0 and st["reserve_bytes"] == default_reserve(vfs.f_blocks * vfs.f_frsize)
    assert 0 <= st["room_bytes"] <= st["disk_free_bytes"] - st["reserve_bytes"] + 64 * MiB

    code, out, _ = fd("stats", "--set-reserve", "64MiB", "--json")
    assert code == 0 and json.loads(out)["reserve_bytes"] == 64 * MiB
    code, out, _ = fd("stats")
    assert code == 0 and "reserve kept free" in out and "64 MiB" in out and "room for new" in out
    with Store(store, create=False) as s:  # recorded in the store: every process sees it
        assert s.reserve_bytes() == 64 * MiB
    code, out, _ = fd("stats", "--set-reserve", "default", "--json")
    assert json.loads(out)["reserve_bytes"] == default_reserve(vfs.f_blocks * vfs.f_frsize)
    code, _, err = fd("stats", "--set-reserve", "lots")
    assert code == 8 and err.startswith("fusedrive: error: ") and "Traceback" not in err
