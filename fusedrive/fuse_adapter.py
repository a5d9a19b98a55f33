"""The FUSE daemon: a thin pyfuse3 + trio adapter over ``Filesystem``, and ``serve``.

One process serves one mount (pyfuse3 keeps one session per process). Handlers
translate arguments, call the synchronous ``Filesystem`` and turn ``FsError`` into
``pyfuse3.FUSEError``; nothing else leaves a handler (an unexpected exception is
logged and becomes EIO, so one bug cannot take the mount down). FUSE_FALLOCATE, for
which pyfuse3 has no handler, comes through ``fallocate_shim`` to
``Operations.fallocate_request`` on the same trio thread.

Work that pays to move off the trio thread goes to worker threads: preparing and
committing flushes (``flusher.Flusher``, which also says when flushes happen) and
fetching + verifying stored chunks for large reads and sequential read-ahead
(``fetcher.Fetcher``). Everything else runs on the trio thread between
checkpoints, so ``Filesystem`` needs no locks. Serving ends when the file system
has no mount left in the daemon's own mount namespace, even if a copy lives on in
another one (``_stop_when_unmounted``): an unmount here always ends the daemon.

Failures (docs/faults.md): a flush that fails raises ``FsError`` (ENOSPC for a full
store, EIO for anything else, a bug included) and leaves its changes buffered for
the next flush (``flusher``); fsync and fsyncdir return the error, close of a file opened for
writing retries and returns it while a failure is outstanding, and no failure ends
the event loop: the daemon never unmounts itself. A final flush that fails when the
mount ends raises ``DataNotStored`` out of ``serve`` (logged at CRITICAL).

Kernel caches (docs/datapath.md): a read-write mount is its volume's only writer
(``_writer_lock``) and a snapshot never changes, so the kernel keeps entries and
negative entries (a lookup of a missing name answers st_ino 0) for ``ENTRY_TIMEOUT``
and attributes for ``ATTR_TIMEOUT`` seconds (``CACHED``): every change of a name and
nearly every change of attributes comes through the kernel, which updates or drops
what it cached itself. The daemon changes attributes on its own in three places:
``refresh`` grows a block volume's disk image (size) and a flush commits each written
file's allocation (st_blocks): both are invalidated here. A write that must merge
stored patches to make room (``Filesystem._make_room``) shrinks other files'
st_blocks: not invalidated, they show the old figure for at most ``ATTR_TIMEOUT``,
which is why attributes are kept for less than entries. Entries and attributes
handed out by readdir (READDIRPLUS) keep ``SHARED``: while they are valid, the
kernel (6.18, measured) does not apply an invalidation to them. A read-only mount
of a volume may have a writer elsewhere: it keeps ``SHARED`` (1 s, as before).

Kernel options: the writeback cache is off unless a read-write mount of a filesystem
volume asks for it (``writeback_default``, ``writeback_cache``): then the kernel keeps writes
in its page cache and owns a regular file's size, mtime and ctime (sent as SETATTR),
appends itself (handles lose O_APPEND here, ``Operations._open_flags``), and writes
pages back later; ``control.request_flush`` syncfs's the mount before its flush, and
SIGTERM does too before the loop stops (``_write_back``). docs/datapath.md says
what changes, and why it is off. Mounts use
default_permissions (the kernel checks modes), nosuid, nodev, allow_other unless
asked otherwise, and ro for read-only mounts.
libfuse 3.14 asks the kernel for 1 MiB writes by default (its buffer is
FUSE_MAX_MAX_PAGES = 256 pages), and it accepts no max_write option on
``fuse_session_new``; the test suite checks that 1 MiB writes arrive whole.
"""

from __future__ import annotations

# First: the fallocate shim must be loaded before pyfuse3 is (see fallocate_shim).
from . import fallocate_shim  # isort: split

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pyfuse3
import trio

from blockstore import Busy, InvalidArgument, StoreError
from blockstore import Store as _Store

from .control import FLUSH_XATTR_BYTES, device_mounted, find_mount, syncfs
from .errors import DataNotStored, FlushNeeded, FsError, failure, translate
from .fetcher import Fetcher
from .filesystem import Filesystem, StatFs
from .flusher import Flusher, invalidate_attrs
from .namespace import Attributes, Ctx
from .schema import ROOT_INO

log = logging.getLogger(__name__)


