"""Native server workers: a C thread serving the server end of one channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iopart._native import check, ffi, lib
from iopart.channels.channel import ChannelEnd, Role
from iopart.channels.xlate import RegionTable
from iopart.errors import ChannelError

HANDLER_NULL = int(lib.IOP_HANDLER_NULL)


@dataclass(frozen=True)
class WorkerConfig:
    spin_ns: int = 50_000
    cpu: int = -1
    batch: int = 32
    handler: int = HANDLER_NULL


@dataclass(frozen=True)
class WorkerStats:
    requests: int
    completed: int
    refused_desc: int
    refused_addr: int
    refused_access: int
    batches: int
    wakeups: int
    broken: int


class ServerWorker:
    """Start with `start()`, stop with `stop()` (or use as a context manager)."""

    def __init__(
        self,
        end: ChannelEnd,
        regions: RegionTable | None = None,
        config: WorkerConfig | None = None,
    ) -> None:
        if end.role is not Role.SERVER:
            raise ChannelError("a server worker needs the server end of a channel")
        self.end = end
        self.regions = regions
        self.config = config or WorkerConfig()
        self._w: Any = None

    def start(self) -> ServerWorker:
        cfg = ffi.new("struct iop_worker_cfg *")
        cfg.spin_ns, cfg.cpu = self.config.spin_ns, self.config.cpu
        cfg.batch, cfg.handler = self.config.batch, self.config.handler
        out = ffi.new("struct iop_worker **")
        xl = self.regions.table if self.regions is not None else ffi.NULL
        check(int(lib.iop_worker_start(self.end.handle, xl, cfg, out)), "start worker")
        self._w = out[0]
        return self

    def stats(self) -> WorkerStats:
        s = ffi.new("struct iop_worker_stats *")
        if self._w is not None:
            lib.iop_worker_stats(self._w, s)
        return WorkerStats(**{f: int(getattr(s, f)) for f in WorkerStats.__dataclass_fields__})

    def stop(self) -> WorkerStats:
        st = self.stats()
        if self._w is not None:
            lib.iop_worker_stop(self._w)
            self._w = None
        return st

    def __enter__(self) -> ServerWorker:
        return self.start() if self._w is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
