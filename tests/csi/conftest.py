"""Fixtures for the CSI conformance tests: the real plugin process on a real unix socket.

The plugin runs as ``python -m csi_frontend.cli serve`` in a subprocess, in a short private
directory under /tmp (a unix socket path is limited to 107 bytes, pytest's tmp_path is too
long). The FUSE daemons it starts keep their mount records in ``<base>/run``
(``FUSEDRIVE_RUNTIME_DIR``), so a test can find their PIDs.

Invariant: teardown stops the plugin by the PID it started, then removes every mount under
the base directory, detaches every loop device whose backing file is under it and ends the
FUSE daemons serving it, even when the test failed; a mount that cannot be removed fails the
teardown instead of being left behind silently.
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
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from blockstore import Store
from csi_frontend.client import CsiClient
from csi_frontend.proto import csi_pb2

REPO = Path(__file__).resolve().parents[2]
NODE_ID = "test-node"
pb = csi_pb2


# -- the plugin process ------------------------------------------------------------------


class PluginProcess:
    """One ``fusedrive-csi serve`` process over ``base``; restartable on the same paths."""

    def __init__(self, base: Path, node_id: str = NODE_ID) -> None:
        self.base = base
        self.node_id = node_id
        self.socket = base / "csi.sock"
        self.endpoint = f"unix://{self.socket}"
        self.store = base / "store"
        self.state = base / "state"
        self.runtime = base / "run"
        self.log_path = base / "plugin.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: CsiClient | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("CSI_ENDPOINT", None)
        env["FUSEDRIVE_RUNTIME_DIR"] = str(self.runtime)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        return env

    def start(
        self, *extra: str, wait: bool = True, confine: bool = True, wrapper: tuple[str, ...] = ()
    ) -> CsiClient | None:
        """Start the plugin; ``confine`` limits its paths to ``base`` (--allowed-path-prefix),
        ``wrapper`` runs it under another command (``unshare -m ...``)."""
        assert self.proc is None or self.proc.poll() is not None, "plugin already running"
        self.runtime.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        cmd = [
            *wrapper,
            sys.executable,
            "-m",
            "csi_frontend.cli",
            "serve",
            "--endpoint",
            self.endpoint,
            "--node-id",
            self.node_id,
            "--store",
            str(self.store),
            "--state-dir",
            str(self.state),
            *(["--allowed-path-prefix", str(self.base)] if confine else []),
            *extra,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        if not wait:
            return None
        deadline = time.monotonic() + 60
        # A restart may find the killed plugin's socket file: wait for this run's own line.
        while b"event=listening" not in self.log_path.read_bytes()[offset:] or not _is_socket(
            self.socket
        ):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"plugin exited with {self.proc.returncode} before listening:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"plugin did not create {self.socket}:\n{self.log()}")
            time.sleep(0.05)
        self.close_client()
        self.client = CsiClient(self.endpoint)
        self.client.wait_ready(timeout=30)
        return self.client

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the plugin (by the PID we started) and wait; SIGKILL if it hangs."""
        self.close_client()
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def restart(self, *extra: str) -> CsiClient:
        client = self.start(*extra)
        assert client is not None
        return client

    def mounts(self, under: Path | None = None) -> list[tuple[str, str, str]]:
        return mounts_under(under or self.base)

    def loops(self, under: Path | None = None) -> list[tuple[str, str]]:
        return loops_under(under or self.base)

    def fuse_daemons(self) -> list[dict[str, Any]]:
        """The mount records the FUSE daemons started for this plugin wrote."""
        recs = []
        for path in sorted(self.runtime.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                recs.append(json.loads(path.read_text()))
        return recs


def _is_socket(path: Path) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


# -- cleanup of mounts, loop devices and daemons -------------------------------------------


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(base: Path) -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) of every mount at or below ``base``, in mount order."""
    prefix = str(base).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a, b = left.split(" "), right.split(" ")
            if len(a) < 5 or len(b) < 2:
                continue
            point = _unescape(a[4])
            if point == str(base) or point.startswith(prefix):
                found.append((point, b[0], _unescape(b[1])))
    return found


def loops_under(base: Path) -> list[tuple[str, str]]:
    """(device, backing file) of every loop device whose backing file is below ``base``."""
    if not shutil.which("losetup"):
        return []
    out = subprocess.run(
        ["losetup", "--json", "--list", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if not out.strip():
        return []
    prefix = str(base).rstrip("/") + "/"
    found = []
    for dev in json.loads(out).get("loopdevices", []):
        back = (dev.get("back-file") or "").removesuffix(" (deleted)")
        if back.startswith(prefix):
            found.append((dev["name"], back))
    return found


def _pid_serves(pid: int, base: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return str(base).encode() in cmdline


def cleanup_under(base: Path, runtime: Path | None = None) -> list[str]:
    """Remove every mount, loop device and FUSE daemon of ``base``; returns what it removed."""
    removed: list[str] = []
    daemons: list[int] = []
    if runtime is not None:
        for path in runtime.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                rec = json.loads(path.read_text())
                if str(rec["mountpoint"]).startswith(str(base)):
                    daemons.append(int(rec["pid"]))
    for dev, back in loops_under(base):
        subprocess.run(["losetup", "--detach", dev], capture_output=True, check=False)
        removed.append(f"loop {dev} ({back})")
    for _ in range(3):
        entries = mounts_under(base)
        if not entries:
            break
        for point, fstype, _source in reversed(entries):
            res = subprocess.run(["umount", point], capture_output=True, check=False)
            if res.returncode != 0 and fstype.startswith("fuse"):
                res = subprocess.run(["fusermount3", "-uz", point], capture_output=True)
            if res.returncode != 0:
                res = subprocess.run(["umount", "--lazy", point], capture_output=True)
            removed.append(f"mount {point} ({fstype})")
    deadline = time.monotonic() + 15
    for pid in daemons:
        while _pid_serves(pid, base) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_serves(pid, base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            removed.append(f"daemon {pid} (killed)")
    left = mounts_under(base) + [(d, "loop", b) for d, b in loops_under(base)]
    if left:
        raise RuntimeError(f"could not clean up under {base}: {left}")
    return removed


# -- what the tests use ------------------------------------------------------------------


def mount_cap(mode: str = "SINGLE_NODE_WRITER") -> csi_pb2.VolumeCapability:
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume())
    cap.access_mode.mode = pb.VolumeCapability.AccessMode.Mode.Value(mode)
    return cap


def block_cap(mode: str = "SINGLE_NODE_WRITER") -> csi_pb2.VolumeCapability:
    cap = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume())
    cap.access_mode.mode = pb.VolumeCapability.AccessMode.Mode.Value(mode)
    return cap


class Csi:
    """A CSI client over the plugin's socket with the checks every error must pass."""

    mount_cap = staticmethod(mount_cap)
    block_cap = staticmethod(block_cap)

    def __init__(self, plugin: PluginProcess) -> None:
        self.plugin = plugin

    @property
    def client(self) -> CsiClient:
        assert self.plugin.client is not None, "plugin is not running"
        return self.plugin.client

    def call(self, method: str, request: Any = None) -> Any:
        return self.client.call(method, request)

    @contextlib.contextmanager
    def open_store(self) -> Iterator[Store]:
        """The plugin's store, opened by this test process (LMDB is multi-process)."""
        store = Store(self.plugin.store, create=False)
        try:
            yield store
        finally:
            store.close()

    def error(self, method: str, request: Any, code: grpc.StatusCode) -> grpc.RpcError:
        """Call ``method``, expect ``code``; every error needs a message and no details."""
        with pytest.raises(grpc.RpcError) as info:
            self.client.call(method, request)
        err: Any = info.value
        assert err.code() == code, (
            f"{method}: expected {code.name}, got {err.code().name}: {err.details()}"
        )
        assert err.details(), f"{method}: {code.name} without a message"
        keys = [k for k, _ in (err.trailing_metadata() or ())]
        assert "grpc-status-details-bin" not in keys, f"{method}: status.details is not empty"
        return err

    @staticmethod
    def unique(label: str) -> str:
        return f"{label}-{uuid.uuid4().hex[:10]}"

    def create_volume(
        self, size: int = 64 << 20, block: bool = False, name: str | None = None, **kw: Any
    ) -> csi_pb2.Volume:
        req = pb.CreateVolumeRequest(
            name=name or self.unique("vol"),
            volume_capabilities=[block_cap() if block else mount_cap()],
            capacity_range=pb.CapacityRange(required_bytes=size),
            **kw,
        )
        return self.call("CreateVolume", req).volume

    def create_snapshot(self, volume_id: str, name: str | None = None) -> csi_pb2.Snapshot:
        req = pb.CreateSnapshotRequest(name=name or self.unique("snap"), source_volume_id=volume_id)
        return self.call("CreateSnapshot", req).snapshot