class CacheTimeouts(NamedTuple):
    """Seconds the kernel keeps entries (and negative entries) and attributes."""

    entry: float
    attr: float


# See the docstring and docs/datapath.md.
ENTRY_TIMEOUT = 3600.0
ATTR_TIMEOUT = 60.0
CACHED = CacheTimeouts(ENTRY_TIMEOUT, ATTR_TIMEOUT)
SHARED = CacheTimeouts(1.0, 1.0)  # a read-only mount of a volume: another daemon may write it
# glibc malloc (see ``_keep_freed_memory``): allocations up to MALLOC_MMAP_BYTES come
# from the heap, and up to MALLOC_KEEP_BYTES of freed heap stays with the process.
READ_AHEAD_KB = 1024  # the mount's kernel read-ahead (the kernel's default: 128 KiB)
MALLOC_MMAP_BYTES = 4 * 1024 * 1024
MALLOC_KEEP_BYTES = 64 * 1024 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_SPACE_ATTEMPTS = 8
MOUNT_CHECK_INTERVAL = 1.0  # how often the daemon looks whether its mount is gone (see below)


class _fuse_errors:  # lower case: it reads like a function, ``with _fuse_errors(op):``
    """Turn what a handler raises into ``FUSEError``; anything unexpected is logged, EIO.

    A class rather than a generator context manager: it wraps every request.
    """

    __slots__ = ("op",)

    def __init__(self, op: str) -> None:
        self.op = op

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None or isinstance(exc, pyfuse3.FUSEError) or not isinstance(exc, Exception):
            return  # nothing, or nothing to translate: it goes on as it is
        if isinstance(exc, FsError):
            raise pyfuse3.FUSEError(exc.errno) from None
        if isinstance(exc, StoreError):
            raise pyfuse3.FUSEError(translate(exc).errno) from None
        log.error("event=handler_failed op=%s", self.op, exc_info=exc)
        raise pyfuse3.FUSEError(errno.EIO) from None


def _file_info(fh: int, flags: int, writeback: bool) -> pyfuse3.FileInfo:
    """How the kernel should treat an open file.

    O_DIRECT opens get FUSE direct I/O: the caller asked to bypass the page cache,
    and the kernel then skips what it does for cached writes, among them asking
    ``getxattr("security.capability")`` before every write (one more round trip
    per write: random 4 KiB O_DIRECT writes measured 2.0-2.1k IOPS with it,
    2.3-2.4k without). The kernel drops the pages a direct write covers, so other
    opens and live mappings of the file see it at once (tested through a mount). A
    shared mmap of the O_DIRECT descriptor itself fails with ENODEV (the kernel's
    rule for direct I/O). Other opens keep the page cache across opens: this
    process is the only writer.
    """
    if flags & os.O_DIRECT and not writeback:
        return pyfuse3.FileInfo(fh=fh, direct_io=True)
    # With the writeback cache, O_DIRECT takes the kernel's own direct I/O path, which
    # writes the range's dirty pages back before it reads or writes: FUSE direct I/O
    # does not, and read the daemon's older bytes and size (found by test_fsx).
    return pyfuse3.FileInfo(fh=fh, keep_cache=True)


def _entry(a: Attributes, timeouts: CacheTimeouts) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = 0
    e.entry_timeout = timeouts.entry
    e.attr_timeout = timeouts.attr
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = a.blksize
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    return e


