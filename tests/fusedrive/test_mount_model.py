"""Stateful model test: file and directory operations through a live mount.

Hypothesis drives plain ``os`` calls on a real fusedrive mount and applies each to
an in-memory model (``MDir``, ``MFile``, ``MSymlink``; hard links are one shared
``MFile``). Every result is compared with what the model predicts: bytes read, the
errno of an operation that must fail (EEXIST, EISDIR, ENOTDIR, ENOTEMPTY, EINVAL,
ENODATA), directory listings, whole files after each write or truncate, and now and
then the whole tree (names, types, contents, modes, link counts, hard-link groups,
symlink targets, xattrs). A clean unmount and remount, at least once per example,
must keep the whole tree and leave exactly the model's inodes in use (statfs).

Snapshots (``request_flush`` then ``Store.create_snapshot`` from this process, on
the store the daemon has open) and clones (``clone_snapshot``, ``clone_volume``) are
cut mid-sequence. The model's tree at that moment is recorded and compared, later in
the sequence and at the latest in teardown, with the whole tree of the snapshot
mounted read-only or of the clone mounted read-write; a clone then gets a write of
its own, which its next check must see and the source must not.

Each example has its own volume and mount (made in ``initialize``); teardown
unmounts every mount of the example whatever happened. One store serves all
examples and must pass fsck at the end.
"""

from __future__ import annotations

import copy
import errno
import functools
import logging
import os
import random
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from blockstore import Store, fsck
from fusedrive import request_flush

if TYPE_CHECKING:
    from conftest import FuseMounts

log = logging.getLogger(__name__)

pytestmark = pytest.mark.needs_fuse

CS = 64 * 1024  # the default chunk size: offsets and sizes cluster around its multiples
NAMES = st.sampled_from(["a", "b", "c", "d"])
OFFSETS = st.one_of(
    st.integers(0, 3 * CS),
    st.sampled_from([0, CS - 1, CS, CS + 1, 2 * CS - 3, 2 * CS, 3 * CS + 1]),
)
SIZES = st.one_of(
    st.integers(0, 3000),
    st.sampled_from([1, CS - 1, CS, CS + 1, 2 * CS + 5, 150_000]),
)
FILE_MODES = st.sampled_from([0o600, 0o644, 0o640, 0o444, 0o755, 0o000])
DIR_MODES = st.sampled_from([0o755, 0o700, 0o555, 0o750, 0o000])
XATTR_NAMES = st.sampled_from(["user.a", "user.b", "user.long." + "x" * 100])
TARGETS = st.sampled_from(["a", "../b", "c/d/e", "/abs/path", "t" * 200, "a b"])

# Mounting costs a quarter of a second: bound the mounts per example.
MAX_CUTS = 4
MAX_REMOUNTS = 2

PathT = tuple[str, ...]
_F = TypeVar("_F", bound=Callable[..., None])


@dataclass(eq=False)
class MFile:
    data: bytearray
    mode: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass(eq=False)
class MSymlink:
    target: str


@dataclass(eq=False)
class MDir:
    mode: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    entries: dict[str, MFile | MSymlink | MDir] = field(default_factory=dict)


Node = MFile | MSymlink | MDir
# path -> (kind, mode, nlink, xattrs, content or target, hard-link group)
Described = dict[str, tuple[str, int, int, tuple[tuple[str, bytes], ...], bytes | str, str]]


@dataclass
class Saved:
    kind: str  # "snapshot" or "clone"
    name: str
    root: MDir = field(repr=False)
    checks: int = 0


def content(seed: int, n: int, zero: bool) -> bytes:
    return bytes(n) if zero else random.Random(seed).randbytes(n)


def current_umask() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("Umask:"))
    return int(line.split()[1], 8)


def rel(path: PathT) -> str:
    return "/".join(path)


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    return min(len(a), len(b)) if diff is None else diff


def errno_of(fn: Callable[[], object]) -> int | None:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


