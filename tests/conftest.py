"""Test-suite rules shared by every layer.

Tests marked ``needs_fuse`` or ``needs_loop`` use the real kernel parts. They
skip only where the machine truly lacks them; if any of them is skipped on a
machine that has them (or in CI, where the machine must have them) the run fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from blockstore import Store

# CI runs the property tests with a fixed seed, so a landing is judged on the same
# examples every time; local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


def machine_has_fuse() -> bool:
    return os.path.exists("/dev/fuse") and os.geteuid() == 0 and bool(shutil.which("fusermount3"))


def machine_has_loop() -> bool:
    return (
        os.path.exists("/dev/loop-control") and os.geteuid() == 0 and bool(shutil.which("losetup"))
    )


_PRIVILEGED = {"needs_fuse": machine_has_fuse, "needs_loop": machine_has_loop}
_skipped_privileged: list[str] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, available in _PRIVILEGED.items():
        if item.get_closest_marker(marker) and not available():
            pytest.skip(f"{marker}: this machine lacks it")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        for marker in _PRIVILEGED:
            if item.get_closest_marker(marker):
                _skipped_privileged.append(f"{item.nodeid} ({marker})")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _skipped_privileged:
        return
    must_run = os.environ.get("CI") == "true" or any(f() for f in _PRIVILEGED.values())
    if must_run:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = "privileged tests were skipped on a machine that must run them:\n  " + "\n  ".join(
            _skipped_privileged
        )
        if tr is not None:
            tr.write_line(msg, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def _flip_stored_byte(store: Store, digest: bytes) -> None:
    path, offset, length = store.locate_chunk(digest)
    with open(path, "r+b") as f:
        f.seek(offset + length - 1)
        last = f.read(1)[0]
        f.seek(offset + length - 1)
        f.write(bytes((last ^ 0xFF,)))


@pytest.fixture
def flip_stored_byte() -> Callable[[Store, bytes], None]:
    """Damage a chunk behind the store's back: flip the last byte of its stored record."""
    return _flip_stored_byte
