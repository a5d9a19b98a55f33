"""Mount daemons: start one detached, record it, find it, unmount it and wait for it.

A mount is served by one process (pyfuse3 serves one mount per process) that runs
``fusedrive.fuse_adapter.serve``. This module owns what lives around that process:

- ``serve_recorded`` runs ``serve`` in the calling process and, once the mount is
  live, writes a JSON record of itself (``MountRecord``) to the runtime directory,
  one file per mount point, then signals readiness on a pipe if it was given one.
  It removes its record when ``serve`` returns.
- ``spawn`` starts ``python -m fusedrive ... mount --foreground --ready-fd N`` in a
  new session (no controlling terminal, cwd ``/``, stdout and stderr appended to a
  log file next to the record) and returns only once the daemon writes its
  readiness byte; if the daemon exits first it raises ``DaemonFailed`` with the
  daemon's exit status and the tail of its log. The log is removed when its daemon
  returns from a clean unmount, and kept when it fails.
- ``unmount`` first asks a live read-write mount to flush (``control.request_flush``)
  and refuses to unmount if that fails (``NotStored``: the data stays buffered and
  the mount stays up), then unmounts with ``fusermount3`` (lazily if the mount is
  dead) and waits for the recorded daemon to exit, so that everything is flushed on
  return. If the daemon's final flush fails all the same (changes made after the
  first flush, or the mount went away by other means), the daemon leaves a report
  (``unstored_path``: what was lost and why) that ``unmount`` turns into
  ``NotStored``: data that was not stored is never reported as stored.

Runtime directory: ``$FUSEDRIVE_RUNTIME_DIR``, else ``/run/fusedrive`` for root,
else ``$XDG_RUNTIME_DIR/fusedrive``, else a private directory under the system's
temporary directory. Nothing is written inside the store directory.

Invariants: a record names its process by PID and start time (field 22 of
``/proc/PID/stat``), so a record whose process died, became a zombie, or whose PID
was reused is stale and ignored; a record is only removed by its own process or
once that process is known to be gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from blockstore import Busy, StoreError

from .control import find_mount, request_flush
from .errors import DataNotStored

log = logging.getLogger(__name__)

KIND_VOLUME = "volume"
KIND_SNAPSHOT = "snapshot"


class MountError(Exception):
    """A mount or unmount could not be done, or a mount point is not what it should be."""


class NotStored(MountError):
    """Buffered writes of a mount could not be stored; ``errno``: ENOSPC, EIO, ...

    ``lost``: False when unmounting was refused (the data is still buffered in the
    live daemon), True when the mount is gone and the data with it.
    """

    def __init__(self, message: str, errno_: int, *, lost: bool) -> None:
        super().__init__(message)
        self.errno = errno_
        self.lost = lost


class DaemonFailed(MountError):
    """A spawned mount daemon exited (or hung) before its mount was live."""

    def __init__(self, message: str, status: int | None, log_tail: list[str], log: Path) -> None:
        super().__init__(message)
        self.status = status  # None when it was stopped for not becoming ready in time
        self.log_tail = log_tail
        self.log = log


@dataclass(frozen=True)
class MountRecord:
    mountpoint: str
    store: str
    kind: str  # KIND_VOLUME or KIND_SNAPSHOT
    name: str
    read_only: bool
    pid: int
    starttime: int  # field 22 of /proc/PID/stat: tells a reused PID apart
    log: str
    started: float


# -- the runtime directory and its records ------------------------------------------


def runtime_dir() -> Path:
    """Where mount records and daemon logs live; created private to this user."""
    env = os.environ.get("FUSEDRIVE_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/run/fusedrive")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "fusedrive"
    else:
        path = Path(tempfile.gettempdir()) / f"fusedrive-{os.geteuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A shared temporary directory could hold a directory planted by another user.
    if path.stat().st_uid != os.geteuid():
        raise MountError(f"runtime directory {path} belongs to another user")
    return path


def _key(mountpoint: Path) -> str:
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", mountpoint.name)[:48] or "root"
    return f"{base}-{digest}"


def record_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.json"


def log_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.log"


def unstored_path(mountpoint: Path) -> Path:
    """Where a daemon whose final flush failed reports what it could not store."""
    return runtime_dir() / f"{_key(mountpoint)}.unstored.json"


def read_record(path: Path) -> MountRecord | None:
    try:
        return MountRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("event=bad_mount_record path=%s error=%s", path, exc)
        return None


def _write_record(path: Path, rec: MountRecord) -> None:
    _write_json(path, asdict(rec))


def _write_json(path: Path, obj: dict[str, object]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


def _take_unstored_report(target: Path, pid: int) -> dict[str, object] | None:
    """The report of daemon ``pid`` that it could not store data, removed once read."""
    path = unstored_path(target)
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("pid") != pid:
        return None
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return report


def _remove_record(path: Path, pid: int) -> None:
    rec = read_record(path)
    if rec is None or rec.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def process_starttime(pid: int) -> int | None:
    """The start time of a running (not zombie) process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def daemon_alive(rec: MountRecord) -> bool:
    # Reap it if it happens to be our own child, so that it does not linger as a zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(rec.pid, os.WNOHANG)
    return process_starttime(rec.pid) == rec.starttime


