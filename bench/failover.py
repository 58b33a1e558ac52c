"""`iopart bench failover`: how long guest I/O stalls when an I/O partition fails.

In one run:

* iopart: a stack with its two I/O partitions and one guest running the verifying
  load of `iopart.loadgen` (mixed 4 KiB reads and writes, QD4). The active I/O
  partition is SIGKILLed N times at random moments, then hung (SIGSTOP) N times; a
  hung one is fenced by the standby once it misses the heartbeat deadline. Each
  next fault waits until the restarted one is the standby again.
* peer: qemu-storage-daemon's NBD export SIGKILLed and restarted N times under a
  libnbd client that reconnects and retries (bench/peers/qsd_failover.py).

A stall is the last completion before a fault to the first one after it, seen by
the client. Lost = acknowledged writes not read back (every read is checked, and
every block once more at the end); duplicated = completions delivered twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import report
from iopart import faults, stack
from iopart.config import IoConfig

GAP_MS = 0.2  # completion gaps shorter than this are not kept (a stall below it counts as it)


def targets(heartbeat_ms: int) -> dict[str, tuple[str, float]]:
    return {"stall_p99_ms_kill": ("<=", 10.0),
            "stall_p99_ms_hang": ("<=", heartbeat_ms + 10.0),
            "lost": ("<=", 0), "duplicated": ("<=", 0), "io_errors": ("<=", 0)}


def stall_row(path: str, stalls: Sequence[float], **extra: Any) -> dict[str, Any]:
    a = np.asarray(stalls, dtype=np.float64)
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"path": path, "faults": int(a.size), "p50_ms": round(float(p50), 3),
            "p99_ms": round(float(p99), 3), "p999_ms": round(float(p999), 3),
            "max_ms": round(float(a.max()), 3), **extra}


def _guest(state_dir: Path, stop: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "iopart.cli", "guest", "run", "bench-failover",
            "--state-dir", str(state_dir), "--memory", "32M", "--cpu", "1", "--disk-size", "8M",
            "--",
            "python3", "-m", "iopart.loadgen", "disk", "--stop", str(stop),
            "--gap-ms", str(GAP_MS)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def measure_iopart(state_dir: Path, n: int, rng: random.Random,
                   progress: Callable[[str, float], None]) -> dict[str, Any]:
    stop = state_dir / "loadgen.stop"
    g = _guest(state_dir, stop)
    try:
        faults.wait_redundant(state_dir)
        time.sleep(1.0)
        if g.poll() is not None:
            raise RuntimeError(f"the load guest exited: {g.communicate()}")
        kills = faults.run_faults(state_dir, ["kill"] * n, rng,
                                  progress=lambda i: progress("iopart: SIGKILL", i / (2 * n)))
        hangs = faults.run_faults(state_dir, ["hang"] * n, rng,
                                  progress=lambda i: progress("iopart: hang",
                                                              0.5 + i / (2 * n)))
        stop.touch()
        out, err = g.communicate(timeout=120)
    finally:
        if g.poll() is None:
            g.kill()
            g.wait()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if g.returncode != 0 or not lines:
        raise RuntimeError(f"the load guest failed ({g.returncode}): {out[-2000:]}{err[-2000:]}")
    res: dict[str, Any] = json.loads(lines[-1])
    gaps = res.pop("gaps")
    return {"load": res, "kill": faults.stalls_ms(kills, gaps, GAP_MS),
            "hang": faults.stalls_ms(hangs, gaps, GAP_MS),
            "faults": [f.to_dict() for f in kills + hangs]}


def run(quick: bool = False, progress: Callable[[str, float], None] | None = None
        ) -> dict[str, Any]:
    from bench.peers.qsd_failover import measure_qsd_failover

    say = progress or (lambda _what, _frac: None)
    n = 100 if quick else 300
    t_start = time.monotonic()
    rng = random.Random(20261125)
    heartbeat_ms = IoConfig().heartbeat_ms
    with tempfile.TemporaryDirectory(prefix="iopart-failover-") as tmp:
        state_dir = Path(tmp) / "state"
        stack.up(state_dir, None, timeout=60)
        try:
            io = measure_iopart(state_dir, n, rng, say)
            takeovers = [t for name in ("iop-a", "iop-b")
                         for t in _report(state_dir, name).get("takeovers", [])]
        finally:
            stack.down(state_dir, grace=30)
        say("qemu-storage-daemon: SIGKILL + restart", 0.95)
        peer = measure_qsd_failover(n, workdir=Path(tmp))
    load = io["load"]
    lost = int(load["verify_failures"] + load["final"]["verify_failures"])
    dup = int(load["duplicates"] + load["final"]["duplicates"])
    errors = int(load["errors"] + load["final"]["errors"])
    rows = [stall_row("iopart, active I/O partition SIGKILLed (standby takes over)", io["kill"]),
            stall_row(f"iopart, active I/O partition hung (SIGSTOP; fenced after the "
                      f"{heartbeat_ms} ms heartbeat deadline)", io["hang"]),
            stall_row("qemu-storage-daemon NBD export SIGKILLed and restarted, libnbd client "
                      "retries", peer["stalls_ms"])]
    kill, hang, qsd = rows
    ratios = {"stall_p99_ms_kill": kill["p99_ms"], "stall_p99_ms_hang": hang["p99_ms"],
              "lost": lost, "duplicated": dup, "io_errors": errors,
              "stall_p50_ms_kill": kill["p50_ms"], "stall_p50_ms_hang": hang["p50_ms"],
              "qsd_stall_p99_ms": qsd["p99_ms"],
              "kill_p50_vs_qsd": round(kill["p50_ms"] / qsd["p50_ms"], 3)
              if qsd["p50_ms"] else float("inf")}
    tg = targets(heartbeat_ms)
    return {
        "bench": "failover",
        "quick": quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "iopart bench failover" + (" --quick" if quick else ""),
        "seconds": round(time.monotonic() - t_start, 1),
        "host": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "heartbeat_ms": heartbeat_ms,
        "rows": rows,
        "ratios": ratios,
        "targets": {k: f"{op} {v:g}" for k, (op, v) in tg.items()},
        "met": {k: ratios[k] <= v for k, (_op, v) in tg.items()},
        "load": load,
        "takeover_ms": [t["ms"] for t in takeovers],
        "peer": {k: v for k, v in peer.items() if k != "stalls_ms"},
        "stalls_ms": {"kill": io["kill"], "hang": io["hang"], "qsd": peer["stalls_ms"]},
        "faults": io["faults"],
        "notes": (f"stall = last completion before the fault to the first after, on the "
                  f"client (QD4 mixed 4k, verified); stalls under {GAP_MS} ms count as "
                  f"{GAP_MS} ms. The hang stall includes the {heartbeat_ms} ms heartbeat "
                  "deadline ([io] heartbeat_ms) and the fencing SIGKILL. The peer's stall "
                  "includes restarting qemu-storage-daemon; iopart's standby is already "
                  "running"),
    }


def _report(state_dir: Path, name: str) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((state_dir / f"{name}.json").read_text())
        return doc
    except (OSError, ValueError):
        return {}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iopart bench failover")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    doc = run(a.quick)
    report.save(doc)
    print(json.dumps({k: doc[k] for k in ("ratios", "met", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
