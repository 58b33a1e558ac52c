"""`iopart bench net`: frames through the I/O partition's virtual switch, with the limits.

In one run, interleaved over rounds:

* guest <-> guest round trip, 64 B and 1500 B frames: guest A's native loop sends to
  guest B, whose native loop echoes; the switch thread spins on one CPU, both guests
  share the other and spin with sched_yield (three busy parties on two CPUs);
* guest <-> uplink round trip: guest A to the far end of the default veth uplink, where
  `pktecho` echoes from inside the uplink's namespace;
* the limits: a veth pair between two namespaces with AF_PACKET ping-pong, and a TAP
  with an echo process on its fd (bench/peers/pktecho.c, blocking I/O);
* throughput: guest A sends 1500 B frames as fast as the switch takes them, guest B
  receives with 256 buffers; goodput counts only frames B received.

The switch is the one the I/O partition runs (native/vswitch.c), in this process; the
guests are forked processes with their own channel ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from bench import report
from bench.blockrig import partition_memory
from bench.peers import build
from bench.stats import latency_row, ratio
from iopart._native import ffi
from iopart.channels import Channel, ChannelGeometry, Role
from iopart.client import NicLoops
from iopart.drivers.nic import VethUplink, remove_netns
from iopart.drivers.vswitch import SwitchConfig, VSwitch, format_mac, guest_mac
from iopart.pool import HostMemoryPool

TARGETS = {"g2g_rt_p50_us": ("<=", 5.0), "uplink_rt_vs_veth": ("<=", 1.1),
           "gbit_per_s_1500": (">=", 1.0)}
SIZES = (64, 1500)


def _plan(quick: bool) -> dict[str, int]:
    return {"rounds": 2 if quick else 4, "rt_n": 5000 if quick else 20000,
            "peer_n": 2000 if quick else 8000, "blast_n": 100_000 if quick else 400_000}


def _cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (cpus[0], cpus[0])


class _Guest:
    """A forked guest process owning one NIC's client end; runs loops on command."""

    MAX_SAMPLES = 1 << 20

    def __init__(self, nic: NicLoops, cpu: int, stop: mmap.mmap) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        # latencies come back through shared memory: a message could not hold them
        self.samples = mmap.mmap(-1, self.MAX_SAMPLES * 8)
        self.pid = os.fork()
        if self.pid == 0:
            code = 0
            try:
                ours.close()
                os.sched_setaffinity(0, {cpu})
                nic.end.set_spin(10**9)
                nic.end.set_yield(True)
                self._serve(theirs, nic, stop, self.samples)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()

    @staticmethod
    def _serve(sock: socket.socket, nic: NicLoops, stop: mmap.mmap,
               samples: mmap.mmap) -> None:
        flag = ffi.cast("uint32_t *", ffi.from_buffer(stop))
        while True:
            cmd = json.loads(sock.recv(4096) or b'{"op": "exit"}')
            op = cmd["op"]
            if op == "exit":
                return
            out: dict[str, Any] = {"ok": True}
            try:
                _Guest._do(op, cmd, nic, flag, out, samples)
            except Exception as exc:  # reported to the parent, which raises it
                out = {"ok": False, "error": repr(exc)}
            sock.send(json.dumps(out).encode())

    @staticmethod
    def _do(op: str, cmd: dict[str, Any], nic: NicLoops, flag: Any,
            out: dict[str, Any], samples: mmap.mmap) -> None:
        if True:
            if op == "pingpong":
                lat = nic.pingpong(bytes.fromhex(cmd["dst"]), cmd["len"], cmd["n"])
                arr = np.asarray(lat, dtype=np.uint64)
                samples[: arr.nbytes] = arr.tobytes()
                out["n"] = int(arr.size)
            elif op == "echo":
                out["frames"] = nic.echo(1 << 62, flag, reply=cmd["reply"])
            elif op == "blast":
                got, ns = nic.blast(bytes.fromhex(cmd["dst"]), cmd["len"], cmd["n"])
                out.update(accepted=got, ns=ns)

    def send(self, **cmd: Any) -> None:
        self.sock.send(json.dumps(cmd).encode())

    def reply(self, timeout: float = 120) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        doc: dict[str, Any] = json.loads(self.sock.recv(1 << 24) or b'{"ok": false}')
        if not doc.get("ok"):
            raise RuntimeError(f"bench guest failed: {doc}")
        return doc

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.reply()

    def latencies(self, **cmd: Any) -> np.ndarray[Any, Any]:
        """Run a pingpong; its latencies (ns)."""
        if cmd["n"] > self.MAX_SAMPLES:
            raise ValueError(f"at most {self.MAX_SAMPLES} round trips per call")
        r = self.call(op="pingpong", **cmd)
        return np.frombuffer(self.samples, dtype=np.uint64, count=r["n"]).copy()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(op="exit")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and os.waitpid(self.pid, os.WNOHANG)[0] == 0:
            time.sleep(0.01)
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        self.sock.close()
        self.samples.close()


