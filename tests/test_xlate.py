"""Address translation against a plain model of the rule, and its seqlock generation."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iopart._native import lib
from iopart.channels import Region, RegionTable
from iopart.errors import NativeError

pytestmark = pytest.mark.native

READ, WRITE = int(lib.IOP_ACCESS_READ), int(lib.IOP_ACCESS_WRITE)
POOL = 1 << 30
U64 = 2**64


def model(
    regions: list[Region], prpa: int, length: int, access: int
) -> list[tuple[int, int]] | int:
    """Every byte must be covered with the access; adjacent pool pieces merge."""
    if length == 0 or prpa + length >= U64:  # zero, or the end wraps past 2**64
        return -errno.EINVAL
    out: list[tuple[int, int]] = []
    pos, end = prpa, prpa + length
    while pos < end:
        r = next((r for r in regions if r.prpa <= pos < r.prpa + r.len), None)
        if r is None:
            return -errno.EFAULT
        if r.access & access != access:
            return -errno.EACCES
        take = min(end, r.prpa + r.len) - pos
        off = r.pool_off + (pos - r.prpa)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + take)
        else:
            out.append((off, take))
        pos += take
    return out if len(out) <= 16 else -errno.E2BIG


@st.composite
def region_sets(draw: st.DrawFn) -> list[Region]:
    n = draw(st.integers(0, 8))
    regions, prpa = [], draw(st.integers(0, 1 << 20))
    pool_offs = draw(st.permutations(list(range(16))))
    for i in range(n):
        length = draw(st.integers(1, 8)) * 4096
        gap = draw(st.sampled_from([0, 0, 4096]))
        prpa += gap
        access = draw(st.sampled_from([READ, WRITE, READ | WRITE]))
        # pool offsets sometimes adjacent (merge), sometimes scattered
        off = (
            pool_offs[i] * (1 << 16)
            if draw(st.booleans())
            else (regions[-1].pool_off + regions[-1].len if regions else 0)
        )
        regions.append(Region(prpa, length, off, access))
        prpa += length
    return regions


queries = st.tuples(
    st.one_of(st.integers(0, 1 << 21), st.integers(U64 - 4096, U64 - 1)),
    st.one_of(st.integers(0, 70_000), st.integers(U64 - 4096, U64 - 1)),
    st.sampled_from([READ, WRITE, READ | WRITE]),
)


@settings(max_examples=300, deadline=None)
@given(regions=region_sets(), qs=st.lists(queries, min_size=1, max_size=20))
def test_translation_matches_the_model(
    regions: list[Region], qs: list[tuple[int, int, int]]
) -> None:
    t = RegionTable(POOL)
    t.set(regions)
    for prpa, length, access in qs:
        want = model(regions, prpa, length, access)
        try:
            got: list[tuple[int, int]] | int = t.translate(prpa, length, access)[0]
        except NativeError as exc:
            got = -exc.errno
        assert got == want, (prpa, length, access)


@pytest.mark.parametrize(
    "bad",
    [
        [Region(8192, 4096, 0), Region(0, 4096, 4096)],  # unsorted
        [Region(0, 8192, 0), Region(4096, 4096, 8192)],  # overlapping PRPA
        [Region(0, 4096, POOL - 100)],  # beyond the pool
        [Region(0, 0, 0)],  # empty
        [Region(0, 4096, 0, 0)],  # no access
        [Region(U64 - 4096, 8192, 0)],  # PRPA wraps
        [Region(i * 4096, 4096, 0) for i in range(65)],  # too many
    ],
)
def test_bad_region_sets_change_nothing(bad: list[Region]) -> None:
    t = RegionTable(POOL)
    t.set([Region(0, 4096, 0)])
    gen = t.generation
    with pytest.raises(NativeError):
        t.set(bad)
    assert t.generation == gen
    assert t.translate(0, 4096, READ)[0] == [(0, 4096)]


def test_generation_moves_on_every_reassignment() -> None:
    t = RegionTable(POOL)
    t.set([Region(0, 8192, 0)])
    _, g1 = t.translate(0, 4096, READ)
    assert g1 % 2 == 0 and t.valid(g1)
    t.set([Region(0, 4096, 0)])  # memory taken away
    assert not t.valid(g1)  # a buffer checked under g1 must now be refused
    assert t.generation == g1 + 2
    with pytest.raises(NativeError) as exc:
        t.translate(4096, 4096, READ)
    assert exc.value.errno == errno.EFAULT


def test_scatter_list_spans_extents() -> None:
    t = RegionTable(POOL)
    t.set([Region(0, 4096, 3 * 4096), Region(4096, 4096, 0), Region(8192, 4096, 4096)])
    sg, _ = t.translate(2048, 8192, READ)
    assert sg == [(3 * 4096 + 2048, 2048), (0, 6144)]
