"""What a plugin restart costs a pod writing to its volumes (docs/restart.md).

    sudo .venv/bin/python -m benchmarks.plugin_restart [--restarts 5]

Runs the set-up of ``tests/csi/test_restart.py``: a mounter, and the plugin as PID 1
of its own PID and mount namespaces; publishes a filesystem and a block volume; two
threads write 4 KiB and fsync, one through each target, without pause. Then kills
the plugin's namespace ``--restarts`` times (every process in it dies) and starts a
new plugin each time. Prints one JSON object: per restart, the seconds from the new
plugin's start to serving and to both volumes reported healthy; the longest gap
between two completed writes of each writer over the whole run; and every error a
writer got. Needs root, /dev/fuse and loop devices; everything it creates is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any

from tests.csi.test_restart import Node


def _writer(path: str, block: bool, stop: threading.Event, out: dict[str, Any]) -> None:
    flags = os.O_RDWR if block else os.O_WRONLY | os.O_CREAT | os.O_APPEND
    fd = os.open(path if block else os.path.join(path, "log"), flags, 0o644)
    last, i = time.monotonic(), 0
    try:
        while not stop.is_set():
            try:
                if block:
                    os.pwrite(fd, b"y" * 4096, (i % 4096) * 4096)
                else:
                    os.write(fd, b"x" * 4096)
                os.fsync(fd)
                i += 1
            except OSError as exc:
                out["errors"].append(str(exc))
            now = time.monotonic()
            out["longest_gap_s"] = max(out["longest_gap_s"], now - last)
            last = now
    finally:
        os.close(fd)
        out["writes"] = i


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restarts", type=int, default=5)
    args = ap.parse_args()
    node = Node()
    try:
        node.start_mounter()
        node.start_plugin()
        fs_vid, _, fs_target = node.publish("fsvol", block=False)
        blk_vid, _, blk_target = node.publish("blkvol", block=True)
        stop = threading.Event()
        results: dict[str, dict[str, Any]] = {
            k: {"errors": [], "longest_gap_s": 0.0, "writes": 0} for k in ("fs", "blk")
        }
        threads = [
            threading.Thread(target=_writer, args=(fs_target, False, stop, results["fs"])),
            threading.Thread(target=_writer, args=(blk_target, True, stop, results["blk"])),
        ]
        for t in threads:
            t.start()
        restarts = []
        for _ in range(args.restarts):
            node.kill_plugin()
            t0 = time.monotonic()
            node.start_plugin()
            t1 = time.monotonic()
            while not (node.healthy(fs_vid, fs_target) and node.healthy(blk_vid, blk_target)):
                time.sleep(0.02)
            t2 = time.monotonic()
            restarts.append({"to_serving_s": round(t1 - t0, 3), "to_healthy_s": round(t2 - t0, 3)})
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        for r in results.values():
            r["longest_gap_s"] = round(r["longest_gap_s"], 3)
        print(json.dumps({"restarts": restarts, "writers": results}, indent=2))
        return 0
    finally:
        problems = node.close()
        if problems:
            print(json.dumps({"cleanup_problems": problems}))


if __name__ == "__main__":
    raise SystemExit(main())