def live_mounts(store: Path | None = None) -> list[MountRecord]:
    """Records of live daemons, optionally only those serving ``store``."""
    try:
        paths = sorted(runtime_dir().glob("*.json"))
    except (MountError, OSError):
        return []
    recs = (read_record(p) for p in paths)
    return [
        r
        for r in recs
        if r is not None and (store is None or r.store == str(store)) and daemon_alive(r)
    ]


def mounted_names(store: Path, kind: str) -> dict[str, list[str]]:
    """Volume (or snapshot) name -> the mount points where a live daemon serves it."""
    out: dict[str, list[str]] = {}
    for rec in live_mounts(store):
        if rec.kind == kind:
            out.setdefault(rec.name, []).append(rec.mountpoint)
    return out


def refuse_if_mounted(store: Path, kind: str, name: str) -> None:
    where = mounted_names(store, kind).get(name)
    if where:
        raise Busy(
            f"{kind} {name!r} is mounted at {', '.join(where)}; "
            "unmount it first (`fusedrive umount MOUNTPOINT`)"
        )


def flush_volume_mounts(store: Path, volume: str) -> None:
    """Ask every live writable mount of ``volume`` to flush, so a snapshot holds its writes."""
    recs = [
        r
        for r in live_mounts(store)
        if r.kind == KIND_VOLUME and r.name == volume and not r.read_only
    ]
    if not recs:
        return
    try:
        from fusedrive.control import request_flush
    except ImportError as exc:
        raise MountError(f"cannot flush the mounts of volume {volume!r}: {exc}") from exc
    for rec in recs:
        try:
            request_flush(Path(rec.mountpoint))
        except (OSError, StoreError) as exc:
            raise MountError(
                f"cannot flush volume {volume!r} mounted at {rec.mountpoint}: {exc}"
            ) from exc
        log.info("event=mount_flushed volume=%s mountpoint=%s", volume, rec.mountpoint)


# -- the kernel's mount table -------------------------------------------------------------