def _mac_of(ns: str, ifname: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", ifname], check=True,
                         capture_output=True, text=True).stdout
    return out.split("link/ether ")[1].split()[0]


@contextlib.contextmanager
def _echo(ns: str | None, where: str, cpu: int) -> Iterator[None]:
    exe = str(build("pktecho"))
    argv = [exe, "echo", where, str(cpu)]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"pktecho did not start: {p.stderr.read() if p.stderr else ''}")
        yield
    finally:
        p.kill()
        p.wait()


def _ping(ns: str | None, ifname: str, dst: str, size: int, n: int, cpu: int) -> dict[str, Any]:
    argv = [str(build("pktecho")), "ping", ifname, dst, str(max(size, 60)), str(n), str(cpu)]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if res.returncode:
        raise RuntimeError(f"pktecho ping failed: {res.stderr.strip()}")
    doc: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return doc


@contextlib.contextmanager
def _veth_pair(tag: str) -> Iterator[tuple[str, str]]:
    a, b = f"iopbA{tag}", f"iopbB{tag}"
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "link", "add", "pva", "netns", a, "type", "veth", "peer", "name",
                        "pvb", "netns", b], check=True)
        subprocess.run(["ip", "-n", a, "link", "set", "pva", "up"], check=True)
        subprocess.run(["ip", "-n", b, "link", "set", "pvb", "up"], check=True)
        yield a, b
    finally:
        for ns in (a, b):
            remove_netns(ns)


