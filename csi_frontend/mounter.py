"""The mounter: the long-lived process that owns this node's FUSE daemons.

A FUSE daemon dies with the container (or the PID namespace, or the cgroup) it runs
in, and a dead daemon breaks its volume in every pod that uses it. So the daemons
are not children of the CSI plugin: they belong to this small service, which runs in
its own container with its own lifecycle (``docs/restart.md`` says why, and what its
own upgrade costs). It has no gRPC and little code, so it changes rarely.

The plugin talks to it over a unix stream socket (``MounterClient``): one JSON
request per line, one JSON answer per line, one request per connection:

- ``{"op": "start", "volume": V, "path": P, "read_only": bool}``: serve volume V at
  staging path P (``fusedrive mount``, which returns once the mount is live); if a
  live daemon already serves V at P read-only-ness alike, that one is returned
  (``"existing": true``): a start is idempotent and never remounts a live mount.
- ``{"op": "stop", "path": P, "discard": bool, "lazy": bool, "timeout": s}``: flush,
  unmount and wait for the daemon to exit (``fusedrive.daemon.unmount``): what was
  written is stored when it returns; if it cannot be, the answer says so
  (``code`` ``no_space``/``failed``, ``errno``, ``lost``) and the mount stays up
  unless the data was already lost.
- ``{"op": "list"}``: the live daemons (volume, path, read-only, pid, start time,
  the mount's device number).
- ``{"op": "status"}``: the mounter's pid, version, store and daemon count (a probe).
- ``{"op": "watch"}``: a stream: first ``{"event": "hello", "daemons": [...]}``, then
  one line per change: ``started``, ``stopped`` (a stop asked for), ``died`` (any
  other exit, with the exit status when known). A watcher that reconnects gets a
  fresh ``hello`` and must compare it with what it expects (it may have missed
  events while away).

Errors are ``{"ok": false, "code": C, "error": message}``, C one of ``invalid``,
``not_found``, ``busy``, ``no_space``, ``failed`` (``csi_frontend/errors.py`` maps
them to gRPC codes).

Invariants:
- The mounter is the subreaper of the daemons it starts (``PR_SET_CHILD_SUBREAPER``),
  so it learns each one's exit status, and watches each with a pidfd opened after
  checking its start time, so a reused PID is never taken for a daemon.
- At start it adopts every live daemon recorded in the runtime directory for its
  store (``fusedrive.daemon.live_mounts``): a mounter restarted outside a container
  (by hand, systemd) keeps the daemons the previous one started.
- It only mounts at, and unmounts, paths below its ``--allowed-path-prefix``
  directories, and only fusedrive mounts; the socket is the owner's alone (0600).
- On SIGTERM/SIGINT it stops every daemon cleanly (each stores its buffered writes
  and exits) unless ``leave_daemons``; in a container they would be killed anyway.
- PIDs it reports are in its own PID namespace; they are for logs and humans.
  Whether a daemon is live is what ``list``/``watch`` say, never a PID check by a
  client in another namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_SOCKET = "/run/fusedrive-mounter/mounter.sock"
MAX_REQUEST = 64 * 1024
PR_SET_CHILD_SUBREAPER = 36

# The codes an answer can carry, and the fusedrive CLI exit codes they come from.
CODES = ("invalid", "not_found", "busy", "no_space", "failed", "unavailable")
_EXIT_CODE = {3: "not_found", 4: "busy", 5: "no_space", 7: "busy", 8: "invalid"}


# -- what travels over the socket --------------------------------------------------------


@dataclass(frozen=True)
class DaemonInfo:
    """A live daemon as the mounter reports it."""

    volume: str
    path: str
    read_only: bool
    pid: int  # in the mounter's PID namespace
    starttime: int
    dev: str  # the FUSE mount's major:minor, as mountinfo shows it ('' if unknown)
    started: float
    adopted: bool = False  # found at the mounter's start, not started by it

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DaemonInfo:
        return cls(
            volume=str(obj["volume"]),
            path=str(obj["path"]),
            read_only=bool(obj["read_only"]),
            pid=int(obj["pid"]),
            starttime=int(obj["starttime"]),
            dev=str(obj.get("dev", "")),
            started=float(obj.get("started", 0.0)),
            adopted=bool(obj.get("adopted", False)),
        )


class MounterError(Exception):
    """The mounter refused or failed a request; ``code`` is one of ``CODES``."""

    def __init__(
        self, code: str, message: str, *, errno_: int | None = None, lost: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.errno = errno_
        self.lost = lost  # a stop: buffered data was lost (the mount is gone)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "code": self.code, "error": self.message}
        if self.errno is not None:
            out["errno"] = self.errno
        if self.lost:
            out["lost"] = True
        return out


class MounterUnavailable(MounterError):
    """Nothing answers on the mounter's socket (not started, restarting, gone)."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


