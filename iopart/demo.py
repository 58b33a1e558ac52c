"""`iopart demo`: what the foundation does, end to end, in under a minute.

1. hostile descriptors are refused and counted, the server keeps serving;
2. the system partitions as processes: `up`, partitions created by transactions on
   the command channel, a refusal naming its field, the ultravisor SIGKILLed and
   rebuilt from the audit log by boot, `down`;
3. `iopart up` with its I/O partitions, four guests under monitors writing and
   verifying data on one shared disk, their endpoints' counters; two guests in network
   namespaces of their own pinging each other and the uplink through the switch; a
   guest whose I/O goes on while the active I/O partition is killed, then hung;
4. the disk benchmark (quick): direct, the iopart channel, nbdkit, qemu-storage-daemon.
"""

from __future__ import annotations

import errno
from pathlib import Path

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


def _shared_disk(console: Console, guests: int = 4) -> bool:
    """`iopart up`, then guests writing and verifying data on one shared disk."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from iopart import stack
    from iopart.cli_io import _disk_table, _endpoint_table
    from iopart.rpc import RpcClient

    ok = True
    with tempfile.TemporaryDirectory(prefix="iopart-demo-", dir="/var/tmp") as tmp:
        state = Path(tmp)
        stack.up(state, None)
        try:
            procs = []
            for i in range(guests):
                argv = [sys.executable, "-m", "iopart.cli", "guest", "run", f"guest{i + 1}",
                        "--state-dir", str(state), "--memory", "16M", "--cpu", "0.2",
                        "--disk-size", "8M", "--keep", "--", "python3", "-m",
                        "iopart.demo_guest", str(i + 1)]
                procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
            console.print(f"{guests} guests started, each on its own 8 MiB of disk0 ...")
            t = Table(title=f"{guests} guests on one shared disk (every byte read back checked)")
            for col in ("guest", "ops", "verified", "errors", "bad bytes", "seconds", "exit"):
                t.add_column(col, justify="left" if col == "guest" else "right")
            for i, p in enumerate(procs):
                out, err = p.communicate(timeout=300)
                lines = [ln for ln in out.splitlines() if ln.startswith("{")]
                r = json.loads(lines[-1]) if lines else {}
                ok &= p.returncode == 0 and bool(r)
                if p.returncode:
                    console.print(f"[red]guest{i + 1} failed[/]: {err.strip()[-400:]}")
                t.add_row(f"guest{i + 1}", str(r.get("ops", "-")),
                          f"{r.get('verified_bytes', 0) >> 20} MiB", str(r.get("errors", "-")),
                          str(r.get("verify_failures", "-")), str(r.get("seconds", "-")),
                          str(p.returncode))
            console.print(t)
            with RpcClient(state) as c:
                console.print(_disk_table(c.call("disk.list")))
                st = c.call("status")
            for name, rep in sorted(st["io"].items()):
                console.print(f"{name}: {rep.get('role')}, engine {rep.get('engine')}, "
                              f"metrics {rep.get('metrics_url')}")
                if rep.get("endpoints"):
                    console.print(_endpoint_table(rep["endpoints"]))
            ok &= _shared_nic(console, state)
            ok &= _failover(console, state)
        finally:
            stack.down(state)
            console.print("down")
    return ok


def _shared_nic(console: Console, state: Path) -> bool:
    """Guests in network namespaces of their own, bridged to the active I/O partition's
    switch: unmodified ping between them and to the far end of the default uplink."""
    import subprocess
    import sys
    import time

    from iopart.rpc import RpcClient

    def guest(name: str, ip: str, *prog: str) -> list[str]:
        return [sys.executable, "-m", "iopart.cli", "guest", "run", name, "--state-dir",
                str(state), "--memory", "16M", "--netns", "--ip", ip, "--", *prog]

    console.print("guests on the shared NIC: net1 (10.78.0.11) waits, net2 (10.78.0.12) "
                  "pings it and the uplink's far end (10.78.0.1), all through the active I/O "
                  "partition's switch")
    target = subprocess.Popen(guest("net1", "10.78.0.11/24", "sleep", "6"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        res = subprocess.run(guest("net2", "10.78.0.12/24", "sh", "-c",
                                   "ping -c 3 -i 0.2 10.78.0.11 && ping -c 3 -i 0.2 10.78.0.1"),
                             capture_output=True, text=True, timeout=60)
        for line in res.stdout.splitlines():
            if "bytes from" in line or "packet loss" in line:
                console.print("  " + line)
        with RpcClient(state) as c:
            nics = c.call("nic.list")
    finally:
        target.kill()
        target.communicate(timeout=30)
    for n in nics["nics"]:
        st = n.get("uplink", {}).get("stats", {})
        console.print(f"{n['name']}: {n.get('uplink', {}).get('kind', '?')} uplink, "
                      f"{st.get('tx_frames', 0)} frames in, {st.get('rx_frames', 0)} out")
    if res.returncode:
        console.print(f"[red]ping failed[/]: {res.stderr.strip()[-300:]}")
    return res.returncode == 0


def _failover(console: Console, state: Path) -> bool:
    """A guest keeps verifying I/O while the active I/O partition is killed, then the
    new active one hangs: the standby takes over each time, nothing is lost."""
    import json
    import random
    import subprocess
    import sys
    import time

    from iopart import faults

    stop = state / "demo-failover.stop"
    argv = [sys.executable, "-m", "iopart.cli", "guest", "run", "failover", "--state-dir",
            str(state), "--memory", "32M", "--cpu", "0.5", "--disk-size", "8M", "--",
            "python3", "-m", "iopart.loadgen", "disk", "--stop", str(stop), "--gap-ms", "0.2"]
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rng = random.Random(1)
    done: list[faults.Fault] = []
    try:
        active, standby = faults.wait_redundant(state)
        console.print(f"{active} is active, {standby} the standby; a guest runs verifying "
                      "4k reads and writes ...")
        time.sleep(1.0)
        for kind, what in (("kill", "SIGKILL"), ("hang", "SIGSTOP (hung)")):
            active, standby = faults.wait_redundant(state)
            console.print(f"  iopart fail {active}{' --hang' if kind == 'hang' else ''}: "
                          f"{what} ...")
            done += faults.run_faults(state, [kind], rng, pause_s=(0.2, 0.4))
            rep = json.loads((state / f"{standby}.json").read_text())
            last = (rep.get("takeovers") or [{}])[-1]
            console.print(f"  {standby} took over ({last.get('why')}) in {last.get('ms')} ms; "
                          f"boot restarts {active}, which comes back as the standby")
        time.sleep(0.5)
    finally:
        stop.touch()
        out, err = load.communicate(timeout=120)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if load.returncode or not lines:
        console.print(f"[red]the load guest failed[/]: {err.strip()[-400:]}")
        return False
    r = json.loads(lines[-1])
    stalls = faults.stalls_ms(done, r["gaps"], 0.2)
    t = Table(title="guest I/O across two failovers")
    for col in ("fault", "I/O stall ms"):
        t.add_column(col)
    for f, ms in zip(done, stalls, strict=True):
        t.add_row(f"{f.kind} {f.target}", f"{ms:.1f}")
    console.print(t)
    lost = r["verify_failures"] + r["final"]["verify_failures"]
    dup = r["duplicates"] + r["final"]["duplicates"]
    console.print(f"{r['ops']} requests verified, every block read back at the end: "
                  f"{lost} lost, {dup} duplicated, {r['errors']} errors")
    return bool(lost == 0 and dup == 0 and r["errors"] == 0)


def run(console: Console, quick: bool = True) -> int:
    from bench import disk

    console.rule("iopart demo: memory channels")
    _refusals(console)
    console.rule("system partitions: boot, ultravisor, command")
    _system(console)
    console.rule("I/O partitions: guests sharing one disk and one NIC; failover")
    ok = _shared_disk(console)
    console.rule("disk benchmark: direct, iopart channel, nbdkit, qemu-storage-daemon")
    disk.run(quick, out_json=False, progress=True, save=False)
    console.print("(not saved: `iopart bench disk` writes bench/results and BENCHMARKS.md)")
    return 0 if ok else 1
