"""How long a published volume is down after its FUSE daemon is killed.

    sudo .venv/bin/python -m benchmarks.node_heal [--trials 3]

Starts ``fusedrive-csi serve`` on a scratch directory under /tmp, stages and
publishes one volume through the socket, then SIGKILLs the volume's daemon (found
by its mount record) ``--trials`` times and measures, for each kill, the time until
a synced write through the target succeeds again. Prints one JSON object. Needs
root and /dev/fuse; everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from csi_frontend.client import CsiClient, mount_capability


def _write(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError:
        return False
    try:
        os.write(fd, b"x")
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _daemon_pid(runtime: Path, staging: Path) -> int:
    for rec in runtime.glob("*.json"):
        data = json.loads(rec.read_text())
        if data.get("mountpoint") == str(staging):
            return int(data["pid"])
    raise RuntimeError(f"no daemon record for {staging}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="heal-", dir="/tmp"))
    runtime, sock = base / "run", base / "csi.sock"
    env = dict(os.environ, FUSEDRIVE_RUNTIME_DIR=str(runtime))
    log = open(base / "plugin.log", "w")  # noqa: SIM115  (closed below)
    cmd = [sys.executable, "-m", "csi_frontend.cli", "serve", "--endpoint", f"unix://{sock}"]
    cmd += ["--node-id", "bench", "--store", str(base / "store"), "--state-dir", str(base / "st")]
    cmd += ["--allowed-path-prefix", str(base / "kubelet")]
    plugin = subprocess.Popen(
        cmd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    staging = base / "kubelet" / "staging"
    target = base / "kubelet" / "pods" / "p" / "mount"
    times = []
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline or plugin.poll() is not None:
                raise RuntimeError(f"plugin did not start; see {base / 'plugin.log'}")
            time.sleep(0.05)
        with CsiClient(f"unix://{sock}") as c:
            c.wait_ready(timeout=30)
            cap = MessageToDict(mount_capability(), preserving_proto_field_name=True)
            vid = c.call(
                "CreateVolume",
                {"name": "heal", "volume_capabilities": [cap], "capacity_range": {}},
            ).volume.volume_id
            staging.mkdir(parents=True)
            target.parent.mkdir(parents=True)
            c.call(
                "NodeStageVolume",
                {"volume_id": vid, "staging_target_path": str(staging), "volume_capability": cap},
            )
            pub = {"volume_id": vid, "staging_target_path": str(staging)}
            c.call(
                "NodePublishVolume", {**pub, "target_path": str(target), "volume_capability": cap}
            )
            for _ in range(a.trials):
                pid = _daemon_pid(runtime, staging)
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                while _alive(pid):
                    time.sleep(0.01)
                while not _write(target / "probe"):
                    if time.monotonic() - t0 > 120:
                        raise RuntimeError("the volume did not come back within 120 s")
                    time.sleep(0.02)
                times.append(round(time.monotonic() - t0, 3))
            c.call("NodeUnpublishVolume", {"volume_id": vid, "target_path": str(target)})
            c.call("NodeUnstageVolume", {"volume_id": vid, "staging_target_path": str(staging)})
    finally:
        plugin.send_signal(signal.SIGTERM)
        plugin.wait(timeout=30)
        log.close()
        for point in (target, staging):
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"kill_to_write_seconds": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
