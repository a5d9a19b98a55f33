"""The ``fusedrive`` command line against a real store in a temporary directory.

Most tests call ``main(argv)`` in this process and read what it printed; a few run
``python -m fusedrive`` as a subprocess, as a user would (the mount test must: the
daemon it starts has to outlive the command that started it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockstore import ChunkRef, Store
from fusedrive import cli
from fusedrive.daemon import process_starttime
from fusedrive.units import SizeError, format_size, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "run"
    monkeypatch.setenv("FUSEDRIVE_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def fd(store_dir: Path, runtime: Path, capsys: pytest.CaptureFixture[str]):
    """Run the command line in-process against the test's store."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            code = cli.main(["--store", str(store_dir), *args])
        except SystemExit as exc:  # argparse: --help and usage errors
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def assert_clean_error(res: Result, code: int, *fragments: str) -> None:
    assert res.code == code, res
    assert "Traceback" not in res.err
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusedrive: error: "), res.err
    for fragment in fragments:
        assert fragment in lines[0]


# -- human sizes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("10GiB", 10 * GiB),
        ("512MiB", 512 * MiB),
        ("1G", 10**9),
        ("1GB", 10**9),
        ("2k", 2000),
        ("1.5GiB", 3 * GiB // 2),
        ("1 KiB", KiB),
        (" 7 ", 7),
        ("3kib", 3 * KiB),
        ("1Ti", TiB),
        ("16B", 16),
        ("1EiB", 1 << 60),
        (".5KiB", 512),
        ("0.1KiB", 103),  # a fraction of a byte rounds up: a capacity is never cut short
        ("1.1KiB", 1127),
        ("2.0", 2),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "-1", "-5GiB", "ten", "10XB", "1e9", "1,000", "GiB", "1.2.3", "nan", "1_0"]
)
def test_parse_size_rejects_garbage_with_a_clear_message(text: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)
    if text.startswith("-"):
        assert "negative" in str(info.value)


