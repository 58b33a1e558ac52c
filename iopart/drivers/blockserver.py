"""The native block server of an I/O partition, seen from Python.

`BlockServer` starts one native thread that multiplexes every disk endpoint onto
its disks (native/blk.c). Python adds and removes endpoints and reads counters;
it never runs per request.
"""

from __future__ import annotations

import enum
import mmap
from dataclasses import dataclass, fields
from typing import Any

from iopart._native import check, ffi, lib
from iopart.channels.channel import ChannelEnd, Role
from iopart.drivers.disk import Disk, DiskError
from iopart.errors import ChannelError

HIST_BUCKETS = int(lib.IOP_BLK_HIST_BUCKETS)
HIST_SHIFT = int(lib.IOP_BLK_HIST_SHIFT)
OP_READ = int(lib.IOP_OP_READ)
OP_WRITE = int(lib.IOP_OP_WRITE)
OP_FLUSH = int(lib.IOP_OP_FLUSH)


class Engine(enum.IntEnum):
    PSYNC = int(lib.IOP_BLK_ENGINE_PSYNC)
    IO_URING = int(lib.IOP_BLK_ENGINE_URING)

    @classmethod
    def parse(cls, name: str) -> Engine:
        try:
            return {"psync": cls.PSYNC, "io_uring": cls.IO_URING}[name]
        except KeyError:
            raise DiskError(f"unknown engine {name!r}; known: psync, io_uring") from None


@dataclass(frozen=True)
class ServerConfig:
    engine: Engine = Engine.IO_URING
    cpu: int = -1
    spin_ns: int = 200_000
    batch: int = 32
    queue_depth: int = 256


@dataclass(frozen=True)
class EndpointStats:
    reads: int
    writes: int
    flushes: int
    bytes_read: int
    bytes_written: int
    errors: int
    refused: int
    refused_desc: int
    refused_addr: int
    refused_range: int
    refused_ro: int
    refused_op: int
    refused_stale: int
    inflight: int
    lat_sum_ns: int
    hist: tuple[int, ...]

    @property
    def ops(self) -> int:
        return self.reads + self.writes + self.flushes

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["hist"] = list(self.hist)
        d["hist_upper_ns"] = hist_bounds_ns()
        return d


def hist_bounds_ns() -> list[int]:
    """Upper bound (exclusive) of each latency bucket, in ns."""
    return [1 << (i + HIST_SHIFT) for i in range(HIST_BUCKETS)]


@dataclass(frozen=True)
class Extent:
    """Bytes [base, base+size) of a disk that one endpoint addresses as [0, size)."""

    base: int
    size: int


class BlockServer:
    """One native thread serving block endpoints from a mapping of the host pool."""

    def __init__(self, pool: mmap.mmap, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self._pool = pool
        self._cpool = ffi.from_buffer("char[]", pool)
        c = ffi.new("struct iop_blk_server_cfg *")
        c.engine, c.cpu, c.spin_ns = int(self.config.engine), self.config.cpu, self.config.spin_ns
        c.batch, c.queue_depth = self.config.batch, self.config.queue_depth
        out = ffi.new("struct iop_blk_server **")
        check(int(lib.iop_blk_server_start(self._cpool, len(pool), c, out)), "start block server")
        self._s: Any = out[0]
        self._keep: dict[int, tuple[ChannelEnd, Any]] = {}

    def add(self, end: ChannelEnd, xlate: Any, disk: Disk, extent: Extent, *,
            read_only: bool = False, direct: bool = False, journal: Any = None) -> int:
        """Serve `end`; `xlate` is the client's `struct iop_xlate_table *` (live).

        journal: the channel's opened `struct iop_jrnl *` (failover channels); what it
        holds from a previous server runs first. It must outlive the endpoint."""
        if end.role is not Role.SERVER:
            raise ChannelError("a block endpoint needs the server end of a channel")
        if extent.base < 0 or extent.size <= 0 or extent.base + extent.size > disk.size:
            raise DiskError(
                f"extent [{extent.base}, {extent.base + extent.size}) does not fit "
                f"{disk.path} ({disk.size} bytes)")
        cfg = ffi.new("struct iop_blk_endpoint_cfg *")
        cfg.fd = disk.fd_for(direct)
        cfg.flags = (int(lib.IOP_BLK_RO) if read_only or disk.read_only else 0) | (
            int(lib.IOP_BLK_DIRECT) if direct else 0)
        cfg.base, cfg.size = extent.base, extent.size
        cfg.align = max(disk.logical_block_size, 512)
        ep = check(int(lib.iop_blk_server_add(self._s, end.handle, xlate, cfg,
                                              journal if journal is not None else ffi.NULL)),
                   "add endpoint")
        self._keep[ep] = (end, xlate)
        return ep

    def remove(self, ep: int) -> EndpointStats:
        st = self.stats(ep)
        check(int(lib.iop_blk_server_remove(self._s, ep)), "remove endpoint")
        self._keep.pop(ep, None)
        return st

    def stats(self, ep: int) -> EndpointStats:
        s = ffi.new("struct iop_blk_stats *")
        check(int(lib.iop_blk_endpoint_stats(self._s, ep, s)), "endpoint stats")
        vals: dict[str, Any] = {}
        for f in fields(EndpointStats):
            vals[f.name] = tuple(int(x) for x in s.hist) if f.name == "hist" else int(
                getattr(s, f.name))
        return EndpointStats(**vals)

    def server_stats(self) -> dict[str, int]:
        s = ffi.new("struct iop_blk_server_stats *")
        lib.iop_blk_server_stats(self._s, s)
        return {k: int(getattr(s, k)) for k in
                ("loops", "sleeps", "batches", "submitted", "completed", "broken_channels",
                 "inline_done")}

    @property
    def endpoints(self) -> list[int]:
        return sorted(self._keep)

    def stop(self) -> None:
        if self._s is not None:
            lib.iop_blk_server_stop(self._s)
            self._s = None
            self._keep.clear()
            self._cpool = None

    def __enter__(self) -> BlockServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
