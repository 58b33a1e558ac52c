"""The virtual switch of an I/O partition, seen from Python.

`VSwitch` starts one native thread (native/vswitch.c) that switches frames among
guest ports (channels) and uplink ports (NIC fds). Python adds and removes ports
and reads counters; it never runs per frame. A guest port of a failover channel is
added with the channel's opened journal (iopart.channels.journal): what a previous
switch took and did not complete visibly runs first.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, fields
from typing import Any

from iopart._native import check, ffi, lib
from iopart.channels.channel import ChannelEnd, Role
from iopart.errors import ChannelError, IopartError

OP_NET_TX = int(lib.IOP_OP_NET_TX)
OP_NET_RX = int(lib.IOP_OP_NET_RX)
GUEST = int(lib.IOP_VSW_GUEST)
UPLINK = int(lib.IOP_VSW_UPLINK)


class NicError(IopartError):
    kind = "nic"


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raw = b""
    if len(parts) != 6 or len(raw) != 6 or any(len(p) != 2 for p in parts):
        raise NicError(f"not a MAC address: {text!r} (say 02:00:00:00:00:01)")
    return raw


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def guest_mac(index: int, port: int = 0) -> bytes:
    """A locally administered unicast MAC for a partition's NIC: 02:69:6f:<index>:<port>."""
    return bytes([0x02, 0x69, 0x6F, (index >> 8) & 0xFF, index & 0xFF, port & 0xFF])


@dataclass(frozen=True)
class SwitchConfig:
    cpu: int = -1
    batch: int = 32
    spin_ns: int = 200_000
    mac_age_ns: int = 300_000_000_000


@dataclass(frozen=True)
class PortStats:
    tx_frames: int
    tx_bytes: int
    rx_frames: int
    rx_bytes: int
    rx_dropped: int
    spoofed: int
    runts: int
    oversize: int
    refused: int
    flooded: int
    rx_posted: int

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class VSwitch:
    """One native switching thread over a mapping of the host pool."""

    def __init__(self, pool: mmap.mmap, config: SwitchConfig | None = None) -> None:
        self.config = config or SwitchConfig()
        self._cpool = ffi.from_buffer("char[]", pool)
        c = ffi.new("struct iop_vswitch_cfg *")
        c.cpu, c.batch = self.config.cpu, self.config.batch
        c.spin_ns, c.mac_age_ns = self.config.spin_ns, self.config.mac_age_ns
        out = ffi.new("struct iop_vswitch **")
        check(int(lib.iop_vswitch_start(self._cpool, len(pool), c, out)), "start switch")
        self._s: Any = out[0]
        self._keep: dict[int, tuple[Any, ...]] = {}

    def _add(self, kind: int, fd: int, mac: bytes, mtu: int, rx_slots: int, ch: Any,
             xlate: Any, keep: tuple[Any, ...], journal: Any = None) -> int:
        cfg = ffi.new("struct iop_vport_cfg *")
        cfg.kind, cfg.fd, cfg.mtu, cfg.rx_slots = kind, fd, mtu, rx_slots
        cfg.mac = list(mac)
        jrnl = journal if journal is not None else ffi.NULL
        port = check(int(lib.iop_vswitch_add(self._s, cfg, ch, xlate, jrnl)), "add port")
        self._keep[port] = keep
        return port

    def add_guest(self, end: ChannelEnd, xlate: Any, mac: bytes, *, mtu: int = 1500,
                  rx_slots: int | None = None, journal: Any = None) -> int:
        """A guest's NIC: frames from `end` must carry source `mac`.

        journal: the channel's opened `struct iop_jrnl *` (failover channels, at least
        as many entries as the ring has slots); what it holds from a previous switch
        runs first. It must outlive the port (remove() or stop()). Add the ports that
        receive before the ones that send to them."""
        if end.role is not Role.SERVER:
            raise ChannelError("a switch port needs the server end of a channel")
        if mac[0] & 1:
            raise NicError(f"{format_mac(mac)} is a multicast address, not a NIC's")
        # the ring bounds posted buffers anyway: a buffer waits for a response slot
        return self._add(GUEST, -1, mac, mtu, rx_slots or 1024, end.handle, xlate,
                         (end, xlate, journal), journal)

    def add_uplink(self, fd: int, *, mtu: int = 1500) -> int:
        """A host NIC's fd (TAP, AF_PACKET socket, datagram socket); made non-blocking."""
        os.set_blocking(fd, False)
        return self._add(UPLINK, fd, bytes(6), mtu, 0, ffi.NULL, ffi.NULL, ())

    def remove(self, port: int) -> PortStats:
        st = self.stats(port)
        check(int(lib.iop_vswitch_remove(self._s, port)), "remove port")
        self._keep.pop(port, None)
        return st

    def stats(self, port: int) -> PortStats:
        s = ffi.new("struct iop_vport_stats *")
        check(int(lib.iop_vport_stats(self._s, port, s)), "port stats")
        return PortStats(**{f.name: int(getattr(s, f.name)) for f in fields(PortStats)})

    def switch_stats(self) -> dict[str, int]:
        s = ffi.new("struct iop_vswitch_stats *")
        lib.iop_vswitch_stats(self._s, s)
        return {k: int(getattr(s, k)) for k in ("loops", "sleeps", "frames", "learned",
                                                 "moves", "unknown_dst", "broken_channels")}

    def lookup(self, mac: bytes) -> int | None:
        rc = int(lib.iop_vswitch_lookup(self._s, mac))
        return None if rc < 0 else rc

    def hold(self, on: bool) -> None:
        """Hold the switch between passes (returns once it holds) or let it go on."""
        check(int(lib.iop_vswitch_hold(self._s, int(on))), "hold switch")

    def stop(self) -> None:
        if self._s is not None:
            lib.iop_vswitch_stop(self._s)
            self._s = None
            self._keep.clear()
            self._cpool = None

    def __enter__(self) -> VSwitch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
