"""Channel benchmark: null request round trips over an iopart channel, and its limits.

Paths, all in one run, interleaved round by round so drift hits each alike:

* iopart channel, spinning: a native worker thread (server process) and the
  native client loop (client process) both poll within their spin budget.
* iopart channel, doorbell: spin budget 0 on both ends, every wait sleeps on the
  eventfd doorbell.
* raw SPSC ring (bench/peers/raw_ring.c): two spinning processes, no descriptors,
  no validation: the floor for the spinning path.
* eventfd ping-pong (same binary): the floor for the doorbell path.
* one-way batched: the client pushes no-reply requests, publishing every 32; the
  server copies, checks and consumes each one. Messages per second.

The server end lives in this process (worker on one CPU), the client end in a
child process (on the other CPU) that received it over SCM_RIGHTS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import peers
from bench.stats import latency_row, ratio
from iopart.channels import Channel, ChannelGeometry, Role, ServerWorker, WorkerConfig
from iopart.channels.handoff import offer_channel
from iopart.pool import HostMemoryPool

TARGETS = {
    "spin_vs_raw_ring": ("<=", 3.0),
    "doorbell_vs_eventfd": ("<=", 1.2),
    "mps_batched": (">=", 10_000_000),
}

SPIN_NS = 100_000  # spinning mode: 100 us budget, far above one round trip
BATCH = 32


def _plan(quick: bool) -> dict[str, int]:
    if quick:
        return {"rounds": 5, "spin_n": 200_000, "door_n": 20_000, "oneway_n": 10_000_000}
    return {"rounds": 9, "spin_n": 1_000_000, "door_n": 60_000, "oneway_n": 40_000_000}


def _cpus() -> tuple[int, int]:
    """(client CPU, server CPU): two distinct CPUs when there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (-1, -1)


class _Client:
    """The client child process and its command socket."""

    def __init__(self, ch: Channel) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.channel_client", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        offer_channel(ours, ch, Role.CLIENT)

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.sock.send(json.dumps(cmd).encode())
        self.sock.settimeout(120)
        reply: dict[str, Any] = json.loads(self.sock.recv(4096) or b'{"ok": false}')
        if not reply.get("ok"):
            raise RuntimeError(f"benchmark client failed on {cmd['op']}: {reply}")
        return reply

    def close(self) -> None:
        try:
            self.sock.send(json.dumps({"op": "exit"}).encode())
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def run(
    quick: bool = False, progress: Callable[[str, float], None] | None = None
) -> dict[str, Any]:
    """Run the whole benchmark; returns the result document."""
    plan = _plan(quick)
    cpu_c, cpu_s = _cpus()
    samples: dict[str, list[np.ndarray[Any, Any]]] = {k: [] for k in ("spin", "door", "raw", "efd")}
    oneway: list[float] = []
    raw_oneway: list[float] = []
    steps = plan["rounds"] * 6
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(label, done / steps)

    t_start = time.monotonic()
    with HostMemoryPool(8 << 20) as pool, tempfile.TemporaryDirectory() as tmp:
        ch = Channel(pool, ChannelGeometry(nslots=256, slot_size=64))
        server = ch.end(Role.SERVER)
        client = _Client(ch)
        out = str(Path(tmp) / "lat.bin")
        try:
            for _ in range(plan["rounds"]):
                peers.run_raw_ring("rtt", plan["spin_n"], cpu_c, cpu_s, out)
                samples["raw"].append(np.fromfile(out, dtype=np.uint64))
                step("raw SPSC ring")
                with ServerWorker(server, None, WorkerConfig(spin_ns=SPIN_NS, cpu=cpu_s)):
                    client.call(op="rtt", n=plan["spin_n"], spin_ns=SPIN_NS, cpu=cpu_c, out=out)
                samples["spin"].append(np.fromfile(out, dtype=np.uint64))
                step("iopart spinning")
                peers.run_raw_ring("eventfd", plan["door_n"], cpu_c, cpu_s, out)
                samples["efd"].append(np.fromfile(out, dtype=np.uint64))
                step("eventfd ping-pong")
                with ServerWorker(server, None, WorkerConfig(spin_ns=0, cpu=cpu_s)):
                    client.call(op="rtt", n=plan["door_n"], spin_ns=0, cpu=cpu_c, out=out)
                samples["door"].append(np.fromfile(out, dtype=np.uint64))
                step("iopart doorbell")
                with ServerWorker(server, None, WorkerConfig(cpu=cpu_s, batch=BATCH)):
                    r = client.call(
                        op="oneway", n=plan["oneway_n"], batch=BATCH, cpu=cpu_c, spin_ns=0
                    )
                oneway.append(plan["oneway_n"] / (r["elapsed_ns"] / 1e9))
                step("iopart one-way batched")
                rr = peers.run_raw_ring("oneway", plan["oneway_n"], cpu_c, cpu_s, str(BATCH))
                raw_oneway.append(plan["oneway_n"] / (rr["elapsed_ns"] / 1e9))
                step("raw ring one-way")
            counters = server.counters()
        finally:
            client.close()
            server.close()
            ch.close()

    def cat(key: str) -> np.ndarray[Any, Any]:
        return np.concatenate(samples[key])

    rows = [
        latency_row(
            "iopart channel, spinning", cat("spin"), mode="spin", spin_budget_us=SPIN_NS / 1000
        ),
        latency_row("raw SPSC ring (peer, floor)", cat("raw"), mode="spin"),
        latency_row("iopart channel, doorbell", cat("door"), mode="doorbell"),
        latency_row("eventfd ping-pong (peer, floor)", cat("efd"), mode="doorbell"),
        {
            "path": f"iopart one-way, batch {BATCH}",
            "mode": "oneway",
            "p50_us": None,
            "p99_us": None,
            "p999_us": None,
            "ops_per_s": round(float(np.median(oneway)), 1),
        },
        {
            "path": f"raw ring one-way, batch {BATCH} (peer)",
            "mode": "oneway",
            "p50_us": None,
            "p99_us": None,
            "p999_us": None,
            "ops_per_s": round(float(np.median(raw_oneway)), 1),
        },
    ]
    by = {r["path"]: r for r in rows}
    ratios = {
        "spin_vs_raw_ring": ratio(
            by["iopart channel, spinning"]["p50_us"], by["raw SPSC ring (peer, floor)"]["p50_us"]
        ),
        "doorbell_vs_eventfd": ratio(
            by["iopart channel, doorbell"]["p50_us"],
            by["eventfd ping-pong (peer, floor)"]["p50_us"],
        ),
        "mps_batched": round(float(np.median(oneway)), 1),
        "oneway_vs_raw_ring": ratio(float(np.median(oneway)), float(np.median(raw_oneway))),
    }
    return {
        "bench": "channel",
        "quick": quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "iopart bench channel" + (" --quick" if quick else ""),
        "seconds": round(time.monotonic() - t_start, 1),
        "host": {
            "cpus": os.cpu_count(),
            "client_cpu": cpu_c,
            "server_cpu": cpu_s,
            "kernel": os.uname().release,
        },
        "plan": plan,
        "rows": rows,
        "ratios": ratios,
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "met": {
            k: (ratios[k] <= v if op == "<=" else ratios[k] >= v) for k, (op, v) in TARGETS.items()
        },
        "server_counters": counters.__dict__,
        "notes": "p50 of all samples over interleaved rounds; one-way is the median round",
    }