def _negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """A lookup's answer for a missing name that the kernel keeps for ``timeout``."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = 0
    e.entry_timeout = timeout
    return e


def _statvfs(s: StatFs) -> pyfuse3.StatvfsData:
    d = pyfuse3.StatvfsData()
    d.f_bsize, d.f_frsize = s.bsize, s.frsize
    d.f_blocks, d.f_bfree, d.f_bavail = s.blocks, s.bfree, s.bavail
    d.f_files, d.f_ffree, d.f_favail = s.files, s.ffree, s.favail
    d.f_namemax = s.namemax
    return d


class Operations(pyfuse3.Operations):
    """pyfuse3 request handlers over one ``Filesystem``."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    # POSIX ACLs stay off (no FUSE_POSIX_ACL): ``Namespace`` refuses the
    # ``system.posix_acl_*`` names with EOPNOTSUPP, so tools fall back to chmod.
    enable_acl = False

    def __init__(
        self, fs: Filesystem, timeouts: CacheTimeouts = CACHED, *, writeback: bool = False
    ) -> None:
        super().__init__()
        self.fs = fs
        self.timeouts = timeouts
        # pyfuse3 reads this attribute when it answers INIT: per mount, not per class.
        self.enable_writeback_cache = writeback
        # Readdir answers keep at most SHARED: while attributes from a READDIRPLUS
        # reply are valid, an invalidation does not reach them (measured, Linux 6.18).
        self.readdir_timeouts = CacheTimeouts(*map(min, zip(timeouts, SHARED, strict=True)))
        self._negative = _negative_entry(timeouts.entry)
        self.flusher = Flusher(fs)
        self.fetcher = Fetcher(fs)
        self.largest_write = 0  # observed request size, reported at unmount
        self.mount_path: str | None = None  # resolved mount point, for tuning after INIT

    def init(self) -> None:
        """The kernel's INIT request is being answered: tune the mount right after.

        The kernel sets the mount's read-ahead while it takes our INIT reply, so
        ``tune_read_ahead`` must run after that: a task started here runs once the
        handler that called us has sent the reply.
        """
        nursery, path = self.flusher.nursery, self.mount_path
        if nursery is not None and path is not None:

            async def tune() -> None:
                tune_read_ahead(path)

            nursery.start_soon(tune)

    # -- names ---------------------------------------------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors("lookup"):
            try:
                a = self.fs.find(parent_inode, name)
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                a = None
            if a is None:
                return self._negative  # pyfuse3 copies it into its reply: one serves all
            return _entry(a, self.timeouts)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            try:
                self.fs.forget(ino, n)
            except Exception:
                log.exception("event=forget_failed ino=%d", ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _fuse_errors("getattr"):
            return _entry(self.fs.getattr(inode), self.timeouts)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors("setattr"):
            a = self.fs.setattr(
                inode,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            )
            return _entry(a, self.timeouts)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        with _fuse_errors("readlink"):
            return self.fs.readlink(inode)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors("mknod"):
            return _entry(
                self.fs.mknod(parent_inode, name, mode, rdev, Ctx(ctx.uid, ctx.gid)), self.timeouts
            )

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors("mkdir"):
            return _entry(
                self.fs.mkdir(parent_inode, name, mode, Ctx(ctx.uid, ctx.gid)), self.timeouts
            )

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with _fuse_errors("unlink"):
            self.fs.unlink(parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with _fuse_errors("rmdir"):
            self.fs.rmdir(parent_inode, name)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors("symlink"):
            return _entry(
                self.fs.symlink(parent_inode, name, target, Ctx(ctx.uid, ctx.gid)), self.timeouts
            )

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        with _fuse_errors("rename"):
            self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with _fuse_errors("link"):
            return _entry(self.fs.link(inode, new_parent_inode, new_name), self.timeouts)

    # -- files ---------------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        """With the writeback cache, the kernel appends (O_APPEND) itself.

        It sends every write, appends included, at the offset its own i_size gave,
        and writes pages back through any writable handle of the inode: a handle
        that appended at the daemon's end of file would put a page written back
        through it at the wrong place.
        """
        return flags & ~os.O_APPEND if self.enable_writeback_cache else flags

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        with _fuse_errors("open"):
            fh = self.fs.open(inode, self._open_flags(flags))
            return _file_info(fh, flags, self.enable_writeback_cache)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        with _fuse_errors("create"):
            fh, a = self.fs.create(
                parent_inode, name, mode, self._open_flags(flags), Ctx(ctx.uid, ctx.gid)
            )
            return _file_info(fh, flags, self.enable_writeback_cache), _entry(a, self.timeouts)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with _fuse_errors("read"):
            await self.fetcher.before(fh, off, size, False)
            return self.fs.read(fh, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        with _fuse_errors("write"):
            self.largest_write = max(self.largest_write, len(buf))
            await self.fetcher.before(fh, off, len(buf), True)
            await self.flusher.writes_may_go()
            space_tries = 0
            while True:
                try:
                    n = self.fs.try_write(fh, off, buf)
                    break
                except FlushNeeded as exc:
                    # Waiting for buffers always ends; doubt about space ends with a
                    # verdict once a flush finds nothing else pending, or after a
                    # few tries while other writers keep adding to the buffers.
                    if exc.space:
                        space_tries += 1
                        if space_tries > _SPACE_ATTEMPTS:
                            raise FsError(errno.ENOSPC) from None
                    await self.flusher.make_room(exc.space)
            self.flusher.after_write()
            return n

    async def flush(self, fh: int) -> None:
        """close(2): does not flush (fsync does), but reports a flush that failed.

        While buffered changes could not be stored (``Flusher.failure``), closing a
        file opened for writing tries again and fails with the error (ENOSPC, EIO) if
        they still cannot be stored: close never hides data that is not stored.
        """
        with _fuse_errors("flush"):
            h = self.fs.handles.get(fh)
            if (
                self.flusher.failure is not None
                and h is not None
                and h.flags & os.O_ACCMODE != os.O_RDONLY
            ):
                await self.flusher.flush()

    async def release(self, fh: int) -> None:
        with _fuse_errors("release"):
            self.fetcher.forget(fh)
            self.fs.release(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        with _fuse_errors("fsync"):
            await self.flusher.flush()

    def fallocate_request(
        self, req: int, ino: int, mode: int, off: int, length: int, fh: int
    ) -> None:
        """FUSE_FALLOCATE, which pyfuse3 does not pass on: ``fallocate_shim`` calls this
        on the trio thread, and it answers with ``fallocate_shim.reply``.

        Served at once, like a write that needs no flush; one that must wait for a
        flush first (``FlushNeeded``) goes on in a task, as ``write`` would.
        """
        try:
            self.fs.try_fallocate(ino, mode, off, length)
        except FlushNeeded as exc:
            if self.flusher.nursery is not None:
                self.flusher.nursery.start_soon(
                    self._fallocate_after_flush, req, ino, mode, off, length, exc.space
                )
                return
            fallocate_shim.reply(req, errno.EIO)
        except Exception as exc:
            fallocate_shim.reply(req, failure(exc, "fallocate").errno)
        else:
            fallocate_shim.reply(req, 0)
            self.flusher.after_write()

    async def _fallocate_after_flush(
        self, req: int, ino: int, mode: int, off: int, length: int, space: bool
    ) -> None:
        err = errno.EINTR  # unless it ends below: cancelled, the mount is going away
        try:
            space_tries = 0
            while True:
                if space:
                    space_tries += 1
                    if space_tries > _SPACE_ATTEMPTS:
                        err = errno.ENOSPC
                        break
                await self.flusher.make_room(space)
                try:
                    self.fs.try_fallocate(ino, mode, off, length)
                    err = 0
                    break
                except FlushNeeded as exc:
                    space = exc.space
        except Exception as exc:
            err = failure(exc, "fallocate").errno
        finally:
            fallocate_shim.reply(req, err)
        if err == 0:
            self.flusher.after_write()

    # -- directories ---------------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        with _fuse_errors("opendir"):
            return self.fs.opendir(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        with _fuse_errors("readdir"):
            for name, attrs, cookie in self.fs.readdir(fh, start_id):
                entry = _entry(attrs, self.readdir_timeouts)
                if not pyfuse3.readdir_reply(token, name, entry, cookie):
                    break
                self.fs.remember(attrs.ino)

    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        with _fuse_errors("fsyncdir"):
            await self.flusher.flush()

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with _fuse_errors("statfs"):
            return _statvfs(self.fs.statfs())

    # -- xattrs --------------------------------------------------------------------------------
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        with _fuse_errors("setxattr"):
            if inode == ROOT_INO and name == FLUSH_XATTR_BYTES:
                # After a failure, pick up a fixed cause (a changed parameter) first.
                changed = self.fs.refresh() if self.flusher.failure is not None else []
                await self.flusher.flush_requested()
                for ino in {*changed, *self.fs.refresh()}:
                    await trio.to_thread.run_sync(invalidate_attrs, ino)
                log.info("event=flush_request_served")
                return
            self.fs.setxattr(inode, name, value)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        with _fuse_errors("getxattr"):
            value = self.fs.find_xattr(inode, name)
            if value is None:
                raise pyfuse3.FUSEError(errno.ENODATA)
            return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        with _fuse_errors("listxattr"):
            return self.fs.listxattr(inode)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with _fuse_errors("removexattr"):
            self.fs.removexattr(inode, name)


# -- serving -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _writer_lock(store_path: Path, volume: str) -> Iterator[None]:
    """One read-write mount per volume: a second one would corrupt the tree.

    An flock on ``STORE/locks/VOLUME.lock``; the kernel drops it when the daemon
    dies, however it dies.
    """
    locks = Path(store_path) / "locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(locks / f"{volume}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(
                f"volume {volume!r} is already mounted read-write by another process"
            ) from None
        yield
    finally:
        os.close(fd)


def mount_options(name: str, *, read_only: bool, allow_other: bool, debug: bool) -> set[str]:
    opts = {f"fsname=fusedrive:{name}", "subtype=fusedrive", "default_permissions"}
    opts |= {"nosuid", "nodev"}
    if allow_other:
        opts.add("allow_other")
    if read_only:
        opts.add("ro")
    if debug:
        opts.add("debug")
    return opts


async def _stop_when_unmounted(device: str) -> None:
    """End serving once no mount of this file system is left in the daemon's mount namespace.

    The kernel ends the FUSE session (``pyfuse3.main`` returns) only when the file
    system's last mount goes, in any mount namespace. A process that copied the mount
    table into a private namespace while we were mounted (``unshare -m``, a container
    started then) keeps a mount of its own, and the daemon would go on serving it
    after an unmount here, for as long as that namespace lives (seen: a test's
    daemon alive 30 s after ``fusermount3 -u``). The mount table is looked at only
    when it changed (``/proc/self/mountinfo`` reports POLLPRI then).
    """
    with open("/proc/self/mountinfo", "rb") as table:
        changes = select.poll()
        changes.register(table, select.POLLPRI)
        while True:
            await trio.sleep(MOUNT_CHECK_INTERVAL)
            if changes.poll(0) and not device_mounted(device):
                log.info("event=unmounted_here device=%s (mounts in other namespaces end)", device)
                pyfuse3.terminate()
                return


async def _write_back(ops: Operations) -> None:
    """Have the kernel send its dirty pages before the daemon stops serving.

    Only a SIGTERM / SIGINT needs this: an unmount writes them back itself while the
    daemon still serves, but once ``pyfuse3.terminate`` ends the loop, the session
    closes and the kernel drops what it still holds (libfuse closes /dev/fuse before
    it unmounts). A thread: the write back comes to this daemon, whose loop must run.
    """
    if not ops.enable_writeback_cache or ops.mount_path is None:
        return
    try:
        await trio.to_thread.run_sync(syncfs, ops.mount_path)
    except OSError as exc:  # the final flush still stores what did arrive
        log.error("event=write_back_failed error=%s", exc)


async def _serve_loop(
    ops: Operations, on_ready: Callable[[], None] | None, device: str | None
) -> None:
    async def main_then_stop(nursery: trio.Nursery) -> None:
        await pyfuse3.main()
        nursery.cancel_scope.cancel()

    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("event=signal signal=%s", signal.Signals(signum).name)
                await _write_back(ops)
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        ops.flusher.nursery = nursery
        ops.fetcher.nursery = nursery
        nursery.start_soon(main_then_stop, nursery)
        if threading.current_thread() is threading.main_thread():
            nursery.start_soon(stop_on_signal)
        if not ops.fs.read_only:
            nursery.start_soon(ops.flusher.run_timer)
        if device is not None:
            nursery.start_soon(_stop_when_unmounted, device)
        await trio.lowlevel.checkpoint()
        if on_ready is not None:
            on_ready()


def serve(
    store_path: Path,
    mountpoint: Path,
    *,
    volume: str | None = None,
    snapshot: str | None = None,
    read_only: bool = False,
    allow_other: bool = True,
    on_ready: Callable[[], None] | None = None,
    debug: bool = False,
    cache: CacheTimeouts | None = None,
    writeback_cache: bool | None = None,
) -> None:
    """Mount a volume (or, read-only, a snapshot) and serve it until it is unmounted.

    Store problems (no store, no such volume or snapshot, bad parameters) raise the
    blockstore exception before anything is mounted; a second read-write mount of
    the same volume raises ``Busy``; filesystem problems raise ``FsError``, an
    ``OSError``. ``on_ready`` is called once the mount is live, in the daemon's
    event loop thread: it must not touch the mount itself. Serving ends when the
    mount is unmounted (fusermount3 -u, umount) or on SIGTERM / SIGINT (then the
    daemon unmounts itself); either way every buffered write is flushed first and
    the store is closed on return. ``cache`` overrides how long the kernel keeps
    entries and attributes (default: ``CACHED``, or ``SHARED`` for a read-only mount
    of a volume). ``writeback_cache`` turns the kernel's writeback cache on or off
    (default: ``writeback_default``); a block volume refuses it (``InvalidArgument``).
    """
    if (volume is None) == (snapshot is None):
        raise InvalidArgument("give exactly one of a volume or a snapshot to mount")
    mountpoint = Path(mountpoint)
    if not mountpoint.is_dir():
        raise InvalidArgument(f"mount point {mountpoint} is not a directory")
    store = _Store(store_path, create=False)
    try:
        if snapshot is not None:
            view, name, read_only = store.snapshot(snapshot), snapshot, True
        else:
            assert volume is not None
            store.get_volume(volume)
            view, name = store.volume(volume), volume
        lock = contextlib.nullcontext() if read_only else _writer_lock(Path(store_path), name)
        if cache is None:
            cache = SHARED if read_only and snapshot is None else CACHED
        with lock:
            fs = Filesystem(view, read_only=read_only)
            try:
                writeback = _choose_writeback(fs, writeback_cache)
            except InvalidArgument:
                fs.close()
                raise
            _serve_fs(
                fs, mountpoint, name, read_only, allow_other, on_ready, debug, cache, writeback
            )
    finally:
        store.close()


def writeback_default(fs: Filesystem) -> bool:
    """Off (docs/datapath.md, "Kernel writeback cache"): a mount may opt in.

    syncfs(2) on a FUSE mount does not wait for the write back requests it starts
    to reach the daemon, so a snapshot cut after ``request_flush`` could miss writes
    that returned before it (found by tests/fusedrive/test_snapshot_writer.py).
    Block volumes refuse it (``_choose_writeback``): the kernel keeps a cached
    regular file's size to itself, so a disk image grown by an expansion
    (``Filesystem.refresh``) would keep its old size for the loop device.
    """
    return False


def _choose_writeback(fs: Filesystem, asked: bool | None) -> bool:
    if asked is None or fs.read_only:
        return writeback_default(fs)
    if asked and fs.block_mode:
        raise InvalidArgument(
            "a block volume cannot use the writeback cache: the kernel would keep its "
            "disk image at the old size after an expansion"
        )
    return asked


def _keep_freed_memory() -> None:
    """Have glibc keep freed chunk buffers for reuse instead of giving them back.

    By default glibc returns freed memory at the top of the heap to the kernel once
    it passes 128 KiB, and maps each allocation over 128 KiB (a 1 MiB write request)
    afresh: every chunk buffer then lands on new pages, which fault and are zeroed
    again (measured: 250 page faults and about 0.5 ms of the trio thread per MiB
    written, 3.5x the rest of the write). With these thresholds freed buffers are
    reused; the daemon's memory stays near its high-water mark, which the dirty and
    cache limits bound, instead of shrinking between flushes.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return  # not glibc: nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES) and mallopt(
        _M_TRIM_THRESHOLD, MALLOC_KEEP_BYTES
    )
    if not ok:
        log.warning("event=mallopt_failed")


def tune_read_ahead(mountpoint: str, kib: int = READ_AHEAD_KB) -> bool:
    """Raise the kernel's read-ahead for the mount at ``mountpoint`` (a resolved path).

    Root only (sysfs); True if it was set.

    With the default 128 KiB the kernel asks a FUSE daemon for 256 KiB at a time
    during sequential reads and keeps few requests in flight; 1 MiB was measured
    here to read a cold 1 GiB file about 1.2x faster (4 MiB was no better).
    """
    entry = find_mount(mountpoint)
    if entry is None:
        return False
    dev = entry.device
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:  # not root, or /sys read-only: the default still works
        log.debug("event=read_ahead_not_set device=%s error=%s", dev, exc)
        return False
    return True


def _serve_fs(
    fs: Filesystem,
    mountpoint: Path,
    name: str,
    read_only: bool,
    allow_other: bool,
    on_ready: Callable[[], None] | None,
    debug: bool,
    cache: CacheTimeouts,
    writeback: bool,
) -> None:
    _keep_freed_memory()
    ops = Operations(fs, cache, writeback=writeback)
    ops.mount_path = os.path.realpath(mountpoint)  # now: once mounted, lstat asks the daemon
    opts = mount_options(name, read_only=read_only, allow_other=allow_other, debug=debug)
    fallocate_shim.serve(ops.fallocate_request)
    try:
        pyfuse3.init(ops, str(mountpoint), opts)
    except RuntimeError as exc:
        try:
            fs.close()
        finally:
            ops.flusher.close()
        raise OSError(errno.EIO, f"cannot mount {mountpoint}: {exc}") from exc
    log.info(
        "event=mounted name=%s mountpoint=%s read_only=%s writeback_cache=%s",
        name,
        mountpoint,
        read_only,
        writeback,
    )
    if (why := fallocate_shim.problem()) is not None:
        log.warning("event=fallocate_not_served reason=%r (fallocate fails with EOPNOTSUPP)", why)
    entry = find_mount(ops.mount_path)
    device = entry.device if entry is not None else None
    main_thread = threading.current_thread() is threading.main_thread()
    try:
        trio.run(_serve_loop, ops, on_ready, device)
    finally:
        # A second SIGTERM must not cut the final flush short.
        saved = (
            [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)]
            if (main_thread)
            else []
        )
        try:
            _final_flush(fs)
        finally:
            ops.flusher.close()
            # Unmount only our own mount (SIGTERM): once it is gone, whatever is mounted
            # at the path now (a new mount there) is not ours to detach.
            here = find_mount(ops.mount_path) if device is not None else None
            pyfuse3.close(unmount=device is None or (here is not None and here.device == device))
            for s, handler in zip((signal.SIGTERM, signal.SIGINT), saved, strict=False):
                signal.signal(s, handler)
            log.info(
                "event=unmounted name=%s mountpoint=%s largest_write=%d",
                name,
                mountpoint,
                ops.largest_write,
            )


