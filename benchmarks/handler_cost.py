"""What fusedrive's own code costs per metadata request, without the kernel or pyfuse3.

Owns the "our code" column of docs/datapath.md's metadata section. It drives
``fuse_adapter.Operations`` directly (in one trio run, on a fresh volume of a store
in a temporary directory) with the request sequences the kernel sends for each
operation (seen with ``--debug``), then, separately, ``Filesystem`` operations
followed by the flush that commits them. CPU time per operation
(``time.process_time``), best of ``--repeat`` runs (the machine is shared: the
minimum is the least disturbed run).

Runs against whichever ``fusedrive`` its interpreter imports, so one command per
tree compares two trees::

    .venv/bin/python -P benchmarks/handler_cost.py
    /work/main/.venv/bin/python -P benchmarks/handler_cost.py   # main's code

Prints one JSON object (``--out`` writes it too). Invariant: the temporary store is
removed, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from blockstore import Store
from fusedrive.filesystem import Filesystem
from fusedrive.fuse_adapter import Operations
from fusedrive.namespace import Ctx


class _Request:
    """What pyfuse3 passes as the request context."""

    uid = 0
    gid = 0
    pid = 1
    umask = 0o022


class _Fields:
    """A SetattrFields changing the mode only (pyfuse3's own cannot be built in Python)."""

    update_mode = True
    update_uid = update_gid = update_size = False
    update_atime = update_mtime = update_ctime = False


async def _each(items: Iterable[Any], fn: Callable[[Any], Awaitable[None]]) -> float:
    items = list(items)
    t0 = time.process_time()
    for item in items:
        await fn(item)
    return (time.process_time() - t0) / len(items) * 1e6


async def requests(ops: Operations, n: int) -> dict[str, float]:
    """Microseconds of CPU per operation, as the kernel's request sequences."""
    ctx = _Request()
    top = (await ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o755, ctx)).st_ino  # type: ignore[arg-type]
    names = [b"f%06d" % i for i in range(n)]
    moved = [b"g%06d" % i for i in range(n)]
    inos: list[int] = []
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = 0o100600
    out: dict[str, float] = {}

    async def create(name: bytes) -> None:  # LOOKUP (missing), CREATE, FLUSH, RELEASE, GETATTR
        await ops.lookup(top, name, ctx)  # type: ignore[arg-type]
        fi, e = await ops.create(top, name, 0o644, os.O_WRONLY | os.O_CREAT, ctx)  # type: ignore[arg-type]
        await ops.flush(fi.fh)
        await ops.release(fi.fh)
        await ops.getattr(top, ctx)  # type: ignore[arg-type]
        inos.append(e.st_ino)

    async def chmod(ino: int) -> None:  # SETATTR
        await ops.setattr(ino, attr, _Fields(), None, ctx)  # type: ignore[arg-type]

    async def getxattr(ino: int) -> None:  # before every write(2) and chown
        with contextlib.suppress(pyfuse3.FUSEError):
            await ops.getxattr(ino, b"security.capability", ctx)  # type: ignore[arg-type]

    async def getattr_(ino: int) -> None:
        await ops.getattr(ino, ctx)  # type: ignore[arg-type]

    async def write100(ino: int) -> None:  # OPEN, GETXATTR x2, WRITE, FLUSH, RELEASE
        fi = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, ctx)  # type: ignore[arg-type]
        await getxattr(ino)
        await getxattr(ino)
        await ops.write(fi.fh, 0, b"x" * 100)
        await ops.flush(fi.fh)
        await ops.release(fi.fh)

    async def rename(i: int) -> None:  # LOOKUP (missing), RENAME, GETATTR
        await ops.lookup(top, moved[i], ctx)  # type: ignore[arg-type]
        await ops.rename(top, names[i], top, moved[i], 0, ctx)  # type: ignore[arg-type]
        await ops.getattr(top, ctx)  # type: ignore[arg-type]

    async def unlink(name: bytes) -> None:  # UNLINK, GETATTR
        await ops.unlink(top, name, ctx)  # type: ignore[arg-type]
        await ops.getattr(top, ctx)  # type: ignore[arg-type]

    async def forget(ino: int) -> None:  # FORGET (the unlinked inode goes)
        await ops.forget([(ino, 1)])

    out["create"] = await _each(names, create)
    out["setattr"] = await _each(inos, chmod)
    out["getxattr_missing"] = await _each(inos, getxattr)
    out["getattr"] = await _each(inos, getattr_)
    out["write100"] = await _each(inos, write100)
    out["rename"] = await _each(range(n), rename)
    out["unlink"] = await _each(moved, unlink)
    out["forget_unlinked"] = await _each(inos, forget)
    return out


