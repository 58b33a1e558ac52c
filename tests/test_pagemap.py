"""The tiered page map against its formula and against a plain page-by-page model."""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iopart.pagemap import (
    BLOCK_BYTES,
    SUBALLOC_BIT,
    PageMap,
    PageMapError,
    descriptor_address,
    join_index,
    mem,
    split_index,
)
from iopart.pool import Extent

pytestmark = pytest.mark.unit
KIB4, MIB4 = 4096, 4 << 20


@given(st.integers(0, 2**32 - 1))
def test_index_splits_2_10_10_10_and_joins_back(idx: int) -> None:
    g, m, k, l = split_index(idx)  # noqa: E741
    assert g < 4 and m < 1024 and k < 1024 and l < 1024
    assert idx == g * 2**30 + m * 2**20 + k * 2**10 + l
    assert join_index(g, m, k, l) == idx


@given(st.integers(0, 3), st.integers(0, 1023), st.integers(0, 1023))
def test_descriptor_address_is_the_formula(g: int, m: int, k: int) -> None:
    wordsize = 8
    assert mem(g, m, k) == ((g * 2**10 + m) * 2**10 + k) * 2**10 * wordsize
    idx = join_index(g, m, k, 5)
    assert descriptor_address(idx) == mem(g, m, k)
    assert mem(g, m, k) + 5 * wordsize == idx * wordsize  # word L of the descriptor


def test_formula_corners_and_refusals() -> None:
    assert mem(0, 0, 0) == 0
    assert mem(3, 1023, 1023) == (2**32 - 1024) * 8
    for bad in (-1, 2**32, 1.0, True):
        with pytest.raises(PageMapError):
            split_index(bad)  # type: ignore[arg-type]
    for args in ((4, 0, 0), (0, 1024, 0), (0, 0, -1)):
        with pytest.raises(PageMapError):
            mem(*args)


def test_aligned_request_takes_whole_blocks_and_small_one_splits() -> None:
    pm = PageMap(64 << 20)
    big = pm.allocate(1, 8 << 20)
    assert sum(e.length for e in big) == 8 << 20
    first = big[0].offset // MIB4
    assert pm.entry(1, first) & SUBALLOC_BIT == 0  # owned whole: no tier-1 index page
    assert not any(t == 1 and b == first for t, b, _ in pm.index_pages())
    small = pm.allocate(2, 5000)  # rounds up to 2 pages, in a split 4 MiB block
    assert small[0].length == 2 * KIB4
    blk = small[0].offset // MIB4
    assert pm.entry(1, blk) & SUBALLOC_BIT
    assert pm.owner_of(small[0].offset) == 2 and pm.owner_of(big[0].offset) == 1
    assert pm.free(2, small) == 2 * KIB4
    assert pm.entry(1, blk) == 0  # coalesced: the index page is gone
    assert not any(t == 1 and b == blk for t, b, _ in pm.index_pages())
    pm.check_invariants()


def test_all_or_nothing_and_ownership() -> None:
    pm = PageMap(10 << 20)
    a = pm.allocate(1, 3 << 20)
    before = pm.snapshot()
    with pytest.raises(PageMapError) as e:
        pm.allocate(2, 8 << 20)
    assert e.value.errno == errno.ENOMEM and pm.snapshot() == before
    with pytest.raises(PageMapError) as e:
        pm.free(2, a)
    assert e.value.errno == errno.EPERM and pm.snapshot() == before
    with pytest.raises(PageMapError) as e:
        pm.claim(3, [Extent(a[0].offset, KIB4)])
    assert e.value.errno == errno.EBUSY and pm.snapshot() == before
    # a partial free of a whole block splits it; accounting stays exact
    mid = Extent(a[0].offset + (1 << 20), 1 << 20)
    assert pm.free(1, [mid]) == 1 << 20
    assert pm.used_bytes() == 2 << 20 and pm.free_bytes() == (10 << 20) - (2 << 20)
    pm.claim(1, [mid])  # undo of that free: the very same pages back
    assert pm.extents_of(1) == a
    pm.check_invariants()


def test_pool_size_limits() -> None:
    PageMap(16 << 40)  # 16 TiB: the map is sparse, nothing that size is allocated
    for bad in ((16 << 40) + KIB4, KIB4 + 1, 0):
        with pytest.raises(PageMapError):
            PageMap(bad)


def model_extents(pages: dict[int, int], owner: int) -> list[Extent]:
    out: list[Extent] = []
    for pg in sorted(p for p, o in pages.items() if o == owner):
        off = pg * KIB4
        if out and out[-1].end == off:
            out[-1] = Extent(out[-1].offset, out[-1].length + KIB4)
        else:
            out.append(Extent(off, KIB4))
    return out


@settings(max_examples=40, deadline=None)
@given(
    size_pages=st.integers(1, 5 * 1024 + 7),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_operations_match_a_page_by_page_model(size_pages: int, seed: int) -> None:
    rng = random.Random(seed)
    pm = PageMap(size_pages * KIB4)
    pages: dict[int, int] = {}  # page number -> owner
    for _ in range(60):
        owner = rng.randint(1, 4)
        r = rng.random()
        if r < 0.5:
            want = rng.choice([1, 3, 1024, 1500, rng.randint(1, size_pages)])
            free = size_pages - len(pages)
            try:
                got = pm.allocate(owner, want * KIB4 - rng.randint(0, KIB4 - 1))
            except PageMapError as exc:
                assert want > free and exc.errno == errno.ENOMEM
                continue
            assert want <= free
            new = [pg for e in got for pg in range(e.offset // KIB4, e.end // KIB4)]
            assert len(new) == want and not set(new) & set(pages)
            pages.update(dict.fromkeys(new, owner))
        elif r < 0.8:
            mine = model_extents(pages, owner)
            if not mine:
                continue
            e = rng.choice(mine)
            lo = rng.randrange(e.offset // KIB4, e.end // KIB4)
            hi = rng.randint(lo + 1, e.end // KIB4)
            assert pm.free(owner, [Extent(lo * KIB4, (hi - lo) * KIB4)]) == (hi - lo) * KIB4
            for pg in range(lo, hi):
                del pages[pg]
        else:
            assert pm.free_owner(owner) == sum(KIB4 for o in pages.values() if o == owner)
            pages = {p: o for p, o in pages.items() if o != owner}
        for o in range(1, 5):
            assert pm.extents_of(o) == model_extents(pages, o)
        assert pm.free_bytes() == (size_pages - len(pages)) * KIB4
        for pg in rng.sample(range(size_pages), min(8, size_pages)):
            assert pm.owner_of(pg * KIB4) == pages.get(pg)
        pm.check_invariants()
    assert PageMap.restore(pm.snapshot()).snapshot() == pm.snapshot()


def test_block_sizes_are_the_four_tiers() -> None:
    assert BLOCK_BYTES == (4 << 10, 4 << 20, 4 << 30, 4 << 40)
