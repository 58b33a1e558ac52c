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

_MAX_MSG = 4096


@dataclass(frozen=True)
class ChannelOffer:
    offset: int
    size: int
    role: int


def offer_channel(sock: socket.socket, ch: Channel, role: Role) -> None:
    """Send one end of `ch` to the peer on `sock`."""
    body = json.dumps(asdict(ChannelOffer(ch.extent.offset, ch.extent.length, int(role)))).encode()
    socket.send_fds(sock, [body], [ch.pool.fd, ch.doorbells.req, ch.doorbells.rsp])


def accept_channel(sock: socket.socket) -> tuple[ChannelEnd, Doorbells]:
    """Receive an end sent by offer_channel and attach it."""
    body, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MSG, 3)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise HandoffError(f"channel offer carried {len(fds)} fds, expected 3")
    pool_fd, req, rsp = fds
    try:
        offer = ChannelOffer(**json.loads(body))
        buf = mmap.mmap(
            pool_fd,
            offer.size,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offer.offset,
        )
    except (ValueError, TypeError, OSError) as exc:
        for fd in fds:
            os.close(fd)
        raise HandoffError(f"bad channel offer: {exc}") from exc
    os.close(pool_fd)
    bells = Doorbells(req, rsp)
    return ChannelEnd(buf, 0, offer.size, Role(offer.role), bells), bells