def _new_base() -> Path:
    return Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp"))


def _teardown(plugin: PluginProcess) -> None:
    try:
        plugin.stop()
        # Shown by pytest only when the test failed: what the plugin said, for diagnosis.
        print(f"--- plugin log {plugin.log_path} ---\n{plugin.log()[-20000:]}")
    finally:
        cleanup_under(plugin.base, plugin.runtime)
        shutil.rmtree(plugin.base, ignore_errors=True)


@pytest.fixture(scope="module")
def plugin() -> Iterator[PluginProcess]:
    """One plugin per test module; tests share it and use unique names."""
    p = PluginProcess(_new_base())
    try:
        p.start()
        yield p
    finally:
        _teardown(p)


@pytest.fixture
def new_plugin() -> Iterator[Callable[..., PluginProcess]]:
    """Factory of private plugins (own socket, store and state), all torn down afterwards.

    ``new_plugin(*serve_args)`` starts one; ``new_plugin(start=False)`` only prepares its
    directory, for a test that arranges something before the first start.
    """
    made: list[PluginProcess] = []

    def make(*extra: str, start: bool = True) -> PluginProcess:
        p = PluginProcess(_new_base())
        made.append(p)
        if start:
            p.start(*extra)
        return p

    try:
        yield make
    finally:
        errors = []
        for p in made:
            try:
                _teardown(p)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def new_csi(new_plugin: Callable[..., PluginProcess]) -> Callable[..., Csi]:
    """Factory of private plugins wrapped in ``Csi``: ``new_csi(*serve_args, confine=...,
    wrapper=...)`` (see ``PluginProcess.start``)."""

    def make(*extra: str, confine: bool = True, wrapper: tuple[str, ...] = ()) -> Csi:
        p = new_plugin(start=False)
        p.start(*extra, confine=confine, wrapper=wrapper)
        return Csi(p)

    return make


@pytest.fixture
def csi(plugin: PluginProcess) -> Csi:
    if plugin.client is None:
        plugin.restart()
    return Csi(plugin)


@pytest.fixture
def node_dir(plugin: PluginProcess) -> Iterator[Path]:
    """A private directory for one node test's staging and target paths, cleaned after it."""
    path = plugin.base / "t" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        cleanup_under(path, plugin.runtime)
