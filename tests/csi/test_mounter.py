"""The mounter (``csi_frontend/mounter.py``): real processes, real FUSE, real namespaces.

The mounter runs as PID 1 of its own PID and mount namespaces (``tests/nsutil.py``),
as it would in its own container; its FUSE mounts reach the test through a shared
directory, as through a Bidirectional hostPath. Clients run in other namespaces and
are killed like a restarted plugin container: the daemons must not notice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockstore import Store
from csi_frontend.mounter_client import DaemonDeaths, DaemonInfo, MounterClient, MounterError
from tests.nsutil import NsProcess, SharedDir, mounts_below, process_starttime, wait_gone

pytestmark = pytest.mark.needs_fuse

MiB = 1 << 20
MOUNTER_CMD = [sys.executable, "-m", "csi_frontend.cli", "mounter"]


class MounterEnv:
    """A shared base directory, a store in it, and mounters started over it."""

    def __init__(self) -> None:
        self.shared = SharedDir("fdm-")
        self.base = self.shared.path
        self.store = self.base / "store"
        self.runtime = self.base / "run"
        self.runtime.mkdir()
        self.socket = self.base / "m.sock"
        self.staging = self.base / "stg"
        self.staging.mkdir()
        self.mounters: list[NsProcess] = []
        self.extra_pids: list[tuple[int, int | None]] = []  # daemons left by --leave-daemons
        with Store(self.store) as s:
            for name in ("v1", "v2"):
                s.create_volume(name, 64 * MiB)

    def start_mounter(self, *extra: str, pid_ns: bool = True) -> NsProcess:
        with contextlib.suppress(FileNotFoundError):
            if not self.socket.is_socket():
                self.socket.unlink()
        argv = [
            sys.executable,
            "-m",
            "csi_frontend.cli",
            "mounter",
            "--socket",
            str(self.socket),
            "--store",
            str(self.store),
            "--allowed-path-prefix",
            str(self.staging),
            *extra,
        ]
        env = {"FUSEDRIVE_RUNTIME_DIR": str(self.runtime)}
        m = NsProcess(argv, self.base / "mounter.log", env, pid_ns=pid_ns)
        self.mounters.append(m)
        client = self.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.status()["pid"]:
                    return m
            except MounterError:
                if not m.alive() or time.monotonic() > deadline:
                    raise AssertionError(f"mounter did not come up: {self.log_tail()}") from None
                time.sleep(0.1)

    def client(self) -> MounterClient:
        return MounterClient(self.socket, timeout=150)

    def path(self, name: str) -> str:
        p = self.staging / name
        p.mkdir(exist_ok=True)
        return str(p)

    def log_tail(self) -> str:
        try:
            return "\n".join((self.base / "mounter.log").read_text().splitlines()[-30:])
        except OSError:
            return "(no log)"

    def close(self) -> list[str]:
        self.shared.detach_loops()
        for m in self.mounters:
            if m.alive():
                m.kill()
        for pid, start in self.extra_pids:
            with contextlib.suppress(ProcessLookupError):
                if process_starttime(pid) == start:
                    os.kill(pid, signal.SIGKILL)
            wait_gone(pid, start)
        return self.shared.cleanup()


@pytest.fixture
def env() -> Iterator[MounterEnv]:
    e = MounterEnv()
    try:
        yield e
    finally:
        problems = e.close()
        assert not problems, problems


def fuse_dev(path: str) -> str | None:
    for mp, fstype, dev in mounts_below(Path(path)):
        if mp == path and fstype == "fuse.fusedrive":
            return dev
    return None


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_start_is_idempotent_and_stop_stores_the_data(env: MounterEnv) -> None:
    env.start_mounter()
    c = env.client()
    p1 = env.path("a")
    info, existing = c.start("v1", p1)
    assert not existing and info.volume == "v1" and info.path == p1 and not info.read_only
    assert info.dev and fuse_dev(p1) == info.dev  # the mount reached the host
    payload = os.urandom(300_000)
    (Path(p1) / "f").write_bytes(payload)  # not synced: stop must store it

    again, existing = c.start("v1", p1)
    assert existing and again.pid == info.pid  # a live mount is never mounted again
    with pytest.raises(MounterError) as busy:
        c.start("v2", p1)
    assert busy.value.code == "busy"
    with pytest.raises(MounterError) as ro:
        c.start("v1", p1, read_only=True)
    assert ro.value.code == "busy"
    assert [d.path for d in c.daemons()] == [p1]
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "csi_frontend.cli",
            "mounter",
            "--socket",
            str(env.socket),
            "--list",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert [(d["volume"], d["path"], d["pid"]) for d in json.loads(listed.stdout)] == [
        ("v1", p1, info.pid)
    ]

    c.stop(p1)
    assert fuse_dev(p1) is None and c.daemons() == []
    info2, existing = c.start("v1", p1)
    assert not existing and info2.pid != info.pid
    assert (Path(p1) / "f").read_bytes() == payload
    c.stop(p1)


def test_bad_requests_get_clear_errors_and_the_mounter_stays_up(env: MounterEnv) -> None:
    env.start_mounter()
    c = env.client()
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"op": "frobnicate"}, "invalid", "unknown op"),
        ({"op": "start", "volume": "v1", "path": "rel/path"}, "invalid", "not absolute"),
        ({"op": "start", "volume": "v1", "path": "/etc"}, "invalid", "outside the allowed"),
        ({"op": "start", "volume": "v1", "path": str(env.staging)}, "invalid", "outside"),
        ({"op": "start", "volume": "", "path": env.path("x")}, "invalid", "volume is required"),
        ({"op": "start", "volume": "a/b", "path": env.path("x")}, "invalid", "not a volume"),
        ({"op": "start", "volume": "nope", "path": env.path("x")}, "not_found", "nope"),
        ({"op": "stop", "path": env.path("x")}, "not_found", "not a fusedrive mount"),
        ({"op": "stop", "path": env.path("x"), "timeout": -1}, "invalid", "timeout"),
    ]
    for req, code, text in cases:
        with pytest.raises(MounterError) as err:
            c.call(req)
        assert err.value.code == code, (req, err.value.message)
        assert text in err.value.message, (req, err.value.message)
    with socket.socket(socket.AF_UNIX) as s:  # not JSON at all
        s.connect(str(env.socket))
        s.sendall(b"{nonsense\n")
        answer = json.loads(s.makefile("rb").readline())
    assert answer["ok"] is False and answer["code"] == "invalid"
    assert c.status()["daemons"] == 0
    assert fuse_dev(env.path("x")) is None


CLIENT = textwrap.dedent(
    """
    import sys, time
    from csi_frontend.mounter_client import MounterClient
    c = MounterClient(sys.argv[1])
    info, _ = c.start(sys.argv[2], sys.argv[3])
    print(info.pid, flush=True)
    time.sleep(3600)
    """
)


def test_a_killed_client_namespace_leaves_the_daemons_serving(env: MounterEnv) -> None:
    mounter = env.start_mounter()
    p1 = env.path("a")
    out = env.base / "client.out"
    # The client is a "plugin container": its own PID namespace, killed all at once.
    client = NsProcess([sys.executable, "-c", CLIENT, str(env.socket), "v1", p1], out, pid_ns=True)
    try:
        deadline = time.monotonic() + 120
        while not out.read_text().strip():
            assert client.alive() and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        ns_pid = int(out.read_text().split()[0])
        daemon = mounter.host_pid(ns_pid)
        assert daemon is not None
        start = process_starttime(daemon)
        write_file(Path(p1) / "before", b"x" * 100_000)
    finally:
        client.kill()
    assert not client.alive()
    # The daemon lives on in the mounter's namespace and the mount keeps working.
    assert process_starttime(daemon) == start
    write_file(Path(p1) / "after", b"y" * 100_000)
    assert (Path(p1) / "before").read_bytes() == b"x" * 100_000
    # A new client (a restarted plugin) finds it, and its start adopts it.
    c = env.client()
    assert [(d.volume, d.path, d.pid) for d in c.daemons()] == [("v1", p1, ns_pid)]
    info, existing = c.start("v1", p1)
    assert existing and info.pid == ns_pid
    c.stop(p1)
    assert wait_gone(daemon, start)


def test_watch_says_hello_and_reports_a_death(env: MounterEnv) -> None:
    mounter = env.start_mounter()
    c = env.client()
    p1, p2 = env.path("a"), env.path("b")
    first, _ = c.start("v1", p1)
    events: list[dict[str, Any]] = []
    stop = threading.Event()
    got = threading.Condition()

    def listen() -> None:
        for ev in c.watch(stop):
            with got:
                events.append(ev)
                got.notify_all()

    def wait_for(pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        with got:
            assert got.wait_for(lambda: any(pred(e) for e in events), timeout=60), events
            return next(e for e in events if pred(e))

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    try:
        hello = wait_for(lambda e: e["event"] == "hello")
        assert [DaemonInfo.from_json(d) for d in hello["daemons"]] == [first]
        second, _ = c.start("v2", p2)
        started = wait_for(lambda e: e["event"] == "started")
        assert started["daemon"]["path"] == p2
        # Kill v1's daemon behind the mounter's back.
        victim = mounter.host_pid(first.pid)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        died = wait_for(lambda e: e["event"] == "died")
        assert died["daemon"]["path"] == p1 and died["daemon"]["volume"] == "v1"
        assert died["status"] == -signal.SIGKILL  # the mounter is the daemons' reaper
        assert [d.path for d in c.daemons()] == [p2]
        c.stop(p2)
        stopped = wait_for(lambda e: e["event"] == "stopped")
        assert stopped["daemon"]["pid"] == second.pid
        assert not any(e["event"] == "died" and e["daemon"]["path"] == p2 for e in events)
    finally:
        stop.set()
        t.join(timeout=10)


def test_sigterm_stops_every_daemon_after_storing_its_writes(env: MounterEnv) -> None:
    """The mounter's own upgrade: its daemons end, but nothing written is lost."""
    mounter = env.start_mounter()
    c = env.client()
    p1 = env.path("a")
    info, _ = c.start("v1", p1)
    daemon = mounter.host_pid(info.pid)
    assert daemon is not None
    payload = os.urandom(500_000)
    (Path(p1) / "f").write_bytes(payload)  # buffered in the daemon, not synced
    assert mounter.terminate(timeout=90) == 0, env.log_tail()
    assert process_starttime(daemon) is None
    assert not env.socket.exists()
    # What a new mounter finds: the old mount point is dead or gone; clear it as the
    # plugin's heal does, then serve the volume again.
    subprocess.run(["umount", "--lazy", p1], capture_output=True)
    env.start_mounter()
    c.start("v1", p1)
    assert (Path(p1) / "f").read_bytes() == payload
    c.stop(p1)


