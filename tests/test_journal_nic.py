"""The in-flight journal on the virtual switch: switch processes SIGKILLed under traffic.

Guest A sends sequence-numbered frames to guest B as fast as the switch takes them
(native loop, never more than a window ahead of what B got), B keeps plenty of
receive buffers posted and counts every frame it gets, each checked byte for byte.
Switch processes are forked, each takes both ports over (attach the server ends, open
the journals, add the ports with them) and switches until it is SIGKILLed at a random
moment and replaced.

The contract (DESIGN.md): a frame A queued for transmit is never lost. What may be
lost is a frame the dead switch had already copied into one of B's posted buffers
without publishing that buffer's completion: the replay posts the buffer again and
its frame is gone. Before each replacement starts, the test reads those entries out
of B's journal (DONE, response position not published, NET_RX), the unpublished
response the dead switch pushed for each (same id, status 0, its length) and the
frame in B's buffer, and so knows exactly which frames were lost that way. Every
frame A queued that B never got must be one of them; any other is a transmitted
frame the failover lost. A frame may arrive twice (a transmit run again after its
frame was delivered), at most once more per transmit entry a takeover found.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import select
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from bench.blockrig import partition_memory
from iopart._native import ffi, lib
from iopart.channels import Channel, ChannelGeometry, Role
from iopart.channels.channel import ChannelEnd, Descriptor
from iopart.channels.journal import Journal, journal_size
from iopart.channels.xlate import RegionTable
from iopart.client import OP_NET_RX, OP_NET_TX, GuestMemory, NicEndpoint, NicLoops
from iopart.drivers.vswitch import SwitchConfig, VSwitch, guest_mac
from iopart.pool import HostMemoryPool

pytestmark = pytest.mark.system

SLOTS = 512
SLOT_SIZE = 128
A_BUFS = 64  # A's frames in flight to the switch
B_BUFS = 256  # B's posted receive buffers
WINDOW = 64  # A stays within this many frames of the highest one B got
KILLS = 30
MAX_SEQ = 1 << 24
JE_DONE = int(lib.IOP_JE_DONE)
JE_FREE = int(lib.IOP_JE_FREE)
RING_MAX = int(lib.IOP_RING_MAX)


@dataclass
class Port:
    """One guest port: its channel, journal, region table, memory and MAC."""

    ch: Channel
    jr_off: int
    jr_len: int
    regions: RegionTable
    memory: GuestMemory
    mac: bytes


def make_port(pool: HostMemoryPool, index: int) -> Port:
    regions, memory = partition_memory(pool, 1 << 20)
    ch = Channel(pool, ChannelGeometry(nslots=SLOTS, slot_size=SLOT_SIZE))
    jr_len = journal_size(SLOTS, SLOT_SIZE)
    jr_off = pool.allocate(jr_len).offset
    Journal(pool.mm, jr_off, jr_len).format(SLOTS, SLOT_SIZE)
    return Port(ch, jr_off, jr_len, regions, memory, guest_mac(index))


def fork_switch(pool: HostMemoryPool, ports: list[Port]) -> int:
    """A switch process that takes the ports over, in this order, and switches until
    killed. Returns once it has added them all."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        ready, _, _ = select.select([rfd], [], [], 10)
        ok = bool(ready) and os.read(rfd, 1) == b"r"
        os.close(rfd)
        assert ok, "a switch process did not come up"
        return pid
    code = 0
    try:
        os.close(rfd)
        sw = VSwitch(pool.mm, SwitchConfig(spin_ns=50_000))
        for p in ports:
            end = p.ch.end(Role.SERVER)
            jr = Journal(pool.mm, p.jr_off, p.jr_len)
            jr.open(end, owner=os.getpid() & 0xFFFF)
            sw.add_guest(end, p.regions.table, p.mac, journal=jr.handle)
        os.write(wfd, b"r")
        time.sleep(60)
    except BaseException:  # a child reports by exit code only
        code = 1
    os._exit(code)


@dataclass
class Unfinished:
    """What a dead switch left in one port's journal."""

    rx_done: int = 0  # NET_RX entries DONE, completion unpublished: buffer refilled
    tx: int = 0  # NET_TX entries not retired: run again by the next switch
    rx_frames: tuple[bytes, ...] = ()  # what those NET_RX entries' buffers hold
    tx_frames: tuple[bytes, ...] = ()  # the frames of those NET_TX entries