def run(quick: bool = False, progress: Callable[[str, float], None] | None = None
        ) -> dict[str, Any]:
    plan = _plan(quick)
    cpu_sw, cpu_g = _cpus()
    tag = uuid.uuid4().hex[:6]
    t_start = time.monotonic()
    report_step = progress or (lambda _l, _f: None)
    pool = HostMemoryPool(64 << 20)
    switch = VSwitch(pool.mm, SwitchConfig(cpu=cpu_sw, spin_ns=10**9))
    closers: list[Any] = []
    guests: list[_Guest] = []
    uplink: VethUplink | None = None
    stop = mmap.mmap(-1, 4096)
    lat: dict[str, list[np.ndarray[Any, Any]]] = {}
    peers: dict[str, list[dict[str, Any]]] = {}
    gbps: list[float] = []
    ports: list[int] = []
    try:
        nics: list[NicLoops] = []
        for i in (1, 2):
            regions, mem = partition_memory(pool, 4 << 20)
            ch = Channel(pool, ChannelGeometry(nslots=1024, slot_size=128))
            srv, cli = ch.end(Role.SERVER), ch.end(Role.CLIENT)
            ports.append(switch.add_guest(srv, regions.table, guest_mac(i)))
            nics.append(NicLoops(cli, mem, guest_mac(i), nbufs=256))
            closers += [srv, cli, ch, mem, regions]
        uplink = VethUplink.create(tag, "10.79.9.1/24")
        ports.append(switch.add_uplink(uplink.fileno()))
        up_mac = _mac_of(uplink.ns, uplink.peer_if).replace(":", "")
        guests = [_Guest(n, cpu_g, stop) for n in nics]
        a, b = guests
        mac_b = guest_mac(2).hex()
        steps = plan["rounds"] * 4
        done = 0
        with _veth_pair(tag) as (ns_a, ns_b):
            veth_mac = _mac_of(ns_b, "pvb")
            for rnd in range(plan["rounds"]):
                # guest <-> guest, spinning
                report_step(f"round {rnd + 1}: guest to guest", done / steps)
                stop[0:4] = b"\0\0\0\0"
                b.send(op="echo", reply=True)
                time.sleep(0.05)
                for size in SIZES:
                    lat.setdefault(f"g2g {size}", []).append(
                        a.latencies(dst=mac_b, len=size, n=plan["rt_n"]))
                stop[0:4] = b"\1\0\0\0"
                b.reply()
                done += 1
                # guest <-> uplink
                report_step(f"round {rnd + 1}: guest to uplink", done / steps)
                with _echo(uplink.ns, uplink.peer_if, cpu_g):
                    for size in SIZES:
                        lat.setdefault(f"uplink {size}", []).append(
                            a.latencies(dst=up_mac, len=max(size, 60), n=plan["peer_n"]))
                done += 1
                # limits: veth AF_PACKET ping-pong, TAP echo
                report_step(f"round {rnd + 1}: veth and TAP limits", done / steps)
                with _echo(ns_b, "pvb", cpu_sw):
                    for size in SIZES:
                        peers.setdefault(f"veth {size}", []).append(
                            _ping(ns_a, "pva", veth_mac, size, plan["peer_n"], cpu_g))
                tap = f"iopt{tag}"
                with _echo(None, f"tap:{tap}", cpu_sw):
                    subprocess.run(["ip", "link", "set", tap, "up"], check=True)
                    for size in SIZES:
                        peers.setdefault(f"tap {size}", []).append(
                            _ping(None, tap, "02:00:00:00:00:01", size, plan["peer_n"], cpu_g))
                done += 1
                # throughput, 1500 B
                report_step(f"round {rnd + 1}: throughput", done / steps)
                stop[0:4] = b"\0\0\0\0"
                before = switch.stats(ports[1]).rx_frames
                b.send(op="echo", reply=False)
                time.sleep(0.05)
                r = a.call(op="blast", dst=mac_b, len=1500, n=plan["blast_n"])
                time.sleep(0.05)
                stop[0:4] = b"\1\0\0\0"
                b.reply()
                got = switch.stats(ports[1]).rx_frames - before
                gbps.append(got * 1500 * 8 / (r["ns"] / 1e9) / 1e9)
                done += 1
        counters = {"guest_a": switch.stats(ports[0]).to_dict(),
                    "guest_b": switch.stats(ports[1]).to_dict(),
                    "uplink": switch.stats(ports[2]).to_dict(),
                    "switch": switch.switch_stats()}
    finally:
        for g in guests:
            g.close()
        switch.stop()
        if uplink is not None:
            uplink.close()
        for c in closers:
            close = getattr(c, "close", None)
            if close is not None:
                close()
        stop.close()
        import gc

        gc.collect()
        pool.close()
    rows = []
    for key, parts in lat.items():
        kind, nbytes = key.split()
        name = ("iopart guest <-> guest, spinning" if kind == "g2g"
                else "iopart guest <-> uplink (veth, pktecho)")
        rows.append(latency_row(f"{name}, {nbytes} B", np.concatenate(parts), key=key))
    for key, runs in peers.items():
        kind, nbytes = key.split()
        name = ("veth AF_PACKET ping-pong (limit)" if kind == "veth"
                else "TAP + echo process (limit)")
        med = {f: float(np.median([r[f] for r in runs])) for f in ("p50_ns", "p99_ns",
                                                                   "p999_ns", "mean_ns")}
        rows.append({"path": f"{name}, {nbytes} B", "key": key,
                     "p50_us": round(med["p50_ns"] / 1000, 3),
                     "p99_us": round(med["p99_ns"] / 1000, 3),
                     "p999_us": round(med["p999_ns"] / 1000, 3),
                     "ops_per_s": round(1e9 / med["mean_ns"], 1),
                     "samples": int(sum(r["n"] for r in runs))})
    by = {r["key"]: r for r in rows}
    rows.append({"path": "iopart guest -> guest, 1500 B frames, Gbit/s (median round)",
                 "key": "gbps", "p50_us": None, "p99_us": None, "p999_us": None,
                 "ops_per_s": round(float(np.median(gbps)) * 1e9 / 12000, 1)})
    ratios = {
        "g2g_rt_p50_us": by["g2g 64"]["p50_us"],
        "uplink_rt_vs_veth": ratio(by["uplink 64"]["p50_us"], by["veth 64"]["p50_us"]),
        "gbit_per_s_1500": round(float(np.median(gbps)), 3),
        "g2g_1500_rt_p50_us": by["g2g 1500"]["p50_us"],
        "uplink_1500_rt_vs_veth": ratio(by["uplink 1500"]["p50_us"], by["veth 1500"]["p50_us"]),
        "tap_echo_p50_us": by["tap 64"]["p50_us"],
    }
    return {
        "bench": "net",
        "quick": quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "iopart bench net" + (" --quick" if quick else ""),
        "seconds": round(time.monotonic() - t_start, 1),
        "host": {"cpus": os.cpu_count(), "switch_cpu": cpu_sw, "guest_cpu": cpu_g,
                 "kernel": os.uname().release},
        "plan": plan,
        "rows": rows,
        "ratios": ratios,
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "met": {k: (ratios[k] <= v if op == "<=" else ratios[k] >= v)
                for k, (op, v) in TARGETS.items()},
        "counters": counters,
        "notes": ("round trips: p50 of all samples over interleaved rounds (iopart) or the "
                  "median round of pktecho's own percentiles (limits). Guests spin with "
                  "sched_yield on one CPU, the switch spins on the other; pktecho blocks. "
                  "The uplink path echoes with pktecho in the uplink's namespace. "
                  "Throughput counts frames guest B received (its 256 buffers); the ops/s "
                  "column of that row is frames/s"),
        "frames_per_s_1500": [round(g * 1e9 / 12000) for g in gbps],
        "mac_b": format_mac(guest_mac(2)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iopart bench net")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    doc = run(a.quick)
    report.save(doc)
    print(json.dumps({k: doc[k] for k in ("ratios", "met", "seconds")}) if a.json
          else json.dumps(doc["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