def commits(fs: Filesystem, n: int) -> dict[str, dict[str, float]]:
    """Per operation: CPU of the ``Filesystem`` calls, and of the flush that commits them."""
    ctx = Ctx()
    top = fs.mkdir(1, b"c", 0o755, ctx).ino
    fs.flush()
    names = [b"f%06d" % i for i in range(n)]
    inos: dict[bytes, int] = {}
    out: dict[str, dict[str, float]] = {}

    def timed(label: str, fn: Callable[[], None]) -> None:
        t0 = time.process_time()
        fn()
        t1 = time.process_time()
        fs.flush()
        t2 = time.process_time()
        out[label] = {"op_us": (t1 - t0) / n * 1e6, "commit_us": (t2 - t1) / n * 1e6}

    def create() -> None:
        for name in names:
            fh, a = fs.create(top, name, 0o644, os.O_WRONLY, ctx)
            fs.release(fh)
            inos[name] = a.ino

    def setattr_() -> None:
        for name in names:
            fs.setattr(inos[name], mode=0o600)

    def rename() -> None:
        for name in names:
            fs.rename(top, name, top, b"g" + name[1:])

    def unlink_empty() -> None:  # the kernel still holds each inode: orphan, then forget
        for name in names:
            fs.unlink(top, b"g" + name[1:])
        for name in names:
            fs.forget(inos[name], 1)

    def write100() -> None:
        for name in names:
            fh, a = fs.create(top, name, 0o644, os.O_WRONLY, ctx)
            fs.write(fh, 0, b"x" * 100)
            fs.release(fh)
            inos[name] = a.ino

    def unlink_written() -> None:
        for name in names:
            fs.unlink(top, name)
        for name in names:
            fs.forget(inos[name], 1)

    def mkdir() -> None:
        for name in names:
            inos[name] = fs.mkdir(top, name, 0o755, ctx).ino

    def rmdir() -> None:
        for name in names:
            fs.rmdir(top, name)
        for name in names:
            fs.forget(inos[name], 1)

    timed("create", create)
    timed("setattr", setattr_)
    timed("rename", rename)
    timed("unlink_empty", unlink_empty)
    timed("create_write100", write100)
    timed("unlink_written", unlink_written)
    timed("mkdir", mkdir)
    timed("rmdir", rmdir)
    return out


def measure(store_dir: Path, n: int, tag: str) -> dict[str, Any]:
    store = Store(store_dir, create=True)
    try:
        store.create_volume(tag, 1 << 30)
        fs = Filesystem(store.volume(tag))
        ops = Operations(fs)
        try:
            handled = trio.run(requests, ops, n)
            committed = commits(fs, n)
        finally:
            ops.flusher.close()
            fs.close()
    finally:
        store.close()
    return {"requests_us": handled, "filesystem_us": committed}


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The minimum of every number over the runs (same shape)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: best([r[k] for r in runs]) for k in first}
    return min(runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="handler_cost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.files < 1 or args.repeat < 1:
        p.error("--files and --repeat must be at least 1")
    import fusedrive

    runs = []
    with tempfile.TemporaryDirectory(prefix="handler-cost-") as tmp:
        for r in range(args.repeat):
            runs.append(measure(Path(tmp) / "store", args.files, f"v{r}"))
    result = {
        "benchmark": "fusedrive handler_cost",
        "fusedrive": str(Path(fusedrive.__file__).resolve().parent),
        "files": args.files,
        "repeat": args.repeat,
        "python": platform.python_version(),
        "loadavg_end": list(os.getloadavg()),
        "best_us": best(runs),
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
