"""Containers without a container runtime: processes in their own PID namespace.

A container restart ends every process of the container at once: its PID namespace's
init dies and the kernel kills the rest. ``NsProcess`` reproduces that: the command
runs as PID 1 of a new PID namespace (``unshare --pid --fork``) with its own mount
namespace and a fresh ``/proc`` (so PIDs and ``/proc`` agree inside, as in a
container); ``kill()`` SIGKILLs that init, which takes every process of the
namespace with it.

Mounts: ``unshare --mount`` copies the host's mounts. A mount made inside propagates
back only under a shared mount, as under a hostPath volume with Bidirectional
propagation; ``SharedDir`` makes a private directory under /tmp a shared bind mount of
itself, and everything a test mounts lives below it. ``/proc`` is made private in the
new namespace before a fresh proc is mounted over it, so nothing of it reaches the host.

Invariant: ``SharedDir.cleanup`` detaches every loop device over a file below the
directory (call ``detach_loops`` earlier too, while the FUSE daemons still live: only
then can a device attached from a dead mount namespace be told apart), removes every
mount below it (deepest first, lazily: a FUSE mount whose daemon died answers
ENOTCONN), then the bind mount itself; processes are ended only
by the PIDs the test started or was told (``NsProcess``, ``kill_pid``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Inside the new namespaces: a fresh /proc that does not reach the host, then the command.
_NS_INIT = 'mount --make-private /proc && mount -t proc proc /proc && exec "$@"'


def mounts_below(base: Path) -> list[tuple[str, str, str]]:
    """(mount point, fstype, major:minor) of every mount at or below ``base``."""
    prefix = str(base)
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            mp = a[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append((mp, b[0], a[2]))
    return out


def process_starttime(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def kill_pid(pid: int, starttime: int | None, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` only if it is still the process that started at ``starttime``."""
    if starttime is not None and process_starttime(pid) == starttime:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pid: int, starttime: int | None, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while process_starttime(pid) == starttime and starttime is not None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            kids += [int(x) for x in text.split()]
    return kids


def host_pid(ns_init: int, ns_pid: int) -> int | None:
    """The host PID of the process that is ``ns_pid`` in ``ns_init``'s PID namespace."""
    try:
        ns = os.readlink(f"/proc/{ns_init}/ns/pid")
    except OSError:
        return None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") != ns:
                continue
            for line in Path(f"/proc/{name}/status").read_text().splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                    return int(name)
        except (OSError, ValueError):
            continue
    return None


class SharedDir:
    """A directory under /tmp, bind-mounted on itself and made shared (rshared)."""

    def __init__(self, prefix: str = "fdns-") -> None:
        # Short: unix socket paths live below it (108 bytes at most).
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        os.chmod(self.path, 0o755)
        subprocess.run(["mount", "--bind", str(self.path), str(self.path)], check=True)
        subprocess.run(["mount", "--make-shared", str(self.path)], check=True)

    def loops(self) -> list[str]:
        """Loop devices over a file below: by its path, or by the file system it is on.

        A device attached from a mount namespace that is gone names its backing file
        by the path inside that detached mount (``/disk.img``), so the file system's
        device number (that of a mount below) is what finds it; it can be read only
        while the file system's daemon lives: call this before ending the daemons.
        """
        base = str(self.path)
        devs = {dev for _mp, _fstype, dev in mounts_below(self.path)}
        found = []
        with contextlib.suppress(subprocess.CalledProcessError, ValueError, OSError):
            out = subprocess.run(
                ["losetup", "--json", "--list", "--output", "NAME,BACK-FILE,BACK-MAJ:MIN"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for dev in json.loads(out or '{"loopdevices": []}').get("loopdevices", []):
                back = (dev.get("back-file") or "").removesuffix(" (deleted)")
                on = str(dev.get("back-maj:min") or "").strip()
                if back.startswith(base + "/") or on in devs:
                    found.append(dev["name"])
        return found

    def detach_loops(self) -> None:
        for name in self.loops():
            subprocess.run(["losetup", "--detach", name], capture_output=True)

    def cleanup(self) -> list[str]:
        """Remove every mount and loop device below; returns what could not be removed."""
        problems: list[str] = []
        base = str(self.path)
        self.detach_loops()
        for _ in range(5):
            inner = [m for m in mounts_below(self.path) if m[0] != base]
            if not inner:
                break
            for mp, _fstype, _dev in sorted(inner, key=lambda m: -len(m[0])):
                subprocess.run(["umount", "--lazy", mp], capture_output=True)
        left = [m[0] for m in mounts_below(self.path) if m[0] != base]
        problems += [f"mount left: {mp}" for mp in left]
        while any(m[0] == base for m in mounts_below(self.path)):
            if subprocess.run(["umount", "--lazy", base], capture_output=True).returncode:
                problems.append(f"cannot unmount {base}")
                break
        if not left:
            shutil.rmtree(self.path, ignore_errors=True)
        return problems


class NsProcess:
    """A command as PID 1 of its own PID and mount namespaces (a container's lifetime)."""

    def __init__(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, *, pid_ns: bool = True
    ) -> None:
        self.log = log
        base_env = dict(os.environ)
        base_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), base_env.get("PYTHONPATH")) if p
        )
        base_env.update(env or {})
        if pid_ns:
            cmd = [
                "unshare",
                "--pid",
                "--fork",
                "--mount",
                "--propagation",
                "unchanged",
                "--",
                "sh",
                "-c",
                _NS_INIT,
                "sh",
                *argv,
            ]
        else:
            cmd = list(argv)
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=base_env, cwd="/"
            )
        self.pid_ns = pid_ns
        self.init_pid, self.init_start = self._find_init()

    def _find_init(self) -> tuple[int, int | None]:
        if not self.pid_ns:
            return self.proc.pid, process_starttime(self.proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kids = children(self.proc.pid)
            if kids:
                return kids[0], process_starttime(kids[0])
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"no namespace init under unshare (pid {self.proc.pid}); log {self.log}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def host_pid(self, ns_pid: int) -> int | None:
        if not self.pid_ns:
            return ns_pid
        return host_pid(self.init_pid, ns_pid)

    def kill(self) -> None:
        """SIGKILL the namespace's init: the kernel then kills every process in it."""
        kill_pid(self.init_pid, self.init_start)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the init (the command itself) and wait for it; None if it did not end."""
        kill_pid(self.init_pid, self.init_start, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]
