"""SIGKILL of a live mount's daemon during writes, renames and snapshots, then remount.

Each round (one seed) mounts a volume with ``fusedrive mount`` (a recorded daemon,
so ``fusedrive snapshot create`` flushes it first) and runs a seeded plan of
operations through the mount: new files written and fsync'd, appends fsync'd,
files written without fsync, renames of fsync'd files into other directories and
over other fsync'd files, each followed by an fsync of both directories, and
``fusedrive snapshot create`` on the live mount. A killer thread waits for one
seeded operation of the round's target kind (a write, a rename, a rename over a
file, or a snapshot) to start, sleeps a seeded delay, and SIGKILLs the daemon by
its PID. Then ``fusedrive umount`` detaches the dead mount, ``fusedrive fsck`` must
be clean, and a fresh mount must show:

- every fsync'd file at its name (or, for a rename in flight, at exactly one of its
  two names: never both, never neither; a rename over another file in flight
  leaves either both files as they were or the source under the target's name),
  holding at least its fsync'd bytes, and every file is a prefix of what was
  written to it (nothing torn or foreign);
- no name the plan never made;
- every snapshot whose command returned before the kill holds exactly the tree as
  it was when the command started; one cut while the daemon died is crash
  consistent like the volume; a failed ``snapshot create`` left no snapshot.

Bounded: ``ROUNDS`` seeds, a dozen or so operations each, files up to 1 MiB.
Existing neighbours: ``tests/blockstore/test_crash.py`` kills store writers (no
FUSE), ``test_mount.py`` kills an idle daemon after fsync and after patches, and
``test_snapshot_writer.py`` snapshots a live writer without killing anything.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fusedrive.daemon import process_starttime

log = logging.getLogger(__name__)

pytestmark = pytest.mark.needs_fuse

ROUNDS = int(os.environ.get("FUSEDRIVE_KILL_ROUNDS", "6"))  # more for a soak run
TARGETS = ("write", "rename", "snapshot", "write", "replace", "snapshot")  # by seed
DIRS = ("d0", "d1", "d2")
SIZES = (1, 5000, 65536, 100_000, 300_000, 1 << 20)
WAIT = 60.0  # a guard against a hang, not a performance bound
# Errors an operation on a mount whose daemon was just killed may return.
DEAD = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}


def cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusedrive", "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def alive(pid: int) -> bool:
    return process_starttime(pid) is not None


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@dataclass
class FileModel:
    """What was written to one file, how much of it was fsync'd, and its names."""

    name: str
    data: bytearray
    synced: int = -1  # bytes fsync'd; -1: never fsync'd (the file may be absent)
    alt: str | None = None  # a rename in flight or not yet fsync'd: the other name


@dataclass
class SnapshotOp:
    name: str
    expected: dict[str, bytes]  # the tree when the command started
    model: list[FileModel]  # copies, for a crash-consistent check
    code: int | None = None
    returned_at: float | None = None


