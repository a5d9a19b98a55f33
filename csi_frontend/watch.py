"""Watching the FUSE daemons of staged volumes: one pidfd per daemon, one thread.

``fusedrive mount`` detaches its daemon, so the plugin is not its parent and cannot
wait for it; a pidfd (``os.pidfd_open``) becomes readable when the process exits,
whoever its parent is. The watcher thread polls every pidfd and calls ``on_death``
(from its own thread) once per death.

Invariants: a pidfd is opened only after checking that the PID still names the
daemon recorded for the mount (its start time matches the mount record), so a
reused PID is never watched; ``unwatch`` before a deliberate unmount means a
daemon we stop ourselves is never reported as dead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

from fusedrive.daemon import process_starttime

log = logging.getLogger(__name__)


class DaemonWatcher:
    def __init__(self, on_death: Callable[[str, int], None]) -> None:
        self._on_death = on_death
        self._lock = threading.Lock()
        self._watched: dict[str, tuple[int, int]] = {}  # volume id -> (pidfd, pid)
        # pidfds no longer watched, closed by the watcher thread only (after its poll
        # returned), so a number is never reused while a poll may still report on it.
        self._retired: list[int] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="daemon-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for fd in [*self._retired, *(fd for fd, _pid in self._watched.values())]:
                os.close(fd)
            self._watched.clear()
            self._retired.clear()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def watch(self, volume_id: str, pid: int, starttime: int) -> bool:
        """Watch ``pid`` as the daemon of ``volume_id``; False if it is already gone."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        if process_starttime(pid) != starttime:  # exited, or the PID was reused
            os.close(fd)
            return False
        with self._lock:
            old = self._watched.pop(volume_id, None)
            self._watched[volume_id] = (fd, pid)
            if old is not None:
                self._retired.append(old[0])
        self._wake()
        log.info("event=daemon_watched volume=%s pid=%d", volume_id, pid)
        return True

    def unwatch(self, volume_id: str) -> None:
        with self._lock:
            old = self._watched.pop(volume_id, None)
            if old is not None:
                self._retired.append(old[0])
        if old is not None:
            self._wake()

    def pid_of(self, volume_id: str) -> int | None:
        with self._lock:
            got = self._watched.get(volume_id)
        return got[1] if got else None

    def _run(self) -> None:
        while not self._stop:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._lock:
                for fd in self._retired:
                    os.close(fd)
                self._retired.clear()
                by_fd = {fd: (vid, pid) for vid, (fd, pid) in self._watched.items()}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            events = poller.poll()
            dead: list[tuple[str, int]] = []
            for fd, _mask in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                vid, pid = by_fd[fd]
                with self._lock:
                    if self._watched.get(vid, (None,))[0] != fd:
                        continue  # unwatched meanwhile: a deliberate unmount
                    del self._watched[vid]
                    self._retired.append(fd)
                # Reap it if the plugin happens to be its parent (PID 1 in a container).
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
                dead.append((vid, pid))
            for vid, pid in dead:
                log.warning("event=daemon_died volume=%s pid=%d", vid, pid)
                try:
                    self._on_death(vid, pid)
                except Exception:
                    log.exception("event=daemon_death_handler_failed volume=%s", vid)
