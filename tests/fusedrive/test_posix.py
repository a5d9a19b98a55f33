"""POSIX behaviour that real programs rely on: open(O_TRUNC), and ACLs refused.

Each behaviour is checked twice: on ``Filesystem`` directly (over a real store),
and through a real mount with the programs that showed the bug (the shell's ``>``,
``cp``, ``cp -a``, ``sed -i``, ``setfacl``/``getfacl``, a reader that is not the
owner). The regression tests for what the differential oracle (``test_oracle.py``)
found live here too, each named after its finding.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from blockstore import Store
from fusedrive import Ctx, Filesystem
from fusedrive.schema import ROOT_INO

if TYPE_CHECKING:
    from conftest import FuseMounts

CTX = Ctx(0, 0)
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    s.create_volume("v", 64 << 20)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def fs(store: Store) -> Iterator[Filesystem]:
    f = Filesystem(store.volume("v"))
    try:
        yield f
    finally:
        f.close()


def errno_from(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno or 0


def write_file(fs: Filesystem, name: bytes, data: bytes) -> int:
    fh, a = fs.create(ROOT_INO, name, 0o644, os.O_WRONLY, CTX)
    fs.write(fh, 0, data)
    fs.release(fh)
    return a.ino


def read_all(fs: Filesystem, ino: int) -> bytes:
    fh = fs.open(ino, os.O_RDONLY)
    try:
        return fs.read(fh, 0, 1 << 20)
    finally:
        fs.release(fh)


# -- open(O_TRUNC) -------------------------------------------------------------------------------
@pytest.mark.parametrize("access", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY])
def test_open_o_trunc_empties_the_file_and_updates_mtime_ctime(fs: Filesystem, access: int) -> None:
    """Linux truncates for O_RDONLY|O_TRUNC too (the kernel checked write permission)."""
    ino = write_file(fs, b"f", b"hello-world\n")
    fs.setattr(ino, mtime_ns=1, atime_ns=1)
    before = fs.getattr(ino)
    fh = fs.open(ino, access | os.O_TRUNC)
    after = fs.getattr(ino)
    assert after.size == 0
    assert after.mtime_ns > before.mtime_ns and after.ctime_ns > before.ctime_ns
    assert after.atime_ns == before.atime_ns
    if access != os.O_RDONLY:
        fs.write(fh, 0, b"ab\n")
    fs.release(fh)
    assert read_all(fs, ino) == (b"ab\n" if access != os.O_RDONLY else b"")
    fs.flush()


def test_open_without_o_trunc_keeps_the_file(fs: Filesystem) -> None:
    ino = write_file(fs, b"f", b"keep")
    before = fs.getattr(ino)
    fs.release(fs.open(ino, os.O_RDWR))
    assert fs.getattr(ino) == before
    assert read_all(fs, ino) == b"keep"


def test_open_o_trunc_of_an_empty_file_still_updates_mtime(fs: Filesystem) -> None:
    ino = write_file(fs, b"f", b"")
    fs.setattr(ino, mtime_ns=1)
    fs.release(fs.open(ino, os.O_WRONLY | os.O_TRUNC))
    assert fs.getattr(ino).mtime_ns > 1


def test_open_o_trunc_survives_a_reopen(store: Store) -> None:
    fs = Filesystem(store.volume("v"))
    ino = write_file(fs, b"f", b"x" * 100_000)
    fs.flush()
    fs.release(fs.open(ino, os.O_WRONLY | os.O_TRUNC))
    fs.close()
    fs = Filesystem(store.volume("v"))
    try:
        assert fs.getattr(ino).size == 0
        assert read_all(fs, ino) == b""
    finally:
        fs.close()


def test_open_o_trunc_on_read_only_views_is_refused(store: Store) -> None:
    fs = Filesystem(store.volume("v"))
    ino = write_file(fs, b"f", b"data")
    fs.close()
    store.create_snapshot("v", "s")
    for view in (
        Filesystem(store.snapshot("s")),
        Filesystem(store.volume("v"), read_only=True),
    ):
        assert errno_from(lambda v=view: v.open(ino, os.O_RDONLY | os.O_TRUNC)) == errno.EROFS
        assert read_all(view, ino) == b"data"
        view.close()


# -- POSIX ACLs: refused -------------------------------------------------------------------------
def test_acl_xattrs_are_refused_with_eopnotsupp(fs: Filesystem) -> None:
    ino = write_file(fs, b"f", b"")
    for name in (ACL_ACCESS, ACL_DEFAULT):
        assert errno_from(lambda n=name: fs.setxattr(ino, n, b"\x02\0\0\0")) == errno.EOPNOTSUPP
        assert errno_from(lambda n=name: fs.getxattr(ino, n)) == errno.EOPNOTSUPP
        assert errno_from(lambda n=name: fs.removexattr(ino, n)) == errno.EOPNOTSUPP
    fs.setxattr(ino, b"user.a", b"1")
    assert fs.listxattr(ino) == [b"user.a"]


def test_acl_xattrs_stored_by_older_versions_are_hidden(fs: Filesystem) -> None:
    ino = write_file(fs, b"f", b"")
    fs.xattrs[ino][ACL_ACCESS] = b"\x02\0\0\0"  # as an older daemon stored it
    assert fs.listxattr(ino) == []
    assert errno_from(lambda: fs.getxattr(ino, ACL_ACCESS)) == errno.EOPNOTSUPP


# -- through a mount -----------------------------------------------------------------------------
@pytest.fixture
def mnt(fuse_mounts: FuseMounts) -> Path:
    fuse_mounts.volume()
    return fuse_mounts.mount("--volume", "v")


def sh(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True)


@pytest.mark.needs_fuse
def test_shell_redirect_and_cp_over_a_longer_file_truncate(mnt: Path) -> None:
    r = sh("echo hello-world > f; echo ab > f; cat f", mnt)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ab\n"
    (mnt / "big").write_bytes(b"B" * 200_000)
    (mnt / "small").write_bytes(b"small")
    before = os.stat(mnt / "big")
    subprocess.run(["cp", str(mnt / "small"), str(mnt / "big")], check=True)
    assert (mnt / "big").read_bytes() == b"small"
    after = os.stat(mnt / "big")
    assert after.st_size == 5 and after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ino == before.st_ino  # cp reused the file: the truncate came with open


def make_tree(src: Path) -> dict[str, int]:
    """A small tree with varied modes; returns relative path -> mode."""
    modes = {
        "d755": 0o755, "d755/f644": 0o644, "d755/x755": 0o755, "d755/p640": 0o640,
        "d750": 0o750, "d750/r444": 0o444, "d750/sub": 0o775, "d750/sub/g664": 0o664,
    }  # fmt: skip
    for rel in modes:
        p = src / rel
        if "/" not in rel or rel.endswith("sub"):
            p.mkdir()
        else:
            p.write_text(rel)
    for rel, mode in modes.items():
        os.chmod(src / rel, mode)
    return modes


@pytest.mark.needs_fuse
@pytest.mark.parametrize("flag", ["-a", "-p"])
def test_cp_preserving_keeps_group_and_other_bits(mnt: Path, tmp_path: Path, flag: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    modes = make_tree(src)
    r = subprocess.run(["cp", "-R", flag, f"{src}/.", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = {rel: stat.S_IMODE(os.stat(mnt / rel).st_mode) for rel in modes}
    assert got == modes
    # Someone who is not the owner reads the copy through the group/other bits.
    r = subprocess.run(
        ["runuser", "-u", "nobody", "--", "cat", str(mnt / "d755/f644")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "d755/f644"
    r = subprocess.run(
        ["runuser", "-u", "nobody", "--", "cat", str(mnt / "d755/p640")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr


@pytest.mark.needs_fuse
def test_sed_in_place_keeps_the_mode(mnt: Path) -> None:
    f = mnt / "conf"
    f.write_text("key=old\n")
    os.chmod(f, 0o644)
    subprocess.run(["sed", "-i", "s/old/new/", str(f)], check=True)
    assert f.read_text() == "key=new\n"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644


@pytest.mark.needs_fuse
def test_setfacl_fails_clearly_and_getfacl_shows_the_mode(mnt: Path) -> None:
    f = mnt / "f"
    f.write_text("x")
    os.chmod(f, 0o640)
    r = subprocess.run(["setfacl", "-m", "u:nobody:r", str(f)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "Operation not supported" in r.stderr
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    r = subprocess.run(["getfacl", "-c", str(f)], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["user::rw-", "group::r--", "other::---"]
    d = mnt / "d"
    d.mkdir()
    r = subprocess.run(["setfacl", "-d", "-m", "u::rwx", str(d)], capture_output=True, text=True)
    assert r.returncode != 0 and "Operation not supported" in r.stderr
    assert errno_from(lambda: os.getxattr(f, ACL_ACCESS)) == errno.EOPNOTSUPP
    assert errno_from(lambda: os.setxattr(f, ACL_ACCESS, b"\x02\0\0\0")) == errno.EOPNOTSUPP
    assert os.listxattr(f) == []