def unfinished(pool: HostMemoryPool, port: Port) -> Unfinished:
    """A port's journal and response ring as the dead switch left them, read before the
    next one opens the journal: the receive completions it pushed and never published,
    with the frames it had copied into those buffers."""
    cbuf = ffi.from_buffer("char[]", pool.mm)
    chdr: Any = ffi.cast("struct iop_chan_hdr *", cbuf + port.ch.extent.offset)
    rsp_ring = cbuf + port.ch.extent.offset + int(chdr.rsp_ring_off)
    published = int(ffi.cast("struct iop_ring_ctl *", rsp_ring).prod)
    slots = rsp_ring + int(lib.IOP_RING_CTL_SIZE)
    jhdr: Any = ffi.cast("struct iop_jrnl_hdr *", cbuf + port.jr_off)
    stride = int(jhdr.stride)
    first = cbuf + port.jr_off + int(lib.IOP_JRNL_HDR_SIZE)
    out = Unfinished()
    rx_frames: list[bytes] = []
    tx_frames: list[bytes] = []
    for i in range(int(jhdr.nentries)):
        en: Any = ffi.cast("struct iop_jentry *", first + i * stride)
        state = int(en.state)
        if state == JE_FREE:
            continue
        done = state == JE_DONE
        if done and ((published - int(en.rsp_pos) - 1) & 0xFFFFFFFF) < RING_MAX:
            continue  # its completion is visible: the next switch retires it
        req: Any = ffi.cast("struct iop_desc *", first + i * stride + int(lib.IOP_JENTRY_SIZE))
        if int(req.opcode) == OP_NET_TX:
            out.tx += 1
            addr, n = int(req.frags[0].addr), int(req.frags[0].len)
            tx_frames.append(bytes(port.memory.view[addr : addr + n]))
        elif int(req.opcode) == OP_NET_RX and done:
            out.rx_done += 1
            rsp: Any = ffi.cast("struct iop_desc *",
                                slots + (int(en.rsp_pos) % SLOTS) * SLOT_SIZE)
            assert int(rsp.id) == int(req.id), "a journal entry names another response"
            if int(rsp.status) == 0:
                addr, n = int(req.frags[0].addr), int(rsp.len)
                rx_frames.append(bytes(port.memory.view[addr : addr + n]))
    out.rx_frames, out.tx_frames = tuple(rx_frames), tuple(tx_frames)
    del cbuf
    return out


class Switching:
    """Whether a port's switch is in the middle of its requests: how many it has taken
    from the ring (into the journal) without publishing their completions yet."""

    def __init__(self, pool: HostMemoryPool, port: Port) -> None:
        self._cbuf = ffi.from_buffer("char[]", pool.mm)
        base = self._cbuf + port.ch.extent.offset
        hdr: Any = ffi.cast("struct iop_chan_hdr *", base)
        self._req: Any = ffi.cast("struct iop_ring_ctl *", base + int(hdr.req_ring_off))
        self._rsp: Any = ffi.cast("struct iop_ring_ctl *", base + int(hdr.rsp_ring_off))

    def taken(self) -> int:
        return (int(self._req.cons) - int(self._rsp.prod)) & 0xFFFFFFFF

    def wait(self, timeout_s: float) -> None:
        end = time.perf_counter() + timeout_s
        while self.taken() == 0 and time.perf_counter() < end:
            pass

    def close(self) -> None:
        self._req = self._rsp = self._cbuf = None


