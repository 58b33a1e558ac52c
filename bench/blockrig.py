"""An I/O partition's block path in one process, for native tests and benchmarks.

A pool, a guest's memory extent (mapped the way its monitor maps it), a disk
channel, the native block server on its own thread, and the guest's endpoint.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

from iopart.channels import Channel, ChannelGeometry, Region, RegionTable, Role
from iopart.channels.channel import ChannelEnd
from iopart.client import DiskEndpoint, GuestMemory
from iopart.drivers.blockserver import BlockServer, Engine, Extent, ServerConfig
from iopart.drivers.disk import Disk, create_image
from iopart.pool import HostMemoryPool


@dataclass
class BlockRig:
    pool: HostMemoryPool
    disk: Disk
    server: BlockServer
    regions: RegionTable
    memory: GuestMemory
    channels: list[Channel] = field(default_factory=list)
    ends: list[ChannelEnd] = field(default_factory=list)
    endpoints: list[DiskEndpoint] = field(default_factory=list)

    def endpoint(self, extent: Extent, *, read_only: bool = False, direct: bool = False,
                 nslots: int = 64) -> tuple[int, DiskEndpoint]:
        ch = Channel(self.pool, ChannelGeometry(nslots=nslots, slot_size=128))
        srv, cli = ch.end(Role.SERVER), ch.end(Role.CLIENT)
        self.channels.append(ch)
        self.ends += [srv, cli]
        ep = self.server.add(srv, self.regions.table, self.disk, extent, read_only=read_only,
                             direct=direct)
        d = DiskEndpoint(cli, self.memory, extent.size, f"ep{ep}", read_only)
        self.endpoints.append(d)
        return ep, d

    def close(self) -> None:
        self.server.stop()
        for e in self.ends:
            e.close()
        for c in self.channels:
            c.close()
        self.memory.close()
        self.disk.close()
        gc.collect()
        self.pool.close()


def partition_memory(pool: HostMemoryPool, size: int) -> tuple[RegionTable, GuestMemory]:
    """A partition's memory in a test pool: one extent at PRPA 0, its region table (what
    the I/O partition translates against) and its mapping (what the guest sees)."""
    ext = pool.allocate(size)
    regions = RegionTable(pool.size)
    regs = [Region(0, ext.length, ext.offset)]
    regions.set(regs)
    return regions, GuestMemory.map(pool.fd, regs)


def block_rig(tmp: Path, *, engine: Engine = Engine.IO_URING, disk_size: int = 64 << 20,
              guest_mem: int = 8 << 20, spin_ns: int = 200_000, cpu: int = -1,
              image: Path | None = None) -> BlockRig:
    pool = HostMemoryPool(guest_mem + (8 << 20))
    regions, memory = partition_memory(pool, guest_mem)
    path = image or tmp / "disk.img"
    if not path.exists():
        create_image(path, disk_size)
    disk = Disk(path)
    server = BlockServer(pool.mm, ServerConfig(engine=engine, spin_ns=spin_ns, cpu=cpu))
    return BlockRig(pool, disk, server, regions, memory)
