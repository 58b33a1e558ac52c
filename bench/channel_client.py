"""Client process of the channel benchmark.

Receives its end of the channel over the socket (SCM_RIGHTS), then runs the
native client loops on command. Python only handles the commands; every request
runs in C.

    python -m bench.channel_client FD
"""

from __future__ import annotations

import json
import socket
import sys

from iopart._native import ffi, lib
from iopart.channels.handoff import accept_channel


def serve(sock: socket.socket) -> None:
    got = accept_channel(sock)
    end = got.end
    while True:
        cmd = json.loads(sock.recv(4096) or b'{"op": "exit"}')
        op = cmd["op"]
        if op == "exit":
            break
        lib.iop_pin_cpu(int(cmd.get("cpu", -1)))
        end.set_spin(int(cmd.get("spin_ns", 0)))
        reply: dict[str, object] = {"ok": True}
        if op == "rtt":
            n = int(cmd["n"])
            lat = ffi.new("uint64_t[]", n)
            rc = int(lib.iop_client_roundtrips(end.handle, n, lat, 5000))
            if rc == 0:
                with open(cmd["out"], "wb") as f:
                    f.write(ffi.buffer(lat))
            reply = {"ok": rc == 0, "rc": rc}
        elif op == "oneway":
            el = ffi.new("uint64_t *")
            rc = int(lib.iop_client_oneway(end.handle, int(cmd["n"]), int(cmd["batch"]), el, 30000))
            reply = {"ok": rc == 0, "rc": rc, "elapsed_ns": int(el[0])}
        else:
            reply = {"ok": False, "error": f"unknown op {op!r}"}
        sock.send(json.dumps(reply).encode())
    got.close()


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    serve(sock)


if __name__ == "__main__":
    main()
