"""The host memory pool: one memfd owned by the ultravisor, carved into page extents.

Channels and, later, partition memory are extents of this pool. The pool uses
hugetlb pages when the host has enough free ones and plain shared memory
otherwise; extents are always whole pool pages so any of them can be mapped on
its own by another process from the pool fd.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from iopart.errors import PoolError

PAGE_4K = 4096
_RW = mmap.PROT_READ | mmap.PROT_WRITE


@dataclass(frozen=True)
class Extent:
    """A page-aligned range of the pool: [offset, offset + length)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def _hugepages_free() -> tuple[int, int]:
    """(free huge pages, huge page size in bytes) from /proc/meminfo."""
    free = size = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("HugePages_Free:"):
                free = int(line.split()[1])
            elif line.startswith("Hugepagesize:"):
                size = int(line.split()[1]) * 1024
    except OSError:
        pass
    return free, size


class ChannelMemory(Protocol):
    """What a channel needs of the memory it lives in: a shared mapping, the fd that
    other processes map it from, and page extents."""

    mm: mmap.mmap
    fd: int

    def allocate(self, nbytes: int) -> Extent: ...

    def release(self, ext: Extent) -> None: ...


class ExtentAllocator:
    """First fit over whole pages of one range, merging freed neighbours."""

    def __init__(self, area: Extent, page_size: int = PAGE_4K) -> None:
        self.area = area
        self.page_size = page_size
        self._free: list[Extent] = [area]

    def allocate(self, nbytes: int) -> Extent:
        """First-fit allocation of whole pool pages; PoolError when none fits."""
        if nbytes <= 0:
            raise PoolError(f"allocation size must be positive, got {nbytes}")
        length = -(-nbytes // self.page_size) * self.page_size
        for i, ext in enumerate(self._free):
            if ext.length >= length:
                got = Extent(ext.offset, length)
                rest = Extent(ext.offset + length, ext.length - length)
                self._free[i : i + 1] = [rest] if rest.length else []
                return got
        raise PoolError(
            f"pool exhausted: {length} bytes wanted, {self.free_bytes()} free "
            f"of {self.area.length}",
            errno=12,
        )

    def release(self, ext: Extent) -> None:
        """Return an extent; neighbours are merged. Double release is refused."""
        a = self.area
        if ext.offset % self.page_size or ext.length <= 0 or ext.offset < a.offset or (
            ext.end > a.end
        ):
            raise PoolError(f"not an extent of this pool: {ext}")
        for f in self._free:
            if ext.offset < f.end and f.offset < ext.end:
                raise PoolError(f"extent {ext} is already free")
        free = sorted([*self._free, ext], key=lambda e: e.offset)
        merged: list[Extent] = []
        for e in free:
            if merged and merged[-1].end == e.offset:
                merged[-1] = Extent(merged[-1].offset, merged[-1].length + e.length)
            else:
                merged.append(e)
        self._free = merged

    def free_bytes(self) -> int:
        return sum(e.length for e in self._free)


class HostMemoryPool:
    """One memfd of `size` bytes, mapped shared, with a first-fit extent allocator."""

    def __init__(
        self, size: int, *, name: str = "iopart-pool", hugetlb: bool | None = None
    ) -> None:
        if size <= 0:
            raise PoolError(f"pool size must be positive, got {size}")
        free, hsize = _hugepages_free()
        want_huge = hugetlb if hugetlb is not None else (hsize > 0 and free * hsize >= size)
        self.hugetlb = False
        self.page_size = PAGE_4K
        fd = -1
        mm: mmap.mmap | None = None
        if want_huge and hsize:
            # hugetlb pages are reserved at mmap time: map inside the attempt
            try:
                fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_HUGETLB)
                hsize_total = -(-size // hsize) * hsize
                os.ftruncate(fd, hsize_total)
                mm = mmap.mmap(fd, hsize_total, mmap.MAP_SHARED, _RW)
                size, self.page_size, self.hugetlb = hsize_total, hsize, True
            except OSError as exc:
                if fd >= 0:
                    os.close(fd)
                fd = -1
                if hugetlb:
                    raise PoolError(f"hugetlb pool requested but not available: {exc}") from exc
        if mm is None:
            size = -(-size // PAGE_4K) * PAGE_4K
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, _RW)
        self.mm: mmap.mmap = mm
        self.fd = fd
        self.size = size
        self.extents = ExtentAllocator(Extent(0, size), self.page_size)

    def allocate(self, nbytes: int) -> Extent:
        """First-fit allocation of whole pool pages; PoolError when none fits."""
        return self.extents.allocate(nbytes)

    def release(self, ext: Extent) -> None:
        """Return an extent; neighbours are merged. Double release is refused."""
        self.extents.release(ext)

    def free_bytes(self) -> int:
        return self.extents.free_bytes()

    def close(self) -> None:
        if self.fd >= 0:
            self.mm.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> HostMemoryPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PoolArea:
    """Part of a pool mapped by another process (an I/O partition), in which it formats
    channels. Quacks like HostMemoryPool for `Channel` and the channel handoff."""

    def __init__(self, mm: mmap.mmap, fd: int, area: Extent, page_size: int = PAGE_4K) -> None:
        self.mm = mm
        self.fd = fd
        self.size = len(mm)
        self.extents = ExtentAllocator(area, page_size)

    def allocate(self, nbytes: int) -> Extent:
        return self.extents.allocate(nbytes)

    def release(self, ext: Extent) -> None:
        self.extents.release(ext)


def resident_shmem() -> int:
    """Bytes of shared memory (the pool's pages among them) this process has mapped."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


def trim_view(mm: mmap.mmap, above: int) -> int:
    """Drop this process's page-table entries for a shared mapping of the pool once more
    than `above` bytes of it are mapped; the pages stay in the pool (MADV_DONTNEED on a
    shared mapping only unmaps, and I/O in flight holds its pages). A process dies as
    fast as it can tear down its mappings: an I/O partition that had touched 1 GiB of
    guest memory took 40-80 ms to exit (and so to fail over), 1.4 ms after a trim.
    Returns the bytes that were mapped when it trimmed, else 0."""
    held = resident_shmem()
    if held <= above:
        return 0
    mm.madvise(mmap.MADV_DONTNEED)
    return held
