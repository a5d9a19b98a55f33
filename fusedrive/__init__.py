"""fusedrive: a POSIX filesystem over one blockstore volume, served by FUSE.

Public surface:

- ``Filesystem`` (``fusedrive.filesystem``): the filesystem semantics in plain
  synchronous Python over a ``blockstore.View``; tested without FUSE.
- ``FsError``: every filesystem failure, an ``OSError`` carrying the errno.
- ``request_flush`` (``fusedrive.control``): make a live mount commit its
  buffered writes, from any process.
- ``fusedrive.fuse_adapter.serve``: mount and serve a volume or snapshot in this
  process (imported on demand: it loads pyfuse3 and trio).

Modules: ``schema`` (keys and records), ``filedata`` (buffered writes, read cache,
the flush transaction; with ``buffers``, the layers of buffered changes, and
``patches``, partial writes of a chunk stored on their own), ``namespace``
(inodes, directories, links, xattrs), ``filesystem``, ``errors`` (the errno
table), ``fuse_adapter`` (with ``flusher`` and ``fetcher``, its flush and
read-ahead work), ``control``, and the command line in ``cli``.
"""

from __future__ import annotations

from .control import request_flush
from .errors import FsError
from .filesystem import Filesystem, StatFs
from .namespace import Attributes, Ctx

__all__ = ["Attributes", "Ctx", "Filesystem", "FsError", "StatFs", "request_flush"]
