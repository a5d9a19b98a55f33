"""tar, rsync and cp -a on fusedrive, refereed by the same runs on a plain directory.

The source trees are real ones (Python's standard library, the time zone database)
plus ``make_extras``: every file type the tools copy (hard links, symlinks to files,
directories and nowhere, a FIFO, empty and sparse files, files of a chunk's size
and one byte more), unusual modes (0444, 0600, setuid, setgid, sticky directories),
other owners, user xattrs, times with nanoseconds, long and non-ASCII names.

After each tool has run, the site is remounted, the tool's own check passes
(``tar --compare``, an ``rsync --checksum --dry-run`` that finds nothing to do),
and the tree is the same on fusedrive as on the referee: names, types, bytes,
modes, owners, mtimes (directories too), link targets, hard links, and xattrs where
the tool keeps them.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from referee import MiB, Site, assert_same_tree, diff_r, manifest, run

pytestmark = pytest.mark.needs_fuse

REAL_TREES = [Path("/usr/lib/python3.11"), Path("/usr/share/zoneinfo")]
T0 = 1_000_000_000_123_456_789  # 2001-09-09, with nanoseconds


def make_extras(root: Path, seed: int = 1) -> None:
    """Files of every kind and attribute tar, rsync and cp -a are asked to keep."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "big.bin").write_bytes(rng.randbytes(16 * MiB))
    with open(root / "sparse.bin", "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB + 1234)
        f.write(b"an island in the hole")
    for n in (0, 1, 65535, 65536, 65537, 3 * 65536):
        (root / f"size-{n}").write_bytes(rng.randbytes(n))
    modes = {"ro": 0o444, "private": 0o600, "group": 0o640, "exec": 0o755, "suid": 0o4755}
    modes |= {"sgid": 0o2755, "odd": 0o517}
    for name, mode in modes.items():
        p = root / f"mode-{name}"
        p.write_text(f"{name}\n")
        os.chmod(p, mode)
    for name, mode in {"private": 0o700, "shared": 0o750, "sticky": 0o1777}.items():
        d = root / f"dir-{name}"
        d.mkdir()
        (d / "inside").write_text(name)
        os.chmod(d, mode)
    (root / "dir-setgid").mkdir()
    os.chmod(root / "dir-setgid", 0o2775)
    (root / "empty-dir").mkdir()
    owned = root / "owned"
    owned.mkdir()
    (owned / "file").write_text("theirs")
    os.chown(owned / "file", 1234, 5678)
    os.chown(owned, 4321, 4321)
    (root / "links").mkdir()
    (root / "links" / "target").write_text("pointed at")
    os.symlink("target", root / "links" / "relative")
    os.symlink("/etc/hostname", root / "links" / "absolute")
    os.symlink("../nowhere/at/all", root / "links" / "dangling")
    os.symlink("../dir-shared", root / "links" / "to-dir")
    os.lchown(root / "links" / "relative", 1111, 2222)
    (root / "hard-a").write_bytes(rng.randbytes(70000))
    os.link(root / "hard-a", root / "hard-b")
    os.link(root / "hard-a", root / "links" / "hard-c")
    os.mkfifo(root / "fifo", 0o620)
    (root / "names").mkdir()
    for name in ("with space", "ünïcødé-名前", "-dash", "x" * 255, ".hidden", "a'quote\"s"):
        (root / "names" / name).write_text(name)
    os.setxattr(root / "mode-group", "user.comment", b"kept by tar --xattrs and cp -a")
    os.setxattr(root / "dir-shared", "user.dir", b"\x00binary\xff")
    # Times last, deepest first, so creating entries does not move a parent's mtime.
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(root), reverse=True)):
        for j, name in enumerate(sorted(dirnames) + sorted(filenames)):
            p = Path(dirpath) / name
            t = T0 + (i * 1000 + j) * 1_000_003_007
            os.utime(p, ns=(t, t), follow_symlinks=False)
    os.utime(root, ns=(T0, T0))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain tree of real files and the extras, ~75 MiB; never modified by tests."""
    src = tmp_path_factory.mktemp("source") / "tree"
    make_extras(src / "extras")
    for t in REAL_TREES:
        if t.is_dir():
            run(["tar", "-c", "--exclude=__pycache__", "-C", t.parent, t.name, "-f", src / "t.tar"])
            run(["tar", "-x", "-f", src / "t.tar", "-C", src])
            (src / "t.tar").unlink()
    return src


@pytest.fixture(scope="module")
def tarball(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tarball") / "tree.tar"
    run(["tar", "-c", "--format=posix", "--xattrs", "-f", out, "-C", source, "."])
    return out


@pytest.fixture
def edited_source(source: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the extras and part of the real trees, for tests that edit it."""
    src = tmp_path / "src"
    src.mkdir()
    run(["cp", "-a", source / "extras", src])
    for sub in ("python3.11/email", "python3.11/json", "zoneinfo/Europe"):
        if (source / sub).exists():
            run(["cp", "-a", source / sub, src / sub.replace("/", "-")])
    yield src


