"""The host memory pool's extent allocator."""

from __future__ import annotations

import pytest

from iopart.errors import PoolError
from iopart.pool import Extent, HostMemoryPool

pytestmark = pytest.mark.unit


def test_extents_are_whole_pages_first_fit_and_merge_back() -> None:
    with HostMemoryPool(64 << 10) as p:
        a = p.allocate(1)
        b = p.allocate(5000)
        c = p.allocate(4096)
        assert (a, b, c) == (Extent(0, 4096), Extent(4096, 8192), Extent(12288, 4096))
        p.release(b)
        assert p.allocate(4096) == Extent(4096, 4096)  # first fit reuses the hole
        p.release(Extent(4096, 4096))
        p.release(a)
        p.release(c)
        assert p.free_bytes() == p.size == 64 << 10
        assert p.allocate(64 << 10) == Extent(0, 64 << 10)  # merged into one again


def test_exhaustion_and_bad_releases_are_refused() -> None:
    with HostMemoryPool(16 << 10) as p:
        a = p.allocate(8192)
        with pytest.raises(PoolError, match=r"pool exhausted: 12288 bytes wanted, 8192 free"):
            p.allocate(12000)
        p.release(a)
        with pytest.raises(PoolError, match="already free"):
            p.release(a)
        with pytest.raises(PoolError, match="not an extent"):
            p.release(Extent(100, 4096))
        with pytest.raises(PoolError, match="positive"):
            p.allocate(0)
    with pytest.raises(PoolError, match="positive"):
        HostMemoryPool(0)


def test_pool_memory_is_shared_through_its_fd() -> None:
    import mmap

    with HostMemoryPool(64 << 10) as p:
        ext = p.allocate(4096)
        other = mmap.mmap(p.fd, ext.length, offset=ext.offset)
        other[:5] = b"hello"
        assert p.mm[ext.offset : ext.offset + 5] == b"hello"
        other.close()