def _final_flush(fs: Filesystem) -> None:
    """Flush and close ``fs`` as the mount ends; ``DataNotStored`` if that fails.

    A failed flush is tried once more after picking up the volume's parameters (a
    fixed cause); if it still fails the buffered changes cannot be kept anywhere:
    they are reported lost (logged, and raised so the daemon exits non-zero and
    ``fusedrive umount`` says so), never silently dropped.
    """
    for attempt in (1, 2):
        try:
            fs.close()
            return
        except Exception as exc:
            err = failure(exc, "final flush")
            if attempt == 1:
                log.error("event=final_flush_failed attempt=1 error=%s", err)
                with contextlib.suppress(Exception):
                    fs.refresh()
                continue
            pending = fs.data.pending_bytes()
            log.critical(
                "event=data_not_stored buffered_bytes=%d errno=%s error=%s",
                pending,
                errno.errorcode.get(err.errno, err.errno),
                err,
            )
            raise DataNotStored(
                err.errno,
                f"the final flush failed ({err}); {pending} bytes of buffered writes "
                "and the changes buffered with them were not stored",
                pending,
            ) from exc


def main(argv: list[str] | None = None) -> int:
    """``python -m fusedrive.fuse_adapter``: serve one mount in the foreground (tests, debugging).

    The command line (``fusedrive mount``) is the user-facing way to mount.
    """
    p = argparse.ArgumentParser(prog="python -m fusedrive.fuse_adapter", description=main.__doc__)
    p.add_argument("store", type=Path)
    p.add_argument("mountpoint", type=Path)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--volume")
    which.add_argument("--snapshot")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--no-allow-other", action="store_true")
    p.add_argument("--ready-fd", type=int, help="write one byte to this fd once the mount is live")
    p.add_argument("--debug", action="store_true", help="libfuse's request trace, and debug logs")
    p.add_argument(
        "--cache-timeout",
        type=float,
        help="seconds the kernel keeps entries and attributes (benchmarks; default: docs)",
    )
    p.add_argument(
        "--writeback-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the kernel's writeback cache (default: off; docs/datapath.md)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else getattr(logging, args.log_level),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )

    def ready() -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"R")
            os.close(args.ready_fd)

    try:
        serve(
            args.store,
            args.mountpoint,
            volume=args.volume,
            snapshot=args.snapshot,
            read_only=args.read_only,
            allow_other=not args.no_allow_other,
            on_ready=ready,
            debug=args.debug,
            cache=None
            if args.cache_timeout is None
            else CacheTimeouts(args.cache_timeout, args.cache_timeout),
            writeback_cache=args.writeback_cache,
        )
    except (StoreError, OSError) as exc:
        print(f"fusedrive: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
