"""Group snapshots in the store: several volumes frozen in ONE write transaction.

What is checked: every member of a group holds the same point of the write history
(a hypothesis model of interleaved writes and group snapshots, and a writer thread
committing A then B while groups are cut), a failing create leaves nothing behind,
the same call is idempotent and another set of volumes is refused, members cannot be
deleted alone, and deleting the group releases everything the members held.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockstore import AlreadyExists, InvalidArgument, NotFound, Store, fsck
from blockstore.catalog import member_name


@pytest.fixture
def store(store_dir: Path) -> Iterator[Store]:
    s = Store(store_dir)
    yield s
    s.close()


def test_members_share_one_creation_point_and_name_their_group(store: Store) -> None:
    for vol in ("a", "b", "c"):
        store.create_volume(vol, 1 << 20)
        store.volume(vol).put(b"k", vol.encode())
    group, snaps = store.create_group_snapshot("g", ["a", "b", "c"])
    assert group.volumes == ("a", "b", "c")
    assert group.snapshots == tuple(member_name("g", v) for v in "abc")
    assert [s.volume for s in snaps] == ["a", "b", "c"]
    assert {s.created for s in snaps} == {group.created}
    assert {s.group for s in snaps} == {"g"}
    for vol in ("a", "b", "c"):
        store.volume(vol).put(b"k", b"later")
    for snap in snaps:
        assert store.snapshot(snap.name).get(b"k") == snap.volume.encode()
    assert store.get_group_snapshot("g") == (group, snaps)
    assert [g.name for g in store.list_group_snapshots()] == ["g"]
    # members are ordinary snapshots too: listed and clonable
    assert {s.name for s in store.list_snapshots()} == set(group.snapshots)
    store.clone_snapshot(snaps[0].name, "restored")
    assert store.volume("restored").get(b"k") == b"a"


def test_create_is_idempotent_and_another_volume_set_already_exists(store: Store) -> None:
    for vol in ("a", "b", "c"):
        store.create_volume(vol, 1 << 20)
    group, snaps = store.create_group_snapshot("g", ["a", "b"])
    store.volume("a").put(b"k", b"after")
    # the same volumes in any order: the group already cut, not a new one
    assert store.create_group_snapshot("g", ["b", "a"]) == (group, snaps)
    with pytest.raises(AlreadyExists):
        store.create_group_snapshot("g", ["a", "b", "c"])
    with pytest.raises(AlreadyExists):
        store.create_group_snapshot("g", ["a"])
    assert store.snapshot(snaps[0].name).get(b"k") is None


@pytest.mark.parametrize("volumes", [[], ["a", "a"], ["a", "../x"]])
def test_bad_volume_lists_are_invalid(store: Store, volumes: list[str]) -> None:
    store.create_volume("a", 1 << 20)
    with pytest.raises(InvalidArgument):
        store.create_group_snapshot("g", volumes)
    assert store.list_group_snapshots() == []


def test_an_unknown_volume_creates_nothing_and_freezes_nothing(store: Store) -> None:
    store.create_volume("a", 1 << 20)
    head = store.get_volume("a").head
    layers = store.stats().layers
    with pytest.raises(NotFound):
        store.create_group_snapshot("g", ["a", "missing"])
    assert store.get_volume("a").head == head  # the whole transaction was aborted
    assert store.stats().layers == layers
    assert store.list_snapshots() == [] and store.list_group_snapshots() == []
    with pytest.raises(NotFound):
        store.get_group_snapshot("g")


def test_a_member_cannot_be_deleted_alone(store: Store) -> None:
    store.create_volume("a", 1 << 20)
    _group, snaps = store.create_group_snapshot("g", ["a"])
    with pytest.raises(InvalidArgument, match="group snapshot 'g'"):
        store.delete_snapshot(snaps[0].name)
    assert store.get_snapshot(snaps[0].name) == snaps[0]


def test_deleting_the_group_deletes_its_members_and_releases_their_data(store: Store) -> None:
    for vol in ("a", "b"):
        store.create_volume(vol, 4 << 20)
        store.volume(vol).put_chunk(b"c", store.prepare_chunk(vol.encode() * 50_000))
    before = store.stats()
    _group, snaps = store.create_group_snapshot("g", ["a", "b"])
    for vol in ("a", "b"):  # overwrite: only the members still hold the old chunks
        store.volume(vol).put_chunk(b"c", store.prepare_chunk(b"new " + vol.encode() * 40_000))
    assert store.stats().chunk_count == before.chunk_count + 2
    store.delete_group_snapshot("g")
    with pytest.raises(NotFound):
        store.get_group_snapshot("g")
    with pytest.raises(NotFound):
        store.delete_group_snapshot("g")
    for snap in snaps:
        with pytest.raises(NotFound):
            store.get_snapshot(snap.name)
    store.gc()
    assert store.stats().chunk_count == before.chunk_count  # the old chunks are released
    assert fsck(store).clean


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.sampled_from("abc"), st.integers(0, 3)),
            st.tuples(st.just("group"), st.sets(st.sampled_from("abc"), min_size=1)),
        ),
        max_size=30,
    )
)
def test_every_member_holds_the_same_point_of_the_history(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple]
) -> None:
    """Model: writes get a global sequence number; a group cut after write n holds, in
    every member, exactly the state of its volume after write n."""
    store = Store(tmp_path_factory.mktemp("groups"))
    try:
        model: dict[str, dict[bytes, bytes]] = {v: {} for v in "abc"}
        for vol in "abc":
            store.create_volume(vol, 1 << 20)
        expected: dict[str, dict[bytes, bytes]] = {}
        for seq, op in enumerate(ops):
            if op[0] == "write":
                _, vol, key = op
                k, val = b"k%d" % key, b"%d" % seq
                store.volume(vol).put(k, val)
                model[vol][k] = val
            else:
                _, vols = op
                _group, snaps = store.create_group_snapshot(f"g{seq}", sorted(vols))
                for snap in snaps:
                    expected[snap.name] = dict(model[snap.volume])
        for name, state in expected.items():
            assert dict(store.snapshot(name).scan()) == state
    finally:
        store.close()


def test_a_writer_committing_a_then_b_never_shows_b_ahead(store: Store) -> None:
    """A thread commits sequence number n to A, then n to B, one transaction each, while
    groups of both are cut: every group shows A == B or A == B + 1."""
    store.create_volume("a", 1 << 20)
    store.create_volume("b", 1 << 20)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            n = 0
            while not stop.is_set():
                n += 1
                store.volume("a").put(b"seq", b"%d" % n)
                store.volume("b").put(b"seq", b"%d" % n)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    try:
        for i in range(60):
            _group, (sa, sb) = store.create_group_snapshot(f"g{i}", ["a", "b"])
            va, vb = store.snapshot(sa.name).get(b"seq"), store.snapshot(sb.name).get(b"seq")
            seen.append((int(va or 0), int(vb or 0)))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert all(a in (b, b + 1) for a, b in seen), seen
    assert seen[-1][0] > 0  # the writer ran while the groups were cut


def test_fsck_finds_and_repairs_groups_that_disagree_with_their_members(store: Store) -> None:
    for vol in ("a", "b", "c"):
        store.create_volume(vol, 1 << 20)
    _g1, (m1, _m2) = store.create_group_snapshot("g1", ["a", "b"])
    _g2, (lone,) = store.create_group_snapshot("g2", ["c"])
    assert fsck(store).clean
    # What a bug could leave: a member record gone, a group record gone.
    with store._write() as t:
        t.txn.delete(m1.name.encode(), db=store.dbs.snapshots)
        t.add_holders(m1.layer, -1)
        t.txn.delete(b"g2", db=store.dbs.groups)
    rep = fsck(store)
    assert any("'g1' lists missing members" in p for p in rep.problems), rep.problems
    assert any(f"snapshot {lone.name!r} names group 'g2'" in p for p in rep.problems)
    fsck(store, repair=True)
    assert fsck(store).clean
    group, snaps = store.get_group_snapshot("g1")
    assert group.volumes == ("b",) and [s.volume for s in snaps] == ["b"]
    store.delete_snapshot(lone.name)  # a plain snapshot now: deletable alone
    store.delete_group_snapshot("g1")
    assert store.list_snapshots() == []
