"""`iopart demo`: what the foundation does, end to end, in under a minute.

1. hostile descriptors are refused and counted, the server keeps serving;
2. the system partitions as processes: `up`, partitions created by transactions on
   the command channel, a refusal naming its field, the ultravisor SIGKILLed and
   rebuilt from the audit log by boot, `down`;
3. the channel benchmark (a server process and a client process) against its limits.
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


def _system(console: Console) -> None:
    import os
    import signal
    import tempfile
    import time
    from pathlib import Path

    from iopart import stack
    from iopart.cli import _partition_table, render_status
    from iopart.rpc import RpcClient, RpcError

    with tempfile.TemporaryDirectory(prefix="iopart-demo-") as tmp:
        state = Path(tmp)
        info = stack.up(state, None)
        try:
            console.print(f"up: boot pid {info['boot_pid']}, command pid {info['command_pid']}")
            with RpcClient(state) as c:
                for name, cpu, mib in (("web", 0.25, 64), ("db", 0.5, 128)):
                    c.call("partition.create", name=name, cpu=cpu, memory_mib=mib)
                try:
                    c.call("partition.create", name="huge", cpu=0.1, memory_mib=100_000)
                except RpcError as exc:
                    console.print(f"refused as it should be: {exc.message}")
                before = c.call("status")
            console.print(_partition_table(list(before["database"]["partitions"].values())))
            uv = before["boot"]["children"]["ultravisor"]["pid"]
            os.kill(uv, signal.SIGKILL)
            console.print(f"SIGKILL ultravisor (pid {uv}) ...")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    with RpcClient(state, timeout=5) as c:
                        after = c.call("status")
                    if after["ultravisor"] and after["ultravisor"]["pid"] != uv:
                        break
                except RpcError:
                    pass
                time.sleep(0.1)
            same = after["database"] == before["database"]
            console.print(f"restarted by boot as pid {after['ultravisor']['pid']}, "
                          f"{after['ultravisor']['replayed']} transactions replayed, database "
                          + ("[green]identical[/]" if same else "[red]DIFFERENT[/]"))
            render_status(after)
        finally:
            stack.down(state)
            console.print("down")


def run(console: Console, quick: bool = True) -> int:
    from bench import channel, report
    from iopart.cli import _progress_bar, render_bench

    console.rule("iopart demo: memory channels")
    _refusals(console)
    console.rule("system partitions: boot, ultravisor, command")
    _system(console)
    console.rule("channel benchmark: server process + client process, with the limits")
    bar, update = _progress_bar()
    with bar:
        doc = channel.run(quick=quick, progress=update)
    report.save(doc)
    render_bench(doc)
    console.print("results in bench/results/channel.json, table in BENCHMARKS.md")
    return 0