@pytest.mark.parametrize("text", ["1.5", "0.5", ".5", "1.5B"])
def test_parse_size_refuses_a_fraction_of_a_byte(text: str) -> None:
    """``--size 1.5`` made a 2-byte volume: a size without a unit is whole bytes."""
    with pytest.raises(SizeError, match=r"must be whole.*add a unit, e\.g\. .*GiB"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (10 * GiB, "10 GiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (GiB + 1, "1 GiB"),
        (1 << 60, "1 EiB"),
        (1 << 62, "4 EiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@given(st.integers(0, 1 << 62))
def test_size_round_trips(n: int) -> None:
    assert parse_size(str(n)) == n
    back = parse_size(format_size(n))
    # Two decimals in the display unit: within half a percent.
    assert abs(back - n) <= n * 0.005 + 1


@given(st.integers(1, 1023), st.integers(0, 6))
def test_whole_display_units_round_trip_exactly(k: int, power: int) -> None:
    n = k * 1024**power
    assert parse_size(format_size(n)) == n


# -- volumes -------------------------------------------------------------------------


def test_volume_lifecycle(fd) -> None:
    res = fd("volume", "create", "v1", "--size", "10GiB", "--param", "compression_level=5")
    assert res.code == 0 and "created volume 'v1' (10 GiB, filesystem)" in res.out
    assert fd("volume", "create", "v2", "--size", "1G", "--mode", "block").code == 0

    res = fd("--json", "volume", "list")
    vols = {v["name"]: v for v in res.json()}
    assert vols["v1"]["capacity"] == 10 * GiB and vols["v1"]["parameters"] == {
        "compression_level": "5"
    }
    assert vols["v2"]["capacity"] == 10**9 and vols["v2"]["mode"] == "block"
    assert vols["v1"]["used"] == 0 and vols["v1"]["mountpoints"] == []

    human = fd("volume", "list")
    assert human.code == 0 and "10 GiB" in human.out and "v2" in human.out

    res = fd("volume", "expand", "v1", "--size", "20GiB", "--json")
    assert res.code == 0 and res.json()["capacity"] == 20 * GiB
    assert_clean_error(fd("volume", "expand", "v1", "--size", "1GiB"), 8, "shrinking")

    assert fd("volume", "delete", "v1").code == 0
    assert [v["name"] for v in fd("volume", "list", "--json").json()] == ["v2"]
    assert_clean_error(fd("volume", "delete", "v1"), 3, "volume 'v1' not found")


def test_exit_codes_for_bad_input(fd, tmp_path: Path) -> None:
    assert_clean_error(fd("volume", "list"), 3, "no store at")
    assert fd("volume", "create", "v", "--size", "1MiB").code == 0
    assert_clean_error(fd("volume", "create", "v", "--size", "1MiB"), 4, "already exists")
    assert_clean_error(fd("volume", "create", "w", "--size", "ten"), 8, "invalid size 'ten'")
    assert_clean_error(fd("volume", "create", "w", "--size=-1GiB"), 8, "negative")
    assert_clean_error(fd("volume", "create", "w", "--size", "0"), 8, "larger than zero")
    assert_clean_error(fd("volume", "create", "a/b", "--size", "1MiB"), 8, "invalid volume name")
    assert_clean_error(
        fd("volume", "create", "w", "--size", "1MiB", "--param", "x"), 8, "KEY=VALUE"
    )
    assert_clean_error(fd("volume", "expand", "nope", "--size", "1G"), 3, "'nope'")
    assert_clean_error(fd("snapshot", "create", "nope", "s"), 3, "'nope'")
    assert_clean_error(fd("snapshot", "delete", "nope"), 3, "'nope'")
    assert_clean_error(fd("clone", "nope", "c"), 3, "no volume or snapshot named 'nope'")
    assert_clean_error(fd("mount", "nope", str(tmp_path)), 3, "'nope'")
    missing = tmp_path / "missing"
    assert_clean_error(fd("mount", "v", str(missing)), 7, "does not exist", f"mkdir {missing}")
    assert_clean_error(fd("umount", str(tmp_path)), 7, "not a fusedrive mount")
    # Usage errors are argparse's: exit 2 with the usage line.
    for argv in (["volume"], ["volume", "create", "x"], ["frobnicate"], ["volume", "list", "-x"]):
        res = fd(*argv)
        assert res.code == 2 and "usage:" in res.err and "Traceback" not in res.err


def test_store_is_created_only_by_volume_create(fd, store_dir: Path) -> None:
    assert fd("stats").code == 3 and fd("gc").code == 3 and fd("fsck").code == 3
    assert not store_dir.exists()
    assert fd("volume", "create", "v", "--size", "1MiB").code == 0
    assert (store_dir / "data.mdb").exists()


# -- snapshots and clones ------------------------------------------------------------------


def _write_chunks(store_dir: Path, volume: str, chunks: dict[bytes, bytes]) -> None:
    with Store(store_dir) as store:
        v = store.volume(volume)
        for key, data in chunks.items():
            v.put_chunk(key, data)


def test_snapshots_and_clones_from_both_kinds(fd, store_dir: Path) -> None:
    assert fd("volume", "create", "v", "--size", "16MiB").code == 0
    data = os.urandom(64 * KiB)
    _write_chunks(store_dir, "v", {b"c0": data})

    res = fd("snapshot", "create", "v", "s", "--json")
    assert res.code == 0 and res.json()["volume"] == "v" and res.json()["size"] == 64 * KiB
    assert_clean_error(fd("snapshot", "create", "v", "s"), 4, "already exists")
    _write_chunks(store_dir, "v", {b"c1": os.urandom(64 * KiB)})
    assert fd("volume", "create", "other", "--size", "1MiB").code == 0
    assert fd("snapshot", "create", "other", "o").code == 0

    assert [s["name"] for s in fd("snapshot", "list", "--json").json()] == ["o", "s"]
    assert [s["name"] for s in fd("snapshot", "list", "--volume", "v", "--json").json()] == ["s"]

    res = fd("clone", "s", "from-snap", "--json")
    assert res.code == 0 and res.json()["source"] == "snapshot:s"
    res = fd("clone", "v", "from-vol", "--size", "32MiB", "--json")
    assert res.code == 0 and res.json()["source"] == "volume:v"
    assert res.json()["capacity"] == 32 * MiB
    assert_clean_error(fd("clone", "v", "from-vol"), 4, "already exists")
    assert_clean_error(fd("clone", "s", "small", "--size", "1MiB"), 8)

    with Store(store_dir) as store:
        assert store.volume("from-snap").read_chunk(b"c0") == data
        assert store.volume("from-snap").get(b"c1") is None
        assert store.volume("from-vol").get(b"c1") is not None

    assert fd("snapshot", "delete", "s").code == 0
    assert [s["name"] for s in fd("snapshot", "list", "--json").json()] == ["o"]
    # The clone outlives its snapshot.
    with Store(store_dir) as store:
        assert store.volume("from-snap").read_chunk(b"c0") == data


def test_volumes_and_snapshots_share_one_namespace(fd, store_dir: Path) -> None:
    """A name means one thing to `mount NAME` and `clone NAME`: the other kind cannot take it."""
    assert fd("volume", "create", "dup", "--size", "1MiB").code == 0
    assert fd("volume", "create", "v", "--size", "1MiB").code == 0
    _write_chunks(store_dir, "v", {b"k": os.urandom(4096)})
    taken = "a volume has that name (volumes and snapshots share one namespace)"
    assert_clean_error(fd("snapshot", "create", "v", "dup"), 4, "snapshot 'dup'", taken)
    assert fd("snapshot", "create", "v", "s").code == 0
    taken = "a snapshot has that name"
    assert_clean_error(fd("volume", "create", "s", "--size", "1MiB"), 4, "volume 's'", taken)
    assert_clean_error(fd("clone", "v", "s"), 4, taken)
    assert [s["name"] for s in fd("snapshot", "list", "--json").json()] == ["s"]

    # Explicit kinds still work, and say so when the name is the other kind.
    res = fd("clone", "s", "c1", "--from-snapshot", "--json")
    assert res.code == 0 and res.json()["source"] == "snapshot:s" and res.json()["used"] == 4096
    res = fd("clone", "dup", "c2", "--from-volume", "--json")
    assert res.code == 0 and res.json()["source"] == "volume:dup" and res.json()["used"] == 0
    assert_clean_error(fd("clone", "s", "c3", "--from-volume"), 3, "volume 's' not found")
    assert fd("clone", "dup", "c3", "--from-volume", "--from-snapshot").code == 2


def test_volume_parameters_are_checked_with_the_shared_rules(fd) -> None:
    """`--param` follows fusedrive.parameters: clear message, exit 8, nothing created."""
    bad = {
        "compression_level=99": "compression_level must be an integer from 0",
        "chunk_size=3": "chunk_size must be a power of two from 4KiB to 4MiB",
        "chunk_size=12288": "chunk_size must be a power of two",
        "root_mode=rwx": "root_mode must be octal permissions",
        "chunksize=65536": "unknown parameter 'chunksize' (known parameters: chunk_size,",
    }
    for param, message in bad.items():
        res = fd("volume", "create", "v", "--size", "1MiB", "--param", param)
        assert_clean_error(res, 8, message)
    assert fd("volume", "create", "ok", "--size", "1MiB").code == 0
    assert_clean_error(fd("clone", "ok", "c", "--param", "compression_level=23"), 8, "0 (no")
    assert [v["name"] for v in fd("volume", "list", "--json").json()] == ["ok"]
    # Units are accepted and stored in bytes, which is what the daemon reads.
    res = fd("volume", "create", "v", "--size", "1MiB", "--param", "chunk_size=1MiB", "--json")
    assert res.code == 0 and res.json()["parameters"] == {"chunk_size": str(MiB)}
    res = fd("volume", "create", "--help")
    assert "chunk_size: a power of two" in res.out and "default 64KiB" in res.out


def test_sizes_need_a_unit_or_a_whole_mebibyte(fd) -> None:
    """`--size 1.5` made a 2-byte volume; now refused, as is anything below 1 MiB."""
    assert_clean_error(fd("volume", "create", "v", "--size", "1.5"), 8, "add a unit")
    assert_clean_error(fd("volume", "create", "v", "--size", "4096"), 8, "at least 1 MiB")
    assert_clean_error(fd("volume", "create", "v", "--size", "1M"), 8, "at least 1 MiB")
    assert fd("volume", "create", "v", "--size", "1MiB").code == 0
    assert_clean_error(fd("volume", "expand", "v", "--size", "2"), 8, "at least 1 MiB")
    assert fd("volume", "list", "--json").json()[0]["capacity"] == MiB


def test_a_volume_larger_than_the_free_disk_is_created_with_a_warning(fd, store_dir: Path) -> None:
    res = fd("volume", "create", "small", "--size", "1MiB")
    assert res.code == 0 and "warning" not in res.err
    res = fd("volume", "create", "huge", "--size", "1EiB")
    assert res.code == 0 and "created volume 'huge' (1 EiB" in res.out
    assert "fusedrive: warning: volume 'huge' (1 EiB) is larger than the free space" in res.err
    assert "thin-provisioned" in res.err
    res = fd("volume", "expand", "small", "--size", "2EiB")
    assert res.code == 0 and "thin-provisioned" in res.err


def test_mount_help_hides_the_internal_ready_fd(fd) -> None:
    res = fd("mount", "--help")
    assert (
        res.code == 0 and "--ready-fd" not in res.out and "an existing, empty directory" in res.out
    )


# -- gc, fsck, stats -----------------------------------------------------------------------


def test_fsck_clean_then_corrupt_chunk(
    fd, store_dir: Path, flip_stored_byte: Callable[[Store, bytes], None]
) -> None:
    assert fd("volume", "create", "v", "--size", "1MiB").code == 0
    _write_chunks(store_dir, "v", {b"a": os.urandom(8192), b"b": os.urandom(8192)})
    res = fd("fsck")
    assert res.code == 0 and "clean" in res.out
    assert fd("fsck", "--json").json()["clean"] is True

    with Store(store_dir) as store:
        ref = store.volume("v").get(b"a")
        assert isinstance(ref, ChunkRef)
        flip_stored_byte(store, ref.digest)

    res = fd("fsck", "--json")
    assert res.code == 6
    report = res.json()
    assert report["clean"] is False and report["unfixable"] and report["problems_remaining"] >= 1
    # A corrupt chunk cannot be repaired without inventing data: still exit 6.
    res = fd("fsck", "--repair")
    assert res.code == 6 and "unfixable" in res.out


def test_fsck_repair_fixes_what_it_can(fd, store_dir: Path) -> None:
    assert fd("volume", "create", "v", "--size", "1MiB").code == 0
    _write_chunks(store_dir, "v", {b"a": os.urandom(8192)})
    with Store(store_dir) as store, store.env.begin(write=True) as txn:
        txn.put(b"chunk_count", (7).to_bytes(8, "big"), db=store.dbs.meta)
    res = fd("fsck")
    assert res.code == 6 and "counter chunk_count" in res.out and "--repair" in res.out
    res = fd("fsck", "--repair", "--json")
    assert res.code == 0 and res.json()["repaired"] >= 1
    assert fd("fsck").code == 0


def test_stats_json_and_table(fd, store_dir: Path) -> None:
    assert fd("volume", "create", "v", "--size", "4MiB").code == 0
    assert fd("volume", "create", "w", "--size", "4MiB").code == 0
    same = os.urandom(64 * KiB)
    _write_chunks(store_dir, "v", {b"a": same, b"b": same})
    assert fd("snapshot", "create", "v", "s").code == 0

    stats = fd("stats", "--json").json()
    for key in (
        "store",
        "chunk_count",
        "unique_raw_bytes",
        "stored_bytes",
        "referenced_raw_bytes",
        "logical_used_bytes",
        "dedup_ratio",
        "compression_ratio",
        "gc_pending_layers",
        "disk_free_bytes",
        "volumes",
        "snapshots",
        "per_volume",
    ):
        assert key in stats, key
    assert stats["chunk_count"] == 1 and stats["dedup_ratio"] == 2.0
    assert stats["chunk_hash"] == "blake3"
    assert stats["volumes"] == 2 and stats["snapshots"] == 1
    per = {v["name"]: v for v in stats["per_volume"]}
    assert per["v"]["used"] == 128 * KiB and per["v"]["snapshots"] == 1
    assert per["w"] == {
        "name": "w",
        "mode": "filesystem",
        "capacity": 4 * MiB,
        "used": 0,
        "snapshots": 0,
    }

    res = fd("stats")
    assert res.code == 0 and "dedup ratio" in res.out and "2.00x" in res.out
    assert "chunk hash" in res.out and "blake3" in res.out


def test_gc_releases_deleted_volumes(fd, store_dir: Path) -> None:
    assert fd("volume", "create", "v", "--size", "4MiB").code == 0
    _write_chunks(store_dir, "v", {b"c%d" % i: os.urandom(4096) for i in range(20)})
    assert fd("snapshot", "create", "v", "s").code == 0
    res = fd("volume", "delete", "v", "--json")
    # The snapshot still holds the data: nothing to release but the old head.
    assert res.code == 0
    assert fd("snapshot", "delete", "s").code == 0
    assert fd("stats", "--json").json()["gc_pending_layers"] >= 1

    res = fd("gc", "--json")
    assert res.code == 0
    out = res.json()
    assert out["chunks_freed"] == 20 and out["layers_released"] >= 2
    assert out["gc_pending_layers"] == 0
    after = fd("stats", "--json").json()
    assert after["chunk_count"] == 0 and after["stored_bytes"] == 0
    assert fd("fsck").code == 0
    res = fd("gc")
    assert res.code == 0 and "released 0 layers" in res.out


# -- help and the error table ----------------------------------------------------------------


HELP_COMMANDS = [
    [],
    ["volume"],
    ["volume", "create"],
    ["volume", "list"],
    ["volume", "delete"],
    ["volume", "expand"],
    ["snapshot"],
    ["snapshot", "create"],
    ["snapshot", "list"],
    ["snapshot", "delete"],
    ["clone"],
    ["mount"],
    ["umount"],
    ["gc"],
    ["fsck"],
    ["stats"],
]


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=lambda a: " ".join(a) or "top")
def test_help_everywhere(fd, argv: list[str]) -> None:
    res = fd(*argv, "--help")
    assert res.code == 0 and "usage: fusedrive" in res.out


def test_exit_codes_are_documented() -> None:
    top = cli.build_parser().format_help()
    assert cli.__doc__ is not None
    for code, text in cli.EXIT_CODES.items():
        assert f"{code:>3}  {text}" in top
        assert f"{code}  {text}" in cli.__doc__
    # Distinct codes for the distinct failures.
    assert len(set(cli.EXIT_CODES)) == len(cli.EXIT_CODES)


def test_unexpected_errors_are_one_line(fd, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fd("volume", "create", "v", "--size", "1MiB").code == 0

    def broken(self: Store) -> list[object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(Store, "list_volumes", broken)
    assert_clean_error(fd("volume", "list"), 1, "internal error", "boom")


def test_python_dash_m_and_env_store(store_dir: Path, runtime: Path) -> None:
    env = {**os.environ, "FUSEDRIVE_STORE": str(store_dir)}
    py = [sys.executable, "-m", "fusedrive"]
    res = subprocess.run(
        [*py, "volume", "create", "v", "--size", "1GiB"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run([*py, "volume", "list", "--json"], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)[0]["capacity"] == GiB
    res = subprocess.run([*py, "volume", "delete", "nope"], env=env, capture_output=True, text=True)
    assert res.returncode == 3 and res.stderr == "fusedrive: error: volume 'nope' not found\n"


# -- mount and umount through a real FUSE mount ----------------------------------------------


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _alive(pid: int) -> bool:
    return process_starttime(pid) is not None


@pytest.fixture
def daemons(runtime: Path) -> Iterator[dict[str, object]]:
    """Tracks mount points and daemon PIDs; unmounts and kills whatever a test leaves."""
    state: dict[str, object] = {"mountpoints": [], "pids": []}
    try:
        yield state
    finally:
        for mp in state["mountpoints"]:  # type: ignore[attr-defined]
            if _mounted(mp):
                subprocess.run(["fusermount3", "-uz", str(mp)], check=False)
        pids = set(state["pids"])  # type: ignore[call-overload]
        for rec in runtime.glob("*.json"):
            pids.add(json.loads(rec.read_text())["pid"])
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for log in runtime.glob("*.log"):
            print(f"--- {log.name}\n{log.read_text()}")


def _run(store_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusedrive", "--store", str(store_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.needs_fuse
def test_mount_write_umount_remount(store_dir: Path, tmp_path: Path, daemons) -> None:
    mnt, snap_mnt = tmp_path / "mnt", tmp_path / "snap"
    mnt.mkdir()
    snap_mnt.mkdir()
    daemons["mountpoints"] += [mnt, snap_mnt]
    assert _run(store_dir, "volume", "create", "v", "--size", "64MiB").returncode == 0

    res = _run(store_dir, "mount", "v", str(mnt), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    pid = info["pid"]
    daemons["pids"].append(pid)
    assert _mounted(mnt) and _alive(pid)
    # The mount command returned only once the mount was live.
    payload = os.urandom(300 * KiB)
    (mnt / "hello.bin").write_bytes(payload)
    (mnt / "dir").mkdir()
    (mnt / "dir" / "note.txt").write_text("kept\n")

    res = _run(store_dir, "mount", "v", str(mnt))
    assert res.returncode == 7 and "already mounted" in res.stderr
    listed = json.loads(_run(store_dir, "volume", "list", "--json").stdout)
    assert listed[0]["mountpoints"] == [str(mnt)]
    res = _run(store_dir, "volume", "delete", "v")
    assert res.returncode == 7 and "is mounted at" in res.stderr

    # A snapshot of the mounted volume holds what was written (the mount is flushed first).
    res = _run(store_dir, "snapshot", "create", "v", "s")
    assert res.returncode == 0, res.stderr
    res = _run(store_dir, "mount", "s", str(snap_mnt), "--json")
    assert res.returncode == 0, res.stderr
    snap_info = json.loads(res.stdout)
    daemons["pids"].append(snap_info["pid"])
    assert snap_info["read_only"] is True and snap_info["kind"] == "snapshot"
    assert (snap_mnt / "hello.bin").read_bytes() == payload
    with pytest.raises(OSError):
        (snap_mnt / "new").write_text("x")
    assert _run(store_dir, "umount", str(snap_mnt)).returncode == 0

    res = _run(store_dir, "umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert not _mounted(mnt)
    # umount returns only after the daemon has flushed and exited.
    assert not _alive(pid)
    assert _run(store_dir, "umount", str(mnt)).returncode == 7
    assert _run(store_dir, "fsck").returncode == 0

    res = _run(store_dir, "mount", "v", str(mnt), "--json")
    assert res.returncode == 0, res.stderr
    pid2 = json.loads(res.stdout)["pid"]
    daemons["pids"].append(pid2)
    assert (mnt / "hello.bin").read_bytes() == payload
    assert (mnt / "dir" / "note.txt").read_text() == "kept\n"
    assert _run(store_dir, "umount", str(mnt)).returncode == 0
    assert not _alive(pid2) and not _mounted(mnt)


@pytest.mark.needs_fuse
def test_umount_of_a_dead_mount(store_dir: Path, tmp_path: Path, daemons) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemons["mountpoints"].append(mnt)
    assert _run(store_dir, "volume", "create", "v", "--size", "64MiB").returncode == 0
    res = _run(store_dir, "mount", "v", str(mnt), "--json")
    assert res.returncode == 0, res.stderr
    pid = json.loads(res.stdout)["pid"]
    daemons["pids"].append(pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    # The kernel still lists the mount, but it answers ENOTCONN; umount detaches it lazily.
    assert _mounted(mnt)
    res = _run(store_dir, "umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert not _mounted(mnt)
    assert _run(store_dir, "fsck").returncode == 0


@pytest.mark.needs_fuse
def test_expand_reaches_a_live_mount_and_a_clean_umount_leaves_no_log(
    store_dir: Path, tmp_path: Path, runtime: Path, daemons
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemons["mountpoints"].append(mnt)
    assert _run(store_dir, "volume", "create", "v", "--size", "64MiB").returncode == 0
    res = _run(store_dir, "mount", "v", str(mnt), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    daemons["pids"].append(info["pid"])
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 64 * MiB
    assert Path(info["log"]).exists()

    res = _run(store_dir, "volume", "expand", "v", "--size", "1GiB")
    assert res.returncode == 0, res.stderr
    st = os.statvfs(mnt)  # no remount: `expand` asked the mount to pick it up
    assert st.f_blocks * st.f_frsize == GiB

    res = _run(store_dir, "umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert not Path(info["log"]).exists()
    assert list(runtime.glob("*.log")) == [] and list(runtime.glob("*.json")) == []


@pytest.mark.needs_fuse
def test_mount_of_a_record_with_a_bad_parameter_fails_clearly(
    store_dir: Path, tmp_path: Path, runtime: Path, daemons
) -> None:
    """The store takes any parameter (tests force bad ones); the daemon refuses to serve it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemons["mountpoints"].append(mnt)
    with Store(store_dir) as store:
        store.create_volume("v", 64 * MiB, parameters={"compression_level": "99"})
    res = _run(store_dir, "mount", "v", str(mnt))
    assert res.returncode == 7, res.stderr  # the mount failed
    assert "volume 'v': invalid parameter compression_level='99'" in res.stderr
    assert "compression_level must be an integer from 0 (no compression) to 22" in res.stderr
    assert "Traceback" not in res.stderr
    assert not _mounted(mnt)
    assert len(list(runtime.glob("*.log"))) == 1  # a failed daemon keeps its log
