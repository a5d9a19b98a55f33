"""A minimal in-memory pyfuse3 filesystem: the ceiling for a Python FUSE filesystem here.

Written for ``fio_bench`` only. It does the least work a correct pyfuse3 filesystem can
do per request (a dict lookup, a bytearray slice), so what ``fio_bench`` measures
through it is the cost of the kernel, libfuse, pyfuse3 and trio: the best any Python
FUSE filesystem reaches on this machine. It implements what fio, the small-file
job and ``meta_bench`` use (lookup, getattr, setattr of size, mode, owner and times,
create, open, read, write, release, unlink, rename, mkdir, rmdir, opendir, readdir,
releasedir, statfs, flush, fsync, and getxattr, which finds no attribute); everything
else is ENOSYS.

getxattr answers ENODATA rather than ENOSYS so that memfs pays the round trips
fusedrive pays: the kernel asks for ``security.capability`` before every write(2),
truncating open and chown, unless the daemon once answered ENOSYS (then it never asks
again, which a filesystem with extended attributes cannot do).

It mounts with the kernel options fusedrive uses (``default_permissions``, ``nosuid``,
``nodev``, ``allow_other``, writeback caching off, ``keep_cache`` on open, the same
entry and attribute timeouts) so that the two differ only in what the daemon does.

Invariants: a directory's entries map names to inode numbers; an inode lives while it
has a name or an open handle (lookup counts are not tracked: the kernel may ask about
an unlinked, closed inode only in races this benchmark never creates, and then gets
ENOENT). Everything is lost at unmount.

Run: ``python -m benchmarks.memfs MOUNTPOINT [--ready-fd N] [--attr-timeout S]``;
serving ends at unmount (``fusermount3 -u``) or on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pyfuse3
import trio

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
BLOCK = 4096


class Inode:
    __slots__ = (
        "atime",
        "children",
        "ctime",
        "data",
        "gid",
        "ino",
        "mode",
        "mtime",
        "nlink",
        "opened",
        "uid",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int) -> None:
        now = time.time_ns()
        self.ino, self.mode, self.uid, self.gid = ino, mode, uid, gid
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.atime = self.mtime = self.ctime = now
        self.data = bytearray()
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.opened = 0


class MemFs(pyfuse3.Operations):
    """The request handlers; inodes live in one dict."""

    enable_writeback_cache = False

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout
        self.inodes: dict[int, Inode] = {ROOT: Inode(ROOT, stat.S_IFDIR | 0o755, 0, 0)}
        self.next_ino = ROOT + 1

    # -- inodes -----------------------------------------------------------------------------
    def _get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _dir(self, ino: int) -> dict[bytes, int]:
        children = self._get(ino).children
        if children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return children

    def _entry(self, i: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = i.ino
        e.entry_timeout = e.attr_timeout = self.timeout
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid = i.mode, i.nlink, i.uid, i.gid
        e.st_size = len(i.data)
        e.st_blksize = BLOCK
        e.st_blocks = (len(i.data) + 511) // 512
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = i.atime, i.mtime, i.ctime
        return e

    def _new(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Inode:
        children = self._dir(parent)
        if name in children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        i = Inode(self.next_ino, mode, ctx.uid, ctx.gid)
        self.next_ino += 1
        self.inodes[i.ino] = i
        children[name] = i.ino
        p = self.inodes[parent]
        p.mtime = p.ctime = i.ctime
        if stat.S_ISDIR(mode):
            p.nlink += 1
        return i

    def _drop_if_unused(self, i: Inode) -> None:
        if i.nlink == 0 and i.opened == 0:
            del self.inodes[i.ino]

    def _remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        children = self._dir(parent)
        ino = children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        i = self.inodes[ino]
        if want_dir:
            if i.children is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if i.children:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            self.inodes[parent].nlink -= 1
            i.nlink = 0
        else:
            if i.children is not None:
                raise pyfuse3.FUSEError(errno.EISDIR)
            i.nlink -= 1
        del children[name]
        p = self.inodes[parent]
        p.mtime = p.ctime = i.ctime = time.time_ns()
        self._drop_if_unused(i)

    # -- handlers ---------------------------------------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._entry(self._get(parent_inode))
        ino = self._dir(parent_inode).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(self.inodes[ino])

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self._get(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        i = self._get(inode)
        now = time.time_ns()
        if fields.update_size:
            size = attr.st_size
            if size < len(i.data):
                del i.data[size:]
            else:
                i.data.extend(bytes(size - len(i.data)))
            i.mtime = now
        if fields.update_mode:
            i.mode = stat.S_IFMT(i.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            i.uid = attr.st_uid
        if fields.update_gid:
            i.gid = attr.st_gid
        if fields.update_atime:
            i.atime = attr.st_atime_ns
        if fields.update_mtime:
            i.mtime = attr.st_mtime_ns
        i.ctime = now
        return self._entry(i)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        i = self._new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        i.opened += 1
        return pyfuse3.FileInfo(fh=i.ino, keep_cache=True), self._entry(i)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        i = self._get(inode)
        if flags & os.O_TRUNC:
            del i.data[:]
        i.opened += 1
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.inodes[fh].data[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        data = self.inodes[fh].data
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        self.inodes[fh].mtime = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def release(self, fh: int) -> None:
        i = self.inodes[fh]
        i.opened -= 1
        self._drop_if_unused(i)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, want_dir=False)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._dir(parent_inode_old), self._dir(parent_inode_new)
        ino = old.get(name_old)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        i = self.inodes[ino]
        if name_new in new:  # replacing: only a file by a file (enough for benchmarks)
            target = self.inodes[new[name_new]]
            if i.children is not None or target.children is not None:
                raise pyfuse3.FUSEError(errno.EEXIST)
            target.nlink -= 1
            self._drop_if_unused(target)
        del old[name_old]
        new[name_new] = ino
        now = time.time_ns()
        for p in {parent_inode_old, parent_inode_new}:
            self.inodes[p].mtime = self.inodes[p].ctime = now
        if i.children is not None and parent_inode_old != parent_inode_new:
            self.inodes[parent_inode_old].nlink -= 1
            self.inodes[parent_inode_new].nlink += 1

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._get(inode)
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self._new(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, want_dir=True)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._dir(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Cookies are positions in insertion order: stable enough for a benchmark that
        # never removes entries while listing.
        names = list(self._dir(fh).items())
        for pos in range(start_id, len(names)):
            name, ino = names[pos]
            if not pyfuse3.readdir_reply(token, name, self._entry(self.inodes[ino]), pos + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        d = pyfuse3.StatvfsData()
        d.f_bsize = d.f_frsize = BLOCK
        used = sum(len(i.data) for i in self.inodes.values()) // BLOCK
        d.f_blocks = max(used, 1 << 30)
        d.f_bfree = d.f_bavail = d.f_blocks - used
        d.f_files = 1 << 32
        d.f_ffree = d.f_favail = d.f_files - len(self.inodes)
        d.f_namemax = 255
        return d


async def _serve(ready_fd: int | None) -> None:
    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal)
        await trio.lowlevel.checkpoint()
        if ready_fd is not None:
            os.write(ready_fd, b"R")
            os.close(ready_fd)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def serve(mountpoint: Path, timeout: float, ready_fd: int | None = None) -> None:
    """Mount an empty memfs at ``mountpoint`` and serve it until it is unmounted."""
    opts = {"fsname=memfs", "subtype=memfs", "default_permissions", "nosuid", "nodev"}
    opts.add("allow_other")
    pyfuse3.init(MemFs(timeout), str(mountpoint), opts)
    try:
        trio.run(_serve, ready_fd)
    finally:
        pyfuse3.close(unmount=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memfs", description=__doc__)
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--ready-fd", type=int, help="write one byte to this fd once the mount is live")
    p.add_argument(
        "--attr-timeout", type=float, default=1.0, help="entry and attribute timeout, seconds"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.mountpoint.is_dir():
        print(f"memfs: mount point {args.mountpoint} is not a directory", file=sys.stderr)
        return 1
    try:
        serve(args.mountpoint, args.attr_timeout, args.ready_fd)
    except (RuntimeError, OSError) as exc:
        print(f"memfs: cannot serve {args.mountpoint}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
