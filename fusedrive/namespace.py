"""The namespace: inodes, directories, links, symlinks and xattrs of one volume.

``Namespace`` is the metadata half of ``Filesystem`` (which adds open files, file
contents and flushing). Every change is made to the in-memory tables and recorded
as key changes in the live layer of ``FileData`` (``data.live.kv``); the inode
records themselves are packed from ``dirty`` when a flush begins.

Invariants:
- a loaded inode, directory or xattr table is the truth; nothing loaded is ever
  stale, because only this process writes the volume, and tables are dropped
  only when clean (``Filesystem._evict``);
- a directory's ``nlink`` is 2 plus its subdirectories; a directory's ``parent``
  is the directory holding its one entry (the root names itself);
- cookies of a directory only grow: readdir offsets stay valid while entries come
  and go, and RENAME_EXCHANGE keeps each name's cookie;
- an inode is deleted when it has no links, no kernel lookups and no open
  handles; until then an orphan marker (``R``) lets the next read-write open
  delete it if the process dies first.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections.abc import Iterator
from typing import NamedTuple

from blockstore import Corrupt, View

from .errors import FsError, fs_op, store_errors
from .filedata import INF, FileData
from .schema import (
    NAME_MAX,
    ROOT_INO,
    SYMLINK_MAX,
    DirState,
    Inode,
    InodeRecord,
    dirent_key,
    dirent_prefix,
    inode_key,
    orphan_key,
    pack_dirent,
    symlink_key,
    unpack_dirent,
    xattr_key,
    xattr_prefix,
)

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_SIZE_MAX = 65536
# POSIX ACLs are not supported (see ``check_xattr_name``): every operation on these
# names fails with EOPNOTSUPP, as on ext4 mounted -o noacl.
ACL_XATTRS = frozenset({b"system.posix_acl_access", b"system.posix_acl_default"})
_RELATIME_NS = 24 * 3600 * 10**9


# Ctx and Attributes are NamedTuples, not frozen dataclasses: one of each is built per
# request, and a frozen dataclass's __init__ costs several times a tuple's (measured
# 4.2 us against 1.0 us for Attributes; the daemon's whole getattr handler is ~3.5 us).
class Ctx(NamedTuple):
    """Who asks: the owner of anything the request creates."""

    uid: int = 0
    gid: int = 0


class Attributes(NamedTuple):
    """What stat(2) shows of an inode (``Namespace._attrs``)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def now_ns() -> int:
    return time.time_ns()


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"invalid file name {name!r}")


def check_xattr_name(name: bytes) -> None:
    """Refuse the POSIX ACL names with EOPNOTSUPP (a decision, documented in README).

    Without the kernel's FUSE_POSIX_ACL mode the kernel hands ``system.posix_acl_*``
    to the daemon as plain xattrs: stored as such they would be neither enforced nor
    kept in step with the mode, and ``cp -a`` or ``sed -i`` (which set the ACL and
    then skip chmod) would leave files 0600. Refused, those tools fall back to
    chmod, as they do on a filesystem without ACL support. Values stored under
    these names by older versions are hidden and left alone.
    """
    if name in ACL_XATTRS:
        raise FsError(errno.EOPNOTSUPP, "POSIX ACLs are not supported (mode bits only)")


