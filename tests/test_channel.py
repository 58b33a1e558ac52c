"""The native channel through cffi: layout checks, rings, hostile peers, doorbells, worker."""

from __future__ import annotations

import errno
import time

import pytest

from iopart._native import ffi, lib
from iopart.channels import (
    ChannelEnd,
    ChannelGeometry,
    Descriptor,
    Fragment,
    Region,
    RegionTable,
    Role,
    ServerWorker,
    WorkerConfig,
)
from iopart.errors import BadHeaderError, ChannelBrokenError, ConfigError
from iopart.pool import HostMemoryPool

from .conftest import ChannelPair, make_pair

pytestmark = pytest.mark.native

READ, WRITE = int(lib.IOP_ACCESS_READ), int(lib.IOP_ACCESS_WRITE)


def attach(pair: ChannelPair) -> ChannelEnd:
    return ChannelEnd(
        pair.pool.mm, pair.channel.extent.offset, pair.channel.extent.length, Role.SERVER
    )


def roundtrip(client: ChannelEnd, d: Descriptor, timeout_ms: int = 2000) -> Descriptor:
    assert client.push(d)
    client.publish()
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        got = client.pop()
        if got is not None:
            return got
        client.wait(100)
    raise AssertionError(f"no response to {d}")


# ---- header checks at attach -----------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "err", "text"),
    [
        ("signature", 0x1234, errno.EBADMSG, "bad channel signature"),
        ("version", 99, errno.EPROTONOSUPPORT, "unsupported channel version"),
        ("hdr_size", 256, errno.EBADMSG, "bad channel header size"),
        ("total_size", 8192, errno.EMSGSIZE, "does not match its mapping"),
        ("nslots", 3, errno.EINVAL, "bad ring geometry"),
        ("slot_size", 8192, errno.EINVAL, "bad ring geometry"),
        ("max_frags", 50, errno.EINVAL, "max_frags"),
        ("rsp_ring_off", 1 << 40, errno.EINVAL, "ring offsets"),
    ],
)
def test_attach_refuses_a_bad_header(
    pair: ChannelPair, field: str, value: int, err: int, text: str
) -> None:
    setattr(pair.header(), field, value)
    with pytest.raises(BadHeaderError, match=text) as exc:
        attach(pair)
    assert exc.value.errno == err


def test_attach_refuses_indices_outside_the_ring(pair: ChannelPair) -> None:
    rsp = pair.ring_ctl("rsp")
    rsp.prod = 100  # server's tx ring: 100 produced, 0 consumed, 8 slots
    with pytest.raises(BadHeaderError, match="indices outside the ring") as exc:
        attach(pair)
    assert exc.value.errno == errno.EPROTO


def test_attach_refuses_a_mapping_smaller_than_a_header(pool: HostMemoryPool) -> None:
    with pytest.raises(BadHeaderError, match="smaller than a header"):
        ChannelEnd(pool.mm, 0, 100, Role.CLIENT)


def test_bad_geometry_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="power of two"):
        ChannelGeometry(nslots=6).size()


def test_header_is_self_describing(pair: ChannelPair) -> None:
    h = pair.header()
    assert h.signature == lib.IOP_CHAN_SIGNATURE
    assert h.version == lib.IOP_CHAN_VERSION
    assert (h.nslots, h.slot_size, h.max_frags) == (8, 128, 6)
    assert bytes(ffi.buffer(h.type_uuid)) == pair.channel.type_uuid.bytes
    assert h.client_state == h.server_state == lib.IOP_STATE_READY
    pair.client.close()
    assert h.client_state == lib.IOP_STATE_CLOSED


# ---- ring behaviour ----------------------------------------------------------------


