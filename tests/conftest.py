"""Shared fixtures: a real pool, a real channel, both ends, always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iopart._native import ffi
from iopart.channels import Channel, ChannelEnd, ChannelGeometry, Role
from iopart.pool import HostMemoryPool
from tests.stackutil import Stack


@dataclass
class ChannelPair:
    pool: HostMemoryPool
    channel: Channel
    server: ChannelEnd
    client: ChannelEnd

    def header(self) -> Any:
        """The shared header, as the peer could scribble on it."""
        base = ffi.from_buffer("char[]", self.pool.mm) + self.channel.extent.offset
        return ffi.cast("struct iop_chan_hdr *", base)

    def raw(self, offset: int, length: int) -> memoryview:
        start = self.channel.extent.offset + offset
        return memoryview(self.pool.mm)[start : start + length]

    def ring_ctl(self, which: str) -> Any:
        h = self.header()
        off = h.req_ring_off if which == "req" else h.rsp_ring_off
        base = ffi.from_buffer("char[]", self.pool.mm) + self.channel.extent.offset + off
        return ffi.cast("struct iop_ring_ctl *", base)


@pytest.fixture
def pool() -> Iterator[HostMemoryPool]:
    p = HostMemoryPool(8 << 20)
    try:
        yield p
    finally:
        import gc

        gc.collect()  # drop cffi buffer exports before unmapping
        p.close()


def make_pair(pool: HostMemoryPool, nslots: int = 8, slot_size: int = 128) -> ChannelPair:
    ch = Channel(pool, ChannelGeometry(nslots=nslots, slot_size=slot_size))
    return ChannelPair(pool, ch, ch.end(Role.SERVER), ch.end(Role.CLIENT))


@pytest.fixture
def pair(pool: HostMemoryPool) -> Iterator[ChannelPair]:
    p = make_pair(pool)
    try:
        yield p
    finally:
        p.server.close()
        p.client.close()
        p.channel.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A real host stack (boot, ultravisor, command, iop-a, iop-b) in its own state
    directory."""
    s = Stack(tmp_path / "state")
    s.up()
    try:
        yield s
    finally:
        s.down()
