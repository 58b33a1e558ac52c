"""Guest load for failover runs: verifying disk I/O that records its stalls.

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
    a = p.parse_args(argv)
    res = disk_load(a.stop, queue_depth=a.qd, write_pct=a.write_pct, span=a.span_mib << 20,
                    gap_ms=a.gap_ms, max_s=a.max_s)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
