"""Client process of the transaction benchmark: the command partition's side.

python -m bench.tx_client FD
"""

from __future__ import annotations

import json
import socket
import sys
import time
from array import array

from iopart.channels.handoff import accept_channel
from iopart.command_channel import CommandClient

CHUNK = 8192  # latencies per message: 64 KiB


def _tx(txid: int) -> dict[str, object]:
    # a two-step transaction on an existing partition: change its CPU share and state
    state = "running" if txid % 2 else "stopped"
    return {
        "tx": txid,
        "commit": True,
        "steps": [
            {"op": "set_cpu", "name": "bench", "cpu": 0.1 + (txid % 5) / 10},
            {"op": "set_state", "name": "bench", "state": state},
        ],
    }


def serve(sock: socket.socket) -> None:
    got = accept_channel(sock)
    assert got.memory is not None
    cli = CommandClient(got.end, got.memory, int(json.loads(sock.recv(4096))["nslots"]))
    txid = 1
    setup = cli.call(
        {
            "tx": 0,
            "commit": True,
            "steps": [{"op": "create_partition", "name": "bench", "cpu": 0.1}],
        }
    )
    assert setup["ok"], setup
    while True:
        cmd = json.loads(sock.recv(4096) or b'{"op": "exit"}')
        if cmd["op"] == "exit":
            break
        n, depth = int(cmd["n"]), int(cmd["depth"])
        lat: list[int] = []
        sent_at: dict[int, int] = {}
        errors = 0
        t0 = time.perf_counter_ns()
        done = 0
        while done < n:
            while len(sent_at) < depth and txid - 1 < n * 1000 and done + len(sent_at) < n:
                sent_at[cli.send(_tx(txid))] = time.perf_counter_ns()
                txid += 1
            cli.end.publish()
            rid, reply = cli.receive()
            lat.append(time.perf_counter_ns() - sent_at.pop(rid))
            errors += not reply.get("ok")
            done += 1
        elapsed = time.perf_counter_ns() - t0
        sock.send(json.dumps({"ok": errors == 0, "errors": errors, "elapsed_ns": elapsed,
                              "count": len(lat)}).encode())
        # the latencies follow as raw int64 in chunks a SEQPACKET message can carry
        for i in range(0, len(lat), CHUNK):
            sock.send(array("q", lat[i : i + CHUNK]).tobytes())
    got.close()


def main() -> None:
    serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
