"""The tiered page map: who owns each 4 KiB page of the host memory pool.

This module owns the allocation state of the pool (claims 30-33 and 72-75 of the
seed patent): which owner holds which pages, how the pool is split into blocks of
each tier, and the persistent form of that state (`snapshot`/`restore`). It does
not map memory; the ultravisor maps the extents it hands out from
`iopart.pool.HostMemoryPool`.

Tiers. Memory is 4 KiB pages. A block of tier t holds 2^(10t) pages:

    tier 0: 4 KiB page    tier 1: 4 MiB    tier 2: 4 GiB    tier 3: 4 TiB

Every index page holds 2^10 entries, one per block of the tier below: the index
page of a tier-1 block describes its 1024 pages, that of a tier-2 block its 1024
tier-1 blocks, and so on. The root index has four entries, one per tier-3 block,
so the map covers at most 2^32 pages (16 TiB).

The (2,10,10,10) index -- the interpretation chosen here. A partition index is a
32-bit page number into the pool, split from the top into G (2 bits), M, K and
L (10 bits each). It is the path from the root through the tiers:

    G  which tier-3 (4 TiB) block         -- entry G of the root index
    M  which tier-2 (4 GiB) block in it   -- entry M of that block's index page
    K  which tier-1 (4 MiB) block in it   -- entry K of that block's index page
    L  which 4 KiB page in it             -- entry L of that block's index page

The descriptor of (G, M, K) is the index page of that tier-1 block: 2^10 words,
one per page L, at byte address

    Mem(G, M, K) = ((G * 2^10 + M) * 2^10 + K) * 2^10 * wordsize,   wordsize = 8

in the descriptor space, so word L of it sits at Mem(G, M, K) + L * wordsize,
which is the partition index times the word size: the descriptors of all tier-1
blocks form one linear table indexed by page number. Index pages of tiers 2 and 3
describe whole blocks and have no address in that space.

Index entries are 64-bit words:

    0                     the whole block is free
    OWNED_BIT | owner     the whole block is allocated to `owner` (0 .. 2^32 - 1)
    SUBALLOC_BIT          the sub-allocation bit: the block is split into 2^10
                          blocks of the tier below, described by its child index
                          page (which exists exactly when this bit is set)
    ABSENT_BIT            the block lies wholly past the end of the pool

A block that straddles the end of the pool is always split, so every page inside
the pool is described by exactly one non-split entry. Child index pages exist only
while needed: when every entry of one is free again, it is dropped and its parent
entry returns to "free whole block" (coalescing). Tier-0 entries are never split.

Allocation takes whole blocks of the highest tier that fits the request, so a
4 MiB-aligned request gets whole tier-1 blocks with no child index; the rest goes
into a run of free entries of an already split block, else into a free block that
is split for it, else -- when memory is fragmented -- into the longest free runs
left, returning several extents. It is all or nothing: a request that cannot be
met raises `PageMapError` (ENOMEM) and changes nothing.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable, Iterator, Mapping
from itertools import pairwise
from typing import ClassVar

from iopart.errors import IopartError
from iopart.pool import PAGE_4K, Extent

PAGE_SIZE = PAGE_4K
FANOUT_BITS = 10
FANOUT = 1 << FANOUT_BITS
TIERS = 4
ROOT_ENTRIES = 4
INDEX_WIDTHS = (2, 10, 10, 10)
WORD_SIZE = 8
MAX_INDEX = (1 << 32) - 1
MAX_BYTES = (MAX_INDEX + 1) * PAGE_SIZE
BLOCK_PAGES = tuple(1 << (FANOUT_BITS * t) for t in range(TIERS))
BLOCK_BYTES = tuple(p * PAGE_SIZE for p in BLOCK_PAGES)

ENTRY_FREE = 0
SUBALLOC_BIT = 1 << 63
OWNED_BIT = 1 << 62
ABSENT_BIT = 1 << 61
OWNER_MASK = (1 << 32) - 1
MAX_OWNER = OWNER_MASK

SNAPSHOT_FORMAT = "iopart.pagemap/1"

_ROOT_TIER = TIERS  # the root index describes the one "tier 4" block
_KEY_SHIFT = 34  # claim key = tier << 34 | block number (block < 2^32)
_BLOCK_MASK = (1 << _KEY_SHIFT) - 1
_FREE_RUN = re.compile(rb"\x01+")


class PageMapError(IopartError):
    """A page map operation was refused or the map is inconsistent."""

    kind = "pagemap"


def _check_int(value: object, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise PageMapError(
            f"{name} must be an integer in [{lo}, {hi}], got {value!r}", errno=errno.EINVAL
        )
    return value


def split_index(idx: int) -> tuple[int, int, int, int]:
    """(G, M, K, L) of a 32-bit partition index, widths (2, 10, 10, 10)."""
    _check_int(idx, "partition index", 0, MAX_INDEX)
    m = FANOUT - 1
    return idx >> 30, (idx >> 20) & m, (idx >> 10) & m, idx & m


def join_index(g: int, m: int, k: int, l: int = 0) -> int:  # noqa: E741 - the patent's name
    """The 32-bit partition index of (G, M, K, L)."""
    _check_int(g, "G", 0, ROOT_ENTRIES - 1)
    _check_int(m, "M", 0, FANOUT - 1)
    _check_int(k, "K", 0, FANOUT - 1)
    _check_int(l, "L", 0, FANOUT - 1)
    return (((g << 10) | m) << 10 | k) << 10 | l


def mem(g: int, m: int, k: int) -> int:
    """Mem(G, M, K): byte address of the descriptor (index page) of tier-1 block (G, M, K)."""
    join_index(g, m, k)
    return ((g * FANOUT + m) * FANOUT + k) * FANOUT * WORD_SIZE


def descriptor_address(partition_index: int) -> int:
    """Mem(G, M, K) of the tier-1 block holding page `partition_index` (L selects the word)."""
    g, m, k, _ = split_index(partition_index)
    return mem(g, m, k)


def _key(tier: int, block: int) -> int:
    return (tier << _KEY_SHIFT) | block


class _Index:
    """One index page: entry words, a byte per entry that is 1 when free, the free count."""

    __slots__ = ("entries", "freemap", "nfree")

    def __init__(self, n: int, word: int) -> None:
        self.entries = [word] * n
        free = word == ENTRY_FREE
        self.freemap = bytearray(b"\x01" * n if free else n)
        self.nfree = n if free else 0

    def set(self, i: int, k: int, word: int) -> None:
        """Set entries [i, i + k) to `word`, keeping the free map and count right."""
        was = self.freemap.count(1, i, i + k)
        self.entries[i : i + k] = [word] * k
        if word == ENTRY_FREE:
            self.freemap[i : i + k] = b"\x01" * k
            self.nfree += k - was
        else:
            self.freemap[i : i + k] = bytes(k)
            self.nfree -= was


class PageMap:
    """Allocation state of a pool of `total_bytes` (a multiple of 4 KiB, at most 16 TiB).

    Index pages are kept sparsely: `_pages[t]` maps the number of each split tier-t
    block (page number >> 10t) to its index page; `_pages[4][0]` is the root.
    """

    _COUNTERS: ClassVar[tuple[str, ...]] = (
        "allocations",
        "alloc_refused",
        "frees",
        "free_refused",
        "splits",
        "coalesces",
    )

    def __init__(self, total_bytes: int) -> None:
        _check_int(total_bytes, "pool size", PAGE_SIZE, MAX_BYTES)
        if total_bytes % PAGE_SIZE:
            raise PageMapError(
                f"pool size {total_bytes} is not a multiple of {PAGE_SIZE}", errno=errno.EINVAL
            )
        self.total_bytes = total_bytes
        self.total_pages = total_bytes // PAGE_SIZE
        self._free_pages = self.total_pages
        self._pages: list[dict[int, _Index]] = [{} for _ in range(_ROOT_TIER + 1)]
        self._claims: dict[int, set[int]] = {}
        self._extents: dict[int, list[Extent]] = {}  # extents_of() cache, dropped on change
        self._counters = dict.fromkeys(self._COUNTERS, 0)
        root = _Index(ROOT_ENTRIES, ENTRY_FREE)
        self._pages[_ROOT_TIER][0] = root
        self._shape(_ROOT_TIER, 0, root)

    def _shape(self, tier: int, block: int, page: _Index) -> None:
        """Mark entries past the pool end absent and split the one straddling it."""
        size = BLOCK_PAGES[tier - 1]
        for i in range(len(page.entries)):
            child = (block << FANOUT_BITS) + i
            start = child * size
            if start + size <= self.total_pages:
                continue
            if start >= self.total_pages:
                page.set(i, 1, ABSENT_BIT)
            else:
                page.set(i, 1, SUBALLOC_BIT)
                sub = _Index(FANOUT, ENTRY_FREE)
                self._pages[tier - 1][child] = sub
                self._shape(tier - 1, child, sub)

    # -- queries ---------------------------------------------------------------

    def free_bytes(self) -> int:
        return self._free_pages * PAGE_SIZE

    def used_bytes(self) -> int:
        return (self.total_pages - self._free_pages) * PAGE_SIZE

    def counters(self) -> dict[str, int]:
        """Operations, refusals, splits and coalesces since this map was made."""
        return dict(self._counters)

    def owners(self) -> list[int]:
        return sorted(self._claims)

    def _lookup(self, page_no: int) -> tuple[int, int, int]:
        """(tier, block, word) of the one non-split entry describing page `page_no`."""
        for tier in range(TIERS - 1, -1, -1):
            block = page_no >> (FANOUT_BITS * tier)
            word = self._pages[tier + 1][block >> FANOUT_BITS].entries[block & (FANOUT - 1)]
            if not word & SUBALLOC_BIT:
                return tier, block, word
        raise PageMapError(f"page {page_no} is split below tier 0", errno=errno.EUCLEAN)

    def owner_of(self, offset: int) -> int | None:
        """Owner of the page holding byte `offset`, or None when that page is free."""
        _check_int(offset, "offset", 0, self.total_bytes - 1)
        word = self._lookup(offset // PAGE_SIZE)[2]
        return word & OWNER_MASK if word & OWNED_BIT else None

    def entry(self, tier: int, block: int) -> int:
        """Index entry word of tier-`tier` block `block` (its first page >> 10*tier).

        A block inside an unsplit ancestor has no entry of its own; it reads as the
        ancestor's word (free, owned by the same owner, or absent).
        """
        _check_int(tier, "tier", 0, TIERS - 1)
        limit = ROOT_ENTRIES << (FANOUT_BITS * (TIERS - 1 - tier))
        _check_int(block, f"tier-{tier} block", 0, limit - 1)
        for t in range(tier, TIERS):
            b = block >> (FANOUT_BITS * (t - tier))
            page = self._pages[t + 1].get(b >> FANOUT_BITS)
            if page is not None:
                return page.entries[b & (FANOUT - 1)]
        raise PageMapError("root index missing", errno=errno.EUCLEAN)

    def index_pages(self) -> Iterator[tuple[int, int, tuple[int, ...]]]:
        """(tier, block, entry words) of every split block, tier-1 first; the root last.

        For tier 1 the words are the descriptor of (G, M, K) =
        split_index(block << 10)[:3], which lives at `descriptor_address(block << 10)`.
        """
        for tier in range(1, _ROOT_TIER + 1):
            for block in sorted(self._pages[tier]):
                yield tier, block, tuple(self._pages[tier][block].entries)

    def extents_of(self, owner: int) -> list[Extent]:
        """Everything `owner` holds, as sorted extents with neighbours merged."""
        _check_int(owner, "owner", 0, MAX_OWNER)
        cached = self._extents.get(owner)
        if cached is None:
            runs = _runs(self._claims.get(owner, ()))
            spans = sorted((f * BLOCK_BYTES[t], c * BLOCK_BYTES[t]) for t, f, c in runs)
            cached = self._extents[owner] = _merge(spans)
        return list(cached)

    # -- structure changes -----------------------------------------------------

    def _split(self, tier: int, block: int) -> _Index:
        """Set the sub-allocation bit of free tier-`tier` block `block`; return its new index."""
        parent = self._pages[tier + 1].get(block >> FANOUT_BITS)
        if parent is None:
            parent = self._split(tier + 1, block >> FANOUT_BITS)
        i = block & (FANOUT - 1)
        if parent.entries[i] != ENTRY_FREE:
            raise PageMapError(
                f"tier-{tier} block {block} cannot be split: entry {parent.entries[i]:#x}",
                errno=errno.EEXIST,
            )
        parent.set(i, 1, SUBALLOC_BIT)
        page = _Index(FANOUT, ENTRY_FREE)
        self._pages[tier][block] = page
        self._counters["splits"] += 1
        return page

    def _split_owned(self, tier: int, block: int, owner: int) -> None:
        """Split a whole owned block into 1024 blocks of the tier below, same owner."""
        word = OWNED_BIT | owner
        parent = self._pages[tier + 1][block >> FANOUT_BITS]
        parent.set(block & (FANOUT - 1), 1, SUBALLOC_BIT)
        self._pages[tier][block] = _Index(FANOUT, word)
        self._extents.pop(owner, None)
        claims = self._claims[owner]
        claims.discard(_key(tier, block))
        first = _key(tier - 1, block << FANOUT_BITS)
        claims.update(range(first, first + FANOUT))
        self._counters["splits"] += 1

    def _claim_run(self, tier: int, first: int, count: int, owner: int) -> None:
        """Give `count` free tier-`tier` blocks from `first` (one index page) to `owner`."""
        parent_block = first >> FANOUT_BITS
        page = self._pages[tier + 1].get(parent_block)
        if page is None:
            page = self._split(tier + 1, parent_block)
        i = first & (FANOUT - 1)
        if i + count > len(page.entries) or page.freemap.count(1, i, i + count) != count:
            raise PageMapError(
                f"tier-{tier} blocks {first}..{first + count - 1} are not all free",
                errno=errno.EEXIST,
            )
        page.set(i, count, OWNED_BIT | owner)
        self._free_pages -= count * BLOCK_PAGES[tier]
        key = _key(tier, first)
        self._claims.setdefault(owner, set()).update(range(key, key + count))
        self._extents.pop(owner, None)

    def _release_run(self, tier: int, first: int, count: int, owner: int) -> None:
        """Free `count` tier-`tier` blocks of `owner` from `first`, then coalesce upwards."""
        parent_block = first >> FANOUT_BITS
        page = self._pages[tier + 1][parent_block]
        page.set(first & (FANOUT - 1), count, ENTRY_FREE)
        self._free_pages += count * BLOCK_PAGES[tier]
        self._extents.pop(owner, None)
        claims = self._claims[owner]
        key = _key(tier, first)
        claims.difference_update(range(key, key + count))
        if not claims:
            del self._claims[owner]
        t, b = tier + 1, parent_block
        while t < _ROOT_TIER and page.nfree == FANOUT:
            del self._pages[t][b]
            page = self._pages[t + 1][b >> FANOUT_BITS]
            page.set(b & (FANOUT - 1), 1, ENTRY_FREE)
            self._counters["coalesces"] += 1
            t, b = t + 1, b >> FANOUT_BITS

    # -- allocation ------------------------------------------------------------

    def _find_free(self, tier: int) -> int | None:
        """A free whole tier-`tier` block, preferring ones whose parent is already split."""
        for parent_block, page in sorted(self._pages[tier + 1].items()):
            if page.nfree:
                return (parent_block << FANOUT_BITS) + page.freemap.find(1)
        if tier + 1 < TIERS:
            parent = self._find_free(tier + 1)
            if parent is not None:
                return parent << FANOUT_BITS
        return None

    def _find_run(self, tier: int, want: int) -> tuple[int, int] | None:
        """(first block, count <= want) of free tier-`tier` blocks in one index page."""
        pages = self._pages[tier + 1]
        pattern = b"\x01" * want
        for parent_block, page in sorted(pages.items()):
            if page.nfree >= want:
                i = page.freemap.find(pattern)
                if i >= 0:
                    return (parent_block << FANOUT_BITS) + i, want
        if tier + 1 < TIERS and want < FANOUT:
            parent = self._find_free(tier + 1)
            if parent is not None:
                return parent << FANOUT_BITS, want
        best: tuple[int, int] | None = None
        for parent_block, page in sorted(pages.items()):
            if page.nfree > (best[1] if best else 0):
                for run in _FREE_RUN.finditer(page.freemap):
                    if best is None or run.end() - run.start() > best[1]:
                        best = (
                            (parent_block << FANOUT_BITS) + run.start(),
                            min(want, run.end() - run.start()),
                        )
        return best

    def allocate(self, owner: int, nbytes: int) -> list[Extent]:
        """Give `owner` at least `nbytes` (rounded up to pages); sorted, merged extents.

        All or nothing: PageMapError(ENOMEM) when the free pages do not suffice.
        """
        _check_int(owner, "owner", 0, MAX_OWNER)
        _check_int(nbytes, "allocation size", 1, 1 << 63)
        want = -(-nbytes // PAGE_SIZE)
        if want > self._free_pages:
            self._counters["alloc_refused"] += 1
            raise PageMapError(
                f"page map exhausted: owner {owner} wants {want * PAGE_SIZE} bytes "
                f"({want} pages), {self.free_bytes()} bytes free of {self.total_bytes}",
                errno=errno.ENOMEM,
            )
        taken: list[tuple[int, int, int]] = []
        remaining, cap = want, TIERS - 1
        try:
            while remaining:
                tier = min(cap, (remaining.bit_length() - 1) // FANOUT_BITS)
                run = self._find_run(tier, min(remaining >> (FANOUT_BITS * tier), FANOUT))
                if run is None:
                    if tier == 0:
                        raise PageMapError(
                            f"{remaining} pages counted free but not found", errno=errno.EUCLEAN
                        )
                    cap = tier - 1  # nothing this allocation does frees a tier-`tier` block
                    continue
                first, count = run
                self._claim_run(tier, first, count, owner)
                taken.append((tier, first, count))
                remaining -= count * BLOCK_PAGES[tier]
        except BaseException:
            for tier, first, count in reversed(taken):
                self._release_run(tier, first, count, owner)
            raise
        self._counters["allocations"] += 1
        return _merge(sorted((f * BLOCK_BYTES[t], c * BLOCK_BYTES[t]) for t, f, c in taken))

    def claim(self, owner: int, extents: Iterable[Extent]) -> None:
        """Give `owner` exactly `extents`, every page of which must be free.

        This is how a rolled-back free is undone: the owner gets back the very
        pages it had. Each range is taken as the largest aligned blocks that fit.
        Refused with nothing changed (EBUSY) when any page is held.
        """
        _check_int(owner, "owner", 0, MAX_OWNER)
        ranges = self._page_ranges(extents)
        for start, end in ranges:
            pos = start
            while pos < end:
                tier, first, count, word, _ = self._run_at(pos, end)
                if word != ENTRY_FREE:
                    holder = f"owner {word & OWNER_MASK}" if word & OWNED_BIT else "nobody"
                    raise PageMapError(
                        f"owner {owner} cannot claim offset {pos * PAGE_SIZE}: held by {holder}",
                        errno=errno.EBUSY,
                    )
                pos = min(end, (first + count) << (FANOUT_BITS * tier))
        for start, end in ranges:
            pos = start
            while pos < end:
                tier = TIERS - 1
                while tier and (pos % BLOCK_PAGES[tier] or pos + BLOCK_PAGES[tier] > end):
                    tier -= 1
                self._claim_run(tier, pos >> (FANOUT_BITS * tier), 1, owner)
                pos += BLOCK_PAGES[tier]
        self._counters["allocations"] += 1

    # -- freeing ---------------------------------------------------------------

    def _page_ranges(self, extents: Iterable[Extent]) -> list[tuple[int, int]]:
        ranges = []
        for ext in extents:
            if not isinstance(ext, Extent):
                raise PageMapError(f"not an Extent: {ext!r}", errno=errno.EINVAL)
            off, length = ext.offset, ext.length
            if (
                not isinstance(off, int)
                or not isinstance(length, int)
                or off < 0
                or length <= 0
                or off % PAGE_SIZE
                or length % PAGE_SIZE
                or off + length > self.total_bytes
            ):
                raise PageMapError(
                    f"extent [{off}, +{length}) is not a page-aligned range of this "
                    f"{self.total_bytes}-byte pool",
                    errno=errno.EINVAL,
                )
            ranges.append((off // PAGE_SIZE, (off + length) // PAGE_SIZE))
        ranges.sort()
        for (_, end), (start, _) in pairwise(ranges):
            if start < end:
                raise PageMapError(
                    f"extents overlap at offset {start * PAGE_SIZE}", errno=errno.EINVAL
                )
        return ranges

    def _run_at(self, page_no: int, end: int) -> tuple[int, int, int, int, bool]:
        """(tier, first, count, word, whole) of entries equal to the one at `page_no`.

        `whole` says the run lies inside [page_no, end); when false, count is 1 and
        the one block reaches outside the range.
        """
        tier, block, word = self._lookup(page_no)
        shift = FANOUT_BITS * tier
        if block << shift < page_no or (block + 1) << shift > end:
            return tier, block, 1, word, False
        entries = self._pages[tier + 1][block >> FANOUT_BITS].entries
        i = block & (FANOUT - 1)
        stop = min(len(entries), i + ((end - (block << shift)) >> shift))
        j = stop if entries[i:stop] == [word] * (stop - i) else i + 1
        while j < stop and entries[j] == word:
            j += 1
        return tier, block, j - i, word, True

    def free(self, owner: int, extents: Iterable[Extent]) -> int:
        """Free `extents`, every page of which `owner` must hold; returns bytes freed.

        Parts of a larger block may be freed: the block is split first. Refused with
        nothing changed (EPERM) when any page is free or held by someone else.
        """
        _check_int(owner, "owner", 0, MAX_OWNER)
        ranges = self._page_ranges(extents)
        mine = OWNED_BIT | owner
        for start, end in ranges:
            pos = start
            while pos < end:
                tier, first, count, word, _ = self._run_at(pos, end)
                if word != mine:
                    self._counters["free_refused"] += 1
                    holder = f"owner {word & OWNER_MASK}" if word & OWNED_BIT else "nobody"
                    raise PageMapError(
                        f"owner {owner} cannot free offset {pos * PAGE_SIZE}: held by {holder}",
                        errno=errno.EPERM,
                    )
                pos = (first + count) << (FANOUT_BITS * tier)
        freed = 0
        for start, end in ranges:
            pos = start
            while pos < end:
                tier, first, count, _, whole = self._run_at(pos, end)
                if not whole:
                    self._split_owned(tier, first, owner)
                    continue
                self._release_run(tier, first, count, owner)
                freed += count * BLOCK_BYTES[tier]
                pos = (first + count) << (FANOUT_BITS * tier)
        self._counters["frees"] += 1
        return freed

    def free_owner(self, owner: int) -> int:
        """Free everything `owner` holds; returns the bytes freed."""
        _check_int(owner, "owner", 0, MAX_OWNER)
        freed = 0
        for tier, first, count in _runs(self._claims.get(owner, ())):
            self._release_run(tier, first, count, owner)
            freed += count * BLOCK_BYTES[tier]
        return freed

    # -- persistence and checking ------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """JSON-serializable state: the pool size and every claim as [tier, first, count, owner]."""
        claims = [
            [tier, first, count, owner]
            for owner, keys in self._claims.items()
            for tier, first, count in _runs(keys)
        ]
        claims.sort()
        return {
            "format": SNAPSHOT_FORMAT,
            "page_size": PAGE_SIZE,
            "total_bytes": self.total_bytes,
            "claims": claims,
        }

    @classmethod
    def restore(cls, data: Mapping[str, object]) -> PageMap:
        """Rebuild a map from `snapshot()`; PageMapError(EINVAL) when it does not fit."""
        if data.get("format") != SNAPSHOT_FORMAT or data.get("page_size") != PAGE_SIZE:
            raise PageMapError(
                f"not a {SNAPSHOT_FORMAT} snapshot with {PAGE_SIZE}-byte pages", errno=errno.EINVAL
            )
        total = data.get("total_bytes")
        claims = data.get("claims")
        if not isinstance(total, int) or not isinstance(claims, list):
            raise PageMapError("snapshot lacks total_bytes or claims", errno=errno.EINVAL)
        pm = cls(total)
        for claim in claims:
            if not isinstance(claim, list | tuple) or len(claim) != 4:
                raise PageMapError(f"bad claim {claim!r}", errno=errno.EINVAL)
            tier = _check_int(claim[0], "claim tier", 0, TIERS - 1)
            limit = ROOT_ENTRIES << (FANOUT_BITS * (TIERS - 1 - tier))
            first = _check_int(claim[1], "claim block", 0, limit - 1)
            count = _check_int(claim[2], "claim count", 1, FANOUT)
            owner = _check_int(claim[3], "claim owner", 0, MAX_OWNER)
            try:
                pm._claim_run(tier, first, count, owner)
            except PageMapError as exc:
                raise PageMapError(
                    f"snapshot claim {claim!r}: {exc.message}", errno=errno.EINVAL
                ) from exc
        pm.check_invariants()
        return pm

    def check_invariants(self) -> None:
        """Verify the whole structure; PageMapError(EUCLEAN) naming the first fault."""

        def bad(msg: str) -> PageMapError:
            return PageMapError(f"page map inconsistent: {msg}", errno=errno.EUCLEAN)

        if set(self._pages[_ROOT_TIER]) != {0} or self._pages[0]:
            raise bad("root index missing or tier-0 index pages present")
        free_pages = 0
        owned: dict[int, set[int]] = {}
        reachable = 0
        stack = [(_ROOT_TIER, 0)]
        while stack:
            tier, block = stack.pop()
            page = self._pages[tier].get(block)
            if page is None:
                raise bad(
                    f"tier-{tier} block {block} has its sub-allocation bit set but no index page"
                )
            reachable += 1
            n = ROOT_ENTRIES if tier == _ROOT_TIER else FANOUT
            if len(page.entries) != n or len(page.freemap) != n:
                raise bad(f"index of tier-{tier} block {block} has {len(page.entries)} entries")
            if page.freemap != bytes(int(w == ENTRY_FREE) for w in page.entries):
                raise bad(f"free map of tier-{tier} block {block} disagrees with its entries")
            if page.nfree != page.freemap.count(1):
                raise bad(f"free count of tier-{tier} block {block} is {page.nfree}")
            if tier < _ROOT_TIER and page.nfree == FANOUT:
                raise bad(f"tier-{tier} block {block} is wholly free but still split")
            size = BLOCK_PAGES[tier - 1]
            for i, word in enumerate(page.entries):
                child = (block << FANOUT_BITS) + i
                start = child * size
                inside = start + size <= self.total_pages
                outside = start >= self.total_pages
                if word == SUBALLOC_BIT:
                    if tier == 1 or outside:
                        raise bad(f"tier-{tier - 1} block {child} cannot be split")
                    stack.append((tier - 1, child))
                    continue
                if not inside and word != (ABSENT_BIT if outside else SUBALLOC_BIT):
                    raise bad(f"tier-{tier - 1} block {child} at the pool end has {word:#x}")
                if word == ENTRY_FREE:
                    free_pages += size
                elif word & ~OWNER_MASK == OWNED_BIT:
                    owned.setdefault(word & OWNER_MASK, set()).add(_key(tier - 1, child))
                elif word != ABSENT_BIT:
                    raise bad(f"tier-{tier - 1} block {child} has entry {word:#x}")
        if reachable != sum(len(p) for p in self._pages):
            raise bad("index pages present that no sub-allocation bit leads to")
        if free_pages != self._free_pages:
            raise bad(f"{free_pages} pages free in the index, {self._free_pages} counted")
        if owned != self._claims:
            raise bad("per-owner claims differ from the index entries")
        used = sum(BLOCK_PAGES[k >> _KEY_SHIFT] for keys in owned.values() for k in keys)
        if used + free_pages != self.total_pages:
            raise bad(f"{used} used + {free_pages} free pages != {self.total_pages}")


def _runs(keys: Iterable[int]) -> Iterator[tuple[int, int, int]]:
    """Claim keys grouped into (tier, first, count) runs that stay inside one index page."""
    tier = first = count = -1
    for key in sorted(keys):
        t, b = key >> _KEY_SHIFT, key & _BLOCK_MASK
        if t == tier and b == first + count and b >> FANOUT_BITS == first >> FANOUT_BITS:
            count += 1
            continue
        if count > 0:
            yield tier, first, count
        tier, first, count = t, b, 1
    if count > 0:
        yield tier, first, count


def _merge(spans: list[tuple[int, int]]) -> list[Extent]:
    """Sorted (offset, length) spans as extents, touching neighbours merged."""
    out: list[Extent] = []
    for off, length in spans:
        if out and out[-1].end == off:
            out[-1] = Extent(out[-1].offset, out[-1].length + length)
        else:
            out.append(Extent(off, length))
    return out
