# Entry points: `make demo` and `make test` (see README.md). Both set up what they need.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp

.PHONY: setup demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml scripts/install-system-deps
	scripts/install-system-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m csi_frontend.demo

demo-store: setup
	$(PY) -m blockstore.demo

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy blockstore fusedrive csi_frontend

pytest: setup
	$(PY) -m pytest -q

test: lint typecheck pytest

# Everything but fio (about 20 minutes on 2 cores; needs root, /dev/fuse, loop devices):
# the store alone, then snapshot/restore/clone through CSI against hostpath (tar, cp,
# dd) and btrfs, busy-volume snapshots, lineage, scale and space; then REPORT.md and
# its plots in benchmarks/results/ (with the latest fio.json).
bench: setup
	$(PY) -m benchmarks.store_bench
	$(PY) -m benchmarks.csi_bench
	$(PY) -m benchmarks.report

# A smaller csi_bench (a few minutes), results and report in benchmarks/results/quick/.
.PHONY: bench-quick
bench-quick: setup
	$(PY) -m benchmarks.csi_bench --quick --out benchmarks/results/quick/csi.json
	$(PY) -m benchmarks.report --csi benchmarks/results/quick/csi.json \
		--out benchmarks/results/quick/REPORT.md

# fio through a fusedrive mount, a plain directory and memfs (needs root, /dev/fuse, fio).
.PHONY: bench-fio
bench-fio: setup
	$(PY) -m benchmarks.fio_bench

# PostgreSQL pgbench (scale 10, 4 clients, 30 s, fsync on) on a fusedrive volume and a
# plain directory, interleaved rounds (needs root, /dev/fuse, Debian postgresql; ~6 min).
.PHONY: bench-pg
bench-pg: setup
	$(PY) -m benchmarks.pg_bench

# Issue 18's whole table in one run (needs root, /dev/fuse, loop devices, fio, Debian
# postgresql, rsync; ~20 min on 2 cores): PostgreSQL, fio, small files, SQLite, tar x and
# rsync, block volumes (ext4 on a loop device) and daemon memory, fusedrive vs a plain
# directory, trials interleaved. benchmarks/results/datapath.json, DATAPATH.md, datapath.png.
# `python -m benchmarks.datapath_bench --quick`: small sizes, under 2 minutes, results in
# benchmarks/results/quick/.
.PHONY: bench-datapath
bench-datapath: setup
	$(PY) -m benchmarks.datapath_bench

# Regenerates csi_frontend/proto/csi_pb2*.py(i) from csi.proto.
.PHONY: proto
proto: setup
	PYTHON=$(PY) scripts/gen-proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