class Namespace:
    """Inode, directory and xattr tables with the operations on names."""

    def __init__(self, view: View, data: FileData, read_only: bool) -> None:
        self.view = view
        self.data = data
        self.read_only = read_only
        self.inodes: dict[int, Inode] = {}
        self.dirty: set[int] = set()  # inodes whose record must be written at the next flush
        self.dirs: dict[int, DirState] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self.dir_handles: dict[int, int] = {}
        self.next_fh = 1
        self.next_ino = ROOT_INO + 1
        self.inode_count = 0
        self.sb_dirty = False  # next_ino or inode_count changed

    # -- loading ----------------------------------------------------------------------------------

    def _get(self, key: bytes) -> bytes | None:
        for layer in self.data.layers():
            found, value = layer.lookup_kv(key)
            if found:
                return value
        stored = self.view.get(key)
        if stored is not None and not isinstance(stored, bytes):
            raise Corrupt(f"entry {key!r} holds a chunk, not a record")
        return stored

    def _inode(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is None:
            raw = self._get(inode_key(ino))
            if raw is None:
                raise FsError(errno.ENOENT, f"no inode {ino}")
            node = self.inodes[ino] = Inode.from_record(ino, InodeRecord.unpack(raw))
        return node

    def _dir(self, ino: int) -> DirState:
        ds = self.dirs.get(ino)
        if ds is None:
            if not self._inode(ino).is_dir:
                raise FsError(errno.ENOTDIR)
            entries = {}
            prefix = dirent_prefix(ino)
            for key, value in self.view.scan(prefix):
                if not isinstance(value, bytes):
                    raise Corrupt(f"directory entry {key!r} is not a record")
                entries[key[len(prefix) :]] = unpack_dirent(value)
            ds = self.dirs[ino] = DirState(entries)
        return ds

    def _xattrs(self, ino: int) -> dict[bytes, bytes]:
        xa = self.xattrs.get(ino)
        if xa is None:
            self._inode(ino)
            prefix = xattr_prefix(ino)
            xa = {k[len(prefix) :]: v for k, v in self.view.scan(prefix) if isinstance(v, bytes)}
            self.xattrs[ino] = xa
        return xa

    def _load_inodes(self, inos: list[int]) -> None:
        missing = [i for i in inos if i not in self.inodes]
        if not missing:
            return
        for ino, raw in zip(
            missing, self.view.get_many([inode_key(i) for i in missing]), strict=True
        ):
            if isinstance(raw, bytes) and ino not in self.inodes:
                self.inodes[ino] = Inode.from_record(ino, InodeRecord.unpack(raw))

    def _attrs(self, node: Inode) -> Attributes:
        stored = max(node.alloc + self.data.file_growth(node.ino), 0)
        return Attributes(
            node.ino, node.mode, node.nlink, node.uid, node.gid, node.rdev, node.size,
            (stored + 511) // 512, self.data.chunk_size,
            node.atime_ns, node.mtime_ns, node.ctime_ns,
        )  # fmt: skip

    # -- helpers for changes ----------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    def _touch(self, node: Inode, *, mtime: bool = True, now: int | None = None) -> None:
        now = now_ns() if now is None else now
        node.ctime_ns = now
        if mtime:
            node.mtime_ns = now
        self.dirty.add(node.ino)

    def _new_inode(self, mode: int, ctx: Ctx, rdev: int = 0, parent: Inode | None = None) -> Inode:
        now = now_ns()
        uid, gid = ctx.uid, ctx.gid
        if parent is not None and parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ino = self.next_ino
        self.next_ino += 1
        self.inode_count += 1
        self.sb_dirty = True
        nlink = 2 if stat.S_ISDIR(mode) else 1
        node = Inode(ino, mode, uid, gid, nlink, 0, rdev, now, now, now)
        if stat.S_ISDIR(mode):
            node.parent = parent.ino if parent is not None else ino
            self.dirs[ino] = DirState()
        self.inodes[ino] = node
        self.xattrs[ino] = {}
        self.dirty.add(ino)
        return node

    def _add_entry(self, parent: Inode, name: bytes, child: Inode) -> None:
        cookie = parent.next_cookie
        parent.next_cookie += 1
        self._dir(parent.ino).add(name, child.ino, cookie)
        self.data.live.kv[dirent_key(parent.ino, name)] = pack_dirent(child.ino, cookie)
        self._touch(parent)

    def _remove_entry(self, parent: Inode, name: bytes) -> None:
        self._dir(parent.ino).remove(name)
        self.data.live.kv[dirent_key(parent.ino, name)] = None
        self._touch(parent)

    def _unlinked(self, node: Inode) -> None:
        """``node`` lost a link: delete it now or mark it an orphan until it is let go."""
        if node.nlink > 0:
            return
        if node.lookups > 0 or node.opens > 0:
            self.data.live.kv[orphan_key(node.ino)] = b""
            node.orphaned = True
        else:
            self._destroy(node.ino)

    def _maybe_destroy(self, node: Inode) -> None:
        if node.nlink == 0 and node.lookups <= 0 and node.opens <= 0 and not self.read_only:
            self._destroy(node.ino)

    def _destroy(self, ino: int, *, orphan: bool = False) -> None:
        """Delete every record of ``ino`` (at the next flush).

        ``orphan``: an orphan marker may be stored for it (also known from the loaded
        inode). Records a loaded inode cannot have are not deleted: every delete costs
        the commit a store lookup, and unlink is on the metadata hot path. Only a
        regular file of nonzero size has chunks (no chunk holds bytes at or past its
        file's size: a truncate to 0 already hid them), only a symlink a target, and
        only an inode marked in ``_unlinked`` (or found by the startup scan) a marker.
        """
        live = self.data.live
        kv = live.kv
        node = self.inodes.pop(ino, None)
        kv[inode_key(ino)] = None
        if node is None or (stat.S_ISREG(node.mode) and node.size > 0):
            live.hide(ino, 0, INF)
        if node is None or stat.S_ISLNK(node.mode):
            kv[symlink_key(ino)] = None
        if node is None or orphan or node.orphaned:
            kv[orphan_key(ino)] = None
        xa = self.xattrs.pop(ino, None)
        if xa is None:
            live.prefix_deletes.append(xattr_prefix(ino))
        else:
            for name in xa:
                kv[xattr_key(ino, name)] = None
        self.dirs.pop(ino, None)
        self.dirty.discard(ino)
        self.inode_count -= 1
        self.sb_dirty = True

    def _child(self, parent: int, name: bytes) -> tuple[Inode, Inode]:
        check_name(name)
        pnode = self._inode(parent)
        ent = self._dir(parent).entries.get(name)
        if ent is None:
            raise FsError(errno.ENOENT)
        return pnode, self._inode(ent[0])

    def _new_name(self, parent: int, name: bytes) -> Inode:
        """The parent directory, checked that ``name`` can be created in it."""
        self._writable()
        check_name(name)
        pnode = self._inode(parent)
        if name in (b".", b"..") or name in self._dir(parent).entries:
            raise FsError(errno.EEXIST)
        if pnode.nlink == 0:
            raise FsError(errno.ENOENT, "the directory was removed")
        return pnode

    def _relatime(self, node: Inode) -> None:
        if self.read_only:
            return
        a = node.atime_ns
        now = now_ns()
        if a <= node.mtime_ns or a <= node.ctime_ns or now - a > _RELATIME_NS:
            node.atime_ns = now
            self.dirty.add(node.ino)

    # -- namespace --------------------------------------------------------------------------------

    @fs_op
    def lookup(self, parent: int, name: bytes) -> Attributes:
        """Look ``name`` up in ``parent``; counts one kernel lookup of the result."""
        a = self._lookup(parent, name)
        if a is None:
            raise FsError(errno.ENOENT)
        return a

    @fs_op
    def find(self, parent: int, name: bytes) -> Attributes | None:
        """``lookup``, with None rather than ENOENT for a name ``parent`` lacks.

        The FUSE adapter's path: a lookup of a missing name precedes every create,
        and raising costs more than the rest of the request (``FsError`` builds its
        message). A missing or non-directory ``parent`` still raises.
        """
        return self._lookup(parent, name)

    def _lookup(self, parent: int, name: bytes) -> Attributes | None:
        if name == b".":
            node = self._inode(parent)
        elif name == b"..":
            node = self._inode(self._inode(parent).parent or ROOT_INO)
        else:
            check_name(name)
            self._inode(parent)
            ent = self._dir(parent).entries.get(name)
            if ent is None:
                return None
            node = self._inode(ent[0])
        node.lookups += 1
        return self._attrs(node)

    @fs_op
    def forget(self, ino: int, n: int = 1) -> None:
        node = self.inodes.get(ino)
        if node is not None:
            node.lookups = max(node.lookups - n, 0)
            self._maybe_destroy(node)

    def remember(self, ino: int) -> None:
        """Count one more kernel lookup (readdirplus returned the entry)."""
        node = self.inodes.get(ino)
        if node is not None:
            node.lookups += 1

    @fs_op
    def getattr(self, ino: int) -> Attributes:
        return self._attrs(self._inode(ino))

    @fs_op
    def readlink(self, ino: int) -> bytes:
        if not stat.S_ISLNK(self._inode(ino).mode):
            raise FsError(errno.EINVAL)
        target = self._get(symlink_key(ino))
        if target is None:
            raise FsError(errno.EIO, f"symlink {ino} has no target")
        return target

    @fs_op
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attributes:
        pnode = self._new_name(parent, name)
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL, f"mknod cannot create file type {kind:o}")
        dev = rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        node = self._new_inode(mode, ctx, dev, pnode)
        self._add_entry(pnode, name, node)
        node.lookups += 1
        return self._attrs(node)

    @fs_op
    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attributes:
        pnode = self._new_name(parent, name)
        node = self._new_inode(stat.S_IFDIR | (mode & 0o7777), ctx, 0, pnode)
        self._add_entry(pnode, name, node)
        pnode.nlink += 1
        node.lookups += 1
        return self._attrs(node)

    @fs_op
    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attributes:
        pnode = self._new_name(parent, name)
        if len(target) > SYMLINK_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not target:
            raise FsError(errno.ENOENT)
        node = self._new_inode(stat.S_IFLNK | 0o777, ctx, 0, pnode)
        node.size = len(target)
        self.data.live.kv[symlink_key(node.ino)] = target
        self._add_entry(pnode, name, node)
        node.lookups += 1
        return self._attrs(node)

    @fs_op
    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attributes:
        pnode = self._new_name(new_parent, new_name)
        node = self._inode(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        if node.nlink == 0:
            raise FsError(errno.ENOENT)
        self._add_entry(pnode, new_name, node)
        node.nlink += 1
        self._touch(node, mtime=False)
        node.lookups += 1
        return self._attrs(node)

    @fs_op
    def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        pnode, node = self._child(parent, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._remove_entry(pnode, name)
        node.nlink -= 1
        self._touch(node, mtime=False)
        self._unlinked(node)

    @fs_op
    def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        if name == b".":
            raise FsError(errno.EINVAL)
        pnode, node = self._child(parent, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if self._dir(node.ino).entries:
            raise FsError(errno.ENOTEMPTY)
        self._remove_entry(pnode, name)
        pnode.nlink -= 1
        node.nlink = 0
        self._touch(node, mtime=False)
        self._unlinked(node)

    def _is_ancestor(self, anc: Inode, node: Inode) -> bool:
        """True if directory ``anc`` is ``node`` or one of its ancestors."""
        cur = node
        for _ in range(1 << 16):
            if cur.ino == anc.ino:
                return True
            if cur.ino == ROOT_INO or cur.parent in (0, cur.ino):
                return False
            cur = self._inode(cur.parent)
        raise FsError(errno.ELOOP, "directory tree too deep")

    @fs_op
    def rename(
        self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int = 0
    ) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        check_name(name_new)
        pold, node = self._child(parent_old, name_old)
        pnew = self._inode(parent_new)
        if not pnew.is_dir:
            raise FsError(errno.ENOTDIR)
        ent = self._dir(parent_new).entries.get(name_new)
        target = self._inode(ent[0]) if ent is not None else None
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise FsError(errno.ENOENT)
            self._exchange(pold, name_old, node, pnew, name_new, target)
            return
        if target is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        if target is node:
            return  # two links to one inode: POSIX says do nothing
        if node.is_dir and self._is_ancestor(node, pnew):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")
        if target is not None:
            if node.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if target.is_dir and not node.is_dir:
                raise FsError(errno.EISDIR)
            if target.is_dir and self._dir(target.ino).entries:
                raise FsError(errno.ENOTEMPTY)
        if pnew.nlink == 0:
            raise FsError(errno.ENOENT, "the directory was removed")
        if target is not None:
            self._remove_entry(pnew, name_new)
            if target.is_dir:
                target.nlink = 0
                pnew.nlink -= 1
            else:
                target.nlink -= 1
            self._touch(target, mtime=False)
            self._unlinked(target)
        self._remove_entry(pold, name_old)
        self._add_entry(pnew, name_new, node)
        if node.is_dir and pold is not pnew:
            node.parent = pnew.ino
            pold.nlink -= 1
            pnew.nlink += 1
        self._touch(node, mtime=False)

    def _exchange(self, pa: Inode, na: bytes, a: Inode, pb: Inode, nb: bytes, b: Inode) -> None:
        if a is b:
            return
        if (a.is_dir and self._is_ancestor(a, pb)) or (b.is_dir and self._is_ancestor(b, pa)):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")
        da, db = self._dir(pa.ino), self._dir(pb.ino)
        ca, cb = da.entries[na][1], db.entries[nb][1]
        # Each name keeps its cookie: an exchange must not move entries in readdir order.
        da.entries[na] = (b.ino, ca)
        db.entries[nb] = (a.ino, cb)
        self.data.live.kv[dirent_key(pa.ino, na)] = pack_dirent(b.ino, ca)
        self.data.live.kv[dirent_key(pb.ino, nb)] = pack_dirent(a.ino, cb)
        if pa is not pb:
            for node, old, new in ((a, pa, pb), (b, pb, pa)):
                if node.is_dir:
                    node.parent = new.ino
                    old.nlink -= 1
                    new.nlink += 1
        for node in (pa, pb):
            self._touch(node)
        for node in (a, b):
            self._touch(node, mtime=False)

    # -- directories ------------------------------------------------------------------------------
    @fs_op
    def opendir(self, ino: int) -> int:
        self._dir(ino)
        fh = self.next_fh
        self.next_fh += 1
        self.dir_handles[fh] = ino
        return fh

    @fs_op
    def readdir(self, fh: int, start: int = 0) -> Iterator[tuple[bytes, Attributes, int]]:
        """(name, attributes, cookie) after ``start``; a cookie is the next entry's offset.

        Lookup counts are not changed: the caller reports entries the kernel kept
        with ``remember``.
        """
        ino = self.dir_handles.get(fh)
        if ino is None:
            raise FsError(errno.EBADF)
        ds = self._dir(ino)
        if start == 0:
            self._relatime(self._inode(ino))
        return self._readdir(ds, start)

    def _readdir(self, ds: DirState, start: int) -> Iterator[tuple[bytes, Attributes, int]]:
        page: list[tuple[bytes, int, int]] = []
        it = ds.after(start)
        while True:
            page.clear()
            for item in it:
                page.append(item)
                if len(page) >= 128:
                    break
            if not page:
                return
            with store_errors():
                self._load_inodes([child for _, child, _ in page])
                out = [(n, self._attrs(self._inode(c)), k) for n, c, k in page]
            yield from out

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    # -- extended attributes ----------------------------------------------------------------------
    @fs_op
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        check_xattr_name(name)
        self._writable()
        if not name or len(name) > NAME_MAX:
            raise FsError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        xa = self._xattrs(ino)
        if flags & XATTR_CREATE and name in xa:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and name not in xa:
            raise FsError(errno.ENODATA)
        xa[name] = bytes(value)
        self.data.live.kv[xattr_key(ino, name)] = bytes(value)
        self._touch(self._inode(ino), mtime=False)

    @fs_op
    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.find_xattr(ino, name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    @fs_op
    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """``getxattr``, with None rather than ENODATA for a missing name: the kernel asks
        for ``security.capability`` before every write and chown, and it is never there."""
        check_xattr_name(name)
        return self._xattrs(ino).get(name)

    @fs_op
    def listxattr(self, ino: int) -> list[bytes]:
        return sorted(n for n in self._xattrs(ino) if n not in ACL_XATTRS)

    @fs_op
    def removexattr(self, ino: int, name: bytes) -> None:
        check_xattr_name(name)
        self._writable()
        xa = self._xattrs(ino)
        if name not in xa:
            raise FsError(errno.ENODATA)
        del xa[name]
        self.data.live.kv[xattr_key(ino, name)] = None
        self._touch(self._inode(ino), mtime=False)
