"""Producer process for the ring property test: pushes ids 0..n-1 in random batches.

python -m tests.ring_producer FD N SEED SPIN_NS
"""

from __future__ import annotations

import random
import socket
import sys
import time

from iopart.channels import Descriptor
from iopart.channels.handoff import accept_channel


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    n, seed, spin = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    got = accept_channel(sock)
    end = got.end
    end.set_spin(spin)
    rng = random.Random(seed)
    deadline = time.monotonic() + 60
    i = 0
    while i < n:
        batch = rng.randint(1, 12)
        while batch and i < n:
            if not end.push(Descriptor(id=i, offset=i ^ 0x5A5A)):
                break  # full: publish what we have and let the consumer catch up
            i += 1
            batch -= 1
        end.publish()
        if time.monotonic() > deadline:
            sys.exit("producer timed out")
    sock.send(b"done")
    got.close()


if __name__ == "__main__":
    main()
