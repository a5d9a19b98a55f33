"""``IndexRanges`` (the hidden chunk ranges of a layer) against a set of indexes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fusedrive.buffers import IndexRanges

RANGES = st.lists(st.tuples(st.integers(0, 80), st.integers(-3, 12)), max_size=40)


@given(RANGES)
def test_ranges_stay_sorted_disjoint_and_cover_what_was_added(adds: list[tuple[int, int]]) -> None:
    r = IndexRanges()
    model: set[int] = set()
    for lo, n in adds:
        r.add(lo, lo + n)
        model.update(range(lo, lo + n))
        covered = {i for a, b in r for i in range(a, b)}
        assert covered == model
        assert all(a < b for a, b in r)
        # Sorted, and apart: touching or overlapping ranges are merged into one.
        assert all(b < c for (_, b), (c, _) in zip(r.ranges, r.ranges[1:], strict=False))
        assert all(r.covers(i) == (i in model) for i in range(-1, 100))


def test_many_ranges_cost_no_scan_each() -> None:
    """fstrim sends one punch per free extent: 5,000 ranges in any order stay cheap
    (a scan per range took 15 s for 8,000). Counted by comparisons, not timed."""
    calls = 0

    class Key(int):
        def __lt__(self, other: object) -> bool:
            nonlocal calls
            calls += 1
            return int(self) < int(other)  # type: ignore[call-overload]

    r = IndexRanges()
    n = 5_000
    for k in range(n):
        i = (k * 7919) % n * 3  # a permutation of 0, 3, 6, ...: never touching
        r.add(Key(i), Key(i + 1))
    assert len(r.ranges) == n
    assert calls < n * 64, calls  # bisection: about 2 log2(n) per add (a scan: n/2)
