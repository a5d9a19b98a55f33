"""The store at work: create, write, snapshot, clone, read back, stats.

``make demo`` runs this until the CSI driver's lifecycle demo replaces it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from . import Store, fsck

MiB = 1 << 20


def main() -> None:
    console = Console()
    table = Table(title="blockstore demo")
    table.add_column("step")
    table.add_column("result")
    table.add_column("time", justify="right")

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        table.add_row(name, str(out), f"{(time.perf_counter() - t0) * 1000:.2f} ms")
        return out

    with tempfile.TemporaryDirectory(prefix="fusedrive-demo-") as tmp, Store(tmp + "/store") as s:
        step("create volume v1 (256 MiB)", lambda: s.create_volume("v1", 256 * MiB).name)
        v1 = s.volume("v1")
        text = b"".join(b"line %d of a text-like file\n" % i for i in range(200_000))
        chunks = [text[i : i + 64 * 1024] for i in range(0, len(text), 64 * 1024)]
        noise = [os.urandom(64 * 1024) for _ in range(64)]

        def write_all() -> str:
            with v1.batch() as b:
                for i, c in enumerate(chunks + noise):
                    b.put_chunk(b"data/%06d" % i, s.prepare_chunk(c))
                b.put(b"meta/name", b"first version")
            return f"{len(chunks) + len(noise)} chunks, {s.get_volume('v1').used / MiB:.1f} MiB"

        step("write text-like + random data", write_all)
        step("snapshot v1 -> s1", lambda: s.create_snapshot("v1", "s1").name)
        step("overwrite meta/name in v1", lambda: v1.put(b"meta/name", b"second version"))
        step("clone s1 -> c1", lambda: s.clone_snapshot("s1", "c1").name)
        step("clone live v1 -> c2", lambda: s.clone_volume("v1", "c2").name)
        step("read meta/name in c1", lambda: s.volume("c1").get(b"meta/name"))
        step("read meta/name in c2", lambda: s.volume("c2").get(b"meta/name"))
        step(
            "c1 data equals v1 data",
            lambda: all(
                s.volume("c1").read_chunk(b"data/%06d" % i) == v1.read_chunk(b"data/%06d" % i)
                for i in range(len(chunks) + len(noise))
            ),
        )
        st = s.stats()
        step(
            "space",
            lambda: (
                f"{st.chunk_count} chunks, logical {st.logical_used_bytes / MiB:.1f} MiB, "
                f"stored {st.stored_bytes / MiB:.1f} MiB, dedup {st.dedup_ratio:.2f}x, "
                f"compression {st.compression_ratio:.2f}x"
            ),
        )
        step("fsck", lambda: "clean" if fsck(s).clean else "PROBLEMS")

        def delete_all() -> str:
            for n in ("v1", "c1", "c2"):
                s.delete_volume(n)
            s.delete_snapshot("s1")
            s.gc()
            after = s.stats()
            return f"{after.chunk_count} chunks, {after.entries} entries left"

        step("delete everything + gc", delete_all)
    console.print(table)


if __name__ == "__main__":
    main()
