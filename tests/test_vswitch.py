"""The virtual switch in one process: learning, flooding, spoofing, sizes, uplinks."""

from __future__ import annotations

import errno
import gc
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.blockrig import partition_memory
from iopart._native import ffi
from iopart.channels import Channel, ChannelGeometry, Role
from iopart.channels.channel import ChannelEnd
from iopart.client import GuestMemory, NicEndpoint, NicLoops
from iopart.drivers.vswitch import SwitchConfig, VSwitch, guest_mac
from iopart.pool import HostMemoryPool

pytestmark = pytest.mark.native
BCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, payload: bytes = b"hello", ethertype: int = 0x88B5) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload.ljust(46, b"\0")


@dataclass
class Net:
    pool: HostMemoryPool
    switch: VSwitch
    guests: list[NicEndpoint] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    _close: list[object] = field(default_factory=list)

    def guest(self, index: int, rx_buffers: int = 16, mtu: int = 1500) -> NicEndpoint:
        regions, mem = partition_memory(self.pool, 1 << 20)
        ch = Channel(self.pool, ChannelGeometry(nslots=64, slot_size=128))
        srv, cli = ch.end(Role.SERVER), ch.end(Role.CLIENT)
        mac = guest_mac(index)
        port = self.switch.add_guest(srv, regions.table, mac, mtu=mtu)
        nic = NicEndpoint(cli, mem, mac, rx_buffers=rx_buffers, mtu=mtu, name=f"g{index}")
        self.guests.append(nic)
        self.ports.append(port)
        # the buffers are posted asynchronously: frames before they are taken would
        # be dropped, as a NIC drops what arrives before its receive ring is filled
        for _ in range(2000):
            if self.switch.stats(port).rx_posted == rx_buffers:
                break
            time.sleep(0.001)
        assert self.switch.stats(port).rx_posted == rx_buffers
        self._close += [srv, cli, ch, mem, regions]
        return nic

    def raw_guest(self, index: int, nbufs: int = 64) -> tuple[NicLoops, int]:
        """A guest whose NIC is driven by the native loops."""
        regions, mem = partition_memory(self.pool, 1 << 20)
        ch = Channel(self.pool, ChannelGeometry(nslots=256, slot_size=128))
        srv, cli = ch.end(Role.SERVER), ch.end(Role.CLIENT)
        cli.set_spin(1_000_000)
        port = self.switch.add_guest(srv, regions.table, guest_mac(index))
        self._close += [srv, cli, ch, mem, regions]
        return NicLoops(cli, mem, guest_mac(index), nbufs), port

    def close(self) -> None:
        self.switch.stop()
        for o in self._close:
            if isinstance(o, ChannelEnd | Channel | GuestMemory):
                o.close()
        gc.collect()
        self.pool.close()


@pytest.fixture
def net() -> Iterator[Net]:
    pool = HostMemoryPool(32 << 20)
    n = Net(pool, VSwitch(pool.mm, SwitchConfig(spin_ns=20_000)))
    try:
        yield n
    finally:
        n.close()


def test_unknown_destinations_flood_then_the_switch_learns(net: Net) -> None:
    a, b, c = net.guest(1), net.guest(2), net.guest(3)
    f = frame(b.mac, a.mac, b"to b")
    assert a.send(f) == 0
    assert b.recv() == f and c.recv() == f  # b not learned yet: flooded
    assert net.switch.lookup(a.mac) == net.ports[0]
    back = frame(a.mac, b.mac, b"to a")
    assert b.send(back) == 0
    assert a.recv() == back
    assert c.recv(timeout_ms=50) is None  # a was learned: not flooded
    again = frame(b.mac, a.mac, b"again")
    assert a.send(again) == 0 and b.recv() == again and c.recv(timeout_ms=50) is None
    sa = net.switch.stats(net.ports[0])
    assert sa.tx_frames == 2 and sa.flooded == 1 and sa.rx_frames == 1
    assert net.switch.switch_stats()["unknown_dst"] == 1


def test_broadcast_reaches_everyone_but_the_sender(net: Net) -> None:
    a, b, c = net.guest(1), net.guest(2), net.guest(3)
    f = frame(BCAST, a.mac, b"all")
    assert a.send(f) == 0
    assert b.recv() == f and c.recv() == f
    assert a.recv(timeout_ms=50) is None
    m = frame(b"\x01\x00\x5e\x00\x00\x01", c.mac, b"multicast")
    assert c.send(m) == 0 and a.recv() == m and b.recv() == m