def test_switches_killed_under_traffic_lose_no_transmitted_frame() -> None:
    pool = HostMemoryPool(32 << 20)
    a_port, b_port = make_port(pool, 1), make_port(pool, 2)
    a_cli, b_cli = a_port.ch.end(Role.CLIENT), b_port.ch.end(Role.CLIENT)
    a = NicLoops(a_cli, a_port.memory, a_port.mac, nbufs=A_BUFS)
    b = NicLoops(b_cli, b_port.memory, b_port.mac, nbufs=B_BUFS)
    counts = ffi.new("uint8_t[]", MAX_SEQ)
    credit = ffi.new("uint64_t *", WINDOW)
    stop_tx, stop_rx = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    results: dict[str, dict[str, int]] = {}
    failures: list[BaseException] = []

    def receive() -> None:
        try:
            results["rx"] = b.seq_recv(a.mac, counts, MAX_SEQ, stop_rx, credit=credit,
                                       window=WINDOW)
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    def send() -> None:
        try:
            results["tx"] = a.seq_send(b.mac, 0, MAX_SEQ, credit=credit, stop=stop_tx)
        except BaseException as exc:
            failures.append(exc)

    # B first: a frame switched to a port not added yet would go nowhere
    ports = [b_port, a_port]
    rng = random.Random(11)
    lost_rx_entries = tx_entries = kills_mid_switching = 0
    lost: set[int] = set()  # frames that were in a buffer whose completion was lost
    may_lose: set[int] = set()  # those of them whose transmit was complete
    not_a_frame: list[bytes] = []

    def seqs(frames: tuple[bytes, ...]) -> set[int]:
        out = set()
        for f in frames:
            seq = b.seq_check(f, a.mac)
            if seq is None:
                not_a_frame.append(f)
            else:
                out.add(seq)
        return out

    a_switching = Switching(pool, a_port)  # A posts no buffers: all it has taken are frames
    pid = fork_switch(pool, ports)
    receiver, sender = threading.Thread(target=receive), threading.Thread(target=send)
    receiver.start()
    jb = Journal(pool.mm, b_port.jr_off, b_port.jr_len)
    for _ in range(2000):  # B's buffers are with the switch before A sends
        if jb.state().in_flight == B_BUFS:
            break
        time.sleep(0.001)
    assert jb.state().in_flight == B_BUFS
    sender.start()
    kills = 0
    t0 = time.monotonic()
    try:
        for k in range(KILLS):
            time.sleep(rng.uniform(0.001, 0.04))
            if k % 2:
                # every other kill waits (a little) for the switch to be in the middle of
                # A's frames: killed at a random moment, it mostly is not
                a_switching.wait(0.02)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            kills += 1
            ub, ua = unfinished(pool, b_port), unfinished(pool, a_port)
            lost_rx_entries += ub.rx_done
            tx_entries += ua.tx
            kills_mid_switching += bool(ub.rx_done or ua.tx)
            in_rx, in_tx = seqs(ub.rx_frames), seqs(ua.tx_frames)
            lost |= in_rx
            # a frame whose transmit is run again reaches B again: it may not be lost
            may_lose |= in_rx - in_tx
            pid = fork_switch(pool, ports)
        time.sleep(0.1)
        stop_tx[0] = 1
        sender.join(30)
        assert not sender.is_alive(), "A's frames did not complete after the last takeover"
        queued = results["tx"]["queued"] if "tx" in results else 0
        got = np.frombuffer(ffi.buffer(counts), dtype=np.uint8)
        deadline = time.monotonic() + 5  # let B take in what is still on its way
        while time.monotonic() < deadline:
            if set(np.flatnonzero(got[:queued] == 0).tolist()) <= may_lose:
                break
            time.sleep(0.01)
        time.sleep(0.05)  # and any late second copy
    finally:
        stop_tx[0] = stop_rx[0] = 1
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        for t in (sender, receiver):
            if t.ident is not None:
                t.join(30)
    elapsed = time.monotonic() - t0
    assert not failures, failures
    tx, rx = results["tx"], results["rx"]
    got = np.frombuffer(ffi.buffer(counts), dtype=np.uint8).copy()
    missing = set(np.flatnonzero(got[:queued] == 0).tolist())
    twice = int((got[got > 1].astype(np.int64) - 1).sum())
    ja = Journal(pool.mm, a_port.jr_off, a_port.jr_len).state()
    jbs = jb.state()
    print(f"\n{kills} kills in {elapsed:.1f} s ({kills_mid_switching} with entries to run "
          f"again): A queued {queued} frames ({tx}), B got {int((got > 0).sum())} of them "
          f"({rx}), {twice} twice; {tx_entries} transmit entries run again; "
          f"{lost_rx_entries} receive completions unpublished at a takeover, "
          f"{len(lost)} frames in them, {len(may_lose)} of those with their transmit "
          f"complete; {len(missing)} frames never received"
          f"\nA journal {ja}\nB journal {jbs}")
    assert kills == KILLS
    assert queued > 20_000, "too little traffic to say anything"
    assert tx_entries > 0, "no kill caught the switch with frames taken: nothing was tested"
    assert tx["accepted"] == queued and tx["failed"] == 0
    assert rx["bad"] == 0 and not not_a_frame, "a frame arrived damaged"
    assert rx["errors"] == 0
    assert not got[queued:].any(), "B got a frame A never queued"
    # every frame A queued reached B, but for frames in receive buffers whose completion
    # a dead switch never published while it had published the transmit's
    assert missing <= may_lose, f"transmitted frames lost: {sorted(missing - may_lose)[:20]}"
    assert len(missing) <= lost_rx_entries
    assert twice <= tx_entries, "more frames delivered twice than transmits run again"
    assert tx["duplicates"] == 0 and rx["duplicates"] == 0, "a completion delivered twice"
    assert ja.takeovers == kills + 1 and jbs.takeovers == kills + 1
    del got, jb
    a_switching.close()
    for o in (a_cli, b_cli, a_port.ch, b_port.ch, a_port.memory, b_port.memory):
        o.close()
    gc.collect()
    pool.close()


