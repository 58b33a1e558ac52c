"""A failover channel's in-flight journal, and the heartbeat of an I/O partition.

The journal lives in pool pages next to its channel that only I/O partitions map
(see native/include/iop_journal.h for the protocol). A server that starts to serve
a channel, first or after a takeover, opens it: what the previous server took and
did not make visible is queued to run again, in order, before anything new.
"""

from __future__ import annotations

import errno
import mmap
from dataclasses import dataclass
from typing import Any

from iopart._native import check, ffi, lib
from iopart.channels.channel import ChannelEnd, Role
from iopart.errors import ChannelError


def journal_size(entries: int, slot_size: int) -> int:
    n = int(lib.iop_jrnl_size(entries, slot_size))
    if n == 0:
        raise ChannelError(f"bad journal geometry: {entries} entries of {slot_size}-byte slots",
                           errno=errno.EINVAL)
    return n


@dataclass(frozen=True)
class JournalState:
    """The shared header: who serves the channel and what takeovers found."""

    owner: int
    epoch: int
    takeovers: int
    replayed: int
    retired: int
    skipped: int
    requeued: int
    requeued_rx: int
    in_flight: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Journal:
    """A journal at `offset` of a shared mapping (the pool, as an I/O partition maps it)."""

    def __init__(self, buf: mmap.mmap, offset: int, length: int) -> None:
        self._buf = buf
        self._cbuf = ffi.from_buffer("char[]", buf)
        self.ptr = self._cbuf + offset
        self.length = length
        self._hdr: Any = ffi.cast("struct iop_jrnl_hdr *", self.ptr)
        self.handle: Any = None

    def format(self, entries: int, slot_size: int) -> None:
        check(int(lib.iop_jrnl_format(self.ptr, self.length, entries, slot_size)),
              "format journal")

    def open(self, end: ChannelEnd, owner: int) -> int:
        """Take the channel over for `owner` (end: just attached as server). Returns the
        number of entries queued to run again."""
        if end.role is not Role.SERVER:
            raise ChannelError("a journal is opened by the server end", errno=errno.EINVAL)
        out = ffi.new("struct iop_jrnl **")
        check(int(lib.iop_jrnl_open(self.ptr, self.length, end.handle, owner, out)),
              "open journal")
        self.handle = out[0]
        return int(lib.iop_jrnl_pending_replays(self.handle))

    def state(self) -> JournalState:
        h = self._hdr
        ent = ffi.cast("struct iop_jentry *", self.ptr + int(lib.IOP_JRNL_HDR_SIZE))
        stride = int(h.stride) // int(lib.IOP_JENTRY_SIZE)
        busy = 0
        for i in range(int(h.nentries)):
            if int(ent[i * stride].state) != int(lib.IOP_JE_FREE):
                busy += 1
        return JournalState(int(h.owner), int(h.epoch), int(h.takeovers), int(h.replayed),
                            int(h.retired), int(h.skipped), int(h.requeued),
                            int(h.requeued_rx), busy)

    def close(self) -> None:
        if self.handle is not None:
            lib.iop_jrnl_close(self.handle)
            self.handle = None


class Heartbeat:
    """A native thread writing the monotonic clock (ns) into a shared 64-bit word."""

    def __init__(self, word: Any, interval_ns: int) -> None:
        out = ffi.new("struct iop_heartbeat **")
        check(int(lib.iop_heartbeat_start(word, interval_ns, out)), "start heartbeat")
        self._hb: Any = out[0]

    def stop(self) -> None:
        if self._hb is not None:
            lib.iop_heartbeat_stop(self._hb)
            self._hb = None


def monotonic_ns() -> int:
    """The clock heartbeats and completion times use (CLOCK_MONOTONIC)."""
    return int(lib.iop_monotonic_ns())
