"""The in-flight journal with real processes: block servers SIGKILLed under load.

One client keeps a verifying mixed load (stamped 4k writes, every read checked
against the last acknowledged version) on a failover channel, while server
processes are forked, killed at random moments and replaced. Each replacement
attaches the channel, opens the journal and continues. No acknowledged write may
be lost, no request completed twice, no completion missing.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from bench.blockrig import partition_memory
from iopart.channels import Channel, ChannelGeometry, Descriptor, Role
from iopart.channels.journal import Journal, journal_size
from iopart.client import DiskEndpoint, JobResult
from iopart.drivers.blockserver import BlockServer, Engine, Extent, ServerConfig
from iopart.drivers.disk import Disk, create_image
from iopart.pool import HostMemoryPool

SLOTS = 64
SPAN = 256 * 4096  # small, so reads keep landing on blocks written moments ago


def fork_server(pool: HostMemoryPool, ch: Channel, table: object, disk_path: Path,
                jr_off: int, jr_len: int, engine: Engine) -> int:
    """A block server process that takes the channel over and serves until killed."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        end = ch.end(Role.SERVER)
        jr = Journal(pool.mm, jr_off, jr_len)
        jr.open(end, owner=os.getpid() & 0xFFFF)
        srv = BlockServer(pool.mm, ServerConfig(engine=engine, spin_ns=50_000))
        srv.add(end, table, Disk(disk_path), Extent(0, 8 << 20), journal=jr.handle)
        time.sleep(60)
    except BaseException:  # a child reports by exit code only
        code = 1
    os._exit(code)


@pytest.mark.parametrize("engine", [Engine.IO_URING, Engine.PSYNC])
def test_servers_killed_under_load_lose_and_duplicate_nothing(tmp_path: Path,
                                                              engine: Engine) -> None:
    pool = HostMemoryPool(32 << 20)
    regions, memory = partition_memory(pool, 8 << 20)
    img = tmp_path / "disk.img"
    create_image(img, 8 << 20)
    geo = ChannelGeometry(nslots=SLOTS, slot_size=128)
    ch = Channel(pool, geo)
    jr_len = journal_size(SLOTS, 128)
    jr_ext = pool.allocate(jr_len)
    Journal(pool.mm, jr_ext.offset, jr_len).format(SLOTS, 128)
    cli = ch.end(Role.CLIENT)
    disk = DiskEndpoint(cli, memory, 8 << 20)
    versions = disk.new_versions()
    results: list[JobResult] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        try:
            seed = 1
            while not stop.is_set():
                results.append(disk.run_job(n_ops=2000, queue_depth=8, write_pct=50,
                                            verify=True, span=SPAN, seed=seed,
                                            versions=versions, timeout_ms=20_000))
                seed += 1
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    rng = random.Random(7)
    pid = fork_server(pool, ch, regions.table, img, jr_ext.offset, jr_len, engine)
    worker = threading.Thread(target=load)
    worker.start()
    kills = 0
    try:
        for _ in range(30):
            time.sleep(rng.uniform(0.002, 0.04))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # its I/O is finished once it is reaped
            kills += 1
            pid = fork_server(pool, ch, regions.table, img, jr_ext.offset, jr_len, engine)
        time.sleep(0.2)
        stop.set()
        worker.join(30)
        assert not worker.is_alive(), "the load did not finish after the last takeover"
        # a last full pass: every block read back against its last acknowledged write
        final = disk.run_job(n_ops=SPAN // 4096, sequential=True, verify=True, span=SPAN,
                             versions=versions, timeout_ms=20_000)
        results.append(final)
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        worker.join(30)
    assert not failures, failures
    ops = sum(r.ops for r in results)
    jr = Journal(pool.mm, jr_ext.offset, jr_len)
    st = jr.state()
    print(f"{engine.name}: {kills} kills, {ops} requests, journal {st}")
    assert kills == 30
    assert ops > 4000
    assert sum(r.errors for r in results) == 0
    assert sum(r.verify_failures for r in results) == 0, "an acknowledged write was lost"
    assert sum(r.duplicates for r in results) == 0, "a request completed twice"
    assert final.verified_bytes > 0
    assert st.takeovers == kills + 1
    cli.close()
    ch.close()
    memory.close()


def test_a_takeover_wakes_a_client_the_dead_server_published_to_but_never_rang() -> None:
    """The server died between publishing a completion and ringing the doorbell: the
    client sleeps with its completion in the ring. Opening the journal rings it."""
    pool = HostMemoryPool(4 << 20)
    ch = Channel(pool, ChannelGeometry(nslots=8, slot_size=128))
    jr_len = journal_size(8, 128)
    jr_ext = pool.allocate(jr_len)
    Journal(pool.mm, jr_ext.offset, jr_len).format(8, 128)
    cli = ch.end(Role.CLIENT)
    dead = ch.end(Role.SERVER, doorbells=False)  # publishes, never rings
    cli.push(Descriptor(7))
    cli.publish()
    woke: list[float] = []

    def sleeper() -> None:
        t0 = time.monotonic()
        cli.wait(10_000)
        woke.append(time.monotonic() - t0)

    t = threading.Thread(target=sleeper)
    t.start()
    time.sleep(0.3)  # the client is asleep on its doorbell
    got = dead.pop()
    assert got is not None
    assert dead.push(Descriptor(7, status=0))
    dead.publish()
    time.sleep(0.3)
    assert not woke, "the client should still sleep: nobody rang"
    new = ch.end(Role.SERVER)
    jr = Journal(pool.mm, jr_ext.offset, jr_len)
    jr.open(new, owner=1)
    t.join(5)
    assert woke and woke[0] < 2, woke
    assert cli.pop() == Descriptor(7, status=0)
    jr.close()
    for e in (cli, dead, new):
        e.close()
    ch.close()
