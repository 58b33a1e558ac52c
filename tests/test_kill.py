"""SIGKILL of the command partition at random points during 200 multi-step
transactions: afterwards the database equals a model of the committed ones."""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time

import pytest

from iopart.auditlog import AuditLog
from iopart.resources import ResourceDB
from iopart.rpc import REFUSED, UNAVAILABLE, RpcClient, RpcError
from iopart.transaction import replay
from tests.stackutil import Stack

pytestmark = pytest.mark.system
MIB = 1 << 20
N_TX = 200
KILL_EVERY = 10


def spec(i: int) -> tuple[float, int]:
    """cpu and memory (MiB) of partition p<i>: distinct, so a mix-up would show."""
    return round(0.001 * (1 + i % 7), 4), 1 + i % 3


def test_sigkill_of_the_command_partition_during_multi_step_transactions(
    stack: Stack,
) -> None:
    rng = random.Random(20261124)
    kills = 0
    acked: set[str] = set()
    maybe: set[str] = set()  # sent, outcome unknown to the client
    for i in range(N_TX):
        name = f"p{i}"
        cpu, mem = spec(i)
        if i % KILL_EVERY == KILL_EVERY // 2:
            # kill while this create is in flight: 0-15 ms covers its three messages
            stack.wait_healthy()
            boot = stack.boot()["children"]["command"]
            time.sleep(max(0.0, boot["started_at"] + 1.1 - time.time()))  # not a crash loop
            timer = threading.Timer(rng.uniform(0, 0.015), os.kill,
                                    (boot["pid"], signal.SIGKILL))
            timer.start()
            kills += 1
        deadline = time.monotonic() + 30
        while True:
            try:
                with RpcClient(stack.dir, timeout=10) as c:
                    c.call("partition.create", name=name, cpu=cpu, memory_mib=mem)
                acked.add(name)
                break
            except RpcError as exc:
                if exc.code == REFUSED and exc.data and exc.data.get("errno") == errno.EEXIST:
                    maybe.add(name)  # an earlier try committed; its reply was lost
                    break
                assert exc.code == UNAVAILABLE or exc.data.get("errno") == errno.EBUSY, (
                    exc.to_dict()
                )
                maybe.add(name)
                assert time.monotonic() < deadline, f"{name}: no progress in 30 s"
                time.sleep(0.02)
    stack.wait_healthy()
    db = stack.status()["database"]
    guests = {n: p for n, p in db["partitions"].items() if p["kind"] == "guest"}
    # every acknowledged transaction is there, whole
    assert acked <= set(guests)
    # nothing that was never asked for, and nothing half made: each partition has the
    # cpu and memory of its one transaction (a rolled-back one would lack its memory)
    assert set(guests) <= acked | maybe
    for n, p in guests.items():
        cpu, mem = spec(int(n[1:]))
        assert (p["cpu"], p["memory"]) == (cpu, mem * MIB), f"{n} is partial: {p}"
        assert sum(length for _, length in p["extents"]) == mem * MIB
    assert len(guests) == N_TX  # every create was retried until it held
    # the durable log replays to the very same database
    fresh = ResourceDB(db["cpu_capacity"], db["memory_bytes"])
    log = AuditLog(stack.dir / "audit.db")
    try:
        replay(fresh, log)
        outcomes = [r.outcome for r in log.records()]
    finally:
        log.close()
    assert fresh.snapshot() == db
    rolled_back = outcomes.count("rolled_back")
    assert rolled_back >= 3, f"{kills} kills but only {rolled_back} landed mid-transaction"
    print(f"kills={kills} acked={len(acked)} unacked={len(maybe - acked)} "
          f"rolled_back={rolled_back} committed={outcomes.count('committed')}")
