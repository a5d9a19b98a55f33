"""``python -m fusedrive``: the same command line as the ``fusedrive`` script."""

from __future__ import annotations

import sys

from fusedrive.cli import main

if __name__ == "__main__":
    sys.exit(main())
