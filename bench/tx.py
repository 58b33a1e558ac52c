"""Transaction benchmark: committed transactions per second through the command channel.

The ultravisor side (resource database, transaction manager, durable SQLite audit
log, command channel server) runs here; the command partition's side runs in a
child process that received the channel and its memory over SCM_RIGHTS. Each
transaction has two steps and is acknowledged only after its audit record is
durable (WAL, synchronous=FULL). Measured at one transaction in flight (QD1) and
pipelined (QD32, where group commit pays one fsync per batch).

The limit, in the same run and in the same directory: a bare SQLite loop, one
insert per transaction, each committed with the same durability.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import latency_row, ratio
from iopart.auditlog import AuditLog
from iopart.channels import Channel, ChannelGeometry, Region, RegionTable, Role
from iopart.channels.handoff import offer_channel
from iopart.command_channel import CommandServer
from iopart.pool import HostMemoryPool
from iopart.resources import ResourceDB
from iopart.transaction import TransactionManager

TARGETS = {"tx_per_s": (">=", 5000.0), "tx_vs_sqlite": (">=", 0.5)}
NSLOTS = 64
DEPTH = 32


def sqlite_limit(path: Path, n: int) -> list[int]:
    """Per-commit latencies of a bare durable insert loop."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=full")
    db.execute("create table t (seq integer primary key, body text not null)")
    body = json.dumps({"op": "set_cpu", "name": "bench", "cpu": 0.5}) * 2
    lat = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        db.execute("begin")
        db.execute("insert into t (body) values (?)", (body,))
        db.execute("commit")
        lat.append(time.perf_counter_ns() - t0)
    db.close()
    return lat


def run(
    quick: bool = False,
    state_dir: Path = Path(".iopart"),
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    n_qd1, n_pipe, rounds = (1500, 6000, 3) if quick else (5000, 30000, 5)
    state_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    samples: dict[str, list[int]] = {"qd1": [], "pipe": [], "sqlite": []}
    pipe_rates: list[float] = []
    sqlite_rates: list[float] = []
    with tempfile.TemporaryDirectory(dir=state_dir) as tmp, HostMemoryPool(16 << 20) as pool:
        tm = TransactionManager(
            ResourceDB(float(os.cpu_count() or 1)), AuditLog(Path(tmp) / "audit.db")
        )
        ch = Channel(pool, ChannelGeometry(nslots=NSLOTS, slot_size=128))
        mem = pool.allocate(4 << 20)
        regions = RegionTable(pool.size)
        regions.set([Region(0, mem.length, mem.offset)])
        server = CommandServer(
            ch.end(Role.SERVER), regions, pool.mm, lambda m: tm.handle("command", m), tm.flush
        )
        server.end.set_spin(20_000)
        stop = threading.Event()
        thread = threading.Thread(target=server.serve, args=(stop.is_set,), daemon=True)
        thread.start()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.tx_client", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        try:
            offer_channel(ours, ch, Role.CLIENT, memory=mem)
            ours.send(json.dumps({"nslots": NSLOTS}).encode())
            ours.settimeout(300)
            for r in range(rounds):
                for key, n, depth in (("qd1", n_qd1, 1), ("pipe", n_pipe, DEPTH)):
                    ours.send(json.dumps({"op": "run", "n": n, "depth": depth}).encode())
                    reply = json.loads(ours.recv(1 << 16))
                    if not reply["ok"]:
                        raise RuntimeError(f"{reply['errors']} transactions failed")
                    lat = array("q")
                    while len(lat) < reply["count"]:
                        lat.frombytes(ours.recv(1 << 17))
                    samples[key] += lat.tolist()
                    if key == "pipe":
                        pipe_rates.append(n / (reply["elapsed_ns"] / 1e9))
                limit = sqlite_limit(Path(tmp) / f"limit{r}.db", n_qd1)
                samples["sqlite"] += limit
                sqlite_rates.append(len(limit) / (sum(limit) / 1e9))
                if progress:
                    progress(f"round {r + 1}/{rounds}", (r + 1) / rounds)
            ours.send(json.dumps({"op": "exit"}).encode())
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stop.set()
            thread.join(timeout=10)
            ours.close()
            committed, audit_rows = tm.committed, tm.log.last_seq()
            tm.log.close()
            server.end.close()
            ch.close()
    pipe = sorted(pipe_rates)[len(pipe_rates) // 2]
    lim = sorted(sqlite_rates)[len(sqlite_rates) // 2]
    rows = [
        latency_row(
            f"iopart tx, pipelined QD{DEPTH} (group commit)",
            samples["pipe"],
            ops_per_s_measured=round(pipe, 1),
        ),
        latency_row("iopart tx, QD1", samples["qd1"]),
        latency_row("SQLite insert+commit, same durability (limit)", samples["sqlite"]),
    ]
    rows[0]["ops_per_s"] = round(pipe, 1)  # throughput, not 1/latency, when pipelined
    ratios = {
        "tx_per_s": round(pipe, 1),
        "tx_vs_sqlite": ratio(pipe, lim),
        "qd1_tx_vs_sqlite": ratio(rows[1]["ops_per_s"], rows[2]["ops_per_s"]),
    }
    return {
        "bench": "tx",
        "quick": quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "iopart bench tx" + (" --quick" if quick else ""),
        "seconds": round(time.monotonic() - t_start, 1),
        "host": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "rows": rows,
        "ratios": ratios,
        "targets": {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items()},
        "met": {k: ratios[k] >= v for k, (_op, v) in TARGETS.items()},
        "committed": committed,
        "audit_rows": audit_rows,
        "notes": "two-step transactions; every acknowledged one is durable in the audit log "
        "(SQLite WAL, synchronous=FULL); QD32 rows count throughput",
    }