def edit(src: Path, round: int) -> None:
    """Changes an rsync over an existing tree must carry: every kind of them."""
    rng = random.Random(round)
    e = src / "extras"
    with open(e / "big.bin", "r+b") as f:  # a few bytes in the middle: a delta
        for _ in range(5):
            f.seek(rng.randrange(16 * MiB - 100))
            f.write(rng.randbytes(100))
    # Same size: rsync's quick check (size and whole-second mtime) would skip it if the
    # edit fell in the same second as the last sync, so give each round its own second.
    os.utime(e / "big.bin", ns=(T0 + round * 13 * 10**9, T0 + round * 13 * 10**9))
    with open(e / "size-196608", "ab") as f:
        f.write(rng.randbytes(5000))
    os.truncate(e / "size-65537", 100 + round)
    (e / f"new-{round}").write_bytes(rng.randbytes(200_000))
    (e / f"size-{round - 1}").unlink()
    os.chmod(e / "mode-private", 0o644 if round % 2 else 0o600)
    os.utime(e / "hard-a", ns=(T0 + round * 7 * 10**9, T0 + round * 7 * 10**9 + 1))
    swapped = e / "dir-private"  # a directory becomes a file, and back
    if swapped.is_dir():
        shutil.rmtree(swapped)
        swapped.write_text(f"a file where a directory was, round {round}")
    else:
        swapped.unlink()
        swapped.mkdir()
        (swapped / "inside").write_text(f"round {round}")
    old = "with space" if round == 1 else f"renamed-{round - 1}"
    (e / "names" / old).rename(e / "names" / f"renamed-{round}")
    os.symlink(f"target-{round}", e / "links" / f"new-link-{round}")
    shutil.rmtree(src / "python3.11-json", ignore_errors=True)
    # rsync leaves a directory's or symlink's mtime alone when it is in the same second
    # as the source's (on any filesystem): give them times far from now.
    base = T0 + round * 10**12
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(src), reverse=True)):
        for j, name in enumerate(dirnames + filenames):
            p = Path(dirpath) / name
            if p.is_symlink() or p.is_dir():
                t = base + (i * 1000 + j) * 1_000_003_007
                os.utime(p, ns=(t, t), follow_symlinks=False)


def test_tar_extract_matches_the_referee(tarball: Path, sites: tuple[Site, Site]) -> None:
    trees = []
    for site in sites:
        dest = site.root / "x"
        dest.mkdir()
        run(["tar", "-x", "--xattrs", "--xattrs-include=user.*", "-f", tarball, "-C", dest])
        site.cycle()
        p = run(["tar", "--compare", "--xattrs", "-f", tarball, "-C", dest], check=False)
        assert p.returncode == 0, f"tar --compare on {site}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
        trees.append(manifest(dest, xattrs=True))
    referee, fusedrive = sites
    assert_same_tree(trees[0], trees[1], "tar x")
    diff_r(referee.root / "x", fusedrive.root / "x", "--exclude=fifo")


def rsync_is_done(src: Path, dest: Path) -> None:
    """rsync's own check: comparing every byte, it finds nothing left to do."""
    p = run(["rsync", "-aH", "--delete", "--checksum", "--dry-run", "-i", f"{src}/", dest])
    assert not p.stdout.strip(), f"rsync still finds differences under {dest}:\n{p.stdout[:3000]}"


@pytest.mark.parametrize(
    "opts",
    [[], ["--inplace"], ["--inplace", "--no-whole-file"]],
    ids=["plain", "inplace", "inplace-delta"],
)
def test_rsync_over_an_existing_tree(
    opts: list[str], edited_source: Path, sites: tuple[Site, Site]
) -> None:
    src = edited_source
    for site in sites:
        run(["rsync", "-aH", f"{src}/", site.root / "r"])
    for round in (1, 2):
        edit(src, round)
        for site in sites:
            run(["rsync", "-aH", "--delete", *opts, f"{src}/", site.root / "r"])
            site.cycle()
            rsync_is_done(src, site.root / "r")
        want = manifest(src)
        referee, fusedrive = sites
        got_referee, got = manifest(referee.root / "r"), manifest(fusedrive.root / "r")
        assert_same_tree(got_referee, got, f"rsync -aH {' '.join(opts)}, round {round}")
        assert_same_tree(want, got, f"rsync round {round}", "source, fusedrive")
    diff_r(src, sites[1].root / "r", "--exclude=fifo")


def test_cp_a_keeps_modes_owners_times(edited_source: Path, sites: tuple[Site, Site]) -> None:
    src = edited_source
    want = manifest(src, xattrs=True)
    for site in sites:
        run(["cp", "-a", src, site.root / "c"])
        site.cycle()
    referee, fusedrive = sites
    assert_same_tree(want, manifest(referee.root / "c", xattrs=True), "cp -a", "source, referee")
    assert_same_tree(
        want, manifest(fusedrive.root / "c", xattrs=True), "cp -a", "source, fusedrive"
    )


def test_cp_a_of_an_extended_acl_says_so_and_keeps_the_mode(
    tmp_path: Path, sites: tuple[Site, Site]
) -> None:
    """fusedrive has no POSIX ACLs (docs/posix.md): like ext4 mounted -o noacl, cp -a of
    a file carrying an extended ACL copies it, keeps its mode bits and reports that the
    ACL could not be kept, never silently."""
    src = tmp_path / "acl-src"
    src.mkdir()
    (src / "f").write_bytes(b"data\n")
    run(["setfacl", "-m", "u:1234:rwx,g:5678:r", src / "f"])
    mode = (src / "f").stat().st_mode
    fusedrive = sites[1]
    res = subprocess.run(
        ["cp", "-a", src / "f", fusedrive.root / "acl-copy"], capture_output=True, text=True
    )
    assert res.returncode != 0
    assert "Operation not supported" in res.stderr, res.stderr
    copy = fusedrive.root / "acl-copy"
    assert copy.read_bytes() == b"data\n"
    assert copy.stat().st_mode == mode
    acl = subprocess.run(["getfacl", "-p", copy], capture_output=True, text=True)
    assert "user:1234" not in acl.stdout
