"""FUSE_FALLOCATE beside pyfuse3, which has no handler for it (pyfuse3 3.5).

Without a handler libfuse answers the kernel's first fallocate with ENOSYS and the
kernel fails every later one with EOPNOTSUPP without asking: posix_fallocate falls
back to writing zeros, punching holes fails, and a block volume's loop device can
never pass a filesystem's discards (fstrim, ``-o discard``) on to the store.

``_fallocate.c`` (built with the package, an optional extension: see
pyproject.toml) defines ``fuse_session_new``. Loaded here with RTLD_GLOBAL before
pyfuse3's extension module is, it is what pyfuse3's call binds to (Python loads
extension modules with RTLD_NOW, so the binding is made when pyfuse3 is
imported): it adds a fallocate handler to the operations pyfuse3 passes and calls
libfuse3's own ``fuse_session_new``. The handler calls the function given to
``serve`` on pyfuse3's trio thread, inside ``fuse_session_process_buf`` with the
GIL held, exactly where pyfuse3's own handlers run; that function answers every
request exactly once with ``reply``, at once or later from a trio task.

This module must therefore be imported before pyfuse3 (``fuse_adapter`` imports it
first). If the library was not built, cannot be loaded, pyfuse3 was imported first,
or ``FUSEDRIVE_FALLOCATE_SHIM=off`` is set in the daemon's environment, nothing
changes: fallocate fails with EOPNOTSUPP as pyfuse3 alone would have it, and
``problem`` says why (the daemon logs it at mount).
"""

from __future__ import annotations

import ctypes
import errno
import importlib.machinery
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "FUSEDRIVE_FALLOCATE_SHIM"  # "off": do not load the shim (see above)
# (request, inode, mode, offset, length, file handle) -> None; the request is an
# opaque pointer (an int) to pass to ``reply``.
Handler = Callable[[int, int, int, int, int, int], None]

_CALLBACK = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_uint64,
)  # fmt: skip


def _library_path() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_fallocate{suffix}"
        if path.exists():
            return path
    return None


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get(ENV, "").lower() in ("off", "0", "no"):
        return None, f"turned off ({ENV}={os.environ[ENV]})"
    if "pyfuse3" in sys.modules:
        return None, "pyfuse3 was imported before fusedrive.fallocate_shim"
    path = _library_path()
    if path is None:
        return None, "fusedrive/_fallocate was not built (no C compiler or libfuse3 headers?)"
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return None, f"cannot load {path}: {exc}"
    lib.fusedrive_fallocate_set_handler.argtypes = [_CALLBACK]
    lib.fusedrive_fallocate_set_handler.restype = None
    lib.fusedrive_fallocate_reply.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.fusedrive_fallocate_reply.restype = ctypes.c_int
    lib.fusedrive_fallocate_served.argtypes = []
    lib.fusedrive_fallocate_served.restype = ctypes.c_int
    return lib, None


_lib, _problem = _load()
_callback: object | None = None  # the C callback, kept alive while registered
# Requests handed to the handler and not answered yet: a request is answered once,
# never twice (libfuse frees it with the answer). All on pyfuse3's trio thread.
_pending: set[int] = set()


def serve(handler: Handler) -> None:
    """Have ``handler`` called for every FUSE_FALLOCATE of this process's session.

    Call before the session is created (``pyfuse3.init``). A handler that raises
    is a bug: the exception is logged and its request answered EIO, unless it was
    answered already.
    """
    global _callback
    if _lib is None:
        return

    def call(req: int | None, ino: int, mode: int, off: int, length: int, fh: int) -> None:
        r = req or 0
        _pending.add(r)
        try:
            handler(r, ino, mode, off, length, fh)
        except BaseException:
            log.exception("event=fallocate_handler_failed ino=%d", ino)
            if r in _pending:
                reply(r, errno.EIO)

    _callback = _CALLBACK(call)
    _lib.fusedrive_fallocate_set_handler(_callback)


def reply(req: int, err: int) -> None:
    """Answer fallocate request ``req``: 0 for success, else an errno."""
    if req not in _pending:
        log.error("event=fallocate_reply_twice errno=%d", err)
        return
    _pending.discard(req)
    if err == errno.ENOSYS:
        err = errno.EOPNOTSUPP  # ENOSYS would switch fallocate off for the whole mount
    assert _lib is not None
    _lib.fusedrive_fallocate_reply(req, err)


def served() -> bool:
    """True once a FUSE session was created with the fallocate handler."""
    return _lib is not None and bool(_lib.fusedrive_fallocate_served())


def problem() -> str | None:
    """Why fallocate is not served (None when it is, or still may be)."""
    if _problem is not None:
        return _problem
    if not served():
        return "the session was not created through the shim's fuse_session_new"
    return None
