"""`iopart demo`: what the foundation does, end to end, in under a minute.

1. a client process and a server process exchange requests over a channel;
2. hostile descriptors are refused and counted, the server keeps serving;
3. the channel benchmark table against its limits.
Later issues grow this into the full stack demo.
"""

from __future__ import annotations

import errno

from rich.console import Console
from rich.table import Table

from iopart._native import lib
from iopart.channels import (
    Channel,
    ChannelGeometry,
    Descriptor,
    Fragment,
    Region,
    RegionTable,
    Role,
    ServerWorker,
    WorkerConfig,
)
from iopart.pool import HostMemoryPool

READ = int(lib.IOP_ACCESS_READ)


def _refusals(console: Console) -> None:
    """A client with one 64 KiB region sends good and hostile requests."""
    with HostMemoryPool(4 << 20) as pool:
        ch = Channel(pool, ChannelGeometry(nslots=16, slot_size=128))
        mem = pool.allocate(64 << 10)
        regions = RegionTable(pool.size)
        regions.set([Region(prpa=0, len=mem.length, pool_off=mem.offset, access=READ)])
        server, client = ch.end(Role.SERVER), ch.end(Role.CLIENT)
        cases = [
            ("inside the client's memory", Fragment(0x1000, 4096, READ)),
            ("past the end of its memory", Fragment(mem.length - 16, 4096, READ)),
            ("address + length wraps", Fragment(2**64 - 16, 4096, READ)),
            ("write to a read-only region", Fragment(0, 512, int(lib.IOP_ACCESS_WRITE))),
        ]
        table = Table(title="descriptors from the client, checked by the server")
        for col in ("request", "status"):
            table.add_column(col)
        with ServerWorker(server, regions, WorkerConfig(spin_ns=0)) as worker:
            for i, (label, frag) in enumerate(cases):
                client.push(Descriptor(id=i, frags=(frag,)))
                client.publish()
                got = None
                while got is None and client.wait(2000):
                    got = client.pop()
                status = (
                    "no answer"
                    if got is None
                    else (
                        "ok"
                        if got.status == 0
                        else f"refused ({errno.errorcode.get(-got.status, got.status)})"
                    )
                )
                table.add_row(label, status)
            stats = worker.stats()
        console.print(table)
        console.print(
            f"server: {stats.requests} requests, {stats.completed} completed, "
            f"{stats.refused_addr} refused address, {stats.refused_access} refused access"
        )
        server.close()
        client.close()
        ch.close()


def run(console: Console, quick: bool = True) -> int:
    from bench import channel, report
    from iopart.cli import _progress_bar, render_bench

    console.rule("iopart demo: memory channels")
    _refusals(console)
    console.rule("channel benchmark: server process + client process, with the limits")
    bar, update = _progress_bar()
    with bar:
        doc = channel.run(quick=quick, progress=update)
    report.save(doc)
    render_bench(doc)
    console.print("results in bench/results/channel.json, table in BENCHMARKS.md")
    return 0