@dataclass
class Round:
    mnt: Path
    store: Path
    rng: random.Random
    files: list[FileModel] = field(default_factory=list)
    snapshots: list[SnapshotOp] = field(default_factory=list)
    started: list[str] = field(default_factory=list)  # kinds of the operations begun
    counter: int = 0
    replacing: tuple[FileModel, FileModel] | None = None  # (source, target) in flight

    def new_name(self) -> str:
        self.counter += 1
        return f"{self.rng.choice(DIRS)}/f{self.counter}"

    def fsync_dir(self, rel: str) -> None:
        fd = os.open(self.mnt / rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- operations: the model is updated before (what may be) and after (what is) --
    def write(self, fsync: bool) -> None:
        f = FileModel(self.new_name(), bytearray(self.rng.randbytes(self.rng.choice(SIZES))))
        self.files.append(f)
        with open(self.mnt / f.name, "xb") as out:
            out.write(f.data)
            out.flush()  # out of Python's buffer: the daemon has it once this returns
            if fsync:
                os.fsync(out.fileno())
                f.synced = len(f.data)

    def append(self) -> None:
        settled = [f for f in self.files if f.synced == len(f.data) and f.alt is None]
        if not settled:
            return self.write(fsync=True)
        f = self.rng.choice(settled)
        more = self.rng.randbytes(self.rng.choice(SIZES[:4]))
        f.data += more
        with open(self.mnt / f.name, "ab") as out:
            out.write(more)
            out.flush()
            os.fsync(out.fileno())
            f.synced = len(f.data)

    def rename(self) -> None:
        settled = [f for f in self.files if f.synced == len(f.data) and f.alt is None]
        if not settled:
            return self.write(fsync=True)
        f = self.rng.choice(settled)
        old, new = f.name, self.new_name()
        f.alt = new
        os.rename(self.mnt / old, self.mnt / new)
        f.name, f.alt = new, old
        for d in {old.split("/")[0], new.split("/")[0]}:
            self.fsync_dir(d)
        f.alt = None

    def replace(self) -> None:
        """Rename one fsync'd file over another: the target name holds one of the two."""
        settled = [f for f in self.files if f.synced == len(f.data) and f.alt is None]
        if len(settled) < 2:
            return self.rename()
        a, b = self.rng.sample(settled, 2)
        self.replacing = (a, b)
        os.rename(self.mnt / a.name, self.mnt / b.name)
        for d in {a.name.split("/")[0], b.name.split("/")[0]}:
            self.fsync_dir(d)
        self.files.remove(b)
        a.name = b.name
        self.replacing = None

    def worlds(self) -> list[list[FileModel]]:
        """The states the tree may be in: two while a replacing rename is in flight."""
        if self.replacing is None:
            return [self.files]
        a, b = self.replacing
        moved = FileModel(b.name, a.data, a.synced)
        return [self.files, [moved if f is a else f for f in self.files if f is not b]]

    def snapshot(self) -> None:
        name = f"s{len(self.snapshots)}"
        op = SnapshotOp(
            name,
            {f.name: bytes(f.data) for f in self.files},
            [FileModel(f.name, bytearray(f.data), f.synced, f.alt) for f in self.files],
        )
        self.snapshots.append(op)
        res = cli(self.store, "snapshot", "create", "v", name)
        op.code, op.returned_at = res.returncode, time.monotonic()
        if res.returncode != 0:
            raise OSError(errno.ENOTCONN, f"snapshot create failed: {res.stderr.strip()}")

    def run(self, kind: str) -> None:
        self.started.append(kind)
        if kind == "write":
            self.write(fsync=True)
        elif kind == "unsynced":
            self.write(fsync=False)
        elif kind == "append":
            self.append()
        elif kind == "rename":
            self.rename()
        elif kind == "replace":
            self.replace()
        else:
            self.snapshot()


def tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def check_crash_consistent(got: dict[str, bytes], files: list[FileModel], what: str) -> None:
    allowed: set[str] = set()
    for f in files:
        names = [f.name] + ([f.alt] if f.alt else [])
        allowed.update(names)
        present = [n for n in names if n in got]
        assert len(present) <= 1, f"{what}: {f.name} is at both {names}"
        if f.synced >= 0:
            assert present, f"{what}: fsync'd {f.name} (or {f.alt}) is gone"
        if present:
            body = got[present[0]]
            assert len(body) >= max(f.synced, 0), f"{what}: {present[0]} lost fsync'd bytes"
            assert body == bytes(f.data[: len(body)]), f"{what}: {present[0]} is not a prefix"
    unexpected = set(got) - allowed
    assert not unexpected, f"{what}: names nobody made: {sorted(unexpected)}"


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The daemons' runtime directory; every daemon recorded there is gone afterwards."""
    path = tmp_path / "run"
    monkeypatch.setenv("FUSEDRIVE_RUNTIME_DIR", str(path))
    points = Path(tempfile.mkdtemp(prefix="fusedrive-kill-"))
    os.chmod(points, 0o755)
    try:
        yield points
    finally:
        for mp in sorted(points.iterdir()):
            if is_mounted(mp):
                subprocess.run(["fusermount3", "-uz", str(mp)], check=False)
        for rec in path.glob("*.json"):
            pid = json.loads(rec.read_text())["pid"]
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for mp in sorted(points.iterdir()):
            if not is_mounted(mp):
                mp.rmdir()  # never a recursive delete: a mount left behind would be emptied
        if not any(points.iterdir()):
            points.rmdir()


def mount(store: Path, name: str, at: Path) -> int:
    at.mkdir(exist_ok=True)
    res = cli(store, "mount", name, str(at), "--json")
    assert res.returncode == 0, res.stderr
    return int(json.loads(res.stdout)["pid"])


def umount(store: Path, at: Path) -> None:
    res = cli(store, "umount", str(at))
    assert res.returncode == 0, res.stderr
    assert not is_mounted(at)


def plan(rng: random.Random, target: str) -> tuple[list[str], int]:
    kinds = ["write", "write", "unsynced", "append", "rename", "replace", "snapshot"]
    ops = ["write", "write"] + [rng.choice(kinds) for _ in range(rng.randrange(4, 10))]
    ops.append(target)
    return ops, len(ops) - 1


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_sigkill_during_writes_renames_and_snapshots(
    tmp_path: Path, runtime: Path, seed: int
) -> None:
    rng = random.Random(seed)
    target = TARGETS[seed % len(TARGETS)]
    store = tmp_path / "store"
    assert cli(store, "volume", "create", "v", "--size", "256MiB").returncode == 0
    mnt = runtime / "v"
    pid = mount(store, "v", mnt)
    for d in DIRS:
        (mnt / d).mkdir()
    r = Round(mnt, store, rng)
    r.fsync_dir(".")
    ops, kill_at = plan(rng, target)
    # Roughly how long the target takes here: a snapshot command 0.5-1 s (a process
    # start, a flush, a commit), a write up to 1 MiB and its fsync tens of ms, a
    # rename and the fsync of its directories a few ms.
    delay = rng.uniform(0, {"snapshot": 0.8, "write": 0.03}.get(target, 0.004))
    log.info("seed=%d target=%s ops=%s delay=%.3f", seed, target, ops, delay)

    armed, killed_at = threading.Event(), []

    def killer() -> None:
        if armed.wait(WAIT):
            time.sleep(delay)
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT
        i = 0
        while time.monotonic() < deadline:
            kind = ops[i] if i < len(ops) else "write"  # keep going until the kill lands
            if i == kill_at:
                armed.set()
            try:
                r.run(kind)
            except OSError as exc:
                log.info("seed=%d %s failed: %s", seed, kind, exc)
                assert exc.errno in DEAD, exc
                assert killed_at, f"{kind} failed before the kill: {exc}"
                break
            i += 1
    finally:
        armed.set()
        thread.join(WAIT)
    log.info(
        "seed=%d killed during op %d (%s) of %s; snapshots %s",
        seed,
        len(r.started) - 1,
        r.started[-1] if r.started else "-",
        r.started,
        [
            (s.name, s.code, s.returned_at is not None and s.returned_at < killed_at[0])
            for s in r.snapshots
        ],
    )
    end = time.monotonic() + WAIT
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    assert not alive(pid)
    umount(store, mnt)
    res = cli(store, "fsck")
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout + res.stderr

    mount(store, "v", mnt)
    try:
        got = tree(mnt)
    finally:
        umount(store, mnt)
    errors = []
    for world in r.worlds():
        try:
            check_crash_consistent(got, world, f"volume after kill in {r.started[-1]}")
            break
        except AssertionError as exc:
            errors.append(exc)
    else:
        raise errors[0]

    listed = {s["name"] for s in json.loads(cli(store, "snapshot", "list", "--json").stdout)}
    assert listed == {s.name for s in r.snapshots if s.code == 0}, "a failed create left one"
    for snap in r.snapshots:
        if snap.code != 0:
            continue
        at = runtime / snap.name
        mount(store, snap.name, at)
        try:
            got = tree(at)
        finally:
            umount(store, at)
        assert snap.returned_at is not None
        if snap.returned_at < killed_at[0]:
            assert got == snap.expected, f"snapshot {snap.name} taken before the kill changed"
        else:  # the daemon died while the snapshot was cut: crash consistent
            check_crash_consistent(got, snap.model, f"snapshot {snap.name} cut during the kill")
    res = cli(store, "fsck")
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout + res.stderr