# -- whole-tree descriptions ---------------------------------------------------------------------
def describe_model(root: MDir) -> Described:
    nodes: list[tuple[str, Node]] = []

    def walk(d: MDir, prefix: str) -> None:
        for name, child in d.entries.items():
            path = f"{prefix}/{name}" if prefix else name
            nodes.append((path, child))
            if isinstance(child, MDir):
                walk(child, path)

    nodes.append(("", root))
    walk(root, "")
    groups: dict[int, list[str]] = {}
    for path, node in nodes:
        groups.setdefault(id(node), []).append(path)
    out: Described = {}
    for path, node in nodes:
        if isinstance(node, MDir):
            subdirs = sum(isinstance(c, MDir) for c in node.entries.values())
            out[path] = ("dir", node.mode, 2 + subdirs, tuple(sorted(node.xattrs.items())), b"", "")
        elif isinstance(node, MSymlink):
            out[path] = ("symlink", 0o777, 1, (), node.target, "")
        else:
            links = groups[id(node)]
            xattrs = tuple(sorted(node.xattrs.items()))
            out[path] = ("file", node.mode, len(links), xattrs, bytes(node.data), min(links))
    return out


def describe_mount(root: Path) -> Described:
    out: Described = {}
    groups: dict[int, list[str]] = {}

    def xattrs(p: Path) -> tuple[tuple[str, bytes], ...]:
        return tuple(sorted((n, os.getxattr(p, n)) for n in os.listxattr(p)))

    def add(p: Path, path: str) -> None:
        st_ = os.lstat(p)
        mode = stat.S_IMODE(st_.st_mode)
        if stat.S_ISDIR(st_.st_mode):
            out[path] = ("dir", mode, st_.st_nlink, xattrs(p), b"", "")
            for name in os.listdir(p):
                add(p / name, f"{path}/{name}" if path else name)
        elif stat.S_ISLNK(st_.st_mode):
            out[path] = ("symlink", mode, st_.st_nlink, (), os.readlink(p), "")
        elif stat.S_ISREG(st_.st_mode):
            data = p.read_bytes()
            assert len(data) == st_.st_size, f"{path}: read {len(data)} of {st_.st_size} bytes"
            groups.setdefault(st_.st_ino, []).append(path)
            out[path] = ("file", mode, st_.st_nlink, xattrs(p), data, str(st_.st_ino))
        else:
            out[path] = (f"other {st_.st_mode:o}", mode, st_.st_nlink, (), b"", "")

    add(root, "")
    names = {str(ino): min(paths) for ino, paths in groups.items()}
    for path, (kind, mode, nlink, xa, body, group) in list(out.items()):
        if kind == "file":
            out[path] = (kind, mode, nlink, xa, body, names[group])
    return out


def count_inodes(root: MDir) -> int:
    seen: set[int] = set()
    todo: list[Node] = [root]
    while todo:
        node = todo.pop()
        if id(node) not in seen:
            seen.add(id(node))
            if isinstance(node, MDir):
                todo.extend(node.entries.values())
    return len(seen)


def tree_diff(expected: Described, actual: Described) -> list[str]:
    lines = []
    for path in sorted(expected.keys() | actual.keys()):
        e, a = expected.get(path), actual.get(path)
        if e == a:
            continue
        if e is None or a is None:
            lines.append(f"/{path}: expected {'nothing' if e is None else e[0]}, found "
                         f"{'nothing' if a is None else a[0]}")  # fmt: skip
            continue
        for label, ev, av in zip(
            ("kind", "mode", "nlink", "xattrs", "content", "link group"), e, a, strict=True
        ):
            if ev == av:
                continue
            if label == "content" and isinstance(ev, bytes) and isinstance(av, bytes):
                lines.append(
                    f"/{path}: content of {len(ev)} bytes expected, {len(av)} found, "
                    f"first difference at {first_difference(ev, av)}"
                )
            elif label == "mode":
                lines.append(f"/{path}: mode {ev:o} expected, {av:o} found")
            else:
                lines.append(f"/{path}: {label} {ev!r} expected, {av!r} found")
    return lines


