"""NIC backends of an I/O partition: the fds its virtual switch sends and receives on.

* `VethUplink`: a veth pair whose far end sits in a network namespace of its own, with
  an address: the default "physical" uplink when no configuration names a NIC.
* `PacketUplink`: an existing interface through an AF_PACKET socket.
* `TapUplink`: a TAP the I/O partition creates; `open_tap` gives a TAP's fd (IFF_TAP |
  IFF_NO_PI), also for guests' namespaces.

Links and namespaces are managed through netlink (pyroute2). Nothing here is on the
data path: the native switch gets the fds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iopart.errors import IopartError

if TYPE_CHECKING:
    from pyroute2 import IPRoute, NetNS

# pyroute2 is imported where links are made: an I/O partition that adopts its uplinks
# from the fd store never loads it (a smaller process starts and dies faster)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


class NicError(IopartError):
    kind = "nic"


def packet_socket(ifname: str) -> socket.socket:
    """A raw AF_PACKET socket on `ifname` that does not see its own transmissions."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                      socket.htons(ETH_P_ALL))
    try:
        # the switch writes frames out here; they must not come back in as received
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        s.bind((ifname, 0))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def open_tap(name: str) -> int:
    """Create (or attach to) TAP `name`; its non-blocking fd."""
    if not 0 < len(name) < 16:
        raise NicError(f"interface name {name!r} must be 1-15 characters", errno=errno.EINVAL)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise NicError(f"cannot create TAP {name}: {exc.strerror}", errno=exc.errno or 0) from exc
    return fd


SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17


def disable_tx_checksum(ifname: str, ns: str | None = None) -> None:
    """Make the kernel finish checksums before frames leave `ifname`. A veth hands out
    frames whose checksum is left to "hardware"; read through AF_PACKET and delivered
    into a guest's TAP, those would be dropped there as corrupt."""
    from pyroute2 import netns
    if ns is not None:
        netns.pushns(ns)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    finally:
        if ns is not None:
            netns.popns()
    with s:
        value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0))
        ifr = struct.pack("16sQ16x", ifname.encode(), ctypes.addressof(value))
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)


def _link_index(ipr: IPRoute | NetNS, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NicError(f"no interface {name}", errno=errno.ENODEV)
    return int(found[0])


def configure(ns: str, ifname: str, address: str | None, mac: str | None = None) -> None:
    """Bring `ifname` (and lo) up in namespace `ns`, with an address and MAC if given."""
    from pyroute2 import NetNS
    with NetNS(ns) as n:
        idx = _link_index(n, ifname)
        if mac:
            n.link("set", index=idx, address=mac)
        if address:
            ip, _, plen = address.partition("/")
            n.addr("add", index=idx, address=ip, prefixlen=int(plen or 24))
        n.link("set", index=idx, state="up")
        n.link("set", index=_link_index(n, "lo"), state="up")


def move_to_netns(ifname: str, ns: str) -> None:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("set", index=_link_index(ipr, ifname), net_ns_fd=ns)


def remove_netns(ns: str) -> None:
    from pyroute2 import netns
    with contextlib.suppress(OSError, FileNotFoundError):
        netns.remove(ns)


@dataclass
class VethUplink:
    """veth `host_if` (in this namespace, the switch's end) <-> `peer_if` in `ns`."""

    host_if: str
    ns: str
    peer_if: str
    address: str
    sock: socket.socket

    @classmethod
    def create(cls, tag: str, address: str = "10.78.0.1/24") -> VethUplink:
        from pyroute2 import IPRoute, netns
        host_if, ns, peer_if = f"iov{tag}"[:15], f"iopart-up-{tag}", "uplink0"
        remove_netns(ns)  # a crashed predecessor's namespace (and the veth in it)
        with IPRoute() as ipr:
            for stale in ipr.link_lookup(ifname=host_if):
                ipr.link("del", index=stale)
        netns.create(ns)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": peer_if,
                                                                    "net_ns_fd": ns})
                idx = _link_index(ipr, host_if)
                ipr.link("set", index=idx, state="up")
            configure(ns, peer_if, address)
            disable_tx_checksum(peer_if, ns)
            disable_tx_checksum(host_if)
            sock = packet_socket(host_if)
        except Exception:
            remove_netns(ns)
            raise
        return cls(host_if, ns, peer_if, address, sock)

    @classmethod
    def adopt(cls, tag: str, address: str, fd: int) -> VethUplink:
        """The pair another I/O partition made, through its socket (kept by the fd store)."""
        host_if, ns, peer_if = f"iov{tag}"[:15], f"iopart-up-{tag}", "uplink0"
        return cls(host_if, ns, peer_if, address, socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def describe(self) -> dict[str, str]:
        return {"kind": "veth", "interface": self.host_if, "peer_netns": self.ns,
                "peer_interface": self.peer_if, "peer_address": self.address}

    def close(self) -> None:
        self.sock.close()
        remove_netns(self.ns)  # takes the peer, and with it the pair


@dataclass
class PacketUplink:
    """An existing interface of this namespace, through AF_PACKET."""

    ifname: str
    sock: socket.socket

    @classmethod
    def create(cls, ifname: str) -> PacketUplink:
        try:
            return cls(ifname, packet_socket(ifname))
        except OSError as exc:
            raise NicError(f"cannot open {ifname}: {exc.strerror}",
                           errno=exc.errno or 0) from exc

    def fileno(self) -> int:
        return self.sock.fileno()

    def describe(self) -> dict[str, str]:
        return {"kind": "packet", "interface": self.ifname}

    def close(self) -> None:
        self.sock.close()


@dataclass
class TapUplink:
    """A TAP this I/O partition creates: the host's side of it is an ordinary interface
    (bridge it, route to it) and the switch holds the device end."""

    name: str
    fd: int

    @classmethod
    def create(cls, name: str) -> TapUplink:
        from pyroute2 import IPRoute
        fd = open_tap(name)
        try:
            with IPRoute() as ipr:
                ipr.link("set", index=_link_index(ipr, name), state="up")
        except Exception:
            os.close(fd)
            raise
        return cls(name, fd)

    def fileno(self) -> int:
        return self.fd

    def describe(self) -> dict[str, str]:
        return {"kind": "tap", "interface": self.name}

    def close(self) -> None:
        os.close(self.fd)  # a TAP nobody holds (not persistent) goes away with its fd


Uplink = VethUplink | PacketUplink | TapUplink


def open_uplink(path: str, tag: str, fd: int | None = None) -> Uplink:
    """The uplink a NIC's path names: `veth[:ADDRESS/PREFIX]`, `packet:IFNAME` or
    `tap:NAME`. With fd (kept by the fd store since another I/O partition opened it),
    adopt that socket or TAP instead of opening a new one."""
    kind, _, arg = path.partition(":")
    if kind == "veth":
        address = arg or "10.78.0.1/24"
        return VethUplink.adopt(tag, address, fd) if fd is not None else VethUplink.create(
            tag, address)
    if kind == "packet":
        return PacketUplink(arg, socket.socket(fileno=fd)) if fd is not None else \
            PacketUplink.create(arg)
    if kind == "tap":
        return TapUplink(arg, fd) if fd is not None else TapUplink.create(arg)
    if fd is not None:
        os.close(fd)
    raise NicError(f"NIC path {path!r}: say veth[:ADDRESS/PREFIX], packet:IFNAME or tap:NAME",
                   errno=errno.EINVAL)