def test_order_full_empty_and_wrap(pair: ChannelPair) -> None:
    c, s = pair.client, pair.server
    assert s.pop() is None
    next_id = 0
    for _round in range(5):  # 5 x 8 slots: the indices wrap the ring several times
        for _ in range(8):
            assert c.push(Descriptor(id=next_id, offset=next_id * 7))
            next_id += 1
        assert not c.push(Descriptor(id=999))  # full
        c.publish()
        got = [s.pop() for _ in range(8)]
        assert [d.id for d in got if d] == list(range(next_id - 8, next_id))
        assert all(d is not None and d.offset == d.id * 7 for d in got)
        assert s.pop() is None
    assert c.counters().produced == s.counters().consumed == 40


def test_unpublished_slots_are_invisible(pair: ChannelPair) -> None:
    assert pair.client.push(Descriptor(id=1))
    assert pair.server.pop() is None
    pair.client.publish()
    got = pair.server.pop()
    assert got is not None and got.id == 1


def test_too_many_fragments_cannot_be_pushed(pair: ChannelPair) -> None:
    frags = tuple(Fragment(i * 16, 16) for i in range(7))  # max_frags is 6 at 128 B slots
    with pytest.raises(Exception, match=r"E2BIG|Argument list too long"):
        pair.client.push(Descriptor(id=1, frags=frags))


def test_impossible_producer_index_breaks_the_channel(pair: ChannelPair) -> None:
    req = pair.ring_ctl("req")
    req.prod = req.cons + 8 + 1
    with pytest.raises(ChannelBrokenError, match="producer index outside the ring"):
        pair.server.pop()
    assert pair.server.broken
    assert pair.server.counters().bad_index == 1
    assert pair.header().server_state == lib.IOP_STATE_BROKEN
    # stays broken, answers at once, never waits
    t0 = time.monotonic()
    with pytest.raises(ChannelBrokenError):
        pair.server.wait(5000)
    assert time.monotonic() - t0 < 1


def test_consumer_index_ahead_of_producer_breaks_the_channel(pair: ChannelPair) -> None:
    for i in range(8):
        assert pair.client.push(Descriptor(id=i))
    pair.client.publish()
    pair.ring_ctl("req").cons = 50  # the server "consumed" more than was produced
    with pytest.raises(ChannelBrokenError, match="consumer index ahead"):
        pair.client.push(Descriptor(id=9))


def test_descriptor_is_copied_before_it_is_checked(pair: ChannelPair) -> None:
    frag = Fragment(0x1000, 512, READ)
    assert pair.client.push(Descriptor(id=5, opcode=1, offset=77, frags=(frag,)))
    pair.client.publish()
    got = pair.server.pop()
    # the client rewrites the slot after the server took it: the copy must not change
    slot = pair.raw(int(pair.header().req_ring_off) + int(lib.IOP_RING_CTL_SIZE), 128)
    slot[:] = b"\xff" * 128
    assert got == Descriptor(id=5, opcode=1, offset=77, frags=(frag,))


# ---- doorbells and event indices ------------------------------------------------------


def test_spinning_consumer_gets_no_doorbells(pair: ChannelPair) -> None:
    c, s = pair.client, pair.server
    assert c.push(Descriptor(id=1))
    c.publish()  # the very first publish may kick: event index starts at 0
    assert s.pop() is not None
    kicks = c.counters().kicks_sent
    for i in range(2, 50):  # the server polls without ever arming its event index
        assert c.push(Descriptor(id=i))
        c.publish()
        assert s.pop() is not None
    assert c.counters().kicks_sent == kicks
    assert c.counters().kicks_suppressed >= 48


def test_sleeping_consumer_is_woken_by_exactly_one_kick(pair: ChannelPair) -> None:
    c, s = pair.client, pair.server
    s.set_spin(0)
    assert not s.wait(20)  # times out, and has armed its event index
    before = c.counters().kicks_sent
    for i in range(4):  # a batch: only the first publish crosses the event index
        assert c.push(Descriptor(id=i))
        c.publish()
    assert c.counters().kicks_sent == before + 1
    assert s.wait(1000)
    assert [d.id for d in (s.pop() for _ in range(4)) if d] == [0, 1, 2, 3]
    assert s.counters().sleeps >= 1


