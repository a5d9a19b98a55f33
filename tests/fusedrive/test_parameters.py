"""Volume parameters: one set of rules (``fusedrive.parameters``), refused clearly everywhere.

The command line and CSI sides are tested in ``test_cli.py`` and ``tests/csi``; here
the rules themselves, and a daemon handed a record that breaks them.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockstore import InvalidArgument, Store
from fusedrive import Filesystem, FsError
from fusedrive import parameters as P

MiB = 1 << 20


@pytest.mark.parametrize(
    ("key", "raw", "rule"),
    [
        ("compression_level", "99", "from 0 (no compression) to 22"),
        ("compression_level", "-1", "from 0"),
        ("compression_level", "high", "an integer"),
        ("chunk_size", "3", "power of two"),
        ("chunk_size", "12288", "power of two"),
        ("chunk_size", "8MiB", "to 4MiB"),
        ("chunk_size", "1.5", "power of two"),
        ("root_mode", "999", "octal"),
        ("root_mode", "17777", "octal"),
        ("root_uid", "4294967295", "user id"),
    ],
)
def test_a_value_breaking_its_rule_is_refused_naming_parameter_and_rule(
    key: str, raw: str, rule: str
) -> None:
    with pytest.raises(P.ParameterError) as info:
        P.check({key: raw})
    assert isinstance(info.value, InvalidArgument)
    assert key in str(info.value) and rule in str(info.value) and repr(raw) in str(info.value)


def test_unknown_and_immutable_keys_are_refused_with_the_known_names() -> None:
    with pytest.raises(P.ParameterError, match=r"unknown parameter 'chunksize'.*chunk_size"):
        P.check({"chunksize": "65536"})
    with pytest.raises(P.ParameterError, match=r"'chunk_size' cannot be changed.*compression"):
        P.check({"chunk_size": "65536"}, P.MUTABLE)
    assert P.check({"csi.storage.k8s.io/pvc/name": "x"}, ignore_sidecar=True) == {}


def test_values_are_stored_in_canonical_form() -> None:
    assert P.check({"chunk_size": "1MiB", "root_mode": "700", "compression_level": "07"}) == {
        "chunk_size": "1048576",
        "root_mode": "0700",
        "compression_level": "7",
    }


@given(st.integers(12, 22), st.sampled_from(["", "B", "KiB", "MiB"]))
def test_every_allowed_chunk_size_round_trips(exp: int, unit: str) -> None:
    n = 1 << exp
    scale = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20}[unit]
    if n % scale:
        return
    canon = P.check({"chunk_size": f"{n // scale}{unit}"})["chunk_size"]
    assert int(canon) == n and P.check({"chunk_size": canon})["chunk_size"] == canon


@given(st.integers(0, 22))
def test_every_allowed_compression_level_round_trips(level: int) -> None:
    assert P.value(P.check({"compression_level": str(level)}), "compression_level", 3) == level


@pytest.mark.parametrize(
    "params",
    [{"compression_level": "99"}, {"chunk_size": "3"}, {"root_mode": "9"}],
)
def test_a_record_with_a_bad_parameter_refuses_to_open(
    store_dir: Path, params: dict[str, str]
) -> None:
    """The store does not check parameters: a record can hold anything; open refuses it."""
    (key,) = params
    with Store(store_dir) as store:
        store.create_volume("v", MiB, parameters=params)
        with pytest.raises(FsError) as info:
            Filesystem(store.volume("v"))
        assert info.value.errno == errno.EINVAL
        assert f"volume 'v': invalid parameter {key}=" in str(info.value)
        assert "must be" in str(info.value)


def test_a_record_with_units_and_unknown_keys_still_opens(store_dir: Path) -> None:
    """Records written before the rules were shared (``chunk_size=1MiB``, other keys)."""
    with Store(store_dir) as store:
        store.create_volume("v", 8 * MiB, parameters={"chunk_size": "1MiB", "note": "x"})
        fs = Filesystem(store.volume("v"))
        try:
            assert fs.chunk_size == MiB
        finally:
            fs.close()
