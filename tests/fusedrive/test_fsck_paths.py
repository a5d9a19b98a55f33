"""``fusedrive.fsck`` without a mount: keys to paths and byte ranges, whatever the tree.

The directory records are written straight into a volume (``fusedrive.schema``
keys), so the shapes a mount would never make are covered too: a directory
chain deeper than Python's recursion limit, a cycle, a lost parent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from blockstore import Store, fsck
from fusedrive.fsck import _paths, locate
from fusedrive.schema import ROOT_INO, SUPERBLOCK_KEY, Superblock, chunk_key, dirent_key
from fusedrive.schema import pack_dirent as dirent

CHUNK = 65536


def test_paths_of_links_deep_trees_and_broken_records(tmp_path: Path) -> None:
    with Store(tmp_path / "store") as store:
        store.create_volume("v", 1 << 30)
        v = store.volume("v")
        with v.batch() as b:
            b.put(dirent_key(ROOT_INO, b"dir"), dirent(2, 1))
            b.put(dirent_key(2, b"f"), dirent(3, 1))
            b.put(dirent_key(ROOT_INO, b"link"), dirent(3, 2))  # a hard link
            b.put(dirent_key(4, b"a"), dirent(5, 1))  # 4 and 5 name each other
            b.put(dirent_key(5, b"b"), dirent(4, 1))
            b.put(dirent_key(4, b"lost"), dirent(6, 1))
            b.put(dirent_key(99, b"orphaned"), dirent(7, 1))  # 99 has no name
            parent = ROOT_INO
            for i in range(3000):  # deeper than the recursion limit
                b.put(dirent_key(parent, b"d"), dirent(1000 + i, 1))
                parent = 1000 + i
            b.put(dirent_key(parent, b"deep"), dirent(8, 1))
        paths = _paths(v)
    assert paths[3] == ["/dir/f", "/link"]
    assert paths[2] == ["/dir"]
    assert paths[6] == [] and paths[7] == [] and paths[4] == []
    assert paths[8] == ["/d" * 3000 + "/deep"]


def test_locate_gives_the_byte_range_of_chunks_and_patches(
    tmp_path: Path, flip_stored_byte: Callable[[Store, bytes], None]
) -> None:
    with Store(tmp_path / "store") as store:
        store.create_volume("v", 1 << 30)
        v = store.volume("v")
        data, patch = os.urandom(CHUNK), os.urandom(100)
        with v.batch() as b:
            b.put(SUPERBLOCK_KEY, Superblock(CHUNK, 10, 3).pack())
            b.put(dirent_key(ROOT_INO, b"f"), dirent(2, 1))
            b.put_chunk(chunk_key(2, 3), store.prepare_chunk(data))
            b.put_chunk(chunk_key(2, 5) + (7).to_bytes(4, "big"), store.prepare_chunk(patch))
            b.put(b"Zother", b"x")
            b.put_chunk(b"Zraw", store.prepare_chunk(patch))  # the patch's chunk, elsewhere
        for key in (chunk_key(2, 3), b"Zraw"):
            ref = v.get(key)
            assert ref is not None and not isinstance(ref, bytes)
            flip_stored_byte(store, ref.digest)
        found = sorted((r.paths, r.start, r.end, r.ino, r.key) for r in locate(store, fsck(store)))
    assert found == [
        ((), 0, 0, None, b"Zraw"),
        (("/f",), 3 * CHUNK, 4 * CHUNK, 2, chunk_key(2, 3)),
        (("/f",), 5 * CHUNK + 7, 5 * CHUNK + 107, 2, chunk_key(2, 5) + (7).to_bytes(4, "big")),
    ]