def test_a_new_mounter_adopts_the_daemons_a_previous_one_left(env: MounterEnv) -> None:
    """Outside a container (by hand, systemd) a mounter can be replaced live."""
    first = env.start_mounter("--leave-daemons", pid_ns=False)
    c = env.client()
    p1 = env.path("a")
    info, _ = c.start("v1", p1)
    env.extra_pids.append((info.pid, info.starttime))
    assert first.terminate(timeout=60) == 0, env.log_tail()
    assert process_starttime(info.pid) == info.starttime  # left running
    write_file(Path(p1) / "f", b"z" * 50_000)
    env.start_mounter(pid_ns=False)
    [adopted] = c.daemons()
    assert adopted.adopted and adopted.pid == info.pid and adopted.dev == info.dev
    again, existing = c.start("v1", p1)
    assert existing and again.pid == info.pid
    c.stop(p1)
    assert wait_gone(info.pid, info.starttime)
    assert fuse_dev(p1) is None


def test_a_second_mounter_on_the_same_socket_is_refused(env: MounterEnv) -> None:
    env.start_mounter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "csi_frontend.cli",
            "mounter",
            "--socket",
            str(env.socket),
            "--store",
            str(env.store),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FUSEDRIVE_RUNTIME_DIR": str(env.runtime)},
    )
    assert res.returncode == 1
    assert "already answers" in res.stderr and "Traceback" not in res.stderr
    assert env.client().status()["daemons"] == 0
    nobody = subprocess.run(
        [*MOUNTER_CMD, "--list", "--socket", str(env.base / "none.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nobody.returncode == 1 and "does not answer" in nobody.stderr
    assert "Traceback" not in nobody.stderr


def test_daemon_deaths_are_told_once_whether_seen_live_or_after_a_reconnection(
    env: MounterEnv,
) -> None:
    """The plugin's side: a death event, or a mounter that came back without the daemon."""
    mounter = env.start_mounter()
    c = env.client()
    p1, p2 = env.path("a"), env.path("b")
    d1, _ = c.start("v1", p1)
    d2, _ = c.start("v2", p2)
    told: list[tuple[str, int]] = []
    hellos: list[list[str]] = []
    cond = threading.Condition()

    def on_death(volume: str, pid: int) -> None:
        with cond:
            told.append((volume, pid))
            cond.notify_all()

    def on_hello(daemons: list[DaemonInfo]) -> None:
        with cond:
            hellos.append([d.volume for d in daemons])
            cond.notify_all()

    deaths = DaemonDeaths(MounterClient(env.socket), on_death, on_hello)
    deaths.stream.retry = 0.2
    assert deaths.watch("v1", d1.pid) and deaths.watch("v2", d2.pid)
    deaths.start()
    try:
        with cond:
            assert cond.wait_for(lambda: hellos == [["v1", "v2"]], timeout=60), hellos
        victim = mounter.host_pid(d1.pid)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        with cond:
            assert cond.wait_for(lambda: told == [("v1", d1.pid)], timeout=60), told
        assert deaths.pid_of("v1") is None and deaths.pid_of("v2") == d2.pid
        # A death seen before the plugin says it relies on the daemon is not missed.
        assert not deaths.watch("v1", d1.pid)
        # The mounter goes (its daemons with it) and a new one comes without them.
        mounter.kill()
        subprocess.run(["umount", "--lazy", p1], capture_output=True)
        subprocess.run(["umount", "--lazy", p2], capture_output=True)
        env.start_mounter()
        with cond:
            assert cond.wait_for(lambda: len(hellos) == 2, timeout=60), hellos
            assert hellos[1] == [] and told == [("v1", d1.pid), ("v2", d2.pid)]
    finally:
        deaths.stop()
