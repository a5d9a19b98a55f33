"""The deterministic file tree that ``tar x`` and ``rsync -a`` benchmarks unpack and copy.

One definition for ``datapath_bench`` (issue 18's table) and ``meta_bench`` (the
metadata requests), so both measure the same kind of tree.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

TREE_SEED = 18

# (kind, share of the tree's bytes, smallest and largest file, files per directory)
TREE_MIX: tuple[tuple[str, float, int, int, int], ...] = (
    ("small", 0.25, 256, 16 << 10, 100),
    ("medium", 0.45, 64 << 10, 1 << 20, 20),
    ("large", 0.30, 8 << 20, 8 << 20, 10),
)
_TEXT = b"fusedrive benchmark tree: a line of text that compresses well\n"


def make_tree(root: Path, total: int, seed: int = TREE_SEED) -> dict[str, Any]:
    """A deterministic tree of ``total`` bytes under ``root`` (same ``seed``, same tree).

    ``TREE_MIX``: a quarter of the bytes in small files (256 B-16 KiB, 100 per
    directory, two levels deep), 45% in medium ones (64 KiB-1 MiB), 30% in large ones
    (8 MiB, smaller if the share is smaller); each category's last file takes what is
    left of its share. Every file is half seeded random bytes (incompressible), half
    repeated text (compressible); every tenth file is executable; one mtime for all.
    """
    rng = random.Random(seed)
    files = dirs = 0
    for kind, share, lo, hi, per_dir in TREE_MIX:
        budget = int(total * share)
        n = 0
        while budget > 0:
            size = min(budget, rng.randint(lo, hi))
            budget -= size
            sub = n // per_dir
            d = root / kind / f"d{sub // 10:02d}" / f"e{sub % 10}"
            if n % per_dir == 0:
                d.mkdir(parents=True, exist_ok=True)
                dirs += 1
            p = d / f"f{n:05d}.dat"
            half = size // 2
            text = _TEXT * (-(-(size - half) // len(_TEXT)))
            p.write_bytes(rng.randbytes(half) + text[: size - half])
            if n % 10 == 0:
                p.chmod(0o755)
            n += 1
            files += 1
    stamp = 1_700_000_000
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in (*filenames, *dirnames):
            os.utime(os.path.join(dirpath, name), (stamp, stamp))
    os.utime(root, (stamp, stamp))
    return {"files": files, "directories": dirs, "bytes": tree_size(root)[1]}


def tree_size(root: Path) -> tuple[int, int]:
    """(regular files, their bytes) under ``root``."""
    files = size = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size
