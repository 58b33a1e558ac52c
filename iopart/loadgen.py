"""Guest load for failover runs: verifying disk I/O that records its stalls, and
sequence-numbered frames between two NIC guests.

Runs inside a guest (under its monitor) until the stop file appears:

    iopart guest run g1 --disk disk0 --disk-size 16M -- \\
        python3 -m iopart.loadgen disk --stop /tmp/stop

Mixed 4 KiB reads and writes in native jobs: every write is stamped, every read is
checked against the last acknowledged version of its block, so an acknowledged
write that was lost (or an old one run again over a newer one) shows as a verify
failure. A completion delivered twice is dropped by the client and counted. Gaps
between consecutive completions longer than --gap-ms are kept (CLOCK_MONOTONIC),
so whoever injected faults can tell each fault's stall. At the end every block is
read back once more, and one JSON line is printed.

    ... -- python3 -m iopart.loadgen nic-recv --stop /tmp/stop-recv
    ... -- python3 -m iopart.loadgen nic-send --stop /tmp/stop-send

The receiver says hello (a broadcast) every 100 ms; the sender learns its MAC from
that and sends frames 0, 1, 2, ... to it, each one handed to the switch and
completed before the next. The receiver acknowledges the highest number it has
(every 8 frames, and every 20 ms), and the sender keeps at most WINDOW frames
beyond that, fewer than the receive buffers the receiver has posted: so no frame is
dropped for want of a buffer, and a frame that does not arrive was lost on the way.
The receiver counts each frame number it gets; whoever runs both compares what was
queued with what arrived (`missing_below`, `max_seq`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def disk_load(stop: Path, *, queue_depth: int, write_pct: int, span: int, gap_ms: float,
              max_s: float, job_ops: int = 2000) -> dict[str, Any]:
    from iopart import client

    d = client.open_disk()
    span = min(span, d.size) // 4096 * 4096
    versions = d.new_versions()
    gap_ns = int(gap_ms * 1e6)
    gaps: list[tuple[int, int]] = []
    tot = {"ops": 0, "reads": 0, "writes": 0, "errors": 0, "verify_failures": 0,
           "duplicates": 0, "verified_bytes": 0, "jobs": 0}
    first_error = 0
    last = 0
    t_end = time.monotonic() + max_s
    while not stop.exists() and time.monotonic() < t_end:
        r = d.run_job(n_ops=job_ops, queue_depth=queue_depth, write_pct=write_pct,
                      verify=True, span=span, versions=versions, seed=tot["jobs"] + 1,
                      timeout_ms=60_000, latencies=False, completion_times=True)
        for t in r.done_ns:
            if last and t - last > gap_ns:
                gaps.append((last, t))
            last = t
        for k in ("ops", "reads", "writes", "errors", "verify_failures", "duplicates",
                  "verified_bytes"):
            tot[k] += getattr(r, k)
        tot["jobs"] += 1
        first_error = first_error or r.first_error
    # every block once more, against its last acknowledged write
    final = d.run_job(n_ops=span // 4096, sequential=True, verify=True, span=span,
                      versions=versions, timeout_ms=60_000, latencies=False)
    return {**tot, "first_error": first_error, "gaps": gaps, "span": span,
            "final": {"ops": final.ops, "errors": final.errors,
                      "verify_failures": final.verify_failures,
                      "verified_bytes": final.verified_bytes,
                      "duplicates": final.duplicates}}


HELLO_TYPE = 0x88B6
ACK_TYPE = 0x88B7
BROADCAST = b"\xff" * 6
WINDOW = 16  # frames beyond the last acknowledged one (the receiver posts 32 buffers)


def _hello(mac: bytes) -> bytes:
    return BROADCAST + mac + HELLO_TYPE.to_bytes(2, "big") + b"iopart loadgen".ljust(46, b"\0")


def nic_recv(stop: Path, *, max_seq: int = 1 << 22, max_s: float = 600.0) -> dict[str, Any]:
    from iopart import client
    from iopart._native import ffi, lib

    nic = client.open_nic()
    counts = bytearray(max_seq)
    kp = ffi.new("uint64_t *")
    other = bad = acks = 0
    top = -1
    acked, next_ack, peer = -1, 0.0, b""
    next_hello = 0.0
    t_end = time.monotonic() + max_s
    while not stop.exists() and time.monotonic() < t_end:
        now = time.monotonic()
        if now >= next_hello:  # also lets the switch learn where we are, after a takeover
            nic.send(_hello(nic.mac), timeout_ms=60_000)
            next_hello = now + 0.1
        if peer and top >= 0 and (top - acked >= 8 or (top > acked and now >= next_ack)
                                  or now >= next_ack + 0.1):
            ack = peer + nic.mac + ACK_TYPE.to_bytes(2, "big") + (top + 1).to_bytes(8, "little")
            nic.send(ack.ljust(60, b"\0"), timeout_ms=60_000)
            acked, next_ack, acks = top, now + 0.02, acks + 1
        f = nic.recv(timeout_ms=5)
        if f is None:
            continue
        if len(f) < 14 or f[12:14] != b"\x88\xb5":
            other += 1
            continue
        if lib.iop_nic_seq_check(f, len(f), f[6:12], nic.mac, kp) != 0 or kp[0] >= max_seq:
            bad += 1
            continue
        k = int(kp[0])
        counts[k] = min(counts[k] + 1, 255)
        top = max(top, k)
        peer = f[6:12]
    seen = counts[: top + 1]
    return {"max_seq": top, "received": sum(1 for c in seen if c),
            "twice": sum(1 for c in seen if c > 1),
            "missing_below": [k for k, c in enumerate(seen) if not c][:1000],
            "n_missing_below": sum(1 for c in seen if not c), "bad": bad, "other": other,
            "acks": acks, "duplicates": nic.duplicates}


def nic_send(stop: Path, *, rate: float, max_s: float = 600.0) -> dict[str, Any]:
    from iopart import client
    from iopart._native import ffi, lib

    nic = client.open_nic()
    dst = None
    deadline = time.monotonic() + 30
    while dst is None:  # the receiver's hello names it
        if time.monotonic() > deadline or stop.exists():
            raise SystemExit("nic-send: no hello from a receiver in 30 s")
        f = nic.recv(timeout_ms=100)
        if f and len(f) >= 14 and f[12:14] == HELLO_TYPE.to_bytes(2, "big"):
            dst = f[6:12]
    buf = ffi.new("uint8_t[1600]")
    queued = accepted = failed = stalls = 0
    acked = 0  # the receiver has every frame below this one

    def take_acks(timeout_ms: int) -> None:
        nonlocal acked
        f = nic.recv(timeout_ms=timeout_ms)
        while f is not None:
            if len(f) >= 22 and f[12:14] == ACK_TYPE.to_bytes(2, "big"):
                acked = max(acked, int.from_bytes(f[14:22], "little"))
            f = nic.recv(timeout_ms=0)

    t0 = time.monotonic()
    t_end = t0 + max_s
    while not stop.exists() and time.monotonic() < t_end:
        waited = time.monotonic()
        while queued - acked >= WINDOW:
            take_acks(5)
            if time.monotonic() - waited > 1.0:  # acks lost (a takeover): go on, count it
                stalls += 1
                break
        n = lib.iop_nic_seq_frame(buf, nic.mac, dst, queued)
        frame = bytes(ffi.buffer(buf, n))
        queued += 1
        st = nic.send(frame, timeout_ms=60_000)
        if st == 0:
            accepted += 1
        else:
            failed += 1
        take_acks(0)  # and hellos: keep our buffers posted
        ahead = queued / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    return {"queued": queued, "accepted": accepted, "failed": failed, "stalls": stalls,
            "acked": acked, "duplicates": nic.duplicates, "dst": dst.hex(":")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iopart.loadgen", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    dk = sub.add_parser("disk", help="verifying mixed 4k disk load")
    dk.add_argument("--stop", type=Path, required=True, help="stop once this file exists")
    dk.add_argument("--qd", type=int, default=4, help="queue depth (default 4)")
    dk.add_argument("--write-pct", type=int, default=50, help="writes in %% (default 50)")
    dk.add_argument("--span-mib", type=int, default=4, help="bytes addressed (default 4 MiB)")
    dk.add_argument("--gap-ms", type=float, default=1.0,
                    help="keep completion gaps longer than this (default 1 ms)")
    dk.add_argument("--max-s", type=float, default=600.0, help="stop after this long anyway")
    nr = sub.add_parser("nic-recv", help="count sequence-numbered frames (say hello)")
    nr.add_argument("--stop", type=Path, required=True, help="stop once this file exists")
    nr.add_argument("--max-s", type=float, default=600.0, help="stop after this long anyway")
    ns = sub.add_parser("nic-send", help="send sequence-numbered frames to the receiver")
    ns.add_argument("--stop", type=Path, required=True, help="stop once this file exists")
    ns.add_argument("--rate", type=float, default=2000.0, help="frames/s (default 2000)")
    ns.add_argument("--max-s", type=float, default=600.0, help="stop after this long anyway")
    a = p.parse_args(argv)
    res: dict[str, Any]
    if a.what == "disk":
        res = disk_load(a.stop, queue_depth=a.qd, write_pct=a.write_pct,
                        span=a.span_mib << 20, gap_ms=a.gap_ms, max_s=a.max_s)
    elif a.what == "nic-recv":
        res = nic_recv(a.stop, max_s=a.max_s)
    else:
        res = nic_send(a.stop, rate=a.rate, max_s=a.max_s)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