# -- the service --------------------------------------------------------------------------


@dataclass
class MounterConfig:
    store_path: Path
    socket_path: Path
    allowed_prefixes: list[str] = field(default_factory=list)
    fusedrive_command: list[str] = field(default_factory=list)
    start_timeout: float = 120.0
    leave_daemons: bool = False  # on SIGTERM: keep the daemons running (outside containers)


def _set_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    except (OSError, AttributeError) as exc:
        # Only the exit statuses are lost: the pidfds still see every death.
        log.warning("event=no_subreaper error=%s", exc)


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/") or "/"
    return path != prefix and (prefix == "/" or path.startswith(prefix + "/"))


class Mounter:
    """The daemons of one store, their watch, and the watchers' event queues."""

    def __init__(self, config: MounterConfig) -> None:
        self.config = config
        self.store = config.store_path.absolute()
        self.started = time.time()
        self._lock = threading.Lock()
        self._daemons: dict[str, DaemonInfo] = {}  # path -> daemon
        self._pidfds: dict[int, str] = {}  # pidfd -> path
        # pidfds no longer watched, closed by the watch thread only (after its poll
        # returned), so a number is never reused while a poll may still report on it.
        self._retired: list[int] = []
        self._stopping: set[str] = set()  # paths whose daemon we are stopping
        self._path_locks: dict[str, threading.Lock] = {}
        self._subscribers: list[queue.Queue[dict[str, Any]]] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closing = False
        self._thread = threading.Thread(target=self._watch_loop, name="daemon-watch", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        _set_subreaper()
        self._adopt()
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            for fd in [*self._pidfds, *self._retired]:
                os.close(fd)
            self._pidfds.clear()
            self._retired.clear()

    def _adopt(self) -> None:
        """Take over the live daemons a previous mounter (or anyone) started for the store."""
        from fusedrive.control import find_mount
        from fusedrive.daemon import KIND_VOLUME, live_mounts

        for rec in live_mounts(self.store):
            if rec.kind != KIND_VOLUME:
                continue
            entry = find_mount(rec.mountpoint)
            info = DaemonInfo(
                volume=rec.name,
                path=rec.mountpoint,
                read_only=rec.read_only,
                pid=rec.pid,
                starttime=rec.starttime,
                dev=entry.device if entry is not None else "",
                started=rec.started,
                adopted=True,
            )
            if self._track(info):
                log.info(
                    "event=daemon_adopted volume=%s path=%s pid=%d",
                    rec.name,
                    rec.mountpoint,
                    rec.pid,
                )

    # -- requests -----------------------------------------------------------------------
    def _path_lock(self, path: str) -> threading.Lock:
        with self._lock:
            return self._path_locks.setdefault(path, threading.Lock())

    def check_path(self, path: object) -> str:
        if not isinstance(path, str) or not path:
            raise MounterError("invalid", "path is required")
        if not path.startswith("/") or os.path.normpath(path) != path or "\0" in path:
            raise MounterError("invalid", f"path {path!r} is not absolute and normalised")
        prefixes = self.config.allowed_prefixes
        if prefixes and not any(_under(path, p) for p in prefixes):
            raise MounterError(
                "invalid", f"path {path} is outside the allowed prefixes {', '.join(prefixes)}"
            )
        return path

    @staticmethod
    def check_volume(volume: object) -> str:
        if not isinstance(volume, str) or not volume:
            raise MounterError("invalid", "volume is required")
        if "/" in volume or "\0" in volume or len(volume) > 255:
            raise MounterError("invalid", f"volume {volume!r} is not a volume name")
        return volume

    def daemons(self) -> list[DaemonInfo]:
        with self._lock:
            return sorted(self._daemons.values(), key=lambda d: d.path)

    def status(self) -> dict[str, Any]:
        with self._lock:
            n = len(self._daemons)
        return {
            "ok": True,
            "version": VERSION,
            "pid": os.getpid(),
            "store": str(self.store),
            "started": self.started,
            "daemons": n,
        }

    def start_daemon(self, volume: str, path: str, read_only: bool) -> tuple[DaemonInfo, bool]:
        """Serve ``volume`` at ``path``; (the daemon, whether it was there already)."""
        with self._path_lock(path):
            with self._lock:
                live = self._daemons.get(path)
            if live is not None:
                if live.volume != volume or live.read_only != read_only:
                    raise MounterError(
                        "busy",
                        f"{path} is served by a daemon for volume {live.volume!r} "
                        f"({'read-only' if live.read_only else 'read-write'})",
                    )
                return live, True
            return self._spawn(volume, path, read_only), False

    def _spawn(self, volume: str, path: str, read_only: bool) -> DaemonInfo:
        from fusedrive.control import find_mount
        from fusedrive.daemon import process_starttime

        cmd = self.config.fusedrive_command or [sys.executable, "-m", "fusedrive.cli"]
        ro = ["--read-only"] if read_only else []
        full = [*cmd, "--store", str(self.store), "--json", "mount", *ro, "--", volume, path]
        try:
            proc = subprocess.run(
                full,
                capture_output=True,
                text=True,
                check=False,
                timeout=self.config.start_timeout,
                cwd="/",
            )
        except subprocess.TimeoutExpired:
            raise MounterError(
                "failed", f"fusedrive mount of {volume!r} at {path} did not finish in time"
            ) from None
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            code = _EXIT_CODE.get(proc.returncode, "failed")
            raise MounterError(code, f"fusedrive mount of {volume!r} at {path} failed: {why}")
        try:
            pid = int(json.loads(proc.stdout)["pid"])
        except (ValueError, KeyError, TypeError):
            raise MounterError(
                "failed", f"fusedrive mount printed no pid: {proc.stdout!r}"
            ) from None
        entry = find_mount(path)
        info = DaemonInfo(
            volume=volume,
            path=path,
            read_only=read_only,
            pid=pid,
            starttime=process_starttime(pid) or 0,
            dev=entry.device if entry is not None else "",
            started=time.time(),
        )
        if not self._track(info):
            raise MounterError("failed", f"the daemon of {volume!r} at {path} exited at once")
        log.info("event=daemon_started volume=%s path=%s pid=%d", volume, path, pid)
        self._publish({"event": "started", "daemon": asdict(info)})
        return info

    def stop_daemon(self, path: str, discard: bool, lazy: bool, timeout: float) -> dict[str, Any]:
        from fusedrive.daemon import MountError, NotStored, unmount

        with self._path_lock(path):
            with self._lock:
                self._stopping.add(path)
            try:
                rec = unmount(Path(path), lazy=lazy, timeout=timeout, discard=discard)
            except NotStored as exc:
                raise MounterError(
                    "no_space" if exc.errno == 28 else "failed",
                    str(exc),
                    errno_=exc.errno,
                    lost=exc.lost,
                ) from None
            except MountError as exc:
                text = str(exc)
                code = (
                    "not_found"
                    if "not a fusedrive mount" in text or "not mounted" in text
                    else "busy"
                )
                raise MounterError(code, text) from None
            finally:
                with self._lock:
                    self._stopping.discard(path)
            # The watch may not have seen the exit yet: forget the daemon now.
            with self._lock:
                gone = self._daemons.pop(path, None)
                for fd, p in list(self._pidfds.items()):
                    if p == path:
                        del self._pidfds[fd]
                        self._retired.append(fd)
            self._wake()
            if gone is not None:
                self._publish({"event": "stopped", "daemon": asdict(gone)})
            log.info("event=daemon_stopped path=%s pid=%s", path, rec.pid if rec else None)
            return {"ok": True, "path": path, "pid": rec.pid if rec else None}

    def stop_all(self, timeout: float = 25.0) -> None:
        """SIGTERM every daemon (each stores its buffered writes, then exits) and wait."""
        daemons = self.daemons()
        from fusedrive.daemon import process_starttime

        for d in daemons:
            if process_starttime(d.pid) == d.starttime:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(d.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for d in daemons:
            while process_starttime(d.pid) == d.starttime and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(d.pid, os.WNOHANG)
                time.sleep(0.05)
        log.info("event=daemons_stopped count=%d", len(daemons))

    # -- the watch ----------------------------------------------------------------------
    def _track(self, info: DaemonInfo) -> bool:
        """Watch ``info``'s process; False (nothing tracked) if it is already gone."""
        from fusedrive.daemon import process_starttime

        try:
            fd = os.pidfd_open(info.pid)
        except ProcessLookupError:
            return False
        if process_starttime(info.pid) != info.starttime:
            os.close(fd)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(info.pid, os.WNOHANG)
            return False
        with self._lock:
            self._daemons[info.path] = info
            self._pidfds[fd] = info.path
        self._wake()
        return True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _watch_loop(self) -> None:
        while not self._closing:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._lock:
                for fd in self._retired:
                    os.close(fd)
                self._retired.clear()
                fds = dict(self._pidfds)
            for fd in fds:
                poller.register(fd, select.POLLIN)
            for fd, _mask in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                self._died(fd)

    def _died(self, fd: int) -> None:
        with self._lock:
            path = self._pidfds.pop(fd, None)
            if path is None:
                return  # stopped meanwhile: stop_daemon retired it
            os.close(fd)
            info = self._daemons.pop(path, None)
            stopping = path in self._stopping
        if info is None:
            return
        status: int | None = None
        with contextlib.suppress(ChildProcessError, OSError):
            pid, raw = os.waitpid(info.pid, os.WNOHANG)
            if pid == info.pid:
                status = os.waitstatus_to_exitcode(raw)
        kind = "stopped" if stopping else "died"
        if kind == "died":
            log.warning(
                "event=daemon_died volume=%s path=%s pid=%d status=%s",
                info.volume,
                info.path,
                info.pid,
                status,
            )
        self._publish({"event": kind, "daemon": asdict(info), "status": status})

    def _publish(self, event: dict[str, Any]) -> None:
        with self._lock:
            subs = list(self._subscribers)
        for q in subs:
            q.put(event)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[tuple[list[DaemonInfo], queue.Queue[dict[str, Any]]]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._subscribers.append(q)
            snapshot = sorted(self._daemons.values(), key=lambda d: d.path)
        try:
            yield snapshot, q
        finally:
            with self._lock:
                self._subscribers.remove(q)

    # -- dispatch -----------------------------------------------------------------------
    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "start":
            volume = self.check_volume(req.get("volume"))
            path = self.check_path(req.get("path"))
            info, existing = self.start_daemon(volume, path, bool(req.get("read_only", False)))
            return {"ok": True, "daemon": asdict(info), "existing": existing}
        if op == "stop":
            path = self.check_path(req.get("path"))
            timeout = req.get("timeout", 60.0)
            if not isinstance(timeout, (int, float)) or timeout <= 0:
                raise MounterError("invalid", "timeout must be a positive number of seconds")
            return self.stop_daemon(
                path, bool(req.get("discard", False)), bool(req.get("lazy", False)), timeout
            )
        if op == "list":
            return {"ok": True, "daemons": [asdict(d) for d in self.daemons()]}
        if op == "status":
            return self.status()
        raise MounterError("invalid", f"unknown op {op!r} (start, stop, list, status, watch)")


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        mounter = self.server.mounter
        self.connection.settimeout(30)
        try:
            line = self.rfile.readline(MAX_REQUEST + 1)
        except OSError:
            return
        if not line:
            return
        try:
            if len(line) > MAX_REQUEST:
                raise MounterError("invalid", f"request longer than {MAX_REQUEST} bytes")
            try:
                req = json.loads(line)
            except ValueError as exc:
                raise MounterError("invalid", f"request is not JSON: {exc}") from None
            if not isinstance(req, dict):
                raise MounterError("invalid", "request is not a JSON object")
            if req.get("op") == "watch":
                self.connection.settimeout(None)
                self._watch(mounter)
                return
            answer = mounter.handle(req)
        except MounterError as exc:
            answer = exc.to_json()
        except Exception as exc:
            log.exception("event=request_failed")
            answer = {"ok": False, "code": "failed", "error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(answer).encode() + b"\n")

    def _watch(self, mounter: Mounter) -> None:
        with mounter.subscribe() as (snapshot, q):
            hello = {
                "event": "hello",
                "daemons": [asdict(d) for d in snapshot],
                "mounter": mounter.status(),
            }
            try:
                self.wfile.write(json.dumps(hello).encode() + b"\n")
                while not mounter._closing:
                    try:
                        ev = q.get(timeout=1.0)
                    except queue.Empty:
                        # Nothing to say: end when the watcher has hung up.
                        r, _, _ = select.select([self.connection], [], [], 0)
                        if r and not self.connection.recv(1, socket.MSG_PEEK):
                            return
                        continue
                    self.wfile.write(json.dumps(ev).encode() + b"\n")
            except OSError:
                return


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, mounter: Mounter) -> None:
        self.mounter = mounter
        old = os.umask(0o177)
        try:
            super().__init__(path, _Handler)
        finally:
            os.umask(old)


def _claim_socket(path: Path) -> None:
    """Remove a stale socket at ``path``; refuse if a live mounter answers there."""
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return
    if not path.is_socket():
        raise MounterError("invalid", f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise MounterError("busy", f"a mounter already answers on {path}")


def serve(config: MounterConfig, ready: Callable[[], None] | None = None) -> int:
    """Run the mounter until SIGTERM/SIGINT; returns the process exit status."""
    mounter = Mounter(config)
    _claim_socket(config.socket_path)
    mounter.start()
    server = _Server(str(config.socket_path), mounter)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("event=signal signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="mounter-socket", daemon=True)
    thread.start()
    log.info(
        "event=mounter_ready socket=%s store=%s daemons=%d pid=%d",
        config.socket_path,
        mounter.store,
        len(mounter.daemons()),
        os.getpid(),
    )
    if ready is not None:
        ready()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            config.socket_path.unlink()
        if not config.leave_daemons:
            mounter.stop_all()
        mounter.close()
    return 0


# -- the client ----------------------------------------------------------------------------


class MounterClient:
    """Requests to the mounter at ``socket_path``; ``MounterError`` on refusal."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 150.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout

    def _connect(self, timeout: float | None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(self.socket_path)
        except OSError as exc:
            s.close()
            raise MounterUnavailable(
                f"the mounter does not answer on {self.socket_path}: {exc.strerror or exc}"
            ) from None
        return s

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._connect(self.timeout) as s:
            try:
                s.sendall(json.dumps(req).encode() + b"\n")
                with s.makefile("rb") as f:
                    line = f.readline(16 * MAX_REQUEST)
            except OSError as exc:
                raise MounterUnavailable(
                    f"the mounter on {self.socket_path} failed to answer: {exc}"
                ) from None
        if not line:
            raise MounterUnavailable(f"the mounter on {self.socket_path} hung up")
        answer = json.loads(line)
        if not answer.get("ok"):
            code = answer.get("code", "failed")
            raise MounterError(
                code if code in CODES else "failed",
                str(answer.get("error", "unknown error")),
                errno_=answer.get("errno"),
                lost=bool(answer.get("lost", False)),
            )
        return dict(answer)

    def start(self, volume: str, path: str, read_only: bool = False) -> tuple[DaemonInfo, bool]:
        """Serve ``volume`` at ``path``: (the daemon, whether it was live already)."""
        ans = self.call({"op": "start", "volume": volume, "path": path, "read_only": read_only})
        return DaemonInfo.from_json(ans["daemon"]), bool(ans.get("existing"))

    def stop(
        self, path: str, *, discard: bool = False, lazy: bool = False, timeout: float = 60.0
    ) -> None:
        self.call(
            {"op": "stop", "path": path, "discard": discard, "lazy": lazy, "timeout": timeout}
        )

    def daemons(self) -> list[DaemonInfo]:
        return [DaemonInfo.from_json(d) for d in self.call({"op": "list"})["daemons"]]

    def status(self) -> dict[str, Any]:
        return self.call({"op": "status"})

    def watch(self, stop: threading.Event) -> Iterator[dict[str, Any]]:
        """The event stream of one connection (``hello`` first); ends when it breaks."""
        s = self._connect(10.0)
        try:
            s.sendall(b'{"op": "watch"}\n')
            s.settimeout(1.0)
            buf = b""
            while not stop.is_set():
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    yield json.loads(line)
        finally:
            s.close()


class MounterWatch:
    """Keeps a watch connection open, reconnecting; calls back from its own thread.

    ``on_hello(daemons)`` after every (re)connection with the mounter's full list, so
    the caller can tell what died while it was not listening; ``on_event(event)`` for
    every ``started``/``stopped``/``died``; ``on_lost()`` when the connection breaks.
    """

    def __init__(
        self,
        client: MounterClient,
        on_hello: Callable[[list[DaemonInfo]], None],
        on_event: Callable[[dict[str, Any]], None],
        on_lost: Callable[[], None] | None = None,
        retry: float = 1.0,
    ) -> None:
        self.client = client
        self.on_hello = on_hello
        self.on_event = on_event
        self.on_lost = on_lost
        self.retry = retry
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mounter-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for ev in self.client.watch(self._stop):
                    if ev.get("event") == "hello":
                        self.on_hello([DaemonInfo.from_json(d) for d in ev.get("daemons", [])])
                        self.connected.set()
                    else:
                        self.on_event(ev)
            except MounterUnavailable as exc:
                log.debug("event=mounter_unavailable error=%s", exc)
            except Exception:
                log.exception("event=mounter_watch_failed")
            if self.connected.is_set():
                self.connected.clear()
                log.warning("event=mounter_watch_lost socket=%s", self.client.socket_path)
                if self.on_lost is not None:
                    with contextlib.suppress(Exception):
                        self.on_lost()
            self._stop.wait(self.retry)


class DaemonDeaths:
    """The plugin's watch of the daemons it relies on, fed by the mounter's event stream.

    ``watch(volume, pid)`` says the plugin relies on daemon ``pid`` for ``volume``;
    ``on_death(volume, pid)`` is called (from the watch thread) once when it dies: on
    a ``died`` event, or when a ``hello`` (after any reconnection, e.g. a restarted
    mounter) does not list it any more. ``unwatch`` before a deliberate stop. A death
    seen before ``watch`` was called makes ``watch`` return False.
    """

    def __init__(
        self,
        client: MounterClient,
        on_death: Callable[[str, int], None],
        on_hello: Callable[[list[DaemonInfo]], None] | None = None,
    ) -> None:
        self._on_death = on_death
        self._on_hello = on_hello
        self._lock = threading.Lock()
        self._expect: dict[str, int] = {}  # volume -> pid
        self._dead: dict[tuple[str, int], float] = {}  # recent deaths, for watch()'s race
        self.stream = MounterWatch(client, self._hello, self._event)

    def start(self) -> None:
        self.stream.start()

    def stop(self) -> None:
        self.stream.stop()

    def watch(self, volume: str, pid: int, starttime: int = 0) -> bool:
        with self._lock:
            if (volume, pid) in self._dead:
                return False
            self._expect[volume] = pid
        return True

    def unwatch(self, volume: str) -> None:
        with self._lock:
            self._expect.pop(volume, None)

    def pid_of(self, volume: str) -> int | None:
        with self._lock:
            return self._expect.get(volume)

    def _remember(self, volume: str, pid: int) -> None:
        now = time.monotonic()
        self._dead[(volume, pid)] = now
        for key, at in list(self._dead.items()):
            if now - at > 600:
                del self._dead[key]

    def _event(self, ev: dict[str, Any]) -> None:
        if ev.get("event") != "died":
            return
        d = ev.get("daemon") or {}
        volume, pid = str(d.get("volume", "")), int(d.get("pid", 0))
        with self._lock:
            self._remember(volume, pid)
            mine = self._expect.get(volume) == pid
            if mine:
                del self._expect[volume]
        if mine:
            self._on_death(volume, pid)

    def _hello(self, daemons: list[DaemonInfo]) -> None:
        live = {(d.volume, d.pid) for d in daemons}
        with self._lock:
            gone = [(v, p) for v, p in self._expect.items() if (v, p) not in live]
            for v, p in gone:
                del self._expect[v]
                self._remember(v, p)
        for v, p in gone:
            self._on_death(v, p)
        if self._on_hello is not None:
            self._on_hello(daemons)


class EmbeddedMounter:
    """A mounter inside the calling process, on its own socket thread.

    For a plugin run without ``--mounter-socket`` (by hand, tests): the same protocol
    and code, but the daemons are in the plugin's process tree, so a container
    restart ends them. ``close`` leaves them running; the next mounter adopts them.
    """

    def __init__(self, config: MounterConfig) -> None:
        self.config = config
        self.mounter = Mounter(config)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        _claim_socket(self.config.socket_path)
        self.mounter.start()
        self._server = _Server(str(self.config.socket_path), self.mounter)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="mounter-socket", daemon=True
        )
        self._thread.start()
        log.info(
            "event=embedded_mounter socket=%s daemons=%d",
            self.config.socket_path,
            len(self.mounter.daemons()),
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.config.socket_path.unlink()
        self.mounter.close()
