"""A store whose filesystem fills up: NoSpace, a reserve kept free, nothing stored lost.

The store lives on a real ext4 filesystem of a few tens of MiB on a loop device
(``tests/smallfs.py``), filled with incompressible chunks until the store refuses.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from blockstore import NoSpace, Store, StoreError, fsck
from blockstore.environment import RESERVE_MAX, RESERVE_MIN, default_reserve
from blockstore.errors import store_error_of
from tests.smallfs import small_filesystem

MiB, GiB = 1 << 20, 1 << 30
CHUNK = 64 << 10


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "fs", tmp_path / "fs.img", 48) as fs:
        yield fs / "store"


def fill(store: Store, volume: str, batch: int = 4, prefix: str = "c") -> dict[bytes, bytes]:
    """Put incompressible chunks into ``volume`` until the store says NoSpace; returns
    what was stored (a batch is one transaction: all of it or none)."""
    view = store.volume(volume)
    stored: dict[bytes, bytes] = {}
    i = 0
    while True:
        chunk = {f"{prefix}{i + j:06d}".encode(): os.urandom(CHUNK) for j in range(batch)}
        try:
            with view.batch() as b:
                for key, data in chunk.items():
                    b.put_chunk(key, store.prepare_chunk(data))
        except NoSpace:
            return stored
        stored.update(chunk)
        i += batch
        assert i < 100_000, "the store never filled up"


def test_default_reserve_is_a_share_of_the_filesystem_within_bounds() -> None:
    assert default_reserve(10 * GiB) == int(10 * GiB * 0.02)  # 2%
    assert default_reserve(400 * MiB) == RESERVE_MIN  # at least 16 MiB
    assert default_reserve(100 * GiB) == RESERVE_MAX  # at most 1 GiB
    assert default_reserve(48 * MiB) == 12 * MiB  # never more than a quarter of a tiny one


def test_filesystem_and_lmdb_failures_map_to_store_errors_in_one_place() -> None:
    assert isinstance(store_error_of(OSError(errno.ENOSPC, "full")), NoSpace)
    assert isinstance(store_error_of(OSError(errno.EDQUOT, "quota")), NoSpace)
    assert isinstance(store_error_of(lmdb.MapFullError("full")), NoSpace)
    lmdb_full = lmdb.Error("mdb_txn_commit: No space left on device")
    assert isinstance(store_error_of(lmdb_full), NoSpace)
    other = store_error_of(OSError(errno.EIO, "bad disk"))
    assert isinstance(other, StoreError) and not isinstance(other, NoSpace)
    assert store_error_of(ValueError("a bug")) is None


@pytest.mark.needs_loop
def test_a_full_store_refuses_data_and_creates_keeps_its_reserve_and_recovers(
    small_store: Path,
) -> None:
    with Store(small_store) as s:
        reserve = s.reserve_bytes()
        vfs = os.statvfs(small_store)
        assert reserve == default_reserve(vfs.f_blocks * vfs.f_frsize)
        s.create_volume("ballast", GiB)
        s.create_volume("v", GiB)
        stored = fill(s, "ballast")
        assert len(stored) * CHUNK > 16 * MiB  # it did store a good part of the disk
        # A batch of four was refused; up to three single chunks may still fit.
        stored.update(fill(s, "ballast", batch=1, prefix="d"))

        # Full: new data is refused with NoSpace, and the reserve is still free.
        with pytest.raises(NoSpace, match="reserve"):
            s.volume("v").put_chunk(b"one-more", os.urandom(CHUNK))
        st = s.stats()
        assert st.reserve_bytes == reserve
        assert st.room_bytes < 2 * CHUNK
        assert st.disk_free_bytes >= reserve
        for create in (
            lambda: s.create_volume("new", MiB),
            lambda: s.create_snapshot("v", "snap"),
            lambda: s.clone_volume("ballast", "copy"),
        ):
            with pytest.raises(NoSpace, match="reserve"):
                create()
        # Metadata still fits (that is what the reserve is for), and deletes work.
        s.volume("v").put(b"note", b"metadata is not refused")
        s.volume("ballast").delete(b"c000000")
        del stored[b"c000000"]

        # Everything stored reads back intact.
        view = s.volume("ballast")
        for key, data in stored.items():
            assert view.read_chunk(key) == data
        assert fsck(s).clean

        # Space comes back with delete + gc, and writing works again.
        s.delete_volume("ballast")
        s.gc()
        s.segments.settle()
        assert s.room() > 16 * MiB
        s.volume("v").put_chunk(b"one-more", data := os.urandom(CHUNK))
        assert s.volume("v").read_chunk(b"one-more") == data
        s.create_volume("new", MiB)
        assert fsck(s).clean


@pytest.mark.needs_loop
def test_a_hard_enospc_is_no_space_and_loses_nothing(
    small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the reserve check switched off the store meets the filesystem's own ENOSPC
    (a segment append, its fdatasync or LMDB's commit): still NoSpace, never an
    OSError, and what was committed before stays readable."""
    with Store(small_store) as s:
        s.create_volume("v", GiB)
        monkeypatch.setattr(Store, "_room", lambda self, txn: 1 << 50)
        stored = fill(s, "v", batch=1)
        with pytest.raises(NoSpace) as info:
            s.volume("v").put_chunk(b"again", os.urandom(CHUNK))
        assert isinstance(info.value.__cause__, (OSError, lmdb.Error)), info.value.__cause__
        view = s.volume("v")
        for key, data in stored.items():
            assert view.read_chunk(key) == data
    monkeypatch.undo()
    with Store(small_store, create=False) as s:  # reopens, and reads what it stored
        view = s.volume("v")
        assert all(view.read_chunk(key) == data for key, data in stored.items())