# -- the clients' shadows: completions not in flight are dropped and counted ----------

@dataclass
class Pair:
    pool: HostMemoryPool
    srv: ChannelEnd
    cli: ChannelEnd
    memory: GuestMemory


@pytest.fixture
def pair() -> Iterator[Pair]:
    pool = HostMemoryPool(8 << 20)
    _, memory = partition_memory(pool, 2 << 20)
    ch = Channel(pool, ChannelGeometry(nslots=64, slot_size=128))
    p = Pair(pool, ch.end(Role.SERVER), ch.end(Role.CLIENT), memory)
    try:
        yield p
    finally:
        p.srv.close()
        p.cli.close()
        ch.close()
        memory.close()
        gc.collect()
        pool.close()


def twice_server(srv: ChannelEnd, n: int, stop: threading.Event) -> threading.Thread:
    """A switch that completes each of the next n transmits twice, and then once more a
    transmit never asked for."""

    def run() -> None:
        done = 0
        while done < n and not stop.is_set():
            d = srv.pop()
            if d is None:
                srv.wait(20)
                continue
            if d.opcode != OP_NET_TX:
                continue
            for _ in range(2):
                srv.push(Descriptor(d.id, d.opcode, len=d.len))
            done += 1
            if done == n:
                srv.push(Descriptor((1 << 32) | 7 | (99 << 33), OP_NET_TX))
            srv.publish()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_nic_endpoint_drops_completions_delivered_twice(pair: Pair) -> None:
    mac = guest_mac(1)
    nic = NicEndpoint(pair.cli, pair.memory, mac, rx_buffers=2, tx_buffers=4)
    posted = [pair.srv.pop(), pair.srv.pop()]
    assert all(d is not None and d.opcode == OP_NET_RX for d in posted)
    assert posted[0] is not None
    f = guest_mac(2) + mac + b"\x88\xb5" + b"x" * 46
    addr = posted[0].frags[0].addr
    pair.memory.view[addr : addr + len(f)] = f
    for _ in range(2):  # buffer 0 filled, its completion delivered twice
        pair.srv.push(Descriptor(0, OP_NET_RX, len=len(f)))
    pair.srv.publish()
    assert nic.recv(1000) == f
    assert nic.recv(50) is None
    assert nic.duplicates == 1
    stop = threading.Event()
    t = twice_server(pair.srv, 6, stop)
    try:
        assert nic.send_many([f] * 6) == [0] * 6
        nic.recv(100)
    finally:
        stop.set()
        t.join()
    # the second copy of every completion (recv took in those send_many left behind);
    # the one never asked for is not a duplicate
    assert nic.duplicates == 7
    assert nic.unsolicited == 1


def test_native_nic_loops_drop_completions_delivered_twice(pair: Pair) -> None:
    nic = NicLoops(pair.cli, pair.memory, guest_mac(1), nbufs=8)
    stop = threading.Event()
    t = twice_server(pair.srv, 50, stop)
    try:
        got, _ = nic.blast(guest_mac(2), 60, 50, timeout_ms=2000)
    finally:
        stop.set()
        t.join()
    assert got == 50
    # the second copy of the last completion may still be in the ring when blast ends
    assert 49 <= nic.duplicates <= 51
