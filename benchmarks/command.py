"""The command line both benchmarks share: sizes, where results go, where work happens.

``parse`` checks the arguments the same way for every benchmark: ``--out`` must name
a ``.json`` file (or a path where one can be created), and the plot defaults to the
same name with ``.png``. Argument errors exit with argparse's usage message.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchArgs:
    quick: bool
    out: Path
    plot: Path
    tmp_dir: Path

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


def parse(
    argv: Sequence[str] | None,
    *,
    prog: str,
    doc: str,
    default_out: Path,
    default_tmp: Path,
    quick_help: str,
    tmp_help: str,
) -> BenchArgs:
    """Parse a benchmark's arguments (and set warnings-only logging)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=default_out, help="JSON results file")
    parser.add_argument(
        "--plot", type=Path, default=None, help="PNG plot (default: --out with .png)"
    )
    parser.add_argument("--tmp-dir", type=Path, default=default_tmp, help=tmp_help)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.out.suffix != ".json":
        parser.error(f"--out must name a .json file, not {str(args.out)!r}")
    if args.out.exists() and not args.out.is_file():
        parser.error(f"--out {str(args.out)!r} exists and is not a file")
    return BenchArgs(args.quick, args.out, args.plot or args.out.with_suffix(".png"), args.tmp_dir)