def step(fn: _F) -> _F:
    """Mark the machine broken while a step runs, so teardown checks only a sound state."""

    @functools.wraps(fn)
    def wrapper(self: MountModel, *args: Any, **kwargs: Any) -> None:
        self.healthy = False
        fn(self, *args, **kwargs)
        self.healthy = True

    return wrapper  # type: ignore[return-value]


class MountModel(RuleBasedStateMachine):
    """Set ``env`` (a ``FuseMounts``) on a subclass before running."""

    env: FuseMounts
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        MountModel.examples += 1
        self.vol = f"v{MountModel.examples}"
        self.mnt: Path | None = None
        self.mounts: list[Path] = []
        self.healthy = False
        self.cuts = 0
        self.remounts = 0
        self.umask = current_umask()
        self.root = MDir(0o755)
        self.saved: list[Saved] = []

    # -- model navigation ------------------------------------------------------------------------
    def node(self, path: PathT) -> Node:
        n: Node = self.root
        for name in path:
            assert isinstance(n, MDir)
            n = n.entries[name]
        return n

    def dir(self, path: PathT) -> MDir:
        d = self.node(path)
        assert isinstance(d, MDir)
        return d

    def paths(self, want: Callable[[Node], bool] = lambda n: True) -> list[PathT]:
        out: list[PathT] = []

        def walk(d: MDir, prefix: PathT) -> None:
            for name in sorted(d.entries):
                child = d.entries[name]
                if want(child):
                    out.append((*prefix, name))
                if isinstance(child, MDir):
                    walk(child, (*prefix, name))

        walk(self.root, ())
        return out

    def dirs(self) -> list[PathT]:
        return [(), *self.paths(lambda n: isinstance(n, MDir))]

    def files(self) -> list[PathT]:
        return self.paths(lambda n: isinstance(n, MFile))

    def real(self, path: PathT) -> Path:
        assert self.mnt is not None
        return self.mnt.joinpath(*path)

    def draw_new(self, data: st.DataObject) -> tuple[PathT, MDir, str]:
        parent = data.draw(st.sampled_from(self.dirs()), label="parent")
        name = data.draw(NAMES, label="name")
        return parent, self.dir(parent), name

    def draw_destination(self, data: st.DataObject) -> tuple[PathT, MDir, str]:
        """Half the time an existing name, to replace it (or be refused)."""
        if data.draw(st.booleans(), label="existing"):
            path = data.draw(st.sampled_from(self.paths()), label="destination")
            return path[:-1], self.dir(path[:-1]), path[-1]
        return self.draw_new(data)

    def check_file(self, path: PathT) -> None:
        """The whole file, read afresh: stale bytes anywhere in it would show."""
        f = self.node(path)
        assert isinstance(f, MFile)
        got = self.real(path).read_bytes()
        assert got == f.data, (
            f"/{rel(path)}: {len(got)} bytes read, {len(f.data)} expected; "
            f"first difference at {first_difference(got, f.data)}"
        )

    # -- mounting --------------------------------------------------------------------------------
    def mount(self, *args: str, at: str) -> Path:
        mp = self.env.mount(*args, at=at)
        self.mounts.append(mp)
        return mp

    def unmount(self, mp: Path) -> None:
        self.mounts.remove(mp)
        self.env.unmount(mp)

    def check_inodes(self, mp: Path, root: MDir, what: str) -> None:
        """Inodes in use (statfs) are the model's: a mount opened read-write has none
        without a name (orphans from before are deleted when it opens)."""
        st_ = os.statvfs(mp)
        used, expected = st_.f_files - st_.f_ffree, count_inodes(root)
        assert used == expected, f"{what}: {used} inodes in use, {expected} expected"

    def check_tree(self, mp: Path, root: MDir, what: str) -> None:
        diff = tree_diff(describe_model(root), describe_mount(mp))
        assert not diff, f"{what} differs from the model:\n  " + "\n  ".join(diff)

    @initialize()
    @step
    def start(self) -> None:
        self.env.volume(self.vol)
        self.mnt = self.mount("--volume", self.vol, at=self.vol)

    def teardown(self) -> None:
        try:
            if self.healthy and self.mnt is not None:
                self.check_tree(self.mnt, self.root, "the live mount")
                for saved in self.saved:
                    if not saved.checks:
                        self.check_saved(saved)
                self.remount_and_check()
                self.unmount(self.mnt)
        finally:
            for mp in list(self.mounts):
                self.env.discard(mp)

    # -- files -----------------------------------------------------------------------------------
    @rule(data=st.data(), size=SIZES, seed=st.integers(0, 1 << 16), zero=st.booleans())
    @step
    def create(self, data: st.DataObject, size: int, seed: int, zero: bool) -> None:
        ppath, parent, name = self.draw_new(data)
        p = self.real((*ppath, name))
        body = content(seed, size, zero)

        def make() -> None:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                assert os.write(fd, body) == len(body)
            finally:
                os.close(fd)

        if name in parent.entries:
            assert errno_of(make) == errno.EEXIST
            return
        make()
        parent.entries[name] = MFile(bytearray(body), 0o644 & ~self.umask)

    @precondition(lambda self: self.files())
    @rule(data=st.data(), off=OFFSETS, size=SIZES, seed=st.integers(0, 1 << 16), zero=st.booleans())
    @step
    def write(self, data: st.DataObject, off: int, size: int, seed: int, zero: bool) -> None:
        path = data.draw(st.sampled_from(self.files()), label="file")
        f = self.node(path)
        assert isinstance(f, MFile)
        body = content(seed, size, zero)
        fd = os.open(self.real(path), os.O_WRONLY)
        try:
            assert os.pwrite(fd, body, off) == len(body)
        finally:
            os.close(fd)
        if body:
            if len(f.data) < off:
                f.data.extend(bytes(off - len(f.data)))
            f.data[off : off + len(body)] = body
        self.check_file(path)

    @precondition(lambda self: self.files())
    @rule(data=st.data(), size=st.one_of(OFFSETS, st.just(5 * CS + 17)))
    @step
    def truncate(self, data: st.DataObject, size: int) -> None:
        path = data.draw(st.sampled_from(self.files()), label="file")
        f = self.node(path)
        assert isinstance(f, MFile)
        os.truncate(self.real(path), size)
        if size < len(f.data):
            del f.data[size:]
        else:
            f.data.extend(bytes(size - len(f.data)))
        self.check_file(path)

    @precondition(lambda self: self.files())
    @rule(data=st.data(), off=OFFSETS, size=SIZES)
    @step
    def read(self, data: st.DataObject, off: int, size: int) -> None:
        path = data.draw(st.sampled_from(self.files()), label="file")
        f = self.node(path)
        assert isinstance(f, MFile)
        fd = os.open(self.real(path), os.O_RDONLY)
        try:
            got = os.pread(fd, size, off)
        finally:
            os.close(fd)
        assert got == bytes(f.data[off : off + size]), f"read of /{rel(path)} at {off}+{size}"

    # -- names -----------------------------------------------------------------------------------
    @precondition(lambda self: self.root.entries)
    @rule(data=st.data())
    @step
    def unlink(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self.paths()), label="path")
        node = self.node(path)
        if isinstance(node, MDir):
            assert errno_of(lambda: os.unlink(self.real(path))) == errno.EISDIR
            return
        os.unlink(self.real(path))
        del self.dir(path[:-1]).entries[path[-1]]

    @rule(data=st.data(), mode=DIR_MODES)
    @step
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        ppath, parent, name = self.draw_new(data)
        p = self.real((*ppath, name))
        if name in parent.entries:
            assert errno_of(lambda: os.mkdir(p, mode)) == errno.EEXIST
            return
        os.mkdir(p, mode)
        parent.entries[name] = MDir(mode & ~self.umask)

    @precondition(lambda self: self.root.entries)
    @rule(data=st.data())
    @step
    def rmdir(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self.paths()), label="path")
        node = self.node(path)
        expected = None
        if not isinstance(node, MDir):
            expected = errno.ENOTDIR
        elif node.entries:
            expected = errno.ENOTEMPTY
        assert errno_of(lambda: os.rmdir(self.real(path))) == expected
        if expected is None:
            del self.dir(path[:-1]).entries[path[-1]]

    def expected_rename(self, src: PathT, dpar: PathT, dname: str) -> int | None:
        """The errno Linux gives ``rename(src, dpar/dname)``, None if it succeeds."""
        node = self.node(src)
        target = self.dir(dpar).entries.get(dname)
        dst = (*dpar, dname)
        if isinstance(node, MDir) and dpar[: len(src)] == src:
            return errno.EINVAL  # into itself
        if target is not None and src != dst and src[: len(dst)] == dst:
            return errno.ENOTEMPTY  # over one of its own ancestors
        if target is None or target is node:
            return None
        if isinstance(node, MDir) and not isinstance(target, MDir):
            return errno.ENOTDIR
        if isinstance(target, MDir) and not isinstance(node, MDir):
            return errno.EISDIR
        if isinstance(target, MDir) and target.entries:
            return errno.ENOTEMPTY
        return None

    @precondition(lambda self: self.root.entries)
    @rule(data=st.data())
    @step
    def rename(self, data: st.DataObject) -> None:
        src = data.draw(st.sampled_from(self.paths()), label="source")
        dpar, dparent, dname = self.draw_destination(data)
        expected = self.expected_rename(src, dpar, dname)
        got = errno_of(lambda: os.rename(self.real(src), self.real((*dpar, dname))))
        assert got == expected, f"rename /{rel(src)} -> /{rel((*dpar, dname))}"
        node = self.node(src)
        if expected is None and dparent.entries.get(dname) is not node:
            del self.dir(src[:-1]).entries[src[-1]]
            dparent.entries[dname] = node

    @precondition(lambda self: self.files())
    @rule(data=st.data())
    @step
    def link(self, data: st.DataObject) -> None:
        src = data.draw(st.sampled_from(self.files()), label="source")
        ppath, parent, name = self.draw_destination(data)
        p = self.real((*ppath, name))
        if name in parent.entries:
            assert errno_of(lambda: os.link(self.real(src), p)) == errno.EEXIST
            return
        os.link(self.real(src), p)
        parent.entries[name] = self.node(src)

    @rule(data=st.data(), to=TARGETS)
    @step
    def symlink(self, data: st.DataObject, to: str) -> None:
        ppath, parent, name = self.draw_new(data)
        p = self.real((*ppath, name))
        if name in parent.entries:
            assert errno_of(lambda: os.symlink(to, p)) == errno.EEXIST
            return
        os.symlink(to, p)
        parent.entries[name] = MSymlink(to)

    # -- metadata --------------------------------------------------------------------------------
    @rule(data=st.data(), file_mode=FILE_MODES, dir_mode=DIR_MODES)
    @step
    def chmod(self, data: st.DataObject, file_mode: int, dir_mode: int) -> None:
        candidates = [(), *self.paths(lambda n: not isinstance(n, MSymlink))]
        path = data.draw(st.sampled_from(candidates), label="path")
        node = self.node(path)
        assert not isinstance(node, MSymlink)
        mode = dir_mode if isinstance(node, MDir) else file_mode
        os.chmod(self.real(path), mode)
        node.mode = mode

    @rule(data=st.data(), name=XATTR_NAMES, value=st.binary(max_size=300), remove=st.booleans())
    @step
    def xattr(self, data: st.DataObject, name: str, value: bytes, remove: bool) -> None:
        candidates = [(), *self.paths(lambda n: not isinstance(n, MSymlink))]
        path = data.draw(st.sampled_from(candidates), label="path")
        node = self.node(path)
        assert not isinstance(node, MSymlink)
        p = self.real(path)
        if remove:
            expected = None if name in node.xattrs else errno.ENODATA
            assert errno_of(lambda: os.removexattr(p, name)) == expected
            node.xattrs.pop(name, None)
        else:
            os.setxattr(p, name, value)
            node.xattrs[name] = value
        assert sorted(os.listxattr(p)) == sorted(node.xattrs)

    @rule(data=st.data())
    @step
    def listdir(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self.dirs()), label="dir")
        assert sorted(os.listdir(self.real(path))) == sorted(self.dir(path).entries)

    @rule()
    @step
    def whole_tree(self) -> None:
        assert self.mnt is not None
        self.check_tree(self.mnt, self.root, "the live mount")

    # -- snapshots, clones, remounts -------------------------------------------------------------
    @precondition(lambda self: len(self.saved) < MAX_CUTS)
    @rule(kind=st.sampled_from(["snapshot", "clone_volume", "clone_snapshot"]), data=st.data())
    @step
    def cut(self, kind: str, data: st.DataObject) -> None:
        assert self.mnt is not None
        self.cuts += 1
        snaps = [s for s in self.saved if s.kind == "snapshot"]
        if kind == "clone_snapshot" and not snaps:
            kind = "snapshot"
        if kind == "clone_snapshot":
            src = data.draw(st.sampled_from(snaps), label="snapshot")
            name = f"{self.vol}-c{self.cuts}"
            with Store(self.env.store) as s:
                s.clone_snapshot(src.name, name)
            self.saved.append(Saved("clone", name, copy.deepcopy(src.root)))
            return
        request_flush(self.mnt)
        with Store(self.env.store) as s:
            if kind == "snapshot":
                name = f"{self.vol}-s{self.cuts}"
                s.create_snapshot(self.vol, name)
            else:
                name = f"{self.vol}-c{self.cuts}"
                s.clone_volume(self.vol, name)
        self.saved.append(
            Saved("snapshot" if kind == "snapshot" else "clone", name, copy.deepcopy(self.root))
        )

    def check_saved(self, saved: Saved) -> None:
        saved.checks += 1
        at = f"{saved.name}-{saved.checks}"
        if saved.kind == "snapshot":
            mp = self.mount("--snapshot", saved.name, at=at)
            try:
                self.check_tree(mp, saved.root, f"snapshot {saved.name}")
                assert errno_of(lambda: (mp / "new").touch()) == errno.EROFS
            finally:
                self.unmount(mp)
            return
        mp = self.mount("--volume", saved.name, at=at)
        try:
            self.check_tree(mp, saved.root, f"clone {saved.name}")
            self.check_inodes(mp, saved.root, f"clone {saved.name}")
            # The clone's own write: its next check must find it, the source never.
            body = os.urandom(1000 * saved.checks)
            (mp / f"z{saved.checks}").write_bytes(body)
            saved.root.entries[f"z{saved.checks}"] = MFile(bytearray(body), 0o666 & ~self.umask)
        finally:
            self.unmount(mp)

    @precondition(lambda self: self.saved)
    @rule(data=st.data())
    @step
    def check_cut(self, data: st.DataObject) -> None:
        self.check_saved(data.draw(st.sampled_from(self.saved), label="saved"))

    def remount_and_check(self) -> None:
        """A clean unmount keeps everything, and frees every inode that lost its last name."""
        assert self.mnt is not None
        self.unmount(self.mnt)
        self.mnt = self.mount("--volume", self.vol, at=self.vol)
        self.check_tree(self.mnt, self.root, "the remounted volume")
        self.check_inodes(self.mnt, self.root, "the remounted volume")

    @precondition(lambda self: self.remounts < MAX_REMOUNTS)
    @rule()
    @step
    def remount(self) -> None:
        self.remounts += 1
        self.remount_and_check()


def test_operations_through_the_mount_match_the_model(fuse_mounts: FuseMounts) -> None:
    class Machine(MountModel):
        env = fuse_mounts

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=20,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    with Store(fuse_mounts.store) as s:
        report = fsck(s)
    assert report.clean, report.problems + report.unfixable
