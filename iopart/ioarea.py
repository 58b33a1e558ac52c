"""The I/O area: pool pages the redundant I/O partitions share.

The ultravisor sets one area aside for all I/O partitions and keeps it for as long
as it runs, so it outlives any one of them. It holds:

* a header: which I/O partition is active, and one slot per I/O partition with its
  pid and a heartbeat (CLOCK_MONOTONIC ns, stamped by a native thread);
* one record per endpoint (a guest's disk or NIC): who the client is, what it
  addresses, then the channel's in-flight journal and the channel itself. Guests
  map only the channel's pages; the record and the journal are the I/O
  partitions' own.

The doorbells of a record's channel (eventfds) are kept by the ultravisor's fd
store under the record's key, so a standby gets them without the active's help.
Records are claimed and freed under a lock file (released by the kernel if its
holder dies); a record claimed by a process that died before making it live is
freed by the next active I/O partition.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iopart._native import ffi
from iopart.channels.channel import ChannelGeometry
from iopart.channels.journal import Journal, journal_size, monotonic_ns
from iopart.errors import IopartError
from iopart.pool import Extent

AREA_MAGIC = 0x41455241504F49  # "IOPAREA"
AREA_VERSION = 2
HEADER_BYTES = 128 << 10
RECORD_BYTES = 128 << 10
RECORD_HEAD = 4 << 10      # record header page
JOURNAL_OFF = RECORD_HEAD  # the journal, then the channel on its own pages
CHANNEL_OFF = 48 << 10
CHANNEL_LEN = RECORD_BYTES - CHANNEL_OFF
MAX_SERVERS = 4

FREE, CLAIMED, LIVE = 0, 1, 2
DISK, NIC = 1, 2
KINDS = {DISK: "disk", NIC: "nic"}
ROLE_NONE, ROLE_STANDBY, ROLE_ACTIVE = 0, 1, 2
ROLES = {ROLE_NONE: "down", ROLE_STANDBY: "standby", ROLE_ACTIVE: "active"}
MODES = ("rw", "ro", "shared")
# a freed record is not handed out again for this long: the guest of the monitor that
# mapped its channel dies a moment after the monitor (PDEATHSIG) and must be gone
REUSE_AFTER_NS = 2_000_000_000
#: the redundant I/O partitions, by slot in the area header
IO_PARTITIONS = ("iop-a", "iop-b")


class AreaError(IopartError):
    kind = "io-area"


class ServerSlot(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 16), ("pid", ctypes.c_uint32),
                ("role", ctypes.c_uint32), ("heartbeat_ns", ctypes.c_uint64),
                ("started_ns", ctypes.c_uint64), ("takeovers", ctypes.c_uint64),
                ("last_takeover_ns", ctypes.c_uint64), ("pad", ctypes.c_uint64 * 2)]


class AreaHeader(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint64), ("version", ctypes.c_uint32),
                ("nrecords", ctypes.c_uint32), ("record_bytes", ctypes.c_uint32),
                ("active", ctypes.c_int32), ("failovers", ctypes.c_uint64),
                ("servers", ServerSlot * MAX_SERVERS)]


class RecordHeader(ctypes.Structure):
    _fields_ = [("state", ctypes.c_uint32), ("kind", ctypes.c_uint32),
                ("generation", ctypes.c_uint32), ("claimer", ctypes.c_uint32),
                ("partition", ctypes.c_char * 64), ("device", ctypes.c_char * 64),
                ("part_index", ctypes.c_uint32), ("monitor_pid", ctypes.c_uint32),
                ("base", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("mode", ctypes.c_uint32),
                ("mac", ctypes.c_uint8 * 8), ("nslots", ctypes.c_uint32),
                ("slot_size", ctypes.c_uint32), ("chan_len", ctypes.c_uint64),
                ("created_ns", ctypes.c_uint64), ("freed_ns", ctypes.c_uint64),
                ("path", ctypes.c_char * 512)]


FLAG_RO, FLAG_DIRECT = 1, 2


@dataclass(frozen=True)
class Record:
    """A copy of one live record."""

    index: int
    generation: int
    kind: str
    partition: str
    device: str
    part_index: int
    monitor_pid: int
    base: int
    size: int
    read_only: bool
    direct: bool
    mode: str
    mac: bytes
    geometry: ChannelGeometry
    chan_off: int   # pool offsets
    chan_len: int
    jrnl_off: int
    jrnl_len: int
    path: str  # the disk's image or device

    @property
    def key(self) -> str:
        """The fd store's key for this record's doorbells."""
        return f"ep{self.index}"


class RecordMemory:
    """Quacks like a pool for `Channel`: hands out exactly one record's channel pages."""

    def __init__(self, mm: mmap.mmap, fd: int, ext: Extent) -> None:
        self.mm, self.fd, self.size, self._ext = mm, fd, len(mm), ext

    def allocate(self, nbytes: int) -> Extent:
        if nbytes > self._ext.length:
            raise AreaError(f"a channel of {nbytes} bytes does not fit a record",
                            errno=errno.E2BIG)
        return self._ext

    def release(self, ext: Extent) -> None:
        """The record is freed by the area, not here."""