def test_spoofed_runt_and_oversize_frames_are_dropped_and_counted(net: Net) -> None:
    a, b = net.guest(1), net.guest(2, mtu=1500)
    assert a.send(frame(b.mac, b.mac, b"spoof")) == -errno.EPERM
    assert a.send(b"\x02" * 10) == -errno.EMSGSIZE
    big = frame(b.mac, a.mac, b"x" * 1600)
    assert len(big) > 1518
    with pytest.raises(Exception, match="over the MTU"):
        a.send(big)  # the client refuses it before the switch has to
    # a client that ignores its MTU is refused by the switch
    assert raw_tx(a, 7, 0x8000, 1600) == -errno.EMSGSIZE
    assert b.recv(timeout_ms=50) is None
    st = net.switch.stats(net.ports[0])
    assert st.spoofed == 1 and st.runts == 1 and st.oversize == 1 and st.tx_frames == 0
    assert net.switch.stats(net.ports[1]).rx_frames == 0
    # nothing learned from a spoofed frame
    assert net.switch.lookup(b.mac) is None


def test_a_guest_without_receive_buffers_drops_like_a_nic(net: Net) -> None:
    a, b = net.guest(1), net.guest(2, rx_buffers=2)
    for i in range(5):
        assert a.send(frame(b.mac, a.mac, bytes([i]))) == 0
    got = [b.recv(timeout_ms=200) for _ in range(5)]
    assert sum(g is not None for g in got) >= 2
    st = net.switch.stats(net.ports[1])
    assert st.rx_frames + st.rx_dropped == 5 and st.rx_dropped >= 1


def test_an_uplink_is_a_port_like_any_other(net: Net) -> None:
    a = net.guest(1)
    wire, nic_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        up = net.switch.add_uplink(nic_side.fileno())
        host_mac = b"\x02\x99\x00\x00\x00\x01"
        wire.send(frame(a.mac, host_mac, b"from the wire"))
        assert a.recv() == frame(a.mac, host_mac, b"from the wire")
        assert net.switch.lookup(host_mac) == up
        assert a.send(frame(host_mac, a.mac, b"to the wire")) == 0
        wire.settimeout(2)
        assert wire.recv(2048) == frame(host_mac, a.mac, b"to the wire")
        wire.send(b"\x00" * 8)  # runt from the wire
        assert a.send(frame(host_mac, a.mac, b"sync")) == 0
        assert wire.recv(2048)[:6] == host_mac
        assert net.switch.stats(up).runts == 1
        net.switch.remove(up)
        assert net.switch.lookup(host_mac) is None
    finally:
        wire.close()
        nic_side.close()


def raw_tx(nic: NicEndpoint, rid: int, addr: int, length: int) -> int | None:
    """Send a frame descriptor by hand (what a hostile guest could do); its status."""
    from iopart.channels.channel import Descriptor, Fragment
    from iopart.client import ACCESS_READ, OP_NET_TX

    rid |= 1 << 40
    nic.end.push(Descriptor(rid, OP_NET_TX, len=length,
                            frags=(Fragment(addr, length, ACCESS_READ),)))
    nic.end.publish()
    for _ in range(100):
        nic._take(100)
        if rid in nic._tx_status:
            return nic._tx_status.pop(rid)
    return None