def mountpoint_path(text: str | os.PathLike[str]) -> Path:
    """The absolute path of a mount point without touching it (a dead FUSE mount fails stat)."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(text))))
    if p.parent == p:
        return p
    parent = Path(os.path.realpath(p.parent))
    try:
        # A symlink is never a mount point itself; follow it as the mount did.
        if (parent / p.name).is_symlink():
            return Path(os.path.realpath(p))
    except OSError:
        pass  # the mount point of a dead mount: lstat fails with ENOTCONN
    return parent / p.name


def _is_dead_mount(mountpoint: Path) -> bool:
    try:
        os.stat(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def check_mountpoint(target: Path) -> None:
    """Refuse a mount point that is taken, missing or not a directory."""
    rec = read_record(record_path(target))
    if rec is not None and daemon_alive(rec):
        raise MountError(f"{target} is already mounted by fusedrive (pid {rec.pid})")
    if find_mount(target) is not None:
        raise MountError(f"{target} is already a mount point")
    if not target.exists():
        raise MountError(
            f"mount point {target} does not exist; create the directory first (mkdir {target})"
        )
    if not target.is_dir():
        raise MountError(f"mount point {target} is not a directory")


# -- serving, spawning, unmounting ----------------------------------------------------------


def serve_recorded(
    store_path: Path,
    target: Path,
    kind: str,
    name: str,
    *,
    read_only: bool,
    allow_other: bool = True,
    debug: bool = False,
    ready_fd: int | None = None,
    on_ready: Callable[[], None] | None = None,
    writeback_cache: bool | None = None,
) -> None:
    """Serve the mount in this process until it is unmounted, recorded while it is live."""
    if ready_fd is not None:
        try:
            os.fstat(ready_fd)
        except OSError as exc:
            raise MountError(f"--ready-fd {ready_fd} is not an open file descriptor") from exc
    try:
        from fusedrive.fuse_adapter import serve
    except ImportError as exc:
        raise MountError(f"FUSE support is not available: {exc}") from exc
    me = os.getpid()
    path = record_path(target)
    rec = MountRecord(
        mountpoint=str(target),
        store=str(store_path),
        kind=kind,
        name=name,
        read_only=read_only,
        pid=me,
        starttime=process_starttime(me) or 0,
        log=str(log_path(target)) if ready_fd is not None else "",
        started=time.time(),
    )

    def ready() -> None:
        nonlocal ready_fd
        _write_record(path, rec)
        log.info("event=mounted %s=%s mountpoint=%s pid=%d", kind, name, target, me)
        if ready_fd is not None:
            os.write(ready_fd, b"R")
            os.close(ready_fd)
            ready_fd = None
        if on_ready is not None:
            on_ready()

    try:
        serve(
            store_path,
            target,
            volume=name if kind == KIND_VOLUME else None,
            snapshot=name if kind == KIND_SNAPSHOT else None,
            read_only=read_only,
            allow_other=allow_other,
            on_ready=ready,
            debug=debug,
            writeback_cache=writeback_cache,
        )
    except DataNotStored as exc:
        report = {"pid": me, "errno": exc.errno, "error": str(exc), "time": time.time()}
        report["pending_bytes"] = exc.pending_bytes
        with contextlib.suppress(OSError):
            _write_json(unstored_path(target), report)
        raise MountError(f"{target}: {exc}") from exc
    except OSError as exc:
        raise MountError(f"cannot mount at {target}: {exc}") from exc
    else:
        log.info("event=unmounted mountpoint=%s pid=%d", target, me)
        if rec.log:
            # A clean unmount: nothing in the log is needed any more, and one log per
            # mount point would otherwise pile up in the runtime directory. Removed while
            # the record still refuses a new mount here, so no new daemon has opened it.
            # A daemon that fails keeps its log (and `mount` prints its tail).
            with contextlib.suppress(OSError):
                os.unlink(rec.log)
    finally:
        _remove_record(path, me)


def spawn(fusedrive_args: list[str], target: Path, timeout: float) -> tuple[int, Path]:
    """Start ``python -m fusedrive *fusedrive_args --ready-fd N`` detached; wait until live.

    ``fusedrive_args`` must end inside the ``mount --foreground`` command (its options
    may be closed by ``--``: ``--ready-fd`` goes before it). Returns the daemon's PID and
    its log file.
    """
    logfile = log_path(target)
    env = dict(os.environ)
    # The daemon runs from "/" (so it pins no directory); keep this package importable.
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    r, w = os.pipe()
    args = list(fusedrive_args)
    at = args.index("--") if "--" in args else len(args)
    args[at:at] = ["--ready-fd", str(w)]
    cmd = [sys.executable, "-m", "fusedrive", *args]
    try:
        with open(logfile, "ab") as logf:
            offset = logf.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            logf.write(f"--- {stamp} {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                pass_fds=(w,),
                start_new_session=True,
                cwd="/",
                env=env,
            )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        outcome = _wait_ready(r, timeout)
    finally:
        os.close(r)
    if outcome == "ready":
        log.info("event=daemon_ready pid=%d mountpoint=%s", proc.pid, target)
        return proc.pid, logfile
    if outcome == "timeout":
        proc.terminate()
    try:
        status = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait()
    tail = _log_tail(logfile, offset)
    if outcome == "timeout":
        raise DaemonFailed(
            f"the mount was not live after {timeout:g} s; stopped the daemon (log {logfile})",
            None,
            tail,
            logfile,
        )
    raise DaemonFailed(
        f"the mount daemon exited with status {status} before the mount was live (log {logfile})",
        status,
        tail,
        logfile,
    )


def _wait_ready(fd: int, timeout: float) -> str:
    """``"ready"`` once a byte arrives, ``"died"`` at end of file, else ``"timeout"``."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            return "ready" if os.read(fd, 1) else "died"


