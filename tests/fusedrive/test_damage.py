"""Damaged chunks through a live mount: rewriting heals, fsck names files, zeroing is explicit.

A stored byte is flipped behind the store's back (``flip_stored_byte``) while the
volume is unmounted, so no cache hides it. Reads of the damaged range fail with EIO;
writing the same bytes again, to any file, heals the chunk for every file, volume
and snapshot that shares it; ``fusedrive fsck`` names every volume, snapshot and
path (with byte ranges) the damage reaches, ``--repair`` marks it, and
``--zero-damaged`` turns the damaged ranges of unmounted volumes into holes and says
which, leaving snapshots as they are.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from blockstore import ChunkRef, Store
from fusedrive.schema import chunk_key, chunk_prefix, patch_offset

if TYPE_CHECKING:
    from conftest import FuseMounts

pytestmark = pytest.mark.needs_fuse

CHUNK = 64 * 1024
Flip = Callable[[Store, bytes], None]


def fd_cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusedrive", "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def fsck_json(store: Path, *args: str) -> tuple[int, dict[str, Any]]:
    res = fd_cli(store, "fsck", "--json", *args)
    assert not res.stderr.strip() or "error" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout)


def stored_ref(store: Store, volume: str, key: bytes) -> ChunkRef:
    ref = store.volume(volume).get(key)
    assert isinstance(ref, ChunkRef), key
    return ref


def eio(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError as exc:
        assert exc.errno == errno.EIO, exc
        return True
    return False


def test_writing_the_same_data_again_heals_every_file_sharing_it(
    fuse_mounts: FuseMounts, flip_stored_byte: Flip
) -> None:
    fuse_mounts.volume("v")
    mnt = fuse_mounts.mount("--volume", "v")
    data = os.urandom(4 * CHUNK)
    (mnt / "a").write_bytes(data)
    ino = (mnt / "a").stat().st_ino
    fuse_mounts.unmount(mnt)
    assert fd_cli(fuse_mounts.store, "snapshot", "create", "v", "s").returncode == 0
    with Store(fuse_mounts.store) as s:
        flip_stored_byte(s, stored_ref(s, "v", chunk_key(ino, 2)).digest)

    mnt = fuse_mounts.mount("--volume", "v")
    assert eio(mnt / "a")
    with open(mnt / "b", "wb") as f:  # the identical good bytes, to a new file
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert (mnt / "b").read_bytes() == data  # on 678449a: EIO, dedup named the damaged copy
    assert (mnt / "a").read_bytes() == data
    fuse_mounts.unmount(mnt)
    snap = fuse_mounts.mount("--snapshot", "s", at="snap")
    assert (snap / "a").read_bytes() == data  # the snapshot shares the healed chunk
    fuse_mounts.unmount(snap)
    code, report = fsck_json(fuse_mounts.store)
    assert code == 0 and report["clean"], report

    # Damaged again, and nobody has read it yet: a write of the same bytes checks the
    # stored copy it would share and replaces it.
    with Store(fuse_mounts.store) as s:
        flip_stored_byte(s, stored_ref(s, "v", chunk_key(ino, 2)).digest)
    mnt = fuse_mounts.mount("--volume", "v")
    with open(mnt / "c", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert (mnt / "a").read_bytes() == data == (mnt / "c").read_bytes()
    fuse_mounts.unmount(mnt)

    # Damaged again: rewriting the file in place, chunk by whole chunk, heals it too.
    with Store(fuse_mounts.store) as s:
        flip_stored_byte(s, stored_ref(s, "v", chunk_key(ino, 2)).digest)
    mnt = fuse_mounts.mount("--volume", "v")
    assert eio(mnt / "b")
    with open(mnt / "a", "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert (mnt / "a").read_bytes() == data == (mnt / "b").read_bytes()
    fuse_mounts.unmount(mnt)
    code, report = fsck_json(fuse_mounts.store)
    assert code == 0 and report["clean"], report


def test_fsck_names_paths_and_ranges_and_zeroes_only_when_asked(
    fuse_mounts: FuseMounts, flip_stored_byte: Flip
) -> None:
    store = fuse_mounts.store
    fuse_mounts.volume("v")
    mnt = fuse_mounts.mount("--volume", "v")
    (mnt / "dir").mkdir()
    a = os.urandom(4 * CHUNK)
    (mnt / "dir" / "a").write_bytes(a)
    os.link(mnt / "dir" / "a", mnt / "a-link")
    b = bytearray(os.urandom(2 * CHUNK))
    (mnt / "b").write_bytes(b)
    fd = os.open(mnt / "b", os.O_RDWR)
    try:
        os.fsync(fd)
        patch = os.urandom(4096)
        os.pwrite(fd, patch, 70000)  # into a stored chunk: stored as a patch
        b[70000 : 70000 + 4096] = patch
        os.fsync(fd)
    finally:
        os.close(fd)
    ino_a, ino_b = (mnt / "dir" / "a").stat().st_ino, (mnt / "b").stat().st_ino
    assert fd_cli(store, "snapshot", "create", "v", "s").returncode == 0
    fuse_mounts.unmount(mnt)
    with Store(store) as s:
        flip_stored_byte(s, stored_ref(s, "v", chunk_key(ino_a, 1)).digest)
        patches = [k for k, _ in s.volume("v").scan(chunk_prefix(ino_b)) if patch_offset(k)]
        assert len(patches) == 1
        flip_stored_byte(s, stored_ref(s, "v", patches[0]).digest)

    code, report = fsck_json(store)
    assert code == 6 and not report["clean"]
    ranges = sorted(
        (r["kind"], r["name"], tuple(r["paths"]), r["start"], r["end"])
        for d in report["damaged"]
        for r in d["ranges"]
    )
    views = (("volume", "v"), ("snapshot", "s"))
    assert ranges == sorted(
        [(kind, name, ("/a-link", "/dir/a"), CHUNK, 2 * CHUNK) for kind, name in views]
        + [(kind, name, ("/b",), 70000, 74096) for kind, name in views]
    )
    text = fd_cli(store, "fsck")
    assert text.returncode == 6
    assert "volume v: /a-link, /dir/a bytes 65536-131071" in text.stdout
    assert "snapshot s: /b bytes 70000-74095" in text.stdout
    assert "--zero-damaged" in text.stdout

    code, report = fsck_json(store, "--repair")
    assert code == 6 and report["marked"] == 2  # marked, not changed
    assert all(d["marked"] for d in report["damaged"]) and not report["zeroed"]
    mnt = fuse_mounts.mount("--volume", "v")
    assert eio(mnt / "a-link") and eio(mnt / "b")  # --repair alone changed no data
    fuse_mounts.unmount(mnt)

    code, report = fsck_json(store, "--zero-damaged")
    assert code == 6, "the snapshot still holds the damage"
    zeroed = sorted((r["name"], tuple(r["paths"]), r["start"]) for r in report["zeroed"])
    assert zeroed == [("v", ("/a-link", "/dir/a"), CHUNK), ("v", ("/b",), 70000)]
    assert {(r["kind"], r["reason"]) for r in report["not_zeroed"]} == {
        ("snapshot", "snapshots are read-only")
    }
    assert {r["kind"] for d in report["damaged"] for r in d["ranges"]} == {"snapshot"}

    mnt = fuse_mounts.mount("--volume", "v")
    want_a = a[:CHUNK] + bytes(CHUNK) + a[2 * CHUNK :]
    assert (mnt / "dir" / "a").read_bytes() == want_a
    # Zeros where the damaged patch was, not the bytes it had covered.
    b[70000 : 70000 + 4096] = bytes(4096)
    assert (mnt / "b").read_bytes() == bytes(b)
    # The files' stored bytes follow: a's chunk is a hole, b's patch merged away.
    assert (mnt / "dir" / "a").stat().st_blocks * 512 == 3 * CHUNK
    assert (mnt / "b").stat().st_blocks * 512 == 2 * CHUNK
    fuse_mounts.unmount(mnt)
    assert fd_cli(store, "snapshot", "delete", "s").returncode == 0
    assert fd_cli(store, "gc").returncode == 0  # the snapshot's versions go, and the damage
    code, report = fsck_json(store)
    assert code == 0 and report["clean"], report


def test_a_read_marks_damage_and_zeroing_skips_a_mounted_volume(
    fuse_mounts: FuseMounts, flip_stored_byte: Flip
) -> None:
    store = fuse_mounts.store
    fuse_mounts.volume("v")
    mnt = fuse_mounts.mount("--volume", "v")
    (mnt / "f").write_bytes(os.urandom(CHUNK))
    ino = (mnt / "f").stat().st_ino
    fuse_mounts.unmount(mnt)
    with Store(store) as s:
        flip_stored_byte(s, stored_ref(s, "v", chunk_key(ino, 0)).digest)
    mnt = fuse_mounts.mount("--volume", "v")
    assert eio(mnt / "f")
    with open(mnt / "other", "wb") as f:  # the daemon's next commit marks what it found
        f.write(b"x")
        f.flush()
        os.fsync(f.fileno())
    code, report = fsck_json(store)
    assert code == 6 and [d["marked"] for d in report["damaged"]] == [True], report
    code, report = fsck_json(store, "--zero-damaged")
    assert code == 6 and not report["zeroed"]
    assert [r["reason"] for r in report["not_zeroed"]] == [
        "the volume is mounted; unmount it first"
    ]
    assert eio(mnt / "f")
    fuse_mounts.unmount(mnt)