def test_frames_from_outside_the_guest_memory_are_refused(net: Net) -> None:
    a, b = net.guest(1), net.guest(2)
    assert raw_tx(a, 99, (1 << 20) + 4096, 60) == -errno.EFAULT
    assert raw_tx(a, 98, (1 << 20) - 30, 60) == -errno.EFAULT  # runs off the end
    assert net.switch.stats(net.ports[0]).refused == 2
    assert b.recv(timeout_ms=50) is None


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.mark.system
def test_a_tap_uplink_in_a_namespace_answers_arp(net: Net) -> None:
    """A real TAP, moved into a namespace of the test's own with 10.77.0.1/24: the guest
    asks who has 10.77.0.1 and the kernel there answers through the switch."""
    import fcntl

    ns = f"iopt{uuid.uuid4().hex[:8]}"
    tap = f"iopt{uuid.uuid4().hex[:6]}"
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    up = None
    try:
        ifr = struct.pack("16sH", tap.encode(), 0x0002 | 0x1000)  # IFF_TAP | IFF_NO_PI
        fcntl.ioctl(fd, 0x400454CA, ifr)  # TUNSETIFF
        run("ip", "netns", "add", ns)
        run("ip", "link", "set", tap, "netns", ns)
        run("ip", "-n", ns, "addr", "add", "10.77.0.1/24", "dev", tap)
        run("ip", "-n", ns, "link", "set", tap, "up")
        a = net.guest(1)
        up = net.switch.add_uplink(fd)
        arp = (BCAST + a.mac + struct.pack("!H", 0x0806)
               + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + a.mac
               + bytes([10, 77, 0, 2]) + bytes(6) + bytes([10, 77, 0, 1]))
        assert a.send(arp.ljust(60, b"\0")) == 0
        reply = None
        for _ in range(50):
            f = a.recv(timeout_ms=100)
            if f is not None and f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02":
                reply = f
                break
        assert reply is not None, "no ARP reply from the namespace"
        assert reply[28:32] == bytes([10, 77, 0, 1]) and reply[0:6] == a.mac
        assert net.switch.stats(up).tx_frames >= 1
    finally:
        if up is not None:
            net.switch.remove(up)  # before its fd is closed and its number reused
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        os.close(fd)
    assert not Path(f"/sys/class/net/{tap}").exists()


def echo_thread(nic: NicLoops, reply: bool) -> tuple[threading.Thread, object, list[int]]:
    stop = ffi.new("uint32_t *")
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(nic.echo(1 << 62, stop, reply=reply)))
    t.start()
    return t, stop, out


def test_native_round_trips_and_blast_between_two_guests(net: Net) -> None:
    a, pa = net.raw_guest(1)
    b, pb = net.raw_guest(2)
    t, stop, seen = echo_thread(b, reply=True)
    try:
        for _ in range(2000):
            if net.switch.stats(pb).rx_posted == b.nbufs:
                break
            time.sleep(0.001)
        lat = a.pingpong(b.mac, 64, 2000)
        assert len(lat) == 2000 and min(lat) > 0
        lat = a.pingpong(b.mac, 1500, 500)
        assert len(lat) == 500
    finally:
        stop[0] = 1  # type: ignore[index]
        t.join(5)
    assert seen == [2500]
    sa, sb = net.switch.stats(pa), net.switch.stats(pb)
    assert sa.tx_frames == sb.rx_frames == 2500 and sb.tx_frames == 2500
    assert net.switch.switch_stats()["unknown_dst"] <= 1

    t, stop, seen = echo_thread(b, reply=False)
    try:
        time.sleep(0.05)
        got, ns = a.blast(b.mac, 1500, 20000)
        for _ in range(1000):  # the receiver takes what reached it, reposting as it goes
            if net.switch.stats(pb).rx_posted >= 2 * b.nbufs:
                break
            time.sleep(0.002)
    finally:
        stop[0] = 1  # type: ignore[index]
        t.join(5)
    assert got == 20000 and ns > 0
    sb2 = net.switch.stats(pb)
    # the sender outruns a receiver with 128 buffers: the rest is dropped and counted
    assert (sb2.rx_frames - sb.rx_frames) + (sb2.rx_dropped - sb.rx_dropped) == 20000
    assert seen[0] == sb2.rx_frames - sb.rx_frames


@pytest.mark.system
def test_a_veth_uplink_reaches_its_namespace(net: Net) -> None:
    from iopart.drivers.nic import VethUplink

    tag = uuid.uuid4().hex[:6]
    up = VethUplink.create(tag, "10.79.0.1/24")
    port = None
    try:
        a = net.guest(5)
        port = net.switch.add_uplink(up.fileno())
        arp = (BCAST + a.mac + struct.pack("!H", 0x0806)
               + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + a.mac
               + bytes([10, 79, 0, 2]) + bytes(6) + bytes([10, 79, 0, 1]))
        assert a.send(arp.ljust(60, b"\0")) == 0
        reply = None
        for _ in range(50):
            f = a.recv(timeout_ms=100)
            if f is not None and f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02":
                reply = f
                break
        assert reply is not None, "no ARP reply through the veth"
        assert reply[28:32] == bytes([10, 79, 0, 1])
        # what the switch wrote out did not come back in (PACKET_IGNORE_OUTGOING)
        assert net.switch.stats(port).tx_frames == 1
    finally:
        if port is not None:
            net.switch.remove(port)
        up.close()
    assert not Path(f"/run/netns/{up.ns}").exists()