class IoArea:
    def __init__(self, mm: mmap.mmap, fd: int, extent: Extent, lock_path: Path) -> None:
        if extent.length < HEADER_BYTES + RECORD_BYTES:
            raise AreaError(f"the I/O area is too small ({extent.length} bytes)",
                            errno=errno.EINVAL)
        self.mm, self.fd, self.extent = mm, fd, extent
        self.nrecords = (extent.length - HEADER_BYTES) // RECORD_BYTES
        self.lock_path = lock_path
        self.header = AreaHeader.from_buffer(mm, extent.offset)
        self._cbuf: Any = ffi.from_buffer("char[]", mm)
        with self.lock():
            if self.header.magic != AREA_MAGIC:
                ctypes.memset(ctypes.addressof(self.header), 0, ctypes.sizeof(AreaHeader))
                for i in range(self.nrecords):
                    self._head(i).state = FREE
                self.header.version = AREA_VERSION
                self.header.nrecords = self.nrecords
                self.header.record_bytes = RECORD_BYTES
                self.header.active = -1
                self.header.magic = AREA_MAGIC
            elif self.header.version != AREA_VERSION or self.header.nrecords != self.nrecords:
                raise AreaError("the I/O area was laid out by another version",
                                errno=errno.EPROTO)

    @contextlib.contextmanager
    def lock(self, stuck: Callable[[], object] | None = None,
             stuck_after_s: float = 0.1) -> Iterator[None]:
        """The area lock. A holder that dies releases it; one that hangs does not, so a
        waiter calls `stuck` (which may fence the hung holder) every stuck_after_s."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            since = time.monotonic()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if stuck is not None and time.monotonic() - since > stuck_after_s:
                        stuck()
                        since = time.monotonic()
                    time.sleep(0.0005)
            yield
        finally:
            os.close(fd)

    # -- servers
    def server(self, slot: int) -> ServerSlot:
        s: ServerSlot = self.header.servers[slot]
        return s

    def heartbeat_word(self, slot: int) -> Any:
        off = (self.extent.offset + AreaHeader.servers.offset + slot * ctypes.sizeof(ServerSlot)
               + ServerSlot.heartbeat_ns.offset)
        return ffi.cast("uint64_t *", self._cbuf + off)

    # -- records
    def _rec_off(self, i: int) -> int:
        return self.extent.offset + HEADER_BYTES + i * RECORD_BYTES

    def _head(self, i: int) -> RecordHeader:
        return RecordHeader.from_buffer(self.mm, self._rec_off(i))

    def claim(self, *, kind: int, partition: str, device: str, part_index: int,
              monitor_pid: int, base: int, size: int, flags: int, mode: str, mac: bytes,
              geometry: ChannelGeometry, path: str = "") -> Record:
        """Take a free record and lay out its journal; it goes live with `publish`."""
        jlen = journal_size(geometry.nslots, geometry.slot_size)
        if JOURNAL_OFF + jlen > CHANNEL_OFF or geometry.size() > CHANNEL_LEN:
            raise AreaError(f"a channel of {geometry} does not fit a record", errno=errno.E2BIG)
        with self.lock():
            now = monotonic_ns()
            for i in range(self.nrecords):
                h = self._head(i)
                if h.state != FREE or (h.freed_ns and now - h.freed_ns < REUSE_AFTER_NS):
                    continue
                h.state = CLAIMED
                h.claimer = os.getpid()
                h.generation += 1
                h.kind = kind
                h.partition = partition.encode()[:63]
                h.device = device.encode()[:63]
                h.part_index, h.monitor_pid = part_index, monitor_pid
                h.base, h.size, h.flags = base, size, flags
                h.mode = MODES.index(mode)
                ctypes.memmove(h.mac, mac.ljust(8, b"\0"), 8)
                h.nslots, h.slot_size = geometry.nslots, geometry.slot_size
                h.chan_len = CHANNEL_LEN
                h.created_ns = 0
                h.path = path.encode()[:511]
                rec = self._copy(i, h)
                break
            else:
                raise AreaError(f"all {self.nrecords} endpoint records are in use",
                                errno=errno.ENOSPC)
        Journal(self.mm, rec.jrnl_off, rec.jrnl_len).format(geometry.nslots,
                                                             geometry.slot_size)
        return rec

    def publish(self, rec: Record) -> None:
        with self.lock():
            h = self._head(rec.index)
            if h.state == CLAIMED and h.generation == rec.generation:
                h.created_ns = monotonic_ns()
                h.state = LIVE

    def free(self, rec: Record) -> bool:
        """Free the record if it is still this generation; False if it was not."""
        with self.lock():
            h = self._head(rec.index)
            if h.generation != rec.generation or h.state == FREE:
                return False
            h.state = FREE
            h.freed_ns = monotonic_ns()
            return True

    def free_abandoned(self) -> list[int]:
        """Free records claimed by processes that died before making them live."""
        out = []
        with self.lock():
            for i in range(self.nrecords):
                h = self._head(i)
                if h.state == CLAIMED and not pid_alive(h.claimer):
                    h.state = FREE
                    h.freed_ns = monotonic_ns()
                    out.append(i)
        return out

    def live(self) -> list[Record]:
        out = []
        for i in range(self.nrecords):
            h = self._head(i)
            if h.state == LIVE:
                out.append(self._copy(i, h))
        return out

    def get(self, index: int) -> Record | None:
        h = self._head(index)
        return self._copy(index, h) if h.state == LIVE else None

    def _copy(self, i: int, h: RecordHeader) -> Record:
        off = self._rec_off(i)
        geo = ChannelGeometry(nslots=int(h.nslots), slot_size=int(h.slot_size))
        return Record(i, int(h.generation), KINDS.get(int(h.kind), "?"),
                      h.partition.decode(errors="replace"), h.device.decode(errors="replace"),
                      int(h.part_index), int(h.monitor_pid), int(h.base), int(h.size),
                      bool(h.flags & FLAG_RO), bool(h.flags & FLAG_DIRECT),
                      MODES[h.mode] if h.mode < len(MODES) else "?", bytes(h.mac)[:6], geo,
                      off + CHANNEL_OFF, int(h.chan_len), off + JOURNAL_OFF,
                      journal_size(geo.nslots, geo.slot_size) if h.nslots else 0,
                      h.path.decode(errors="replace"))

    def journal(self, rec: Record) -> Journal:
        return Journal(self.mm, rec.jrnl_off, rec.jrnl_len)

    def channel_memory(self, rec: Record) -> RecordMemory:
        return RecordMemory(self.mm, self.fd, Extent(rec.chan_off, CHANNEL_LEN))

    def close(self) -> None:
        """Drop this process's views (the area itself stays with the ultravisor)."""
        del self.header
        self._cbuf = None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
