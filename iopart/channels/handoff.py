"""Handing a channel end to another process: fds over a UNIX socket (SCM_RIGHTS).

The message carries the pool fd and both doorbells plus a small JSON body with
the channel's place in the pool. The receiver maps only the channel's pages and
closes the pool fd at once.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
from dataclasses import asdict, dataclass

from iopart.channels.channel import Channel, ChannelEnd, Doorbells, Role
from iopart.errors import HandoffError
from iopart.pool import Extent

_MAX_MSG = 4096
_RW = mmap.PROT_READ | mmap.PROT_WRITE


@dataclass(frozen=True)
class ChannelOffer:
    offset: int
    size: int
    role: int
    mem_offset: int = 0
    mem_size: int = 0


@dataclass
class AcceptedChannel:
    end: ChannelEnd
    doorbells: Doorbells
    memory: mmap.mmap | None  # the receiver's own memory extent, when one was offered

    def close(self) -> None:
        self.end.close()
        self.doorbells.close()
        if self.memory is not None:
            self.memory.close()


def offer_channel(
    sock: socket.socket, ch: Channel, role: Role, memory: Extent | None = None
) -> None:
    """Send one end of `ch` (and optionally the receiver's memory extent) on `sock`."""
    offer = ChannelOffer(
        ch.extent.offset,
        ch.extent.length,
        int(role),
        memory.offset if memory else 0,
        memory.length if memory else 0,
    )
    body = json.dumps(asdict(offer)).encode()
    socket.send_fds(sock, [body], [ch.pool.fd, ch.doorbells.req, ch.doorbells.rsp])


def accept_channel(sock: socket.socket) -> AcceptedChannel:
    """Receive what offer_channel sent and attach it; the pool fd is closed here."""
    body, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MSG, 3)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        try:
            why = json.loads(body)["error"] if body else "the peer closed the connection"
        except (ValueError, KeyError, TypeError):
            why = f"channel offer carried {len(fds)} fds, expected 3"
        raise HandoffError(f"no channel: {why}")
    pool_fd, req, rsp = fds
    try:
        offer = ChannelOffer(**json.loads(body))
        buf = mmap.mmap(pool_fd, offer.size, mmap.MAP_SHARED, _RW, offset=offer.offset)
        mem = None
        if offer.mem_size:
            mem = mmap.mmap(pool_fd, offer.mem_size, mmap.MAP_SHARED, _RW, offset=offer.mem_offset)
    except (ValueError, TypeError, OSError) as exc:
        for fd in fds:
            os.close(fd)
        raise HandoffError(f"bad channel offer: {exc}") from exc
    os.close(pool_fd)
    bells = Doorbells(req, rsp)
    end = ChannelEnd(buf, 0, offer.size, Role(offer.role), bells)
    return AcceptedChannel(end, bells, mem)
