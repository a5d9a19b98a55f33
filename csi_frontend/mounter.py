"""The mounter: the long-lived process that owns this node's FUSE daemons.

A FUSE daemon dies with the container (or the PID namespace, or the cgroup) it runs
in, and a dead daemon breaks its volume in every pod that uses it. So the daemons
are not children of the CSI plugin: they belong to this small service, which runs in
its own container with its own lifecycle (``docs/restart.md`` says why, and what its
own upgrade costs). It has no gRPC and little code, so it changes rarely.

The protocol and the plugin's side of it (``MounterClient``, ``DaemonDeaths``) are
in ``mounter_client.py``; ``EmbeddedMounter`` runs this service inside the plugin.

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

from .mounter_client import (
    MAX_REQUEST,
    VERSION,
    DaemonInfo,
    MounterError,
)

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36

# The fusedrive CLI exit codes and the answer codes (``CODES``) they become.
_EXIT_CODE = {3: "not_found", 4: "busy", 5: "no_space", 7: "busy", 8: "invalid"}


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
