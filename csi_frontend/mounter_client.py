"""The plugin's side of the mounter (``mounter.py``): the socket protocol and its client.

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

``MounterWatch`` keeps a ``watch`` stream open across reconnections, and
``DaemonDeaths`` turns it into one callback per daemon death.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_SOCKET = "/run/fusedrive-mounter/mounter.sock"
MAX_REQUEST = 64 * 1024

# The codes an answer can carry.
CODES = ("invalid", "not_found", "busy", "no_space", "failed", "unavailable")


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