# ---- the worker: refusals, translation, round trips -----------------------------------


def test_refused_descriptors_are_answered_and_counted(pool: HostMemoryPool) -> None:
    pair = make_pair(pool, nslots=8, slot_size=128)
    mem = pool.allocate(64 << 10)
    regions = RegionTable(pool.size)
    regions.set([Region(0, mem.length, mem.offset, READ)])
    cases = [
        (Descriptor(id=1, frags=(Fragment(0, 0, READ),)), -errno.EINVAL),
        (Descriptor(id=2, frags=(Fragment(2**64 - 8, 64, READ),)), -errno.EOVERFLOW),
        (Descriptor(id=3, frags=(Fragment(0, (1 << 20) + 1, READ),)), -errno.EMSGSIZE),
        (Descriptor(id=4, frags=(Fragment(0, 64, 4),)), -errno.EINVAL),
        (Descriptor(id=5, flags=0x80), -errno.EINVAL),
        (Descriptor(id=6, frags=(Fragment(mem.length - 8, 64, READ),)), -errno.EFAULT),
        (Descriptor(id=7, frags=(Fragment(0, 64, WRITE),)), -errno.EACCES),
        (Descriptor(id=8, opcode=200), -errno.EOPNOTSUPP),
        (Descriptor(id=9, frags=(Fragment(0x100, 64, READ),)), 0),
    ]
    try:
        with ServerWorker(pair.server, regions, WorkerConfig(spin_ns=0)) as w:
            for d, status in cases:
                got = roundtrip(pair.client, d)
                assert (got.id, got.status) == (d.id, status)
            st = w.stats()
        assert st.requests == st.completed == len(cases)
        assert st.refused_desc == 5 and st.refused_addr == 1 and st.refused_access == 1
        assert pair.server.counters().refused == 8
        assert pair.header().server_counters.refused == 8  # published for status
    finally:
        pair.server.close()
        pair.client.close()
        pair.channel.close()


def test_too_many_fragments_written_by_a_hostile_client_are_refused(pair: ChannelPair) -> None:
    with ServerWorker(pair.server, None, WorkerConfig(spin_ns=0)):
        assert pair.client.push(Descriptor(id=1))
        slot = pair.raw(int(pair.header().req_ring_off) + int(lib.IOP_RING_CTL_SIZE), 32)
        slot[12:14] = (60).to_bytes(2, "little")  # nfrags = 60 in a 6-fragment slot
        pair.client.publish()
        deadline = time.monotonic() + 2
        got = None
        while got is None and time.monotonic() < deadline:
            pair.client.wait(100)
            got = pair.client.pop()
        assert got is not None and got.status == -errno.E2BIG
        # and the worker keeps serving
        assert roundtrip(pair.client, Descriptor(id=2)).status == 0


@pytest.mark.parametrize("spin_ns", [0, 200_000])
def test_native_round_trips_in_both_modes(pair: ChannelPair, spin_ns: int) -> None:
    pair.client.set_spin(spin_ns)
    with ServerWorker(pair.server, None, WorkerConfig(spin_ns=spin_ns)) as w:
        lat = pair.client.roundtrips(2000)
        st = w.stats()
    assert len(lat) == 2000 and all(x > 0 for x in lat)
    assert st.requests == st.completed == 2000
    assert pair.client.counters().produced == 2000


def test_worker_needs_the_server_end(pair: ChannelPair) -> None:
    with pytest.raises(Exception, match="server end"):
        ServerWorker(pair.client)


def test_client_stops_waiting_when_nobody_serves(pair: ChannelPair) -> None:
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"ETIMEDOUT|timed out"):
        pair.client.roundtrips(1, timeout_ms=200)
    assert time.monotonic() - t0 < 2