def _log_tail(path: Path, offset: int, lines: int = 20) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if not line.startswith("--- ")][-lines:]


def unmount(
    target: Path, *, lazy: bool = False, timeout: float = 60.0, discard: bool = False
) -> MountRecord | None:
    """Unmount a fusedrive mount and wait for its daemon to exit; returns its record.

    A live read-write mount is flushed first; if its buffered writes cannot be stored
    this raises ``NotStored`` (lost=False) and leaves the mount up, unless
    ``discard``. If the daemon's final flush fails after the unmount it raises
    ``NotStored`` (lost=True), whatever ``discard`` says, once the daemon is gone.
    """
    path = record_path(target)
    rec = read_record(path)
    alive = rec is not None and daemon_alive(rec)
    entry = find_mount(target)
    if entry is None:
        if rec is None:
            raise MountError(f"{target} is not a fusedrive mount")
        if not alive:
            _remove_record(path, rec.pid)
            raise MountError(f"{target} is not mounted (removed the record of its dead daemon)")
    else:
        fstype, source = entry.fstype, entry.source
        # A mount without a record (another runtime directory, a daemon started by
        # hand) is still ours if its file system type or source says so.
        ours = rec is not None or "fusedrive" in fstype or "fusedrive" in source
        if not fstype.startswith("fuse") or not ours:
            raise MountError(f"{target} is not a fusedrive mount (it is {fstype} from {source})")
        if not discard and (rec is None or (alive and not rec.read_only)):
            _flush_before_unmount(target, rec)
        _fusermount(target, lazy)
        log.info("event=unmount_requested mountpoint=%s", target)
    if rec is not None and alive:
        deadline = time.monotonic() + timeout
        while daemon_alive(rec):
            if time.monotonic() > deadline:
                raise MountError(
                    f"{target} is unmounted but its daemon (pid {rec.pid}) has not exited "
                    f"after {timeout:g} s; it may still be flushing (log {rec.log or '-'})"
                )
            time.sleep(0.05)
    if rec is not None:
        _remove_record(path, rec.pid)
        report = _take_unstored_report(target, rec.pid) if alive else None
        if report is not None:
            code = report.get("errno")
            raise NotStored(
                f"{target} is unmounted, but its daemon could not store its buffered "
                f"writes: {report.get('error')}; they are lost (log {rec.log or '-'})",
                code if isinstance(code, int) else errno.EIO,
                lost=True,
            )
    return rec


def _flush_before_unmount(target: Path, rec: MountRecord | None) -> None:
    """Ask the daemon to store its buffered writes; ``NotStored`` if it cannot."""
    try:
        request_flush(target)
    except OSError as exc:
        code = exc.errno or errno.EIO
        if code in (errno.ENOTCONN, errno.ENOENT, errno.ENOTSUP, errno.EOPNOTSUPP):
            return  # a dead daemon, or not a mount that takes flush requests
        log.error("event=unmount_refused mountpoint=%s errno=%s", target, code)
        raise NotStored(
            f"not unmounted: the daemon of {target} cannot store its buffered writes "
            f"({os.strerror(code)}); they stay buffered and the mount stays up. Fix the "
            f"cause (log {rec.log if rec is not None and rec.log else '-'}) and unmount "
            "again, or unmount with --discard to drop them",
            code,
            lost=False,
        ) from exc


def _fusermount(target: Path, lazy: bool) -> None:
    exe = shutil.which("fusermount3") or shutil.which("fusermount")
    if exe is None:
        raise MountError("fusermount3 not found (install the fuse3 package)")
    # A mount whose daemon died answers ENOTCONN to everything; only a lazy unmount works.
    flags = "-uz" if lazy or _is_dead_mount(target) else "-u"
    res = subprocess.run([exe, flags, str(target)], capture_output=True, text=True, check=False)
    if res.returncode == 0:
        return
    msg = res.stderr.strip() or f"{Path(exe).name} exited with status {res.returncode}"
    if flags == "-u" and "not connected" in msg:
        res = subprocess.run([exe, "-uz", str(target)], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            return
        msg = res.stderr.strip() or msg
    if "busy" in msg.lower():
        raise MountError(
            f"{target} is busy (open files or a process inside it); "
            f"close them or use `fusedrive umount --lazy`: {msg}"
        )
    raise MountError(f"cannot unmount {target}: {msg}")
