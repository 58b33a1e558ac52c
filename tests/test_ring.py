"""Ring properties: a model-based test in one process, and a producer in another process."""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iopart.channels import Descriptor, Role
from iopart.channels.handoff import offer_channel
from iopart.pool import HostMemoryPool

from .conftest import make_pair

pytestmark = pytest.mark.native

ops = st.lists(st.sampled_from(["push", "push", "push", "publish", "pop", "pop"]), max_size=300)


@settings(max_examples=150, deadline=None)
@given(nslots=st.sampled_from([2, 4, 8]), script=ops)
def test_ring_matches_a_queue_model(nslots: int, script: list[str]) -> None:
    with HostMemoryPool(1 << 20) as pool:
        pair = make_pair(pool, nslots=nslots, slot_size=64)
        pushed: collections.deque[int] = collections.deque()  # pushed, not yet published
        visible: collections.deque[int] = collections.deque()  # published, not yet popped
        next_id = 0
        for op in script:
            if op == "push":
                ok = pair.client.push(Descriptor(id=next_id))
                assert ok == (len(pushed) + len(visible) < nslots)  # full exactly at nslots
                if ok:
                    pushed.append(next_id)
                    next_id += 1
            elif op == "publish":
                pair.client.publish()
                visible.extend(pushed)
                pushed.clear()
            else:
                got = pair.server.pop()
                if visible:
                    assert got is not None and got.id == visible.popleft()  # order kept
                else:
                    assert got is None  # empty exactly when nothing is published
        pair.server.close()
        pair.client.close()
        pair.channel.close()


@pytest.mark.parametrize("spin_ns", [0, 100_000], ids=["doorbell", "spinning"])
def test_producer_in_another_process_loses_and_duplicates_nothing(spin_ns: int) -> None:
    n = 200_000 if spin_ns else 50_000
    with HostMemoryPool(1 << 20) as pool:
        pair = make_pair(pool, nslots=8, slot_size=64)
        pair.server.close()
        server = pair.channel.end(Role.SERVER)
        server.set_spin(spin_ns)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.ring_producer",
                str(theirs.fileno()),
                str(n),
                "42",
                str(spin_ns),
            ],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        try:
            offer_channel(ours, pair.channel, Role.CLIENT)
            expect = 0
            deadline = time.monotonic() + 90
            while expect < n:
                assert time.monotonic() < deadline, f"stalled at {expect} of {n}"
                d = server.pop()
                if d is None:
                    server.wait(100)
                    continue
                assert d.id == expect, f"expected id {expect}, got {d.id}"
                assert d.offset == expect ^ 0x5A5A
                expect += 1
            ours.settimeout(30)
            assert ours.recv(16) == b"done"
            assert proc.wait(timeout=30) == 0
            assert server.pop() is None  # nothing extra
            assert server.counters().consumed == n
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            ours.close()
            server.close()
            pair.client.close()
            pair.channel.close()
