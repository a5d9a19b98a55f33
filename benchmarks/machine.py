"""What every benchmark records about the machine it ran on.

One description for all benchmarks, so results compare field by field: cores, CPU
model, kernel, Python, memory, the UTC date, the work directory (and whether it is on
the repository's disk, the disk the plain-directory reference uses) and the load
average at the start. Each benchmark adds its own fields (tool versions, options).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def describe(work: Path, **extra: Any) -> dict[str, Any]:
    """The machine, the work directory and the load now; ``extra`` fields appended."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_bytes": memory_bytes(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "work_dir": str(work),
        "work_dir_on_repo_disk": work.stat().st_dev == REPO.stat().st_dev,
        "loadavg_start": list(os.getloadavg()),
        **extra,
    }
