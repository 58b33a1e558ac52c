"""A demo guest program: writes self-checking blocks to its disk, reads every one back.

Runs inside a guest partition (`iopart guest run NAME -- python3 -m iopart.demo_guest
SEED`). Each 4 KiB block it writes carries its block number, a version and data derived
from them; reading it back checks every byte. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

from iopart import client


def main() -> int:
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    disk = client.open_disk()
    versions = disk.new_versions()
    blocks = disk.size // 4096
    t0 = time.monotonic()
    common = {"queue_depth": 8, "verify": True, "versions": versions, "seed": seed,
              "latencies": False}
    fill = disk.run_job(n_ops=blocks, write_pct=100, sequential=True, **common)
    mixed = disk.run_job(n_ops=2 * blocks, write_pct=50, **common)
    check = disk.run_job(n_ops=blocks, write_pct=0, sequential=True, **common)
    disk.flush()
    jobs = (fill, mixed, check)
    print(json.dumps({
        "disk": disk.name, "bytes": disk.size, "ops": sum(j.ops for j in jobs),
        "errors": sum(j.errors for j in jobs),
        "verify_failures": sum(j.verify_failures for j in jobs),
        "verified_bytes": check.verified_bytes, "seconds": round(time.monotonic() - t0, 2)}))
    return 0 if all(j.errors == j.verify_failures == 0 for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
